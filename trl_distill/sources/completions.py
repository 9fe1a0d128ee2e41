"""Where a training step's completions come from: the dataset, the student's own samples, or fresh teacher text.

GKD ([Agarwal et al. 2024](https://huggingface.co/papers/2306.13649)): with probability `lmbda` an optimizer step is
*on-policy*: the student samples a completion for each prompt of the batch (`temperature`, `top_p`, `top_k`,
`max_completion_length`) and the step's distillation loss (any mode, e.g. token-level KD with any `objective`,
`kd_temperature`, `kd_top_k`, `alpha`) is taken on those tokens, which the teacher then scores. The other steps use
the dataset's completions, or with `seq_kd=True` completions the teacher generates for the batch's prompts.

This is a completion *source* (where the samples come from), not a mode: any mode with
`supports_generated_completions = True` trains on what it returns. The trainer builds one when `lmbda > 0` or
`seq_kd=True` and calls [`CompletionSource.resample`] from `get_batch_samples`, before the accumulation window's token
count (`num_items_in_batch`) is taken, so that count covers the generated tokens. The coin ([`on_policy_coin`]) is a
function of `(seed, global_step)` only: every rank draws the same side without communicating, and a resumed run
draws the same sides again.
"""

from __future__ import annotations

import random
import warnings
from typing import Any

import torch
from torch import nn

from ..inference import eval_mode
from ..teachers.generation import (
    eos_token_ids,
    generate_completion_ids,
    generation_kwargs,
    teacher_generation_settings,
)


def on_policy_coin(seed: int, step: int, lmbda: float) -> bool:
    """
    Whether optimizer step `step` is on-policy: `True` with probability `lmbda`, the same on every rank.

    The draw comes from a generator seeded with the string `"{seed}:{step}"` (hashed with SHA-512 by `random.Random`,
    so it does not depend on `PYTHONHASHSEED`, the process or the global RNG state). `lmbda=0` is never on-policy and
    `lmbda=1` always is.
    """
    return random.Random(f"{seed}:{step}").random() < lmbda


def completion_starts(labels: torch.Tensor, attention_mask: torch.Tensor) -> list[int]:
    """Per row, the index of the first token in the loss: the prompt is every token before it."""
    in_loss = labels != -100
    starts = []
    for row in range(labels.shape[0]):
        hits = in_loss[row].nonzero()
        starts.append(int(hits[0]) if hits.numel() else int(attention_mask[row].sum()))
    if any(start == 0 for start in starts):
        raise ValueError(
            "A row of the batch has no prompt (its first token is already in the loss), so there is nothing to "
            "generate a completion from. On-policy steps (`lmbda > 0`) and `seq_kd=True` need prompt/completion data "
            "with `completion_only_loss` left on."
        )
    return starts


def completion_batch(
    prompts: list[list[int]], completions: list[list[int]], *, pad_token_id: int, device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """
    A right-padded training batch of `prompt + completion` rows whose loss positions are the completion tokens.

    Args:
        prompts (`list[list[int]]`): Prompt ids per row.
        completions (`list[list[int]]`): Completion ids per row, already cut after their first EOS (see
            [`~trl_distill.teachers.generation.generate_completion_ids`]): nothing after it is in the batch.
        pad_token_id (`int`): Padding id of `input_ids`.

    Returns:
        `dict` with `input_ids`, `attention_mask` (1 on prompt and completion) and `labels` (the completion ids, -100
        on the prompt and on padding), each `(B, max_len)`.
    """
    width = max(len(p) + len(c) for p, c in zip(prompts, completions))
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, -100)
    for row, (prompt, completion) in enumerate(zip(prompts, completions)):
        ids = torch.as_tensor(list(prompt) + list(completion), dtype=torch.long)
        input_ids[row, : len(ids)] = ids
        attention_mask[row, : len(ids)] = 1
        labels[row, len(prompt) : len(ids)] = ids[len(prompt) :]
    return {
        k: v.to(device)
        for k, v in {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}.items()
    }


