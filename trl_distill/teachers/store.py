"""An offline teacher store: the teacher's top-k targets for every response position of a dataset, on disk.

Layout of a store directory (written by [`~trl_distill.teachers.cache.cache_teacher`]):

```
plan.json                 settings fixed when the store was started (a resumed run must match them)
shard-00000.safetensors   keys (R, 16) uint8 | offsets (R + 1,) int64 | entries (P, k + 1) int32
shard-00000.json          the shard's record, written once its file is complete: rows, positions, bytes, sha256
...
manifest.json             plan + every shard's record + per-split row counts and fingerprints; written last
```

`manifest.json` records `manifest_sha256`, the sha256 of its own canonical JSON without that key
([`manifest_sha256`]); a student trained from the store records the same digest in its receipt. A manifest whose
content no longer matches it (an edited `temperature` or `top_k`, say) is refused when the store is opened.

Rows are found by content, not by position: a row's key is a hash of its token ids and labels exactly as the collator
gives them to the model. Shuffling, another `seed` or a subset of the cached rows therefore read the right targets,
and a row the store does not hold (another dataset, tokenizer or `max_length`) is an error, never a wrong target.
`entries` hold, for each response position of the row in order (positions `i` whose label `i + 1` is not -100), the
[`codec`](codec.py) words of the teacher's top-k.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from typing import Any

import torch

from ..digests import file_sha256, json_sha256, tokenizer_sha256
from ..losses import TopKTargets
from . import codec


STORE_FORMAT = "trl_distill.teacher_store"
STORE_VERSION = 1
MANIFEST = "manifest.json"
PLAN = "plan.json"
_KEY_BYTES = 16
MANIFEST_DIGEST = "manifest_sha256"


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def row_key(input_ids: torch.Tensor, labels: torch.Tensor) -> bytes:
    """The 16-byte content key of one unpadded row: its token ids and its labels (-100 where not in the loss)."""
    data = torch.stack([torch.as_tensor(input_ids).long().cpu(), torch.as_tensor(labels).long().cpu()])
    return hashlib.blake2b(data.numpy().tobytes(), digest_size=_KEY_BYTES).digest()


def batch_row_keys(inputs: dict[str, torch.Tensor]) -> list[bytes]:
    """Content keys of the rows of a collated (right- or left-padded) batch, from `attention_mask`."""
    if "attention_mask" not in inputs:
        raise ValueError(
            "An offline teacher store matches rows by their tokens, which needs the batch's `attention_mask`; "
            "padding-free batches (`padding_free=True` or packing) are not supported with `teacher_cache`."
        )
    mask = inputs["attention_mask"].bool()
    return [row_key(ids[m], labels[m]) for ids, labels, m in zip(inputs["input_ids"], inputs["labels"], mask)]


def dataset_row_keys(dataset, batch_size: int = 1000) -> Iterable[bytes]:
    """Content keys of the rows of a prepared (tokenized, with `labels`) dataset, in order."""
    for batch in dataset.select_columns(["input_ids", "labels"]).iter(batch_size=batch_size):
        for ids, labels in zip(batch["input_ids"], batch["labels"]):
            yield row_key(torch.as_tensor(ids), torch.as_tensor(labels))


def fingerprint(keys: Iterable[bytes]) -> str:
    """Order-free fingerprint of a set of rows (sha256 of their sorted keys)."""
    digest = hashlib.sha256()
    for key in sorted(keys):
        digest.update(key)
    return digest.hexdigest()


def tokenization_settings(trainer) -> dict[str, Any]:
    """The settings of an `SFTTrainer` (or `DistillTrainer`) that decide the rows' tokens and labels."""
    args = trainer.args
    return {
        "max_length": args.max_length,
        "truncation_mode": args.truncation_mode,
        "completion_only_loss": trainer.completion_only_loss,
        "assistant_only_loss": args.assistant_only_loss,
        "dataset_text_field": args.dataset_text_field,
        "eos_token": args.eos_token,
        "chat_template_path": args.chat_template_path,
        "packing": args.packing,
        "padding_free": trainer.padding_free,
    }


def manifest_sha256(manifest: dict) -> str:
    """sha256 of the canonical JSON of a store manifest without its `manifest_sha256` key."""
    return json_sha256({key: value for key, value in manifest.items() if key != MANIFEST_DIGEST})


