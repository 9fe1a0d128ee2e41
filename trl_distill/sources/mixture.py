"""Teacher-mixed sampling (MiniLLM, Gu et al. 2024): responses drawn token by token from `alpha p + (1 - alpha) q`.

`model.generate` samples from one model; MiniLLM's sampling policy mixes the next-token distributions of the teacher
`p` and the student `q` at every step, so [`sample_mixture`] runs both models side by side with their own KV caches
(`past_key_values`) over left-padded prompts. For every drawn token it records the three log-probabilities the loss
needs: the student's and the teacher's (temperature 1, what the reverse KL compares) and the one the token was
actually drawn with (for the importance weight `q / p~`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..inference import eval_mode, left_pad


__all__ = ["MixtureSamples", "mixture_distribution", "sample_mixture"]


@dataclass
class MixtureSamples:
    """Sampled completions and their per-token log-probabilities.

    Attributes:
        completions (`list[list[int]]`): per prompt, the drawn ids up to and including the first end-of-sequence id.
        ended (`list[bool]`): whether each completion ended with an end-of-sequence id before the length cap.
        student_logprobs, teacher_logprobs, sample_logprobs (`list[torch.Tensor]`): per prompt, float32 `(len,)`:
            `log q(y_t)`, `log p(y_t)` (temperature 1) and the log-probability of the sampling policy (mixture,
            sampling temperature and truncation included) at each drawn token.
    """

    completions: list[list[int]]
    ended: list[bool]
    student_logprobs: list[torch.Tensor]
    teacher_logprobs: list[torch.Tensor]
    sample_logprobs: list[torch.Tensor]

    def padded(self, attribute: str, width: int | None = None) -> torch.Tensor:
        """`(B, width)` float32 of a per-token attribute, left-aligned, zero-padded on the right."""
        rows = getattr(self, attribute)
        width = width if width is not None else max((len(row) for row in rows), default=0)
        out = torch.zeros(len(rows), width)
        for index, row in enumerate(rows):
            out[index, : len(row)] = row
        return out


def mixture_distribution(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    teacher_mix: float,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
) -> torch.Tensor:
    """Log-probabilities `(B, V)` of the sampling policy `alpha softmax(z_p / T) + (1 - alpha) softmax(z_q / T)`.

    `top_k` / `top_p` then keep the mixture's `top_k` most likely tokens / its smallest nucleus holding `top_p`, and
    renormalize; other tokens get `-inf`. With `teacher_mix=0`, `T=1` and no truncation this is the student's own
    distribution.
    """
    log_q = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if teacher_mix == 0.0:
        log_mix = log_q
    else:
        log_mix = torch.logaddexp(
            log_p + torch.tensor(teacher_mix).log(), log_q + torch.tensor(1.0 - teacher_mix).log()
        )
    if top_k is not None and top_k < log_mix.shape[-1]:
        threshold = log_mix.topk(top_k, dim=-1).values[:, -1:]
        log_mix = log_mix.masked_fill(log_mix < threshold, float("-inf"))
    if top_p < 1.0:
        sorted_logp, order = log_mix.sort(dim=-1, descending=True)
        mass_before = sorted_logp.exp().cumsum(-1) - sorted_logp.exp()
        drop = (mass_before >= top_p).scatter(-1, order, mass_before >= top_p)
        log_mix = log_mix.masked_fill(drop, float("-inf"))
    return torch.log_softmax(log_mix, dim=-1)


def _last_logits(model: nn.Module, input_ids, attention_mask, position_ids, cache):
    outputs = model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, past_key_values=cache,
        use_cache=True, logits_to_keep=1,
    )  # fmt: skip
    return outputs.logits[:, -1], outputs.past_key_values


def sample_mixture(
    student: nn.Module,
    teacher: nn.Module,
    prompts: list[list[int]],
    *,
    teacher_mix: float,
    max_new_tokens: int,
    eos_ids: set[int],
    pad_token_id: int,
    vocab_size: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> MixtureSamples:
    """Draw one completion per prompt from the teacher-mixed policy, both models in eval mode without gradients.

    Args:
        student, teacher (`nn.Module`): causal LMs sharing the first `vocab_size` token ids (unwrapped: not DDP).
        prompts (`list[list[int]]`): prompt ids per row (left-padded here).
        teacher_mix (`float`): `alpha` in `[0, 1)`, the teacher's share of the sampling policy.
        max_new_tokens (`int`): the length cap; a row stops at its first id in `eos_ids`.
        pad_token_id (`int`): padding id of the prompts and of finished rows.
        vocab_size (`int`): leading logits compared (padded `lm_head` rows are never sampled).
        temperature, top_k, top_p: sampling settings applied to the mixture (see [`mixture_distribution`]).
        generator (`torch.Generator`, *optional*): source of randomness (the global one by default).
    """
    if any(len(prompt) == 0 for prompt in prompts):
        raise ValueError("A prompt is empty after tokenization: there is nothing to sample a completion from.")
    device = next(student.parameters()).device
    input_ids, attention_mask = left_pad(prompts, pad_token_id)
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    rows = len(prompts)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    eos = torch.tensor(sorted(eos_ids), device=device)
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    tokens, logq, logp, logm, alive = [], [], [], [], []
    student_cache = teacher_cache = None
    step_ids, step_positions = input_ids, position_ids
    with eval_mode(student, teacher):
        for _ in range(max_new_tokens):
            z_q, student_cache = _last_logits(student, step_ids, attention_mask, step_positions, student_cache)
            z_p, teacher_cache = _last_logits(teacher, step_ids, attention_mask, step_positions, teacher_cache)
            z_q, z_p = z_q[:, :vocab_size].float(), z_p[:, :vocab_size].float()
            log_mix = mixture_distribution(
                z_q, z_p, teacher_mix=teacher_mix, temperature=temperature, top_k=top_k, top_p=top_p
            )
            drawn = torch.multinomial(log_mix.exp(), 1, generator=generator).squeeze(-1)
            drawn = torch.where(done, torch.full_like(drawn, pad_token_id), drawn)
            pick = drawn.unsqueeze(-1)
            tokens.append(drawn)
            alive.append(~done)
            logq.append(torch.log_softmax(z_q, -1).gather(-1, pick).squeeze(-1))
            logp.append(torch.log_softmax(z_p, -1).gather(-1, pick).squeeze(-1))
            logm.append(log_mix.gather(-1, pick).squeeze(-1))
            done = done | torch.isin(drawn, eos)
            if bool(done.all()):
                break
            attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=-1)
            step_positions = step_positions[:, -1:] + 1
            step_ids = pick
    return _collect(tokens, alive, logq, logp, logm, eos_ids)


def _collect(tokens, alive, logq, logp, logm, eos_ids) -> MixtureSamples:
    tokens, alive = torch.stack(tokens, 1).cpu(), torch.stack(alive, 1).cpu()
    logq, logp, logm = (torch.stack(x, 1).float().cpu() for x in (logq, logp, logm))
    samples = MixtureSamples([], [], [], [], [])
    for row in range(tokens.shape[0]):
        length = int(alive[row].sum())
        ids = tokens[row, :length].tolist()
        samples.completions.append(ids)
        samples.ended.append(bool(ids) and ids[-1] in eos_ids)
        samples.student_logprobs.append(logq[row, :length])
        samples.teacher_logprobs.append(logp[row, :length])
        samples.sample_logprobs.append(logm[row, :length])
    return samples
