"""Float64 reference formulas, written from the math (not from the implementation).

Probabilities are formed with `softmax` and divergences with `sum p * log(p / q)` directly, the top-k "other" bucket
as an explicit sum of the probabilities outside the teacher's top-k, and gradients come from autograd. Nothing here
shares code with `trl_distill.losses`.
"""

from __future__ import annotations

import torch


def _kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) along the last dim, with 0 * log 0 = 0 (a token of probability 0 under `p` adds nothing).

    Entries where `p = 0` (e.g. a `-inf` logit) are replaced by 1 *before* the logarithm, so their term and its
    gradient are exactly 0 instead of `0 * -inf = NaN`; `+inf` where `p > 0 = q`, as in the math.
    """
    support = p > 0
    one = torch.ones_like(p)
    p_safe, q_safe = torch.where(support, p, one), torch.where(support, q, one)
    terms = torch.where(support, p_safe * (p_safe.log() - q_safe.log()), torch.zeros_like(p))
    return terms.sum(-1)


def divergence(p: torch.Tensor, q: torch.Tensor, objective: str, beta: float) -> torch.Tensor:
    """D between teacher probabilities `p` and student probabilities `q`."""
    if objective == "forward_kl" or (objective == "generalized_jsd" and beta == 0.0):
        return _kl(p, q)
    if objective == "reverse_kl" or (objective == "generalized_jsd" and beta == 1.0):
        return _kl(q, p)
    b = 0.5 if objective == "jsd" else beta
    m = b * p + (1.0 - b) * q
    return b * _kl(p, m) + (1.0 - b) * _kl(q, m)


def bucket(probs: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Top-k folding: the kept entries (in index order) followed by the summed mass of all the others."""
    k = int(keep[0].sum()) if keep.shape[0] else 0
    kept = probs[keep].reshape(probs.shape[0], k)
    other = (probs * (~keep)).sum(-1, keepdim=True)
    return torch.cat([kept, other], dim=-1)


def per_token_loss(student_logits, teacher_logits, labels, *, objective, beta, temperature, top_k, alpha):
    """Per-row `alpha * T^2 * D + (1 - alpha) * CE` for 2-D float64 logits (rows = positions)."""
    T = temperature
    p = torch.softmax(teacher_logits / T, dim=-1)
    q = torch.softmax(student_logits / T, dim=-1)
    if top_k is not None and top_k < teacher_logits.shape[-1]:
        keep = torch.zeros_like(p, dtype=torch.bool)
        keep.scatter_(-1, teacher_logits.topk(top_k, dim=-1).indices, True)
        p, q = bucket(p, keep), bucket(q, keep)
    loss = alpha * T * T * divergence(p, q, objective, beta)
    if alpha < 1.0:
        ce = -torch.log(torch.softmax(student_logits, dim=-1).gather(-1, labels[:, None]).squeeze(-1))
        loss = loss + (1.0 - alpha) * ce
    return loss


def reference_loss(
    student_logits,
    teacher_logits,
    *,
    labels=None,
    mask=None,
    objective="forward_kl",
    beta=0.5,
    temperature=1.0,
    top_k=None,
    alpha=1.0,
    vocab_size=None,
    reduction="mean",
    num_items_in_batch=None,
):
    """The scalar loss in float64. Inputs of shape `(..., V)`; returns a float64 scalar (autograd-connected)."""
    V = vocab_size or student_logits.shape[-1]
    s = student_logits[..., :V].double().reshape(-1, V)
    t = teacher_logits[..., :V].double().reshape(-1, V)
    keep = torch.ones(s.shape[0], dtype=torch.bool) if mask is None else mask.reshape(-1).bool()
    flat_labels = None
    if labels is not None:
        flat_labels = labels.reshape(-1)
        keep = keep & (flat_labels != -100)
        flat_labels = flat_labels[keep]
    rows = per_token_loss(
        s[keep],
        t[keep],
        flat_labels,
        objective=objective,
        beta=beta,
        temperature=temperature,
        top_k=top_k,
        alpha=alpha,
    )
    total = rows.sum()
    if reduction == "sum":
        return total
    denominator = int(keep.sum()) if num_items_in_batch is None else int(num_items_in_batch)
    return total / max(denominator, 1)
