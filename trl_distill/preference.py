"""Preference pairs for a DPO stage after distillation: the student proposes, the teacher ranks.

The rule, for each prompt:

1. the student samples `num_samples` completions (`temperature`, `top_p`, at most `max_new_tokens` tokens);
2. the teacher scores each completion by its **mean log-probability per completion token** under teacher forcing
   (the end-of-sequence token included, tokenized as `SFTTrainer` tokenizes prompt/completion rows), so that length
   alone neither helps nor hurts;
3. `chosen` is the completion the teacher scores highest, `rejected` the one it scores lowest;
4. the prompt is dropped when the two are the same text or their score gap is below `min_margin` (no preference to
   learn).

DPO on these pairs pulls the student toward what the teacher prefers among the student's own samples (on-policy
pairs, no labels, no reward model).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch.nn.utils.rnn import pad_sequence

from .evaluation import tokenize_prompt_completion
from .inference import eval_mode, generate_text


def teacher_scores(teacher, tokenizer, prompts: list, completions: list, *, batch_size: int = 16) -> list[float]:
    """Mean teacher log-probability per completion token of each `(prompt, completion)` row, in float64.

    Args:
        teacher (`PreTrainedModel`): Scores under teacher forcing, in eval mode, under `torch.no_grad()`.
        tokenizer (`PreTrainedTokenizerBase`): The teacher's tokenizer; rows are tokenized as `SFTTrainer` does
            (EOS appended to string completions).
        prompts, completions (`list[str]` or lists of messages): Rows to score, same length.

    Returns:
        `list[float]`: one score per row (`-inf` for a row with no completion token).
    """
    if len(prompts) != len(completions):
        raise ValueError(f"`prompts` and `completions` differ in length: {len(prompts)} vs {len(completions)}.")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(teacher.parameters()).device
    scores = []
    with eval_mode(teacher):
        for start in range(0, len(prompts), batch_size):
            batch = zip(prompts[start : start + batch_size], completions[start : start + batch_size])
            rows = [tokenize_prompt_completion(tokenizer, p, c) for p, c in batch]
            input_ids = pad_sequence([torch.tensor(ids) for ids, _ in rows], batch_first=True, padding_value=pad_id)
            attention = pad_sequence([torch.ones(len(ids), dtype=torch.long) for ids, _ in rows], batch_first=True)
            target_mask = pad_sequence([torch.tensor(mask, dtype=torch.bool) for _, mask in rows], batch_first=True)
            logits = teacher(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits[:, :-1]
            logp = torch.log_softmax(logits.float(), dim=-1)
            token_logp = logp.gather(-1, input_ids[:, 1:, None].to(device)).squeeze(-1).double()  # [B, T-1]
            mask = target_mask[:, 1:].to(device)
            totals, counts = (token_logp * mask).sum(-1), mask.sum(-1)
            scores.extend(t.item() / c.item() if c.item() else -math.inf for t, c in zip(totals, counts))
    return scores


def sample_completions(
    model,
    tokenizer,
    prompts: list[str],
    *,
    num_samples: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    batch_size: int,
    seed: int,
    progress: bool = True,
) -> list[list[str]]:
    """`num_samples` sampled completions of each plain-text prompt (left-padded batches, special tokens skipped)."""
    from tqdm.auto import tqdm

    samples = []
    with torch.random.fork_rng(devices=[]), eval_mode(model):
        torch.manual_seed(seed)
        for start in tqdm(
            range(0, len(prompts), batch_size), desc="sampling student completions", disable=not progress
        ):
            texts = generate_text(
                model,
                tokenizer,
                prompts[start : start + batch_size],
                do_sample=True,
                temperature=temperature,
                top_p=top_p,
                max_new_tokens=max_new_tokens,
                num_return_sequences=num_samples,
            )
            samples.extend(texts[i : i + num_samples] for i in range(0, len(texts), num_samples))
    return samples


def teacher_ranked_pairs(
    student,
    teacher,
    tokenizer,
    prompts: Iterable[str],
    *,
    teacher_tokenizer=None,
    num_samples: int = 4,
    max_new_tokens: int = 32,
    temperature: float = 1.0,
    top_p: float = 1.0,
    min_margin: float = 0.0,
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = True,
):
    """
    Build DPO pairs by ranking the student's own samples with the teacher (the rule is in the module docstring).

    Args:
        student (`PreTrainedModel`): Samples the completions.
        teacher (`PreTrainedModel`): Ranks them by mean log-probability per completion token.
        tokenizer (`PreTrainedTokenizerBase`): The student's tokenizer (prompts are plain text).
        prompts (`Iterable[str]`): Prompts to build pairs for.
        teacher_tokenizer (`PreTrainedTokenizerBase`, *optional*): The teacher's, when it differs (scores are computed
            on text, so vocabularies need not match). Defaults to `tokenizer`.
        num_samples (`int`, *optional*, defaults to `4`): Completions sampled per prompt; at least 2.
        max_new_tokens (`int`, *optional*, defaults to `32`): Length limit of each sample.
        temperature, top_p (`float`, *optional*): Sampling settings (defaults 1.0: the student's own distribution).
        min_margin (`float`, *optional*, defaults to `0.0`): Minimum teacher score gap (nats per token) to keep a pair.
        batch_size (`int`, *optional*, defaults to `16`): Prompts per `generate` call.
        seed (`int`, *optional*, defaults to `0`): Sampling seed (the global RNG state is restored afterwards).

    Returns:
        `tuple[datasets.Dataset, dict]`: rows `prompt`, `chosen`, `rejected`, `chosen_score`, `rejected_score`; and
        statistics `prompts`, `pairs`, `mean_margin`.
    """
    from datasets import Dataset

    if not isinstance(num_samples, int) or num_samples < 2:
        raise ValueError(f"`num_samples` must be an int >= 2 (a pair needs two samples), got {num_samples!r}.")
    if not (isinstance(min_margin, (int, float)) and min_margin >= 0):
        raise ValueError(f"`min_margin` must be a number >= 0, got {min_margin!r}.")
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("`prompts` must be a non-empty list of strings (plain-text prompts).")
    samples = sample_completions(
        student,
        tokenizer,
        prompts,
        num_samples=num_samples,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        batch_size=batch_size,
        seed=seed,
        progress=progress,
    )
    flat_prompts = [p for p in prompts for _ in range(num_samples)]
    flat_completions = [c for group in samples for c in group]
    flat_scores = teacher_scores(
        teacher, teacher_tokenizer or tokenizer, flat_prompts, flat_completions, batch_size=batch_size * num_samples
    )
    rows = {"prompt": [], "chosen": [], "rejected": [], "chosen_score": [], "rejected_score": []}
    for i, (prompt, group) in enumerate(zip(prompts, samples)):
        scores = flat_scores[i * num_samples : (i + 1) * num_samples]
        best = max(range(num_samples), key=scores.__getitem__)
        worst = min(range(num_samples), key=scores.__getitem__)
        if group[best] == group[worst] or scores[best] - scores[worst] < min_margin:
            continue
        for key, value in (
            ("prompt", prompt),
            ("chosen", group[best]),
            ("rejected", group[worst]),
            ("chosen_score", scores[best]),
            ("rejected_score", scores[worst]),
        ):
            rows[key].append(value)
    margins = [c - r for c, r in zip(rows["chosen_score"], rows["rejected_score"])]
    stats = {
        "prompts": len(prompts),
        "pairs": len(margins),
        "mean_margin": sum(margins) / len(margins) if margins else 0.0,
    }
    return Dataset.from_dict(rows), stats