class CompletionSource:
    """Replaces the completions of an accumulation window's micro-batches on on-policy / `seq_kd` steps, and logs
    per step `on_policy` (1 or 0), `teacher_generated` (1 or 0) and `completion_length` (mean completion tokens per
    row, whatever the source) to `metrics`.

    Args:
        args (`DistillConfig`): Reads `lmbda`, `seq_kd`, `seed`, the sampling fields and the gradient-checkpointing
            settings.
        tokenizer (`PreTrainedTokenizerBase`): The student's text tokenizer (padding and end-of-sequence ids).
        teacher (`nn.Module` or `None`): The placed teacher, for `seq_kd` steps.
        accelerator (`accelerate.Accelerator`): Unwraps the models for generation and sums the logged counts over
            processes.
        metrics ([`~trl_distill.modes.MetricsSink`]): Where the per-step values go (anything with
            `log(values: dict[str, float])`).
    """

    def __init__(self, args, *, tokenizer, teacher: nn.Module | None, accelerator, metrics):
        self.args = args
        self.tokenizer = tokenizer
        self.teacher = teacher
        self.accelerator = accelerator
        self.metrics = metrics
        pad_id = tokenizer.pad_token_id
        self.pad_id = pad_id if pad_id is not None else tokenizer.eos_token_id
        self.student_kwargs = generation_kwargs(
            max_completion_length=args.max_completion_length,
            do_sample=True,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
        )
        self.teacher_kwargs = generation_kwargs(**teacher_generation_settings(args))

    def resample(self, batches: list[dict], *, step: int, student: nn.Module) -> list[dict]:
        """The window's micro-batches, with completions from the source the coin of optimizer step `step` picks.

        `student` is the model the trainer steps (possibly wrapped by DDP / DeepSpeed); it samples on-policy steps.
        """
        args = self.args
        if not batches:  # the data ran out (every rank alike: the dataloader is sharded evenly)
            return batches
        on_policy = on_policy_coin(args.seed, step, args.lmbda)
        teacher = args.seq_kd and not on_policy
        if on_policy:
            batches = [self._generate(batch, student) for batch in batches]
        elif teacher:
            batches = [self._generate(batch, None) for batch in batches]
        self._log(batches, on_policy=on_policy, teacher=teacher)
        return batches

    def _generate(self, batch: dict, student: nn.Module | None) -> dict:
        from trl.models import unwrap_model_for_generation

        if "attention_mask" not in batch:  # padding-free batches: one flattened row, no prompt boundaries to find
            raise ValueError(
                "On-policy / `seq_kd` steps need padded batches: set `packing=False` and `padding_free=False`."
            )
        starts = completion_starts(batch["labels"], batch["attention_mask"])
        prompts = [batch["input_ids"][row, :start].tolist() for row, start in enumerate(starts)]
        if student is not None:
            checkpointing = self.args.activation_checkpointing_kwargs or self.args.gradient_checkpointing_kwargs
            context = unwrap_model_for_generation(
                student, self.accelerator, gradient_checkpointing_kwargs=checkpointing
            )
            kwargs = self.student_kwargs
        else:
            context = unwrap_model_for_generation(self.teacher, self.accelerator)
            kwargs = self.teacher_kwargs
        with warnings.catch_warnings():
            # TRL 1.16's unwrap helper calls transformers' deprecated `is_gradient_checkpointing` alias at every step.
            warnings.filterwarnings("ignore", ".*gradient_checkpointing.* is deprecated", FutureWarning)
            return self._generate_in(context, prompts, kwargs, batch["input_ids"].device)

    def _generate_in(self, context, prompts: list[list[int]], kwargs: dict[str, Any], device) -> dict:
        with context as model, eval_mode(model):
            completions, _ = generate_completion_ids(
                model,
                prompts,
                pad_token_id=self.pad_id,
                eos_ids=eos_token_ids(model, self.tokenizer),
                generation_kwargs=kwargs,
            )
        return completion_batch(prompts, completions, pad_token_id=self.pad_id, device=device)

    def _log(self, batches: list[dict], *, on_policy: bool, teacher: bool) -> None:
        accelerator = self.accelerator
        tokens = sum(int((b["labels"] != -100).sum()) for b in batches)
        rows = sum(b["labels"].shape[0] for b in batches)
        local = torch.tensor([tokens, rows], dtype=torch.float32, device=accelerator.device)
        tokens, rows = accelerator.gather(local.unsqueeze(0)).sum(0).tolist()
        length = tokens / max(rows, 1)
        self.metrics.log(
            {"on_policy": float(on_policy), "teacher_generated": float(teacher), "completion_length": length}
        )


def check_prompt_column(dataset, args) -> None:
    """Refuse, before tokenization, on-policy / `seq_kd` training on rows without a prompt to generate from."""
    if not (args.lmbda > 0 or args.seq_kd) or dataset is None:
        return
    columns = list(getattr(dataset, "column_names", None) or [])
    if columns and "prompt" not in columns and "input_ids" not in columns:
        raise ValueError(
            f"`lmbda={args.lmbda}` / `seq_kd={args.seq_kd}` generate a completion for each row's prompt, but the "
            f"training dataset has no `prompt` column (columns: {columns}). Use a prompt/completion dataset "
            "(`prompt` and `completion` columns, plain text or messages) or a `messages` dataset (each conversation "
            "is split at its final assistant turn, see `trl_distill.conversation`)."
        )
