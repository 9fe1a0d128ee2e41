"""MiniLLM's loss: the sequence-level reverse KL `KL(q_theta || p)` as a policy gradient (Gu et al. 2024).

[MiniLLM](https://huggingface.co/papers/2306.08543) minimizes the reverse KL between the student `q` and the teacher
`p` over whole responses `y ~ q`. Sampling is not differentiable, so the gradient is a policy gradient; with the
per-step reward `r_t = log p(y_t | y_<t) - log q(y_t | y_<t)` and `R_t = sum_{t' >= t} r_t'`,

    grad KL(q || p) = -E_{y ~ q} sum_t R_t grad log q(y_t | y_<t)
                    =  E_{y ~ q} sum_t [ grad KL_t(q || p)  -  R_{t+1} grad log q(y_t | y_<t) ]

(single-step decomposition): the first part, the reverse KL of the next-token distributions at step `t`, is taken
exactly over the vocabulary; only the long-term part `R_{t+1}` is estimated from the sample. The paper's other two
stabilizers: samples come from the teacher-mixed policy `p~ = alpha p + (1 - alpha) q` with the per-step importance
weight `w_t = q(y_t) / p~(y_t)`, and `R_{t+1}` is length-normalized (the mean of the future rewards instead of their
sum). The surrogate whose gradient is the estimate, per sampled token,

    L_t = w_t * KL_t(q_theta || p)  +  c_t * (-log q_theta(y_t | y_<t)),     c_t = w_t * R^norm_{t+1}

with `w_t` and `c_t` constants, is computed here by the chunked driver of [`trl_distill.losses.chunked`] from hidden
states and `lm_head` weights (the same reverse-KL formula as token-level KD, no `(N, V)` logits held). The long-term
coefficient follows the authors' PPO-style clipping at the fresh samples (ratio 1): a token whose weight lies outside
`[1 - clip, 1 + clip]` on the side that would enlarge the update gets no long-term gradient.

This module imports torch only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from .chunked import check_linear_shapes, linear_loss_sums
from .divergences import divergence_terms


__all__ = ["MiniLLMCoefficients", "MiniLLMLossOutput", "linear_minillm_loss", "minillm_coefficients"]


class MiniLLMCoefficients(NamedTuple):
    """Per-token constants of the MiniLLM surrogate, each `(B, L)` float32 (zero off the mask).

    Attributes:
        kl_weight (`torch.Tensor`): `w_t`, the importance weight of the exact single-step term.
        pg_weight (`torch.Tensor`): `c_t`, the coefficient of `-log q(y_t)` (the long-term policy-gradient term).
        future_reward (`torch.Tensor`): `R_{t+1}` (length-normalized when asked), before weighting.
        clipped (`torch.Tensor`): bool, where the long-term term was clipped away.
    """

    kl_weight: torch.Tensor
    pg_weight: torch.Tensor
    future_reward: torch.Tensor
    clipped: torch.Tensor


def minillm_coefficients(
    student_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    sample_logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    length_normalize: bool = True,
    clip: float | None = 0.2,
) -> MiniLLMCoefficients:
    """The importance weights and long-term coefficients of the MiniLLM surrogate, from the sampled tokens' log-probs.

    Args:
        student_logprobs (`torch.Tensor` of shape `(B, L)`): `log q(y_t | y_<t)` of each sampled token under the
            student that is trained (temperature 1).
        teacher_logprobs (`torch.Tensor` of shape `(B, L)`): `log p(y_t | y_<t)` under the teacher.
        sample_logprobs (`torch.Tensor` of shape `(B, L)`): log-probability the token was drawn with (the
            teacher-mixed policy `p~`); equal to `student_logprobs` for plain on-policy samples.
        mask (`torch.Tensor` of shape `(B, L)`): `True` on sampled tokens, `False` on padding (tokens of a row are
            left-aligned: the sequence is every `True` before the first `False`).
        length_normalize (`bool`): `R_{t+1}` is the mean of the future rewards (the paper's length normalization)
            rather than their sum.
        clip (`float`, *optional*): PPO-style clip range of the long-term term's importance weight; `None` keeps it
            unclipped.

    Returns:
        [`MiniLLMCoefficients`], all without gradient.
    """
    mask = mask.bool()
    with torch.no_grad():
        q, p, m = (
            x.detach().float().masked_fill(~mask, 0.0) for x in (student_logprobs, teacher_logprobs, sample_logprobs)
        )
        rewards = (p - q).masked_fill(~mask, 0.0)
        # R_{t+1} = sum of the rewards after t: reversed cumulative sum, minus the reward at t itself.
        future = rewards.flip(-1).cumsum(-1).flip(-1) - rewards
        if length_normalize:
            remaining = mask.float().flip(-1).cumsum(-1).flip(-1) - mask.float()  # tokens after t
            future = future / remaining.clamp(min=1.0)
        weight = (q - m).exp().masked_fill(~mask, 0.0)
        pg_weight = weight * future
        clipped = torch.zeros_like(mask)
        if clip is not None:
            # The PPO objective max(-A w rho, -A clip(w rho)) at rho = 1: its gradient vanishes where the clip binds.
            clipped = mask & (((weight > 1.0 + clip) & (future > 0)) | ((weight < 1.0 - clip) & (future < 0)))
            pg_weight = pg_weight.masked_fill(clipped, 0.0)
        future = future.masked_fill(~mask, 0.0)
    return MiniLLMCoefficients(weight, pg_weight, future, clipped)


@dataclass(frozen=True)
class _MiniLLMSpec:
    """What the chunking driver needs of a loss: its per-chunk terms, and `alpha` (the total is the first sum)."""

    alpha: float = 1.0

    @staticmethod
    def chunk_terms(student_logits, teacher_logits, rows, spec, *, need_grad):
        """Per row: the surrogate `w KL_t + c (-log q(y))` and its single-step part `w KL_t`; the surrogate's gradient."""
        tokens, kl_weight, pg_weight = rows
        z = student_logits  # (C, V) float32, consumed
        target = z.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
        nll = torch.logsumexp(z, dim=-1) - target  # -log q(y_t), before the softmax overwrites z
        kl, G, q = divergence_terms(z, teacher_logits, 1.0)  # reverse KL(q || p), dKL/ds, and q
        single_step = kl_weight * kl
        surrogate = single_step + pg_weight * nll
        if not need_grad:
            return surrogate, single_step, None
        # d KL / dz = G - q sum(G); d(-log q(y)) / dz = q - onehot(y).
        grad = G.addcmul_(q, G.sum(-1, keepdim=True), value=-1.0).mul_(kl_weight[:, None])
        grad.add_(q * pg_weight[:, None])
        grad.scatter_add_(-1, tokens.unsqueeze(-1), -pg_weight[:, None])
        return surrogate, single_step, grad


class _Rows:
    """Per-row data of the selected positions, sliced together by the chunking driver (`rows_data[rows]`)."""

    def __init__(self, *columns: torch.Tensor):
        self.columns = columns

    def __getitem__(self, rows):
        return tuple(column[rows] for column in self.columns)


class MiniLLMLossOutput(NamedTuple):
    """Sums of the MiniLLM surrogate over the selected tokens (reduce them where the batch's count is known).

    Attributes:
        surrogate_sum (`torch.Tensor`): differentiable sum of `w KL_t + c (-log q(y_t))`.
        single_step_sum (`torch.Tensor`): detached sum of the importance-weighted single-step term `w KL_t`.
        pg_sum (`torch.Tensor`): detached sum of the long-term term `c (-log q(y_t))`.
        num_tokens (`torch.Tensor`): number of tokens in the sums.
    """

    surrogate_sum: torch.Tensor
    single_step_sum: torch.Tensor
    pg_sum: torch.Tensor
    num_tokens: torch.Tensor


def linear_minillm_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    *,
    tokens: torch.Tensor,
    kl_weight: torch.Tensor,
    pg_weight: torch.Tensor,
    mask: torch.Tensor,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
) -> MiniLLMLossOutput:
    """The MiniLLM surrogate over sampled tokens, from hidden states and `lm_head` weights, chunk by chunk.

    Per token `t` in `mask`: `kl_weight[t] * KL(q_t || p_t) + pg_weight[t] * (-log q_t(tokens[t]))` with
    `q_t = softmax(student_hidden[t] @ student_weight.T)` and `p_t` the teacher's (temperature 1, first `vocab_size`
    rows). Gradients flow into `student_hidden` and the student's `lm_head` (weight, bias) only; the weights are
    constants (see [`minillm_coefficients`]).

    Args:
        student_hidden (`torch.Tensor` of shape `(..., H_s)`): student hidden states, position `t` predicting
            `tokens[t]` (already shifted).
        student_weight (`torch.Tensor` of shape `(V_s, H_s)`), teacher_hidden (`(..., H_t)`), teacher_weight
            (`(V_t, H_t)`), student_bias, teacher_bias: as in [`~trl_distill.losses.linear_distillation_loss`].
        tokens (`torch.Tensor` of shape `(...)`): the sampled token ids (any value off the mask).
        kl_weight, pg_weight (`torch.Tensor` of shape `(...)`): `w_t` and `c_t`.
        mask (`torch.Tensor` of shape `(...)`): `True` on the tokens in the loss.
        vocab_size (`int`, *optional*): number of real tokens; required when the two `lm_head`s differ in rows.
        chunk_size (`int`, *optional*): positions projected at once.

    Returns:
        [`MiniLLMLossOutput`] (sums; an all-masked input gives zeros with zero gradients).
    """
    check_linear_shapes(student_hidden, student_weight, teacher_hidden, teacher_weight)
    leading = student_hidden.shape[:-1]
    for name, value in (("tokens", tokens), ("kl_weight", kl_weight), ("pg_weight", pg_weight), ("mask", mask)):
        if tuple(value.shape) != tuple(leading):
            raise ValueError(f"`{name}` must have shape {tuple(leading)}, got {tuple(value.shape)}.")
    rows = (student_weight.shape[0], teacher_weight.shape[0])
    if vocab_size is None and rows[0] != rows[1]:
        raise ValueError(f"The `lm_head`s have {rows[0]} and {rows[1]} rows; pass `vocab_size` (the real tokens).")
    width = min(rows) if vocab_size is None else vocab_size
    if isinstance(width, bool) or not isinstance(width, int) or not 0 < width <= min(rows):
        raise ValueError(f"`vocab_size` must be an integer in [1, {min(rows)}] (the real tokens), got {vocab_size!r}.")
    device = student_hidden.device
    index = mask.to(device).bool().reshape(-1).nonzero().squeeze(-1)

    def selected(x, dtype):
        return x.detach().to(device).reshape(-1).index_select(0, index).to(dtype)

    row_data = _Rows(
        selected(tokens, torch.long), selected(kl_weight, torch.float32), selected(pg_weight, torch.float32)
    )
    total, _, single_step = linear_loss_sums(
        (student_hidden, student_weight, student_bias),
        (teacher_hidden, teacher_weight, teacher_bias),
        index, (width, width), row_data, _MiniLLMSpec(), chunk_size,
    )  # fmt: skip
    count = torch.tensor(index.numel(), device=device)
    return MiniLLMLossOutput(total, single_step, total.detach() - single_step, count)
