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


def divergence_terms(s: torch.Tensor, t: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized JSD between two (bucketed) distributions given as log-probabilities.

    Args:
        s (`torch.Tensor` of shape `(C, K)`): student log-probabilities (rows sum to 1 in probability space).
        t (`torch.Tensor` of shape `(C, K)`): teacher log-probabilities.
        beta (`float`): 0 forward KL(teacher || student), 1 reverse KL(student || teacher), else generalized JSD.

    Returns:
        `(value, G)`: the per-row divergence `(C,)` and `G = dD/ds` `(C, K)`, the gradient with respect to the student
        log-probabilities taken as free variables (the softmax Jacobian is applied by the caller).
    """
    if beta == 0.0:
        p = t.exp()
        value = (p * (t - s)).sum(-1)
        return value, p.neg_()
    q = s.exp()
    if beta == 1.0:
        diff = s - t
        value = (q * diff).sum(-1)
        return value, diff.add_(1.0).mul_(q)
    p = t.exp()
    # log m = log(beta * p + (1 - beta) * q), computed in log space for stability.
    log_m = torch.logaddexp(s + math.log1p(-beta), t + math.log(beta))
    s_minus_m = s - log_m
    value = beta * (p * (t - log_m)).sum(-1) + (1.0 - beta) * (q * s_minus_m).sum(-1)
    # dD/dq_b = (1 - beta) (log q_b - log m_b): the beta * p / m and (1 - beta) * q / m terms cancel.
    grad = s_minus_m.mul_(q).mul_(1.0 - beta)
    return value, grad


def kd_chunk(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None,
    spec: KDSpec,
    *,
    need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-row KD and CE terms for one chunk, and the gradient of `alpha*T^2*KD + (1-alpha)*CE` w.r.t. the logits.

    Args:
        student_logits (`torch.Tensor` of shape `(C, V)`): float32 student logits (only real vocabulary rows).
        teacher_logits (`torch.Tensor` of shape `(C, V)`): float32 teacher logits, same vocabulary.
        labels (`torch.Tensor` of shape `(C,)`, *optional*): target ids, required when `spec.alpha < 1`.
        spec ([`KDSpec`]): the loss hyper-parameters.
        need_grad (`bool`): whether to return the gradient.

    Returns:
        `(kd, ce, grad)`: `kd` is `T^2 * D` per row `(C,)` (zeros when `alpha == 0`), `ce` the cross-entropy per row
        (zeros when `alpha == 1`), `grad` the `(C, V)` float32 gradient of `alpha * kd + (1 - alpha) * ce` with respect
        to `student_logits` (or `None`). The inputs are not modified.
    """
    rows, vocab = student_logits.shape
    T = float(spec.temperature)
    zeros = student_logits.new_zeros(rows)
    kd, ce, grad = zeros, zeros, None

    if spec.needs_ce:
        # CE is taken at temperature 1, before `student_logits` is reused below.
        lse = torch.logsumexp(student_logits, dim=-1, keepdim=True)
        ce = lse.squeeze(-1) - student_logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        if need_grad:
            grad = (student_logits - lse).exp_()
            grad.scatter_add_(-1, labels.unsqueeze(-1), grad.new_full((rows, 1), -1.0))
            grad.mul_(1.0 - spec.alpha)

    if not spec.needs_kd:
        return kd, ce, grad

    s = torch.log_softmax(student_logits if T == 1.0 else student_logits / T, dim=-1)
    t = torch.log_softmax(teacher_logits if T == 1.0 else teacher_logits / T, dim=-1)
    beta = spec.effective_beta
    top_k = spec.top_k if spec.top_k is not None and spec.top_k < vocab else None

    if top_k is None:
        value, G = divergence_terms(s, t, beta)
        if need_grad:
            q = s.exp_()
            # dD/du = G - q * sum(G); G is reused as the output buffer.
            G.sub_(q * G.sum(-1, keepdim=True))
            kd_grad = G
    else:
        # Top-k pruning: keep the teacher's k most likely tokens and fold the rest into one "other" bucket on both
        # sides. The bucket mass is summed directly (not 1 - sum(top-k)), so it keeps full relative precision.
        idx = torch.topk(teacher_logits, top_k, dim=-1, sorted=False).indices
        s_k, t_k = s.gather(-1, idx), t.gather(-1, idx)
        q = s.exp_()
        p = t.exp_()
        q_other = q.scatter(-1, idx, 0.0).sum(-1, keepdim=True)
        p_other = p.scatter(-1, idx, 0.0).sum(-1, keepdim=True)
        tiny = torch.finfo(q.dtype).tiny
        s_b = torch.cat([s_k, q_other.clamp_min(tiny).log()], dim=-1)
        t_b = torch.cat([t_k, p_other.clamp_min(tiny).log()], dim=-1)
        value, G = divergence_terms(s_b, t_b, beta)
        if need_grad:
            G_sum = G.sum(-1, keepdim=True)
            # Members of the "other" bucket: q_j * (G_o / q_o - sum G); top-k members: G_j - q_j * sum G.
            kd_grad = q.mul_(G[:, -1:] / q_other.clamp_min(tiny) - G_sum)
            q_k = s_k.exp()
            kd_grad.scatter_(-1, idx, G[:, :-1] - q_k * G_sum)

    kd = value * (T * T)
    if need_grad:
        # d(T^2 D)/dz = T^2 * (dD/du) / T = T * dD/du.
        kd_grad.mul_(spec.alpha * T)
        grad = kd_grad if grad is None else grad.add_(kd_grad)
    return kd, ce, grad
