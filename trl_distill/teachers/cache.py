"""Writing an offline teacher store: run the teacher once over a dataset, keep its top-k at every response position.

The dataset is tokenized by TRL's own `SFTTrainer` (its dataset preparation and collator, with the training run's
`DistillConfig`), so the rows are exactly the ones `DistillTrainer` will see. Writing is streamed shard by shard
(memory bounded by one shard, whatever the dataset size), batched, with a progress bar; a shard is written to a
temporary file and renamed, then recorded, so an interrupted run resumes at the first unrecorded shard and gives the
same files. Under `accelerate launch` / `torchrun`, process `r` of `n` writes shards `r, r + n, ...`, and the main
process writes the manifest once every shard is recorded; every process returns once the manifest exists.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import torch
from torch import nn

from ..batch import model_inputs
from ..conversation import as_prompt_completion
from ..digests import file_sha256, tokenizer_sha256, weights_sha256
from ..losses import teacher_top_k_targets
from . import codec
from .live import lm_head_and_backbone, load_teacher
from .store import (
    MANIFEST,
    PLAN,
    STORE_FORMAT,
    STORE_VERSION,
    batch_row_keys,
    fingerprint,
    seal_manifest,
    shard_name,
    tokenization_settings,
    write_json,
    write_shard,
)


logger = logging.getLogger(__name__)


def cache_teacher(
    teacher_model: str | nn.Module,
    train_dataset,
    *,
    args,
    eval_dataset=None,
    processing_class=None,
    batch_size: int | None = None,
    rows_per_shard: int = 1024,
    process_index: int | None = None,
    num_processes: int | None = None,
    progress: bool = True,
) -> dict | None:
    r"""Run the teacher over a dataset and store its top-k targets in `args.teacher_cache`.

    Pass the `DistillConfig` of the training run: `teacher_cache` (the store directory), `kd_top_k` (k),
    `kd_temperature` (the log-probabilities are stored at this temperature; training must use the same one) and the
    tokenization settings (`max_length`, `completion_only_loss`, ...) are read from it.

    Args:
        teacher_model (`str` or `PreTrainedModel`): the teacher, or its Hub id / local path (loaded with
            `args.teacher_model_init_kwargs`).
        train_dataset, eval_dataset (`datasets.Dataset`): any format `SFTTrainer` accepts (`messages` rows are split
            at their final assistant turn, as `DistillTrainer` splits them); `eval_dataset` may be a dict of datasets.
            Each becomes a split of the store.
        args ([`DistillConfig`]): the training configuration (see above).
        processing_class (*optional*): the **student's** tokenizer (the one training will use). Defaults to the
            teacher's, as `SFTTrainer` loads it.
        batch_size (`int`, *optional*): rows per teacher forward; defaults to `args.per_device_eval_batch_size`.
        rows_per_shard (`int`): rows per shard file (the unit of resumption and of memory).
        process_index, num_processes (`int`, *optional*): this process's share of the shards; default from
            `accelerate` (`accelerate launch` / `torchrun` set them).
        progress (`bool`): show a progress bar (on the main process).

    Returns:
        The manifest (`dict`), or `None` when `process_index`/`num_processes` were given and shards of other
        processes are still missing. Under `accelerate launch` / `torchrun` every process returns the manifest, once
        the main process has written it (a process that finishes its shards first waits for the others, up to the
        process group's timeout: `ddp_timeout`, 30 minutes by default).
    """
    from accelerate import PartialState
    from tqdm.auto import tqdm
    from trl import SFTTrainer

    store_dir, top_k = args.teacher_cache, args.kd_top_k
    if store_dir is None or top_k is None:
        raise ValueError(
            f"`cache_teacher` writes to `args.teacher_cache` the top `args.kd_top_k` entries; got "
            f"`teacher_cache={store_dir!r}`, `kd_top_k={top_k!r}`: set both."
        )
    if not isinstance(rows_per_shard, int) or rows_per_shard < 1:
        raise ValueError(f"`rows_per_shard` must be a positive integer, got {rows_per_shard!r}.")
    state = PartialState()
    distributed = process_index is None and state.num_processes > 1
    rank = state.process_index if process_index is None else process_index
    world = state.num_processes if num_processes is None else num_processes
    if not 0 <= rank < world:
        raise ValueError(f"`process_index={rank}` must be in [0, `num_processes`={world}).")

    teacher, source = load_teacher(
        teacher_model,
        args.teacher_model_init_kwargs,
        trust_remote_code=args.trust_remote_code,
        distributed=distributed,
    )
    # TRL's own dataset preparation and collator, with the training run's settings (not a re-implementation), after
    # the split of `messages` rows that `DistillTrainer` applies too (trl_distill/conversation.py).
    train_dataset, eval_dataset = as_prompt_completion(train_dataset), as_prompt_completion(eval_dataset)
    sft = SFTTrainer(
        model=teacher,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=processing_class,
    )
    teacher.eval()
    tokenizer = getattr(sft.processing_class, "tokenizer", sft.processing_class)
    vocab_size = len(tokenizer)
    if not top_k < vocab_size:
        raise ValueError(f"`kd_top_k={top_k}` must be below the vocabulary size ({vocab_size}).")
    codec.log_prob_bits(vocab_size)  # refuses vocabularies too large for 32-bit entries
    splits = {"train": sft.train_dataset}
    if isinstance(sft.eval_dataset, dict):
        splits.update({f"eval_{name}": dataset for name, dataset in sft.eval_dataset.items()})
    elif sft.eval_dataset is not None:
        splits["eval"] = sft.eval_dataset
    shards = []
    for split, dataset in splits.items():
        for start in range(0, len(dataset), rows_per_shard):
            end = min(start + rows_per_shard, len(dataset))
            shards.append({"file": shard_name(len(shards)), "split": split, "start": start, "end": end})
    plan = {
        "format": STORE_FORMAT,
        "version": STORE_VERSION,
        "teacher": {
            "name_or_path": source,
            "revision": (args.teacher_model_init_kwargs or {}).get("revision"),
            "dtype": str(next(teacher.parameters()).dtype).replace("torch.", ""),
            "weights_sha256": weights_sha256(teacher),
        },
        "tokenizer_sha256": tokenizer_sha256(tokenizer),
        "vocab_size": vocab_size,
        "top_k": top_k,
        "temperature": float(args.kd_temperature),
        "tokenization": tokenization_settings(sft),
        "encoding": {
            "entries": "int32 (positions, k + 1); see trl_distill/teachers/codec.py",
            "id_bits": codec.id_bits(vocab_size),
            "log_prob_bits": codec.log_prob_bits(vocab_size),
            "bytes_per_position": codec.bytes_per_position(top_k),
        },
        "splits": {split: {"rows": len(dataset)} for split, dataset in splits.items()},
        "rows_per_shard": rows_per_shard,
        "shards": shards,
    }
    os.makedirs(store_dir, exist_ok=True)
    check_or_write_plan(store_dir, plan)

    mine = [index for index in range(len(shards)) if index % world == rank]
    todo = [index for index in mine if shard_record(store_dir, shards[index]) is None]
    head, backbone = lm_head_and_backbone(teacher)
    batch_size = batch_size or args.per_device_eval_batch_size
    bar = tqdm(
        total=sum(shards[i]["end"] - shards[i]["start"] for i in todo),
        desc=f"Caching teacher top-{top_k}",
        unit="row",
        disable=not (progress and state.is_local_main_process),
    )
    for index in todo:
        shard = shards[index]
        dataset = splits[shard["split"]].select_columns(["input_ids", "labels"])
        keys, counts, entries = [], [], []
        for start in range(shard["start"], shard["end"], batch_size):
            rows = [dataset[i] for i in range(start, min(start + batch_size, shard["end"]))]
            batch = {k: v.to(sft.args.device) for k, v in sft.data_collator(rows).items()}
            entries.append(_batch_entries(batch, backbone, head, top_k, args, vocab_size))
            keys.extend(batch_row_keys(batch))
            counts.extend((batch["labels"][:, 1:] != -100).sum(-1).tolist())
            bar.update(len(rows))
        record = write_shard(store_dir, index, keys, counts, torch.cat(entries))
        write_json(os.path.join(store_dir, record["file"].replace(".safetensors", ".json")), record)
    bar.close()

    if not distributed:
        return finish_store(store_dir, plan)
    # Every process waits for the others' last shard, the main process writes the manifest, and every process
    # returns only once it exists: a script may open the store (e.g. build its `DistillTrainer`) right after.
    state.wait_for_everyone()
    if state.is_main_process and finish_store(store_dir, plan) is None:
        missing = [shard["file"] for shard in shards if shard_record(store_dir, shard) is None]
        raise RuntimeError(
            f"Teacher store {store_dir!r}: every process finished, but the main process does not see "
            f"{len(missing)} of the {len(shards)} shards ({', '.join(missing[:3])}...). With several machines, "
            "`teacher_cache` must be a directory they all share; re-run the same command to resume."
        )
    state.wait_for_everyone()
    with open(os.path.join(store_dir, MANIFEST)) as handle:
        return json.load(handle)


def _batch_entries(batch: dict, backbone, head, top_k: int, args, vocab_size: int) -> torch.Tensor:
    """The encoded `(positions, k + 1)` words of a batch's response positions, row by row in order."""
    inputs = model_inputs(batch)
    with torch.no_grad():
        hidden = backbone(**inputs, use_cache=False).last_hidden_state
    # Position i predicts token i + 1, as in the training loss.
    in_loss = batch["labels"][:, 1:] != -100
    targets = teacher_top_k_targets(
        hidden[:, :-1][in_loss],
        head.weight,
        teacher_bias=getattr(head, "bias", None),
        top_k=top_k,
        temperature=args.kd_temperature,
        vocab_size=vocab_size,
        chunk_size=args.kd_chunk_size,
    )
    return codec.encode(targets, vocab_size).cpu()


def check_or_write_plan(store_dir: str, plan: dict) -> None:
    path = os.path.join(store_dir, PLAN)
    if not os.path.isfile(path):
        write_json(path, plan)
        return
    with open(path) as handle:
        existing = json.load(handle)
    changed = sorted(key for key in set(plan) | set(existing) if plan.get(key) != existing.get(key))
    if changed:
        details = "; ".join(f"{key}: {_short(existing.get(key))} -> {_short(plan.get(key))}" for key in changed)
        raise ValueError(
            f"The teacher store at {store_dir!r} was started with other settings ({details}). Resume it with the "
            "original settings, or write to an empty `teacher_cache` directory."
        )


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 120 else text[:117] + "..."


def shard_record(store_dir: str, shard: dict) -> dict | None:
    """The record of a finished shard whose file still matches it, else None (the shard is (re)written)."""
    record_path = os.path.join(store_dir, shard["file"].replace(".safetensors", ".json"))
    shard_path = os.path.join(store_dir, shard["file"])
    if not (os.path.isfile(record_path) and os.path.isfile(shard_path)):
        return None
    with open(record_path) as handle:
        record = json.load(handle)
    if os.path.getsize(shard_path) != record["bytes"] or file_sha256(shard_path) != record["sha256"]:
        logger.warning("Teacher store %s: %s does not match its record; writing it again.", store_dir, shard["file"])
        return None
    return record


def finish_store(store_dir: str, plan: dict) -> dict | None:
    """Write the manifest once every shard is recorded (another process may still be writing some)."""
    from safetensors import safe_open

    records = [shard_record(store_dir, shard) for shard in plan["shards"]]
    missing = [shard["file"] for shard, record in zip(plan["shards"], records) if record is None]
    if missing:
        logger.info("Teacher store %s: %d shards still to write (%s...).", store_dir, len(missing), missing[0])
        return None
    manifest = dict(plan)
    manifest["shards"] = [{**shard, **record} for shard, record in zip(plan["shards"], records)]
    for split, info in manifest["splits"].items():
        keys = []
        for shard in manifest["shards"]:
            if shard["split"] == split:
                with safe_open(os.path.join(store_dir, shard["file"]), "pt") as handle:
                    keys.extend(key.tobytes() for key in handle.get_tensor("keys").numpy())
        info["fingerprint"] = fingerprint(keys)
        info["positions"] = sum(s["positions"] for s in manifest["shards"] if s["split"] == split)
    manifest["total_bytes"] = sum(shard["bytes"] for shard in manifest["shards"])
    manifest = seal_manifest(manifest)  # its digest, which the store and every student's receipt record
    write_json(os.path.join(store_dir, MANIFEST), manifest)
    return manifest
