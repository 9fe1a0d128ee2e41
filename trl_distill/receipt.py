"""The distillation receipt: a canonical, hashable, optionally signed record of how an artifact was made.

`distill_receipt.json` sits beside the weights:

```json
{
  "format": "trl-distill-receipt/1",
  "stages": [{"name": "distill", "method": "...", "models": {...}, "settings": {...}, "results": {...}, ...}],
  "artifacts": {"model.safetensors": {"bytes": 1234, "sha256": "..."}, ...},
  "content_id": "sha256:..."
}
```

- **Canonical form**: keys sorted, two-space indentation, UTF-8, floats rounded to 12 significant digits (then
  written in Python's shortest round-trip form, so parsing and re-serializing gives the same bytes), non-finite
  floats as the strings `"nan"`, `"inf"`, `"-inf"`.
- **Content id**: `sha256` of the canonical bytes of the receipt without its `content_id` key. It identifies the
  artifact (the receipt covers every file) and is repeated in the model card.
- **Artifacts**: every file under the output directory except the receipt, its signature, the model card (which
  quotes the content id), hidden files and `checkpoint-*` / `runs` directories.
- **Stages**: one entry per training stage (distill, then recovery, then DPO/GRPO...); `trl_distill.append_stage`
  adds one.
- **Card**: `{"model_name": ..., "tags": [...]}`, the inputs of the model card besides the stages (the card is a pure
  function of the receipt, see `model_card.card_text`).
- **Signature** (optional, `pip install trl_distill[sign]`): Ed25519 over the receipt's exact bytes, in
  `distill_receipt.sig`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .digests import file_sha256


__all__ = [
    "RECEIPT_NAME",
    "SIGNATURE_NAME",
    "canonical_bytes",
    "content_id",
    "generate_signing_key",
    "hash_artifacts",
    "hash_files",
    "load_receipt",
    "new_receipt",
    "sign_receipt",
    "signature_problem",
    "write_receipt",
]

logger = logging.getLogger(__name__)

FORMAT = "trl-distill-receipt/1"
RECEIPT_NAME = "distill_receipt.json"
SIGNATURE_NAME = "distill_receipt.sig"
CARD_NAME = "README.md"
_NOT_ARTIFACTS = {RECEIPT_NAME, SIGNATURE_NAME, CARD_NAME}
# Top-level directories that are not the model: resume state, TensorBoard logs, and sequence-KD's teacher-generation
# cache when an older default put it in the output directory (a cache of the training data, not to be published).
_SKIPPED_DIRS = ("checkpoint-", "runs", "teacher_generations")
_FLOAT_DIGITS = 12
_PROGRESS_BYTES = 256 << 20  # show a progress bar when hashing more than this


# ---- canonical form -------------------------------------------------------------------------------------------------


def normalize(value: Any, path: str = "receipt") -> Any:
    """The JSON value the canonical form writes: floats rounded to 12 significant digits, tuples as lists.

    Raises:
        TypeError: for a value JSON cannot hold (the message names where it is), or a non-string key.
    """
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
        return float(format(value, f".{_FLOAT_DIGITS}g"))
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"`{path}` has a non-string key {key!r}; receipts are JSON objects with string keys.")
            out[key] = normalize(item, f"{path}.{key}")
        return out
    if isinstance(value, (list, tuple)):
        return [normalize(item, f"{path}[{i}]") for i, item in enumerate(value)]
    raise TypeError(
        f"`{path}` is a {type(value).__name__} ({value!r}); a receipt holds only JSON values (convert it to str, a "
        "number, a list or a dict)."
    )


def canonical_bytes(receipt: Mapping) -> bytes:
    """The canonical serialization of `receipt` (see the module docstring): same content, same bytes."""
    text = json.dumps(normalize(receipt), sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False)
    return (text + "\n").encode("utf-8")


def content_id(receipt: Mapping) -> str:
    """`"sha256:<hex>"` of the canonical bytes of `receipt` without its `content_id` key."""
    body = {key: value for key, value in receipt.items() if key != "content_id"}
    return "sha256:" + hashlib.sha256(canonical_bytes(body)).hexdigest()


# ---- artifact files -------------------------------------------------------------------------------------------------


def artifact_paths(output_dir: str | os.PathLike) -> list[str]:
    """Relative POSIX paths of the files the receipt covers, sorted."""
    root = Path(output_dir)
    paths = []
    for directory, dirnames, filenames in os.walk(root):
        top = Path(directory) == root  # `checkpoint-*` and `runs` (TensorBoard) only at the top level
        dirnames[:] = sorted(d for d in dirnames if not (d.startswith(".") or top and d.startswith(_SKIPPED_DIRS)))
        for name in filenames:
            relative = (Path(directory) / name).relative_to(root).as_posix()
            if not name.startswith(".") and relative not in _NOT_ARTIFACTS:
                paths.append(relative)
    return sorted(paths)


def hash_files(root: str | os.PathLike, paths: list[str], desc: str = "Hashing artifact") -> dict[str, dict]:
    """`{path: {"sha256": hex, "bytes": size}}` for existing files `paths` under `root` (a progress bar when large)."""
    from tqdm.auto import tqdm

    root = Path(root)
    sizes = {p: (root / p).stat().st_size for p in paths if (root / p).is_file()}
    total = sum(sizes.values())
    with tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=total < _PROGRESS_BYTES) as bar:
        return {p: {"sha256": file_sha256(root / p, bar), "bytes": size} for p, size in sizes.items()}


def hash_artifacts(output_dir: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """`{relative path: {"sha256": hex, "bytes": size}}` for every artifact file of `output_dir` (see module doc)."""
    return hash_files(output_dir, artifact_paths(output_dir))


# ---- reading and writing --------------------------------------------------------------------------------------------


def receipt_path(location: str | os.PathLike) -> Path:
    """`location` itself if it is a file, else `location/distill_receipt.json`."""
    location = Path(location)
    return location if location.is_file() else location / RECEIPT_NAME


def load_receipt(location: str | os.PathLike) -> dict:
    """Parse the receipt at `location` (a receipt file or the directory holding one)."""
    path = receipt_path(location)
    if not path.is_file():
        raise FileNotFoundError(f"No {RECEIPT_NAME} at {path}: this directory was not saved by trl_distill.")
    try:
        receipt = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}).") from error
    if not isinstance(receipt, dict) or receipt.get("format") != FORMAT:
        raise ValueError(f"{path} is not a trl_distill receipt (expected `format` {FORMAT!r}).")
    return receipt


def new_receipt(output_dir: str | os.PathLike, stages: list[Mapping], card: Mapping | None = None) -> dict:
    """A receipt for `output_dir` as it is now: stages, the card's inputs, the hashes of its files and the content id.

    `card` is `{"model_name": str, "tags": [str, ...]}` (defaults: the directory's name, no extra tags).
    """
    card = {"model_name": Path(output_dir).resolve().name, "tags": [], **dict(card or {})}
    card["tags"] = sorted(set(card["tags"] or ()))
    body = {"format": FORMAT, "stages": list(stages), "card": card, "artifacts": hash_artifacts(output_dir)}
    receipt = normalize(body)
    receipt["content_id"] = content_id(receipt)
    return receipt


def write_receipt(output_dir: str | os.PathLike, receipt: Mapping) -> Path:
    """Write `receipt` canonically to `output_dir/distill_receipt.json`; a signature of an older receipt is removed."""
    path = Path(output_dir) / RECEIPT_NAME
    data = canonical_bytes(receipt)
    signature = Path(output_dir) / SIGNATURE_NAME
    if signature.exists() and (not path.exists() or path.read_bytes() != data):
        signature.unlink()
        logger.warning("Removed %s: it signed the previous receipt. Sign the new one with `sign_receipt`.", signature)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)  # never leave a half-written receipt
    return path


# ---- signing --------------------------------------------------------------------------------------------------------


def _ed25519():
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError as error:
        raise ImportError("Signing receipts needs `cryptography`: `pip install 'trl_distill[sign]'`.") from error
    return ed25519, serialization, InvalidSignature


def _key_id(public_key) -> str:
    _, serialization, _ = _ed25519()
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ed25519:" + hashlib.sha256(raw).hexdigest()[:16]


def generate_signing_key(private_path: str | os.PathLike, public_path: str | os.PathLike) -> str:
    """Create an Ed25519 key pair as PEM files (the private one readable by its owner only); return the key id."""
    ed25519, serialization, _ = _ed25519()
    key = ed25519.Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    descriptor = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as f:
        f.write(private_pem)
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    Path(public_path).write_bytes(public_pem)
    return _key_id(key.public_key())


def _load_key(path: str | os.PathLike, *, private: bool, field: str):
    ed25519, serialization, _ = _ed25519()
    if not Path(path).is_file():
        raise ValueError(
            f"`{field}` {str(path)!r} is not a file (an Ed25519 PEM key, e.g. from `generate_signing_key`)."
        )
    data = Path(path).read_bytes()
    try:
        key = (
            serialization.load_pem_private_key(data, password=None)
            if private
            else serialization.load_pem_public_key(data)
        )
    except (ValueError, TypeError) as error:
        kind = "private" if private else "public"
        raise ValueError(f"`{field}` {str(path)!r} is not a PEM {kind} key ({error}).") from error
    expected = ed25519.Ed25519PrivateKey if private else ed25519.Ed25519PublicKey
    if not isinstance(key, expected):
        raise ValueError(f"`{field}` {str(path)!r} is a {type(key).__name__}; receipts are signed with Ed25519 keys.")
    return key


def check_signing_key(private_key: str | os.PathLike) -> None:
    """Load the `receipt_signing_key` once, so a missing or wrong key fails before training rather than at save time."""
    _load_key(private_key, private=True, field="receipt_signing_key")


def sign_receipt(output_dir: str | os.PathLike, private_key: str | os.PathLike) -> Path:
    """Sign the exact bytes of `output_dir/distill_receipt.json` with an Ed25519 key into `distill_receipt.sig`."""
    key = _load_key(private_key, private=True, field="receipt_signing_key")
    path = receipt_path(output_dir)
    data = path.read_bytes()
    signature = {
        "algorithm": "ed25519",
        "content_id": load_receipt(path)["content_id"],
        "key_id": _key_id(key.public_key()),
        "signature": base64.b64encode(key.sign(data)).decode("ascii"),
    }
    out = path.parent / SIGNATURE_NAME
    out.write_bytes(canonical_bytes(signature))
    return out


def signature_problem(output_dir: str | os.PathLike, public_key: str | os.PathLike) -> str | None:
    """None when `distill_receipt.sig` is a valid signature of the receipt by `public_key`, else what is wrong."""
    _, _, invalid_signature = _ed25519()
    key = _load_key(public_key, private=False, field="public_key")
    path = receipt_path(output_dir)
    signature_file = path.parent / SIGNATURE_NAME
    if not signature_file.is_file():
        return f"{SIGNATURE_NAME}: missing, but a public key was given: the receipt is not signed."
    try:
        signature = json.loads(signature_file.read_text(encoding="utf-8"))
        raw_signature = base64.b64decode(signature["signature"], validate=True)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as error:
        return (
            f"{SIGNATURE_NAME}: not a trl_distill signature ({type(error).__name__}: {error}); sign the receipt "
            "again with `trl_distill.receipt.sign_receipt`."
        )
    if not isinstance(signature, dict):
        return f"{SIGNATURE_NAME}: not a trl_distill signature (a JSON {type(signature).__name__})."
    key_id = _key_id(key)
    if signature.get("key_id") != key_id:
        return (
            f"{SIGNATURE_NAME}: signed by key {signature.get('key_id')}, not by the given public key {key_id} "
            "(wrong key)."
        )
    try:
        key.verify(raw_signature, path.read_bytes())
    except invalid_signature:
        return (
            f"{SIGNATURE_NAME}: the signature by {key_id} does not match {RECEIPT_NAME} (content id now "
            f"{content_id(load_receipt(path))}, signed {signature.get('content_id')}): the receipt changed after "
            "signing."
        )
    return None
