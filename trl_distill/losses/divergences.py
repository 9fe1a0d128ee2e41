"""Divergences between teacher and student next-token distributions, with their gradients.

Everything here works on one chunk of rows (positions) at a time and never builds an autograd graph: each function
returns the per-row value *and* the gradient with respect to the student logits, computed in closed form during the
forward pass. The chunked drivers in [`trl_distill.losses.chunked`] call these functions for both the plain
(`distillation_loss`) and the hidden-state (`linear_distillation_loss`) entry points, so there is exactly one
implementation of each formula (house style, convention 4).

Notation, per row: `s = log_softmax(z_s / T)` (student), `t = log_softmax(z_t / T)` (teacher), `q = exp(s)`,
`p = exp(t)`. All divergences are members of the generalized Jensen-Shannon family of GKD
(Agarwal et al. 2024, https://arxiv.org/abs/2306.13649) with TRL's meaning of `beta`:

- `beta = 0`: forward KL, `KL(p || q) = sum p (t - s)` (mode-covering; the default).
- `beta = 1`: reverse KL, `KL(q || p) = sum q (s - t)` (mode-seeking).
- `0 < beta < 1`: `beta * KL(p || m) + (1 - beta) * KL(q || m)` with `m = beta * p + (1 - beta) * q`.

Gradients: for a divergence `D` written over bucket log-probabilities `s_b`, let `G_b = dD/ds_b` (treating each
`s_b` as free). Through the softmax, `dD/du_j = G_j - q_j * sum_b G_b` with `u = z_s / T`, and `dD/dz_s = dD/du / T`.
With top-k pruning, the non-top-k entries share one "other" bucket, `s_o = log sum_{j not in top-k} q_j`, whose
members get `G_o * q_j / q_o - q_j * sum_b G_b`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch


OBJECTIVES = ("forward_kl", "reverse_kl", "jsd", "generalized_jsd")
_FIXED_BETA = {"forward_kl": 0.0, "reverse_kl": 1.0, "jsd": 0.5}


@dataclass(frozen=True)
class KDSpec:
    """Hyper-parameters of the token-level KD loss, validated once.

    `loss = alpha * T^2 * D(teacher_T, student_T) + (1 - alpha) * CE(student, label)` per position, where `D` is the
    divergence chosen by `objective` and `CE` is taken at temperature 1.
    """

    objective: str = "forward_kl"
    beta: float = 0.5
    temperature: float = 1.0
    top_k: int | None = None
    alpha: float = 1.0

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"`objective` must be one of {OBJECTIVES}, got {self.objective!r}.")
        if not 0.0 <= float(self.beta) <= 1.0:
            raise ValueError(f"`beta` must be in [0, 1] (0 = forward KL, 1 = reverse KL), got {self.beta}.")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"`temperature` must be a finite number > 0, got {self.temperature!r}.")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"`top_k` must be None (full vocabulary) or an integer >= 1, got {self.top_k!r}.")
        if not 0.0 <= float(self.alpha) <= 1.0:
            raise ValueError(f"`alpha` (weight of the KD term against CE) must be in [0, 1], got {self.alpha}.")

    @property
    def effective_beta(self) -> float:
        """The generalized-JSD interpolation the objective stands for (0 forward KL, 1 reverse KL)."""
        return _FIXED_BETA.get(self.objective, float(self.beta))

    @property
    def needs_ce(self) -> bool:
        return self.alpha < 1.0

    @property
    def needs_kd(self) -> bool:
        return self.alpha > 0.0


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise dot product. Not `bmm`: its float32 accumulation over 152k entries drifted from a float64 reference by
    about 5e-5 relative, where `sum`'s cascaded summation stays near 1e-7 (`benchmarks/loss_memory.py` prints the
    losses of the three paths side by side)."""
    return (a * b).sum(-1)


def _softmax_(x: torch.Tensor) -> torch.Tensor:
    """Turn logits into probabilities in place (one `exp` pass); return the `(C, 1)` log-normalizer."""
    shift = x.amax(-1, keepdim=True)
    x.sub_(shift).exp_()
    total = x.sum(-1, keepdim=True)
    x.div_(total)
    return shift + total.log()


