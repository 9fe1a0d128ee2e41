"""Float64 reference of the ULD loss, written from the formula (not from the implementation).

Probabilities come from `softmax`, sorted vectors from `torch.sort`, the zero padding is an explicit `cat`, KL is
`sum p * log(p / q)` and gradients come from autograd (through the sort). Only the token-level divergence of the
identity-matched tokens is borrowed, from `tests/reference.py`.
"""

from __future__ import annotations

import torch

from .reference import divergence


def _sorted(probs: torch.Tensor, k: int | None, sort: bool = True) -> torch.Tensor:
    values = probs.sort(dim=-1, descending=True).values if sort else probs
    return values if k is None else values[:, :k]


def _pad(x: torch.Tensor, width: int) -> torch.Tensor:
    return torch.cat([x, x.new_zeros(x.shape[0], width - x.shape[1])], dim=-1)


def sorted_distance(
    p: torch.Tensor, q: torch.Tensor, distance: str, top_k: int | None, sort: bool = True
) -> torch.Tensor:
    """Per row: the distance between the sorted top-k teacher `p` and student `q` probabilities.

    `sort=False` compares the entries in vocabulary order instead: the negative control.
    """
    ps, qs = _sorted(p, top_k, sort), _sorted(q, top_k, sort)
    if distance == "wasserstein":
        width = max(ps.shape[1], qs.shape[1])
        return (_pad(ps, width) - _pad(qs, width)).abs().sum(-1)
    width = min(ps.shape[1], qs.shape[1])
    ph = ps[:, :width] / ps[:, :width].sum(-1, keepdim=True)
    qh = qs[:, :width] / qs[:, :width].sum(-1, keepdim=True)
    return (ph * (ph.log() - qh.log())).sum(-1)


def uld_reference(
    student_logits,
    teacher_logits,
    *,
    labels=None,
    paired=None,
    distance="wasserstein",
    top_k=64,
    temperature=1.0,
    alpha=1.0,
    exact_match_ids=None,
    objective="forward_kl",
    beta=0.5,
    reduction="mean",
    num_items_in_batch=None,
    sort=True,
):
    """The scalar ULD loss in float64 for 2-D logits `(N, V_s)` and `(N, V_t)` (autograd-connected)."""
    s, t = student_logits.double(), teacher_logits.double()
    keep = torch.ones(s.shape[0], dtype=torch.bool) if labels is None else labels != -100
    pair = torch.ones(s.shape[0], dtype=torch.bool) if paired is None else paired.bool()
    s, t, pair = s[keep], t[keep], pair[keep]
    T = temperature
    q, p = torch.softmax(s / T, dim=-1), torch.softmax(t / T, dim=-1)
    d = torch.zeros(s.shape[0], dtype=torch.float64)
    if exact_match_ids is not None:
        sid, tid = exact_match_ids
        rest_s = torch.ones(q.shape[1], dtype=torch.bool)
        rest_s[sid] = False
        rest_t = torch.ones(p.shape[1], dtype=torch.bool)
        rest_t[tid] = False
        qb = torch.cat([q[:, sid], q[:, rest_s].sum(-1, keepdim=True)], dim=-1)
        pb = torch.cat([p[:, tid], p[:, rest_t].sum(-1, keepdim=True)], dim=-1)
        d = d + divergence(pb, qb, objective, beta)
        q, p = q[:, rest_s], p[:, rest_t]
    d = d + sorted_distance(p, q, distance, top_k, sort)
    loss = alpha * T * T * d * pair
    if alpha < 1.0:
        ce = -torch.log_softmax(s, dim=-1).gather(-1, labels[keep][:, None]).squeeze(-1)
        loss = loss + (1.0 - alpha) * ce
    total = loss.sum()
    if reduction == "sum":
        return total
    denominator = int(keep.sum()) if num_items_in_batch is None else int(num_items_in_batch)
    return total / max(denominator, 1)