def seal_manifest(manifest: dict) -> dict:
    """`manifest` with its `manifest_sha256` set (what `cache_teacher` writes)."""
    body = {key: value for key, value in manifest.items() if key != MANIFEST_DIGEST}
    return {**body, MANIFEST_DIGEST: manifest_sha256(body)}


def read_manifest(path: str) -> dict:
    """Open the manifest of the store at `path` and check it is intact; each error names the file, field and fix.

    Raises:
        FileNotFoundError: no `manifest.json` (an unfinished or missing store).
        ValueError: not JSON, not a version-1 store, no `manifest_sha256`, or a content that does not hash to it (the
            message names the fields that differ from `plan.json`, e.g. an edited `temperature`).
    """
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.isfile(manifest_path):
        hint = (
            "its write was not finished: run `trl-distill cache-teacher` again with the same settings to resume it"
            if os.path.isfile(os.path.join(path, PLAN))
            else "create it with `trl-distill cache-teacher` (or `trl_distill.cache_teacher`)"
        )
        raise FileNotFoundError(f"`teacher_cache={path!r}` has no {MANIFEST}: {hint}.")
    try:
        with open(manifest_path, encoding="utf-8") as handle:
            manifest = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(
            f"`teacher_cache={path!r}`: {MANIFEST} is not valid JSON ({error}); the file was damaged or edited. "
            "Re-run `trl-distill cache-teacher` with the original settings into an empty directory."
        ) from None
    kind = (manifest.get("format"), manifest.get("version")) if isinstance(manifest, dict) else None
    if kind != (STORE_FORMAT, STORE_VERSION):
        raise ValueError(
            f"`teacher_cache={path!r}`: {MANIFEST} is not a version-{STORE_VERSION} trl_distill teacher store "
            f"(format, version: {kind if kind is not None else type(manifest).__name__!r})."
        )
    recorded = manifest.get(MANIFEST_DIGEST)
    if recorded is None:
        raise ValueError(
            f"`teacher_cache={path!r}`: {MANIFEST} records no `{MANIFEST_DIGEST}` (written by an older trl_distill), "
            "so its settings cannot be trusted. Re-run `trl-distill cache-teacher` into an empty directory."
        )
    computed = manifest_sha256(manifest)
    if computed != recorded:
        raise ValueError(
            f"`teacher_cache={path!r}`: {MANIFEST} was edited after the store was written (its content hashes to "
            f"{computed[:12]}..., it records `{MANIFEST_DIGEST}` {str(recorded)[:12]}...)"
            f"{_edited_fields(path, manifest)}. "
            "The stored targets are exact only for the settings they were computed with: restore the original "
            f"{MANIFEST}, or re-run `trl-distill cache-teacher` with the settings you want into an empty directory."
        )
    return manifest


def _edited_fields(path: str, manifest: dict) -> str:
    """`; fields that differ from plan.json: ...` when `plan.json` is there to compare with, else ``."""
    try:
        with open(os.path.join(path, PLAN), encoding="utf-8") as handle:
            plan = json.load(handle)
    except (OSError, ValueError):
        return ""
    changed = [
        f"`{key}` {plan[key]!r} -> {manifest.get(key)!r}"
        for key in sorted(plan)
        if key != "shards" and manifest.get(key) != plan[key]
    ]
    return f"; fields that differ from {PLAN}: {', '.join(changed)}" if changed else ""


