"""Float64 references for MiniLLM (Gu et al. 2024, arXiv:2306.08543), written from the paper's formulas with plain
loops and autograd, sharing nothing with `trl_distill.losses.minillm`.

Notation per sampled sequence `y` (tokens `t = 1..L`): `q_t = softmax(student logits)`, `p_t` the teacher's,
`r_t = log p_t(y_t) - log q_t(y_t)`, `R_{t+1} = sum_{t' > t} r_t'` (or its mean over the `L - t` later tokens with
length normalization), `w_t = q_t(y_t) / p~_t(y_t)` with `p~` the sampling policy.
"""

from __future__ import annotations

import itertools

import torch


def future_rewards(rewards: list[float], *, length_normalize: bool) -> list[float]:
    """`R_{t+1}` for every `t` of one sequence, by explicit loops."""
    out = []
    for t in range(len(rewards)):
        later = rewards[t + 1 :]
        total = sum(later)
        out.append(total / len(later) if (length_normalize and later) else total)
    return out


def minillm_surrogate(student_logits, teacher_logits, tokens, sample_logprobs, mask, *, length_normalize, clip):
    """`sum_t [w_t KL(q_t || p_t) - w_t R_{t+1} log q_t(y_t)] / N` (float64), zeroing the long-term term where the
    PPO clip binds (`w > 1 + clip` with `R > 0`, or `w < 1 - clip` with `R < 0`); `w` and `R` are constants.

    Args:
        student_logits, teacher_logits (`(B, L, V)`): the student's may require grad.
        tokens (`(B, L)`), sample_logprobs (`(B, L)`), mask (`(B, L)` bool, each row's tokens first).
    """
    s = torch.log_softmax(student_logits.double(), -1)
    t = torch.log_softmax(teacher_logits.double(), -1)
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    for b in range(tokens.shape[0]):
        positions = [i for i in range(tokens.shape[1]) if bool(mask[b, i])]
        logq = [s[b, i, tokens[b, i]] for i in positions]
        logp = [t[b, i, tokens[b, i]] for i in positions]
        rewards = [float(lp - lq) for lp, lq in zip(logp, logq)]
        future = future_rewards(rewards, length_normalize=length_normalize)
        for k, i in enumerate(positions):
            w = float(torch.exp(logq[k].detach() - sample_logprobs[b, i].double()))
            kl = (s[b, i].exp() * (s[b, i] - t[b, i])).sum()
            coefficient = w * future[k]
            if clip is not None and ((w > 1 + clip and future[k] > 0) or (w < 1 - clip and future[k] < 0)):
                coefficient = 0.0
            total = total + w * kl - coefficient * logq[k]
            count += 1
    return total / max(count, 1)


def ppo_surrogate(student_logits, teacher_logits, tokens, sample_logprobs, mask, *, length_normalize, clip):
    """The authors' form of the long-term term at the sampled policy (ratio `rho = q / q_old = 1`, with gradient):
    `max(-A w rho, -A clip(w rho, 1 - eps, 1 + eps))`, `A = R_{t+1}`, plus `w KL_t`. Its *gradient* equals
    [`minillm_surrogate`]'s (the values differ)."""
    s = torch.log_softmax(student_logits.double(), -1)
    t = torch.log_softmax(teacher_logits.double(), -1)
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    for b in range(tokens.shape[0]):
        positions = [i for i in range(tokens.shape[1]) if bool(mask[b, i])]
        logq = [s[b, i, tokens[b, i]] for i in positions]
        rewards = [float(t[b, i, tokens[b, i]] - lq) for i, lq in zip(positions, logq)]
        future = future_rewards(rewards, length_normalize=length_normalize)
        for k, i in enumerate(positions):
            w = float(torch.exp(logq[k].detach() - sample_logprobs[b, i].double()))
            ratio = torch.exp(logq[k] - logq[k].detach())
            unclipped = -future[k] * w * ratio
            clipped = -future[k] * torch.clamp(w * ratio, 1 - clip, 1 + clip)
            kl = (s[b, i].exp() * (s[b, i] - t[b, i])).sum()
            total = total + w * kl + torch.maximum(unclipped, clipped)
            count += 1
    return total / max(count, 1)


def sequence_reverse_kl(student_table, teacher_table, vocab: int, length: int):
    """Exact `KL(q || p)` over all `vocab ** length` sequences of a tabular policy (float64, differentiable).

    `*_table[prefix]` is the `(V,)` logit vector after `prefix` (a tuple of ids); every sequence has `length` tokens.
    """
    total = torch.zeros((), dtype=torch.float64)
    for sequence in itertools.product(range(vocab), repeat=length):
        logq = sum(torch.log_softmax(student_table[sequence[:i]].double(), -1)[sequence[i]] for i in range(length))
        logp = sum(torch.log_softmax(teacher_table[sequence[:i]].double(), -1)[sequence[i]] for i in range(length))
        total = total + logq.exp() * (logq - logp)
    return total
