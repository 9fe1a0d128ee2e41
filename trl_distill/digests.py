"""The digests that identify what a distilled model was made from: teacher weights, tokenizers, files, JSON records.

One definition each, shared by the receipt (`provenance`), the offline teacher store (`teachers.store`) and
`trl-distill verify --replay`, so the same teacher gets the same `weights_sha256` wherever it is recorded.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any


__all__ = ["file_sha256", "json_sha256", "tokenizer_sha256", "weights_sha256"]

_BLOCK = 1 << 22


def weights_sha256(model) -> str | None:
    """sha256 over the names, dtypes, shapes and bytes of `model.state_dict()`, sorted by name.

    Tied weights count under each name, buffers are included. `None` when the weights are not all materialized here
    (meta tensors, DeepSpeed ZeRO-3 shards), so a partial view is never recorded as the model's digest.
    """
    import torch
    from tqdm.auto import tqdm

    state = getattr(model, "module", model).state_dict()  # a DDP wrapper prefixes every name with `module.`
    digest = hashlib.sha256()
    for name in tqdm(sorted(state), desc="Hashing teacher weights", disable=len(state) < 1000):
        tensor = state[name]
        if tensor.is_meta or hasattr(tensor, "ds_shape"):
            return None
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(memoryview(flat.view(torch.uint8).numpy()))
    return digest.hexdigest()


def tokenizer_sha256(tokenizer) -> str | None:
    """sha256 of what decides token ids: vocabulary, merges, normalization, added tokens, chat template, bos/eos.

    `tokenizer` may be a processor (its `.tokenizer` is hashed); `None` for `None` or an object without a vocabulary.
    """
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    if tokenizer is None or not hasattr(tokenizer, "get_vocab"):
        return None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state: Any = json.loads(backend.to_str())
        for volatile in ("truncation", "padding"):  # set by the last call with `padding=`/`truncation=`
            state.pop(volatile, None)
    else:
        state = sorted(tokenizer.get_vocab().items())
    state = {
        "backend": state,
        "chat_template": getattr(tokenizer, "chat_template", None),
        "bos": getattr(tokenizer, "bos_token", None),
        "eos": getattr(tokenizer, "eos_token", None),
    }
    return hashlib.sha256(json.dumps(state, sort_keys=True, default=str).encode()).hexdigest()


def file_sha256(path: str | os.PathLike, progress=None) -> str:
    """sha256 of a file's bytes (read in blocks; `progress.update(n)` is called per block when given)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_BLOCK):
            digest.update(block)
            if progress is not None:
                progress.update(len(block))
    return digest.hexdigest()


def json_sha256(value: Any) -> str:
    """sha256 of the canonical JSON of `value` (keys sorted, no whitespace, UTF-8): same content, same digest."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