def write_json(path: str, data: dict) -> None:
    """Write atomically: a reader (or a resumed run) sees the old file or the new one, never half of one."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as handle:
        json.dump(data, handle, indent=1, sort_keys=True)
    os.replace(tmp, path)


def write_shard(directory: str, index: int, keys: list[bytes], counts: list[int], entries: torch.Tensor) -> dict:
    """Write one shard file atomically and return its record (file, rows, positions, bytes, sha256)."""
    from safetensors.torch import save_file

    path = os.path.join(directory, shard_name(index))
    offsets = torch.zeros(len(counts) + 1, dtype=torch.int64)
    offsets[1:] = torch.as_tensor(counts, dtype=torch.int64).cumsum(0)
    tensors = {
        "keys": torch.frombuffer(bytearray(b"".join(keys)), dtype=torch.uint8).reshape(len(keys), _KEY_BYTES),
        "offsets": offsets,
        "entries": entries.contiguous(),
    }
    tmp = f"{path}.tmp{os.getpid()}"
    # One metadata key: safetensors writes a map's keys in no fixed order, and a resumed shard must be byte-identical.
    save_file(tensors, tmp, metadata={"format": f"{STORE_FORMAT}/{STORE_VERSION}"})
    os.replace(tmp, path)
    return {
        "file": shard_name(index),
        "rows": len(keys),
        "positions": int(offsets[-1]),
        "bytes": os.path.getsize(path),
        "sha256": file_sha256(path),
    }


class TeacherStore:
    """Read access to a finished store: verification against a training run, and per-batch targets.

    Opening a store checks its manifest against its `manifest_sha256` ([`read_manifest`]).

    Args:
        path (`str`): the store directory (it holds `manifest.json`).
        verify_hashes (`bool`): check every shard's size and sha256 against the manifest now (a corrupted or
            truncated shard is reported by name).
    """

    def __init__(self, path: str, *, verify_hashes: bool = True, progress: bool = True):
        self.path = os.fspath(path)
        self.manifest = read_manifest(self.path)
        self.top_k = self.manifest["top_k"]
        self.vocab_size = self.manifest["vocab_size"]
        if verify_hashes:
            self.verify_files(progress=progress)
        self._handles: dict[int, Any] = {}
        self._index: dict[bytes, tuple[int, int, int]] | None = None

    @property
    def teacher_record(self) -> dict[str, Any]:
        """What a receipt records of the teacher behind this store: its manifest's teacher, tokenizer and digest."""
        record = dict(self.manifest.get("teacher") or {})
        record["tokenizer_sha256"] = self.manifest.get("tokenizer_sha256")
        record["vocab_size"] = self.vocab_size
        record["store"] = {
            "manifest_sha256": self.manifest[MANIFEST_DIGEST],
            "top_k": self.top_k,
            "temperature": self.manifest.get("temperature"),
            "splits": {name: info.get("fingerprint") for name, info in self.manifest["splits"].items()},
        }
        return record

    def verify_files(self, *, progress: bool = True) -> None:
        """Every shard of the manifest exists, has its recorded size and sha256; raise naming the first that does not."""
        from tqdm.auto import tqdm

        for record in tqdm(self.manifest["shards"], desc="Verifying teacher store", disable=not progress):
            path = os.path.join(self.path, record["file"])
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"Teacher store {self.path!r}: shard {record['file']} listed in {MANIFEST} is missing. Re-run "
                    "`trl-distill cache-teacher` with the same settings to rewrite it."
                )
            size = os.path.getsize(path)
            if size != record["bytes"]:
                raise ValueError(
                    f"Teacher store {self.path!r}: shard {record['file']} has {size} bytes, {MANIFEST} records "
                    f"{record['bytes']} (truncated or overwritten). Delete it and its .json, then re-run "
                    "`trl-distill cache-teacher` with the same settings."
                )
            if file_sha256(path) != record["sha256"]:
                raise ValueError(
                    f"Teacher store {self.path!r}: shard {record['file']} does not match its sha256 in {MANIFEST} "
                    "(the file is corrupted). Delete it and its .json, then re-run `trl-distill cache-teacher` with "
                    "the same settings."
                )

    def check_run(self, *, tokenizer, vocab_size: int, top_k: int, temperature: float, tokenization: dict) -> None:
        """Refuse a training run the store's targets are not exact for; each error names the field and the fix."""
        where = f"the teacher store at {self.path!r}"
        if self.manifest["tokenizer_sha256"] != tokenizer_sha256(tokenizer):
            raise ValueError(
                f"The student's tokenizer differs from the one {where} was tokenized with (tokenizer sha256 "
                f"{self.manifest['tokenizer_sha256'][:12]}... in {MANIFEST}): its rows would not match. Pass the "
                "tokenizer the store was built with as `processing_class`, or re-run `trl-distill cache-teacher` with "
                "this one."
            )
        if vocab_size != self.vocab_size:
            raise ValueError(f"The student's vocabulary has {vocab_size} tokens, {where} {self.vocab_size}.")
        if top_k > self.top_k:
            raise ValueError(
                f"`kd_top_k={top_k}` needs more entries than {where} holds (k={self.top_k}): set `kd_top_k` <= "
                f"{self.top_k} (a smaller k is folded exactly), or re-run `trl-distill cache-teacher` with "
                f"`kd_top_k={top_k}`."
            )
        if float(temperature) != float(self.manifest["temperature"]):
            raise ValueError(
                f"`kd_temperature={temperature}` differs from the temperature {where} was computed at "
                f"({self.manifest['temperature']}). Its log-probabilities are exact at that temperature only (the "
                "'other' bucket's mass at another temperature depends on the tokens that were dropped): set "
                f"`kd_temperature={self.manifest['temperature']}` or re-run `trl-distill cache-teacher` with "
                f"`kd_temperature={temperature}`."
            )
        for name, stored in self.manifest["tokenization"].items():
            if tokenization.get(name) != stored:
                raise ValueError(
                    f"`{name}={tokenization.get(name)!r}` differs from the tokenization {where} was computed with "
                    f"(`{name}={stored!r}`): its rows would not match. Use `{name}={stored!r}` or re-run "
                    "`trl-distill cache-teacher` with these settings."
                )

    def _build_index(self) -> dict[bytes, tuple[int, int, int]]:
        """key -> (shard, first position, number of positions), from every shard's small `keys`/`offsets` tensors."""
        index = {}
        for shard, record in enumerate(self.manifest["shards"]):
            handle = self._handle(shard)
            keys, offsets = handle.get_tensor("keys"), handle.get_tensor("offsets").tolist()
            for row, key in enumerate(keys.numpy()):
                index[key.tobytes()] = (shard, offsets[row], offsets[row + 1] - offsets[row])
        return index

    @property
    def index(self) -> dict[bytes, tuple[int, int, int]]:
        if self._index is None:
            self._index = self._build_index()
        return self._index

    def _handle(self, shard: int):
        if shard not in self._handles:
            from safetensors import safe_open

            self._handles[shard] = safe_open(os.path.join(self.path, self.manifest["shards"][shard]["file"]), "pt")
        return self._handles[shard]

    def check_dataset(self, dataset, name: str) -> None:
        """Every row of a prepared dataset must be in the store; otherwise name the first missing row and the fix."""
        keys = list(dataset_row_keys(dataset))
        missing = [row for row, key in enumerate(keys) if key not in self.index]
        if missing:
            splits = ", ".join(
                f"{split!r}: {info['fingerprint'][:12]}..." for split, info in self.manifest["splits"].items()
            )
            raise ValueError(
                f"{len(missing)} of the {len(keys)} rows of the {name} dataset are not in the teacher store at "
                f"{self.path!r} (first: row {missing[0]}). The store was computed on another dataset or tokenization "
                f"(store fingerprints {splits}; this dataset {fingerprint(keys)[:12]}...). Re-run "
                "`trl-distill cache-teacher` on this dataset."
            )

    def read(self, key: bytes) -> torch.Tensor:
        """The `(positions, k + 1)` int32 words of one row."""
        try:
            shard, start, count = self.index[key]
        except KeyError:
            raise KeyError(
                f"A batch row is not in the teacher store at {self.path!r}: the dataset changed after the store was "
                "verified, or the collator differs from the one it was written with."
            ) from None
        return self._handle(shard).get_slice("entries")[start : start + count]

    def targets(self, inputs: dict[str, torch.Tensor], top_k: int) -> TopKTargets:
        """The teacher's top-`top_k` targets of a collated batch, aligned with `labels[:, 1:]`.

        Returns `TopKTargets` with `ids` `(B, T - 1, top_k)` and `log_probs` `(B, T - 1, top_k + 1)` on the labels'
        device; positions whose shifted label is -100 hold zeros (they are not in the loss).
        """
        labels = inputs["labels"]
        in_loss = labels[:, 1:] != -100
        rows = [self.read(key) for key in batch_row_keys(inputs)]
        for row, (words, expected) in enumerate(zip(rows, in_loss.sum(-1).tolist())):
            if words.shape[0] != expected:
                raise ValueError(
                    f"Teacher store {self.path!r}: batch row {row} has {expected} positions in the loss but its "
                    f"stored row has {words.shape[0]}."
                )
        flat = codec.fold(codec.decode(torch.cat(rows), self.vocab_size), top_k)
        ids = labels.new_zeros((*in_loss.shape, top_k))
        log_probs = torch.zeros((*in_loss.shape, top_k + 1), dtype=torch.float32, device=labels.device)
        ids[in_loss] = flat.ids.to(labels.device)
        log_probs[in_loss] = flat.log_probs.to(labels.device)
        return TopKTargets(ids, log_probs)
