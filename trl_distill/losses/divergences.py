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
_JSD_FAST_SPREAD = 1024.0
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
        if not (
            isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature) and self.temperature > 0
        ):
            raise ValueError(f"`temperature` must be a finite number > 0, got {self.temperature!r}.")
        if self.top_k is not None and (
            isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1
        ):
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


def softmax_inplace(x: torch.Tensor) -> torch.Tensor:
    """Turn logits into probabilities in place (one `exp` pass); return the `(C, 1)` log-normalizer.

    `-inf` entries get probability 0. A row that is all `-inf` gets NaN probabilities and a log-normalizer of
    `-inf`, which callers refuse with [`_check_rows`].
    """
    shift = x.amax(-1, keepdim=True)
    x.sub_(shift).exp_()
    total = x.sum(-1, keepdim=True)
    x.div_(total)
    return torch.where(torch.isneginf(shift), shift, shift + total.log())


def _check_rows(row_max: torch.Tensor, side: str) -> None:
    """Refuse a row whose logits are all `-inf`: its distribution is undefined (0 / 0), not a masked token."""
    if bool(torch.isneginf(row_max).any()):
        raise ValueError(
            f"A position of the {side} has every logit equal to -inf (the whole vocabulary masked), so its "
            "distribution is undefined. Leave such positions out of the loss (`labels=-100` or `mask=False`)."
        )