def divergence_terms(u: torch.Tensor, v: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Generalized JSD between the softmaxes of two logit blocks, its gradient, and the student's probabilities.

    Everything is written with `d = t - s = log(p / q)`, which needs one `exp` per side and no `log` of a probability:
    forward KL `= sum p d`; reverse KL `= -sum q d`; generalized JSD with `r = log(m / q) = logaddexp(d + log beta,
    log(1 - beta))`: `beta * sum p (d - r) - (1 - beta) * sum q r`.

    Args:
        u (`torch.Tensor` of shape `(C, K)`): student logits divided by the temperature (or bucket log-probabilities).
            Overwritten: it holds `q` on return.
        v (`torch.Tensor` of shape `(C, K)`): teacher logits divided by the temperature. Overwritten.
        beta (`float`): 0 forward KL(teacher || student), 1 reverse KL(student || teacher), else generalized JSD.

    Returns:
        `(value, G, q)`: the per-row divergence `(C,)`; `G = dD/ds` `(C, K)`, the gradient with respect to the student
        log-probabilities taken as free variables (the caller applies the softmax Jacobian, `G - q * sum(G)`); and the
        student probabilities `q` (the storage of `u`).
    """
    d = v - u
    log_norm_u = _softmax_(u)
    log_norm_v = _softmax_(v)
    d.sub_(log_norm_v - log_norm_u)  # d = t - s
    q, p = u, v
    if beta == 0.0:
        return _rowdot(p, d), p.neg_(), q
    if beta == 1.0:
        value = -_rowdot(q, d)
        # dD/ds = q (s - t + 1) = q (1 - d)
        return value, d.neg_().add_(1.0).mul_(q), q
    # r = log(m / q) with m = beta p + (1 - beta) q, in log space so a tiny q cannot overflow exp(d).
    r = torch.logaddexp(d + math.log(beta), torch.tensor(math.log1p(-beta), dtype=d.dtype, device=d.device))
    value = beta * _rowdot(p, d.sub_(r)) - (1.0 - beta) * _rowdot(q, r)
    # dD/dq = (1 - beta) (log q - log m) = -(1 - beta) r: the beta p / m and (1 - beta) q / m terms cancel.
    return value, r.mul_(q).mul_(beta - 1.0), q


class TopKTargets(NamedTuple):
    """The teacher's side of a top-k loss, ready for [`kd_chunk`] (computed online or read from a store).

    Attributes:
        ids (`torch.Tensor` of shape `(C, k)`, int64): the teacher's k most likely token ids per row.
        log_probs (`torch.Tensor` of shape `(C, k + 1)`, float32): the teacher's log-probabilities at the loss
            temperature of those ids, then of the "other" bucket (all remaining tokens) in the last column. Consumed.
    """

    ids: torch.Tensor
    log_probs: torch.Tensor


def teacher_top_k(teacher_logits: torch.Tensor, top_k: int, *, sorted: bool = False) -> TopKTargets:
    """The teacher's top-k ids and bucket log-probabilities from temperature-scaled logits.

    The "other" bucket's mass is summed directly (not `1 - sum(top-k)`), so it keeps full relative precision.

    Args:
        teacher_logits (`torch.Tensor` of shape `(C, V)`): float32 teacher logits already divided by the temperature.
            Consumed (it holds the probabilities with the top-k entries zeroed on return).
        top_k (`int`): entries kept, `1 <= top_k < V`.
        sorted (`bool`): order the ids by decreasing probability (a store needs it to fold to a smaller k).
    """
    idx = torch.topk(teacher_logits, top_k, dim=-1, sorted=sorted).indices
    _softmax_(teacher_logits)
    p_k = teacher_logits.gather(-1, idx)
    # Zero the top-k entries in place: what remains is exactly the "other" members' mass.
    p_other = teacher_logits.scatter_(-1, idx, 0.0).sum(-1, keepdim=True)
    log_probs = torch.cat([p_k, p_other], dim=-1).clamp_min_(torch.finfo(p_k.dtype).tiny).log_()
    return TopKTargets(idx, log_probs)


def _top_k_terms(u: torch.Tensor, teacher: TopKTargets, beta: float, need_grad: bool):
    """Divergence between the teacher's bucket distribution and the student's, folded the same way; grad w.r.t. `u`.

    `u` (`(C, V)`, student logits / T) is consumed. The student's bucket: its probabilities at the teacher's top-k ids,
    and the summed mass of every other token.
    """
    idx = teacher.ids
    _softmax_(u)
    q = u
    q_k = q.gather(-1, idx)
    q_other = q.scatter_(-1, idx, 0.0).sum(-1, keepdim=True)
    tiny = torch.finfo(q.dtype).tiny
    s_b = torch.cat([q_k, q_other], dim=-1).clamp_min_(tiny).log_()
    value, G, _ = divergence_terms(s_b, teacher.log_probs, beta)
    if not need_grad:
        return value, None
    G_sum = G.sum(-1, keepdim=True)
    # Members of the "other" bucket: q_j * (G_o / q_o - sum G); top-k members: G_j - q_j * sum G.
    grad = q.mul_(G[:, -1:] / q_other.clamp_min(tiny) - G_sum)
    grad.scatter_(-1, idx, G[:, :-1] - q_k * G_sum)
    return value, grad


def kd_chunk(
    student_logits: torch.Tensor,
    teacher: torch.Tensor | TopKTargets,
    labels: torch.Tensor | None,
    spec: KDSpec,
    *,
    need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-row KD and CE terms for one chunk, and the gradient of `alpha*T^2*KD + (1-alpha)*CE` w.r.t. the logits.

    Args:
        student_logits (`torch.Tensor` of shape `(C, V)`): float32 student logits (only real vocabulary rows).
            Consumed: the buffer is reused for the result.
        teacher (`torch.Tensor` of shape `(C, V)` or [`TopKTargets`]): float32 teacher logits over the same vocabulary
            (consumed), or the teacher's top-k ids and bucket log-probabilities already at temperature `T` (e.g. read
            from an offline store; `spec.top_k` is then ignored: the targets carry their own k).
        labels (`torch.Tensor` of shape `(C,)`, *optional*): target ids, required when `spec.alpha < 1`.
        spec ([`KDSpec`]): the loss hyper-parameters.
        need_grad (`bool`): whether to return the gradient.

    Returns:
        `(kd, ce, grad)`: `kd` is `T^2 * D` per row `(C,)` (zeros when `alpha == 0`), `ce` the cross-entropy per row
        (zeros when `alpha == 1`), `grad` the `(C, V)` float32 gradient of `alpha * kd + (1 - alpha) * ce` with respect
        to `student_logits` (or `None`).
    """
    rows, vocab = student_logits.shape
    T = float(spec.temperature)
    kd = ce = student_logits.new_zeros(rows)
    ce_grad = None
    stored = isinstance(teacher, TopKTargets)
    top_k = spec.top_k if spec.top_k is not None and spec.top_k < vocab else None
    # At T == 1 with the full vocabulary, the CE softmax is the KD softmax and is not computed twice.
    reuse_softmax = T == 1.0 and spec.needs_kd and top_k is None and not stored

    if spec.needs_ce:
        # CE is taken at temperature 1, before the logits are rescaled in place.
        target = student_logits.gather(-1, labels.unsqueeze(-1))
        if need_grad and not reuse_softmax:
            ce_grad = student_logits.clone()
            ce = (_softmax_(ce_grad) - target).squeeze(-1)
        else:
            ce = (torch.logsumexp(student_logits, dim=-1, keepdim=True) - target).squeeze(-1)
    if not spec.needs_kd:
        if ce_grad is not None:
            ce_grad.scatter_add_(-1, labels.unsqueeze(-1), ce_grad.new_full((rows, 1), -1.0))
        return kd, ce, ce_grad

    u = student_logits
    if T != 1.0:
        u.mul_(1.0 / T)
        if not stored:
            teacher.mul_(1.0 / T)
    beta = spec.effective_beta

    if stored or top_k is not None:
        # Top-k pruning: keep the teacher's k most likely tokens and fold the rest into one "other" bucket on both
        # sides.
        value, grad = _top_k_terms(u, teacher if stored else teacher_top_k(teacher, top_k), beta, need_grad)
    else:
        value, G, q = divergence_terms(u, teacher, beta)
        if need_grad:
            # dD/du = G - q * sum(G)
            grad = G.addcmul_(q, G.sum(-1, keepdim=True), value=-1.0)

    kd = value * (T * T)
    if not need_grad:
        return kd, ce, None
    # d(T^2 D)/dz = T^2 * (dD/du) / T = T * dD/du.
    grad.mul_(spec.alpha * T)
    if spec.needs_ce:
        if reuse_softmax:
            grad.add_(q, alpha=1.0 - spec.alpha)
        else:
            grad.add_(ce_grad, alpha=1.0 - spec.alpha)
        grad.scatter_add_(-1, labels.unsqueeze(-1), grad.new_full((rows, 1), spec.alpha - 1.0))
    return kd, ce, grad
