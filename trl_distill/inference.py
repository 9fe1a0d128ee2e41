"""Running a model for inference, written once: unwrap it, put it in eval mode, left-pad prompts and generate.

Used by evaluation, the teacher's generations and store, the completion sources, preference pairs and feature KD.
Imports torch only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn


__all__ = ["eval_mode", "generate_text", "left_pad", "unwrap_model"]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside a DDP / DeepSpeed wrapper (`.module`) and a `PeftModel` (its base model)."""
    inner = getattr(model, "module", None)
    model = inner if isinstance(inner, nn.Module) else model
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@contextlib.contextmanager
def eval_mode(*models: nn.Module | None) -> Iterator[None]:
    """Eval mode (no dropout; gradient checkpointing inactive) under `torch.no_grad`, each model's train flag restored.

    `None` entries are skipped, so `eval_mode(student, teacher)` works without a teacher.
    """
    models = [model for model in models if model is not None]
    flags = [model.training for model in models]
    try:
        with torch.no_grad():
            for model in models:
                model.eval()
            yield
    finally:
        for model, flag in zip(models, flags):
            model.train(flag)


def left_pad(rows: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(input_ids, attention_mask)`, each `(B, max_len)`, rows aligned on the right (0 on the padding).

    Left padding makes every row's generated tokens start right after its own last prompt token.
    """
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, ids in enumerate(rows):
        if len(ids):
            input_ids[index, width - len(ids) :] = torch.as_tensor(list(ids), dtype=torch.long)
            attention_mask[index, width - len(ids) :] = 1
    return input_ids, attention_mask


def generate_text(model: nn.Module, tokenizer, prompts: Sequence[str], **generate_kwargs) -> list[str]:
    """Generate from plain-text prompts in one left-padded batch; the decoded new tokens of every returned sequence.

    Prompts are tokenized as in training (`tokenizer(text=...)`); padding uses the tokenizer's pad token (its EOS when
    it has none) and generation stops at `tokenizer.eos_token_id`. `generate_kwargs` go to `model.generate`
    (`max_new_tokens`, `do_sample`, `num_return_sequences`, ...). The caller sets eval mode ([`eval_mode`]).
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    batch = tokenizer(text=list(prompts), padding=True, padding_side="left", return_tensors="pt").to(device)
    output = model.generate(**batch, pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id, **generate_kwargs)
    return tokenizer.batch_decode(output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
