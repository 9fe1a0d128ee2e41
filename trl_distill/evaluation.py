"""Held-out measurements of a student against its teacher.

[`heldout_metrics`] scores prompt/completion rows with teacher forcing (KL in both directions, top-1 agreement,
perplexities), over completion tokens only; [`task_accuracy`] generates greedily and scores the answers. Both are
pure functions of the models and the rows: the demo calls them once at the end, callbacks call them at each eval.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from .conversation import is_messages_row, split_conversation
from .inference import eval_mode, generate_text


__all__ = ["generate_completions", "heldout_metrics", "task_accuracy", "tokenize_prompt_completion"]


def tokenize_prompt_completion(tokenizer, prompt: str | list, completion: str | list) -> tuple[list[int], list[int]]:
    """
    Tokenize one prompt/completion row exactly as TRL's `SFTTrainer` does, so metrics score the tokens training saw.

    Mirrors `SFTTrainer._prepare_dataset` (trl 1.16): for plain strings, `tokenizer.eos_token` is appended to the
    completion unless it already ends with it, then the prompt and prompt + completion are tokenized separately
    (`tokenizer(text=...)`, default special tokens), and the completion starts where the two token sequences stop
    agreeing (usually right after the prompt; earlier when a token merges across the boundary). Conversational rows
    (lists of messages) go through the chat template instead, the prompt with `add_generation_prompt=True`.

    Args:
        tokenizer (`PreTrainedTokenizerBase`): The tokenizer both models share.
        prompt (`str` or `list[dict]`): The prompt text, or its messages.
        completion (`str` or `list[dict]`): The completion text, or its messages.

    Returns:
        `tuple[list[int], list[int]]`: `input_ids` of prompt + completion, and `completion_mask` (1 on completion
        tokens, 0 on the prompt), of the same length.
    """
    if isinstance(prompt, str) != isinstance(completion, str):
        raise TypeError(
            "`prompt` and `completion` must both be strings or both be lists of messages, got "
            f"{type(prompt).__name__} and {type(completion).__name__}."
        )
    if isinstance(prompt, str):
        eos = tokenizer.eos_token
        if eos is not None and not completion.endswith(eos):
            completion = completion + eos
        prompt_ids = tokenizer(text=prompt)["input_ids"]
        full_ids = tokenizer(text=prompt + completion)["input_ids"]
    else:
        prompt_ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)
        full_ids = tokenizer.apply_chat_template(prompt + completion, tokenize=True, return_dict=True)
        prompt_ids, full_ids = prompt_ids["input_ids"], full_ids["input_ids"]
    prompt_len = 0
    for a, b in zip(prompt_ids, full_ids):
        if a != b:
            break
        prompt_len += 1
    return list(full_ids), [0] * prompt_len + [1] * (len(full_ids) - prompt_len)


def _rows(dataset: Any, columns: tuple[str, ...]) -> list[Mapping]:
    """Materialize a `datasets.Dataset` or an iterable of mappings as a list of rows that have `columns`."""
    rows = list(dataset)
    if not rows:
        raise ValueError("`dataset` is empty: there is nothing to measure.")
    missing = set(columns) - set(rows[0])
    if missing:
        raise ValueError(
            f"`dataset` rows need the columns {list(columns)}; missing {sorted(missing)} (got {sorted(rows[0])})."
        )
    return rows


def _check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive int, got {batch_size!r}.")


def _completion_logprobs(model, input_ids, attention_mask, positions, vocab_size):
    """
    Log-probabilities at the positions that predict completion tokens.

    Returns `[N, vocab_size]` float32 log-softmax (computed in fp32 whatever the model dtype), where `positions` is
    the `[B, T-1]` boolean mask of shifted positions whose next token is a completion token.
    """
    device = next(model.parameters()).device
    logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
    # Padded vocabularies (e.g. Qwen2.5: 151936 rows for 151665 tokens) hold logits no token maps to; both
    # distributions are renormalized over the shared first `vocab_size` entries.
    logits = logits[:, :-1, :vocab_size][positions.to(device)]
    return torch.log_softmax(logits.float(), dim=-1)


def _encode_row(tokenizer, row: Mapping) -> tuple[list[int], list[int]]:
    """`(input_ids, completion_mask)` of a raw prompt/completion row, or of a row already tokenized by `SFTTrainer`."""
    if "input_ids" not in row:
        if is_messages_row(row):  # the rule training follows: the final assistant turn is the completion (issue 12)
            row = split_conversation(row["messages"])
        return tokenize_prompt_completion(tokenizer, row["prompt"], row["completion"])
    ids = list(row["input_ids"])
    if row.get("labels") is not None:  # SFTTrainer's prepared rows: -100 on the tokens the loss skips
        mask = [int(label != -100) for label in row["labels"]]
    else:
        mask = next((row[k] for k in ("completion_mask", "assistant_masks") if row.get(k) is not None), None)
        mask = [1] * len(ids) if mask is None else list(mask)  # language-modeling rows: every token is scored
    if len(mask) != len(ids):
        raise ValueError(f"A tokenized row has {len(ids)} `input_ids` but a mask of {len(mask)} entries.")
    return ids, mask


def _heldout_rows(dataset: Any) -> list[Mapping]:
    rows = _rows(dataset, ())
    if "input_ids" not in rows[0] and not {"prompt", "completion"} <= set(rows[0]) and not is_messages_row(rows[0]):
        raise ValueError(
            "`dataset` rows need `prompt` and `completion` or `messages` (raw rows) or `input_ids` (rows tokenized by "
            f"SFTTrainer, with optional `labels` or `completion_mask`); got the columns {sorted(rows[0])}."
        )
    return rows


def _padded_batch(encoded: list[tuple[list[int], list[int]]], pad_id: int):
    width = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), width), dtype=torch.long)
    completion_mask = torch.zeros((len(encoded), width), dtype=torch.bool)
    for i, (ids, mask) in enumerate(encoded):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention_mask[i, : len(ids)] = 1
        completion_mask[i, : len(ids)] = torch.tensor(mask, dtype=torch.bool)
    return input_ids, attention_mask, completion_mask


def heldout_metrics(
    student,
    teacher,
    tokenizer,
    dataset,
    *,
    batch_size: int = 16,
    vocab_size: int | None = None,
) -> dict[str, float]:
    """
    Teacher-forced metrics of `student` (and `teacher`) on held-out rows.

    Raw prompt/completion rows are tokenized as TRL's `SFTTrainer` tokenizes them (see
    [`tokenize_prompt_completion`]); raw `messages` rows are first split at their final assistant turn, as
    `DistillTrainer` splits them for training ([`trl_distill.conversation`]), so only that turn is measured; rows that `SFTTrainer` already tokenized (`input_ids`, plus `labels` with -100 on
    skipped tokens, or a `completion_mask` / `assistant_masks`; without any, every token is scored) are used as they
    are. Rows are
    right-padded and run through both models. Every metric is a mean over completion tokens (the end-of-sequence token
    included), pooled over the whole dataset: prompt and padding positions are masked out. Distributions are
    temperature-1 softmaxes over the full first `vocab_size` logits, in float32 whatever the models' dtype; per-token
    values are aggregated in float64 by the in-package `evaluate` metrics of [`trl_distill.metrics`]. No truncation is
    applied (TRL truncates at `max_length`, 1024 by default): pass rows that fit.

    - `kl_teacher_student`: KL(teacher‖student) = Σ_v p_t(v) (log p_t(v) − log p_s(v)), the forward KL that
      token-level distillation minimizes.
    - `kl_student_teacher`: KL(student‖teacher), the reverse KL.
    - `top1_agreement`: fraction of completion positions where both models' argmax agree.
    - `acceptance_rate`: Σ_v min(p_t(v), p_s(v)) = 1 − TV(p_t, p_s) averaged over positions: the expected rate at
      which the teacher accepts tokens the student drafts in speculative sampling (Leviathan et al. 2023,
      https://arxiv.org/abs/2211.17192).
    - `student_perplexity`, `teacher_perplexity`: exp of the mean cross-entropy on the gold completion tokens;
      `perplexity_gap` = student − teacher.
    - `num_tokens`: the number of completion tokens measured.

    Args:
        student (`PreTrainedModel`): The student causal LM.
        teacher (`PreTrainedModel` or `None`): The teacher; if `None`, only `student_perplexity` and `num_tokens`
            are returned.
        tokenizer (`PreTrainedTokenizerBase`): The tokenizer both models share.
        dataset (`datasets.Dataset` or iterable of mappings): Rows with `prompt` and `completion`, or `messages`, or
            with `input_ids` (and `labels` or `completion_mask`).
        batch_size (`int`, *optional*, defaults to `16`): Rows per forward pass.
        vocab_size (`int`, *optional*): Number of leading logits to compare; defaults to `len(tokenizer)`, so padded
            embedding rows are ignored. Must not exceed either model's number of logits.

    Returns:
        `dict[str, float]`

    Both models are run under `torch.no_grad()` in eval mode; their train/eval flags are restored afterwards.
    """
    from .metrics import TeacherStudentGap, TokenPerplexity

    _check_batch_size(batch_size)
    vocab_size = len(tokenizer) if vocab_size is None else vocab_size
    for name, model in (("student", student), ("teacher", teacher)):
        if model is None:
            continue
        weight = model.get_output_embeddings().weight
        rows_available = getattr(weight, "ds_shape", weight.shape)[0]  # ZeRO-3 keeps the full shape aside
        if not isinstance(vocab_size, int) or not 0 < vocab_size <= rows_available:
            raise ValueError(
                f"`vocab_size` must be an int in [1, {rows_available}] (the {name}'s number of logits), got "
                f"{vocab_size!r}. Pass the size of the vocabulary the two models share."
            )
    rows = _heldout_rows(dataset)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("The tokenizer has neither `pad_token_id` nor `eos_token_id` to pad batches with.")

    student_ppl, teacher_ppl, gap = TokenPerplexity(), TokenPerplexity(), TeacherStudentGap()
    num_tokens = 0

    def per_token(values: torch.Tensor):
        return values.double().cpu().numpy()

    with eval_mode(student, teacher):
        for start in range(0, len(rows), batch_size):
            encoded = [_encode_row(tokenizer, row) for row in rows[start : start + batch_size]]
            input_ids, attention_mask, completion_mask = _padded_batch(encoded, pad_id)
            # Logits at position t predict token t + 1: keep positions whose next token is a completion token.
            positions = completion_mask[:, 1:]
            labels = input_ids[:, 1:][positions]  # [N]
            if labels.numel() == 0:
                continue
            num_tokens += labels.numel()

            s_logp = _completion_logprobs(student, input_ids, attention_mask, positions, vocab_size)  # [N, V]
            labels = labels.to(s_logp.device)
            student_ppl.add_batch(nll=per_token(-s_logp.gather(-1, labels[:, None]).squeeze(-1)))
            if teacher is None:
                continue
            t_logp = _completion_logprobs(teacher, input_ids, attention_mask, positions, vocab_size).to(s_logp.device)
            teacher_ppl.add_batch(nll=per_token(-t_logp.gather(-1, labels[:, None]).squeeze(-1)))
            t_prob, s_prob, log_ratio = t_logp.exp(), s_logp.exp(), t_logp - s_logp  # log p_t - log p_s
            gap.add_batch(
                kl_teacher_student=per_token((t_prob * log_ratio).sum(-1)),
                kl_student_teacher=per_token((s_prob * -log_ratio).sum(-1)),
                top1_agreement=per_token(t_logp.argmax(-1) == s_logp.argmax(-1)),
                acceptance_rate=per_token(torch.minimum(t_prob, s_prob).sum(-1)),
            )

    if num_tokens == 0:
        raise ValueError("No completion tokens in `dataset`: every completion is empty after tokenization.")
    metrics = {"student_perplexity": student_ppl.compute()["perplexity"]}
    if teacher is not None:
        metrics.update({k: v for k, v in gap.compute().items() if k != "num_tokens"})
        metrics["teacher_perplexity"] = teacher_ppl.compute()["perplexity"]
        metrics["perplexity_gap"] = metrics["student_perplexity"] - metrics["teacher_perplexity"]
    metrics["num_tokens"] = num_tokens
    return metrics


def generate_completions(
    model, tokenizer, prompts: Iterable[str], *, max_new_tokens: int = 8, batch_size: int = 32
) -> list[str]:
    """
    Greedy completions of plain-text prompts, decoded without special tokens.

    Prompts are tokenized as in training (`tokenizer(text=...)`) and left-padded, so every row's next token comes
    right after its own prompt. Generation stops at `tokenizer.eos_token_id`.

    Returns:
        `list[str]`: one completion per prompt, in order.
    """
    _check_batch_size(batch_size)
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"`max_new_tokens` must be a positive int, got {max_new_tokens!r}.")
    prompts = list(prompts)
    completions = []
    with eval_mode(model):
        for start in range(0, len(prompts), batch_size):
            completions.extend(
                generate_text(
                    model,
                    tokenizer,
                    prompts[start : start + batch_size],
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                )
            )
    return completions


def task_accuracy(
    model,
    tokenizer,
    dataset,
    *,
    max_new_tokens: int = 8,
    batch_size: int = 32,
    is_correct: Callable[[str, str], bool],
) -> float:
    """
    Fraction of prompts whose greedy completion is correct.

    Args:
        model (`PreTrainedModel`): The causal LM to evaluate.
        tokenizer (`PreTrainedTokenizerBase`): Its tokenizer.
        dataset (`datasets.Dataset` or iterable of mappings): Rows with a plain-text `prompt` (other columns are
            ignored).
        max_new_tokens (`int`, *optional*, defaults to `8`): Generation budget per prompt; the demo task's answers
            take at most three tokens plus end-of-sequence.
        batch_size (`int`, *optional*, defaults to `32`): Prompts per `generate` call.
        is_correct (`Callable[[str, str], bool]`): Scorer `(prompt, completion_text) -> bool`, e.g. the demo task's
            `trl_distill.demo.task.is_correct` (the library does not guess a task).

    Returns:
        `float` in `[0, 1]`.
    """
    if not callable(is_correct):
        raise TypeError(f"`is_correct` must be a callable `(prompt, completion) -> bool`, got {is_correct!r}.")
    prompts = [row["prompt"] for row in _rows(dataset, ("prompt",))]
    completions = generate_completions(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return sum(is_correct(p, c) for p, c in zip(prompts, completions)) / len(prompts)