def _shift_scale_(x: torch.Tensor, inv_t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`x <- (x - max(x)) / T` in place, row by row: entries in `[-inf, 0]`, and never an overflow (`z / T` of a logit
    near 3e38 overflows; the difference to the row's maximum, divided by T, only underflows to `-inf` where `exp`
    gives 0 anyway).

    Returns `(spread, row_max)`: `spread` `(C, 1)` is `-min(x)` afterwards, finite where every entry of the row is
    (no `-inf` mask, no underflow); `row_max` `(C, 1)` is NaN or `+inf` on rows that hold a NaN or a `+inf`, which the
    callers turn into a NaN loss (an AMP grad scaler then skips the step).
    """
    hi = x.amax(-1, keepdim=True)
    x.sub_(hi)
    if inv_t != 1.0:
        x.mul_(inv_t)
    # Two reductions, not `torch.aminmax`: on CPU it took 18x the time of `amax` (not vectorized).
    return x.amin(-1, keepdim=True).neg_(), hi


def _exp_normalize_(x: torch.Tensor) -> torch.Tensor:
    """Softmax in place of rows already shifted to a maximum of 0; return the `(C, 1)` log-normalizer."""
    x.exp_()
    total = x.sum(-1, keepdim=True)
    x.div_(total)
    return total.log_()


def divergence_terms(
    u: torch.Tensor, v: torch.Tensor, beta: float, *, inv_temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Generalized JSD between the softmaxes of two logit blocks, its gradient, and the student's probabilities.

    Everything is written with `d = t - s = log(p / q)`, which needs one `exp` per side and no `log` of a probability:
    forward KL `= sum p d`; reverse KL `= -sum q d`; generalized JSD with `r = log(m / q) = logaddexp(d + log beta,
    log(1 - beta))`: `beta * sum p (d - r) - (1 - beta) * sum q r`.

    `-inf` entries (a masked vocabulary) are tokens of probability 0 and follow `0 * log 0 = 0`: a token masked on
    both sides, or masked on the side whose probabilities weigh the sum, adds nothing (and gets a zero gradient). The
    value is `+inf` only where it truly is (forward KL with the student masked where the teacher is not, reverse KL
    the other way round). A chunk with such entries (or, for the JSD, a row whose two logit spreads, divided by T, add
    up to more than 1024) takes a slower path written with `log m = logaddexp(t + log beta, s + log(1 - beta))`,
    exact for any gap.

    Args:
        u (`torch.Tensor` of shape `(C, K)`): student logits (or bucket log-probabilities). Overwritten.
        v (`torch.Tensor` of shape `(C, K)`): teacher logits over the same entries. Overwritten.
        beta (`float`): 0 forward KL(teacher || student), 1 reverse KL(student || teacher), else generalized JSD.
        inv_temperature (`float`): `1 / T`; both sides are divided by the temperature here, after subtracting each
            row's maximum, so logits near the float32 limit do not overflow.

    Returns:
        `(value, G, q)`: the per-row divergence `(C,)`; `G = dD/ds` `(C, K)`, the gradient with respect to the student
        log-probabilities taken as free variables (the caller applies the softmax Jacobian, `G - q * sum(G)`); and the
        student probabilities `q`. Raises `ValueError` if a row of either side is all `-inf`.
    """
    spread_u, hi_u = _shift_scale_(u, inv_temperature)
    spread_v, hi_v = _shift_scale_(v, inv_temperature)
    # The fast path needs finite entries; for the JSD also |d| <= 1024 + log V, where `d - r` (r ~ d + log beta for a
    # large d) still has an absolute rounding error below 1e-4. Real logits (spread ~60 / T) stay far below it.
    spread = spread_u + spread_v
    if bool((spread <= _JSD_FAST_SPREAD if 0.0 < beta < 1.0 else torch.isfinite(spread)).all()):
        return _finite_terms(u, v, beta)
    _check_rows(hi_u, "student")
    _check_rows(hi_v, "teacher")
    return _masked_terms(u, v, beta, ~(torch.isfinite(hi_u) & torch.isfinite(hi_v)))


def _finite_terms(u: torch.Tensor, v: torch.Tensor, beta: float):
    """[`divergence_terms`] on shifted rows whose entries are all finite: one `exp` per side, `d` kept finite."""
    d = v - u
    log_norm_u = _exp_normalize_(u)
    log_norm_v = _exp_normalize_(v)
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


def _masked_terms(u: torch.Tensor, v: torch.Tensor, beta: float, invalid: torch.Tensor):
    """[`divergence_terms`] with `-inf` entries: log-probabilities `s`, `t` may be `-inf`; each sum skips the entries
    whose weight (`p` or `q`) is 0. Rows flagged `invalid` (a NaN or `+inf` logit) give NaN."""
    s = u.sub_(torch.logsumexp(u, dim=-1, keepdim=True))
    t = v.sub_(torch.logsumexp(v, dim=-1, keepdim=True))
    q, p = s.exp(), t.exp()
    zero = s.new_zeros(())
    if beta == 0.0:
        value, G = torch.where(p > 0, p * (t - s), zero).sum(-1), p.neg_()
    elif beta == 1.0:
        terms = torch.where(q > 0, q * (s - t), zero)
        value, G = terms.sum(-1), torch.where(q > 0, terms.add_(q), zero)  # q (s - t + 1)
    else:
        log_m = torch.logaddexp(t + math.log(beta), s + math.log1p(-beta))
        G = torch.where(q > 0, q * (s - log_m), zero)  # q log(q / m)
        value = beta * torch.where(p > 0, p * (t - log_m), zero).sum(-1) + (1.0 - beta) * G.sum(-1)
        G.mul_(1.0 - beta)  # dD/ds = (1 - beta) q log(q / m)
    if bool(invalid.any()):
        value = value.masked_fill(invalid.squeeze(-1), float("nan"))
        G.masked_fill_(invalid, float("nan"))
    return value, G, q


class TopKTargets(NamedTuple):
    """The teacher's side of a top-k loss, ready for [`kd_chunk`] (computed online or read from a store).

    Attributes:
        ids (`torch.Tensor` of shape `(C, k)`, int64): the teacher's k most likely token ids per row.
        log_probs (`torch.Tensor` of shape `(C, k + 1)`, float32): the teacher's log-probabilities at the loss
            temperature of those ids, then of the "other" bucket (all remaining tokens) in the last column. Consumed.
    """

    ids: torch.Tensor
    log_probs: torch.Tensor


def _fold_(x: torch.Tensor, idx: torch.Tensor, inv_t: float, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold raw logits onto the ids `idx` plus one "other" bucket, in log space; `x` is consumed.

    The "other" bucket's log-mass is computed relative to its own largest member `m_o` (`log sum exp((z_j - m_o) / T)`
    over the members, a sum >= 1), so it keeps full relative precision however far below the top-k it lies: nothing is
    clamped at float32's smallest probability.

    Returns:
        `(log_b, S_o)`: the bucket log-probabilities `(C, k + 1)` (normalized; `-inf` for an empty bucket), and the
        member sum `S_o` `(C, 1)`; `x` holds the members' weights `exp((z_j - m_o) / T)` (0 at `idx`), so a member's
        share of the bucket is `x_j / S_o`.
    """
    x_k = x.gather(-1, idx)
    x.scatter_(-1, idx, float("-inf"))
    m_o = x.amax(-1, keepdim=True)
    hi = torch.maximum(x_k.amax(-1, keepdim=True), m_o)
    _check_rows(hi, side)
    x.sub_(m_o.masked_fill(torch.isneginf(m_o), 0.0))  # an empty bucket (every member -inf) stays at exp(-inf) = 0
    if inv_t != 1.0:
        x.mul_(inv_t)
    S_o = x.exp_().sum(-1, keepdim=True)
    log_b = torch.cat([(x_k - hi) * inv_t, (m_o - hi) * inv_t + S_o.log()], dim=-1)
    return log_b - torch.logsumexp(log_b, dim=-1, keepdim=True), S_o


def teacher_top_k(
    teacher_logits: torch.Tensor, top_k: int, *, sorted: bool = False, temperature: float = 1.0
) -> TopKTargets:
    """The teacher's top-k ids and bucket log-probabilities at `temperature`.

    The "other" bucket's mass is summed directly (not `1 - sum(top-k)`) and in log space, so it keeps full relative
    precision even far below float32's smallest probability (a logit gap of 100 at T = 1 gives `log p_other = -100`).

    Args:
        teacher_logits (`torch.Tensor` of shape `(C, V)`): float32 teacher logits, divided by `temperature` here
            (overflow-free). Consumed. `-inf` entries are masked tokens (probability 0); a row of only `-inf` is
            refused with a `ValueError`.
        top_k (`int`): entries kept, `1 <= top_k < V`.
        sorted (`bool`): order the ids by decreasing probability (a store needs it to fold to a smaller k).
        temperature (`float`): the loss temperature `T` (pass 1.0 for logits already divided by it).
    """
    idx = torch.topk(teacher_logits, top_k, dim=-1, sorted=sorted).indices
    log_probs, _ = _fold_(teacher_logits, idx, 1.0 / temperature, "teacher")
    return TopKTargets(idx, log_probs)


def _top_k_terms(u: torch.Tensor, teacher: TopKTargets, beta: float, need_grad: bool, inv_t: float):
    """Divergence between the teacher's bucket distribution and the student's, folded the same way; grad w.r.t. `u`.

    `u` (`(C, V)`, raw student logits) is consumed. The student's bucket: its probabilities at the teacher's top-k ids,
    and the summed mass of every other token. The gradient is with respect to `u / T`.
    """
    idx = teacher.ids
    s_b, S_o = _fold_(u, idx, inv_t, "student")
    value, G, q_b = divergence_terms(s_b, teacher.log_probs, beta)
    if not need_grad:
        return value, None
    G_sum = G.sum(-1, keepdim=True)
    # Members j of the "other" bucket: q_j (G_o / q_o - sum G) = (x_j / S_o) (G_o - q_o sum G), with x_j / S_o their
    # share of the bucket (finite even when q_o underflows); top-k members: G_j - q_j * sum G.
    grad = u.mul_((G[:, -1:] - q_b[:, -1:] * G_sum) / S_o.clamp_min(1.0))  # S_o >= 1 unless the bucket is empty
    grad.scatter_(-1, idx, G[:, :-1] - q_b[:, :-1] * G_sum)
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
            Consumed: the buffer is reused for the result. `-inf` entries are masked tokens.
        teacher (`torch.Tensor` of shape `(C, V)` or [`TopKTargets`]): float32 teacher logits over the same vocabulary
            (consumed), or the teacher's top-k ids and bucket log-probabilities already at temperature `T` (e.g. read
            from an offline store; `spec.top_k` is then ignored: the targets carry their own k).
        labels (`torch.Tensor` of shape `(C,)`, *optional*): target ids, required when `spec.alpha < 1`.
        spec ([`KDSpec`]): the loss hyper-parameters.
        need_grad (`bool`): whether to return the gradient.

    Returns:
        `(kd, ce, grad)`: `kd` is `T^2 * D` per row `(C,)` (zeros when `alpha == 0`), `ce` the cross-entropy per row
        (zeros when `alpha == 1`), `grad` the `(C, V)` float32 gradient of `alpha * kd + (1 - alpha) * ce` with respect
        to `student_logits` (or `None`). A row whose logits are all `-inf` raises `ValueError`; a NaN or `+inf` logit
        gives NaN for its row.
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
            log_norm = softmax_inplace(ce_grad)
        else:
            log_norm = torch.logsumexp(student_logits, dim=-1, keepdim=True)
        _check_rows(log_norm, "student")
        ce = (log_norm - target).squeeze(-1)
    if not spec.needs_kd:
        if ce_grad is not None:
            ce_grad.scatter_add_(-1, labels.unsqueeze(-1), ce_grad.new_full((rows, 1), -1.0))
        return kd, ce, ce_grad

    beta = spec.effective_beta
    if stored or top_k is not None:
        # Top-k pruning: keep the teacher's k most likely tokens and fold the rest of the vocabulary into one "other"
        # bucket on both sides.
        targets = teacher if stored else teacher_top_k(teacher, top_k, temperature=T)
        value, grad = _top_k_terms(student_logits, targets, beta, need_grad, 1.0 / T)
    else:
        value, G, q = divergence_terms(student_logits, teacher, beta, inv_temperature=1.0 / T)
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
