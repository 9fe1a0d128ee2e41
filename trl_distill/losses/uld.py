"""Universal Logit Distillation (ULD): distillation between models whose vocabularies differ.

Boizard et al. 2024, "Towards Cross-Tokenizer Distillation: the Universal Logit Distillation Loss for LLMs",
https://arxiv.org/abs/2402.12030. Token `i` of one vocabulary means nothing to the other, so instead of comparing the
two next-token distributions entry by entry, ULD compares them *as sorted lists*: per position, take the top-k
probabilities of teacher and student (`T = temperature`), sort each descending, pad the shorter with zeros, and
measure the gap between the sorted vectors. The result is invariant to any permutation of either vocabulary, which is
what makes it tokenizer-agnostic.

Per position (`p` teacher, `q` student, `p_(r)` the r-th largest):

- `distance="wasserstein"`: `sum_r |p_(r) - q_(r)|`, the closed form of the ULD paper (the 1-Wasserstein distance
  between the sorted distributions with unit ground cost).
- `distance="kl"`: KL(p_hat || q_hat) between the top-k sorted vectors renormalized to sum to one (both cut to the
  shorter length, since a zero pad makes KL infinite).
- `exact_match_ids=(student_ids, teacher_ids)` (the hybrid): tokens whose surface string is in both vocabularies are
  compared by identity with the token-level divergence of `objective`, over those tokens plus one "other" bucket
  holding the rest of the mass on each side; the remaining tokens are compared by sorted matching as above. The two
  terms are added.

The loss per position is `alpha * T^2 * D + (1 - alpha) * CE(student, label)`. It runs on the chunked driver of
[`trl_distill.losses.chunked`]: a chunk of positions at a time, the gradient with respect to the student logits
formed during the forward pass, so no `(N, V)` float32 logits of either model outlive a chunk.

Gradients (per row, `u = z_s / T`): with `g_j = q_j * dD/dq_j` (zero outside the student's top-k for the sorted
part), `dD/du_j = g_j - q_j * sum_l g_l`. Sorting is piecewise constant, so the sorted entries carry the gradient of
the entries they came from (ties have measure zero); for Wasserstein `dD/dq_(r) = sign(q_(r) - p_(r))`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .chunked import (
    DistillationLossOutput,
    check_linear_shapes,
    check_logits_shapes,
    linear_loss_sums,
    logits_loss_sums,
)
from .divergences import KDSpec, divergence_terms, kd_chunk, softmax_inplace
from .reduction import check_reduction, reduce_loss


ULD_DISTANCES = ("wasserstein", "kl")
_CE_ONLY = KDSpec(alpha=0.0)


@dataclass(frozen=True, eq=False)
class ULDSpec:
    """Hyper-parameters of the ULD loss, validated once (see the module docstring for the formulas).

    Attributes:
        distance (`str`): `"wasserstein"` or `"kl"`, for the sorted matching.
        top_k (`int`, *optional*): sorted entries kept per side; `None` = the whole vocabulary.
        temperature (`float`): softmax temperature of both sides; the KD term is scaled by `T^2`.
        alpha (`float`): weight of the KD term; `1 - alpha` weighs the CE on the labels (at temperature 1).
        objective, beta: token-level divergence of the identity-matched tokens (only with `exact_match_ids`).
        exact_match_ids (`tuple[torch.Tensor, torch.Tensor]`, *optional*): student and teacher ids of the tokens
            matched by identity, two `(M,)` integer tensors.
    """

    distance: str = "wasserstein"
    top_k: int | None = 64
    temperature: float = 1.0
    alpha: float = 1.0
    objective: str = "forward_kl"
    beta: float = 0.5
    exact_match_ids: tuple[torch.Tensor, torch.Tensor] | None = None

    def __post_init__(self):
        if self.distance not in ULD_DISTANCES:
            raise ValueError(f"`distance` must be one of {ULD_DISTANCES}, got {self.distance!r}.")
        if self.top_k is not None and (
            isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1
        ):
            raise ValueError(f"`top_k` must be None (whole vocabulary) or an integer >= 1, got {self.top_k!r}.")
        # The shared checks (temperature, alpha, objective, beta) live in KDSpec.
        object.__setattr__(
            self,
            "_kd",
            KDSpec(objective=self.objective, beta=self.beta, temperature=self.temperature, alpha=self.alpha),
        )
        if self.exact_match_ids is not None:
            student_ids, teacher_ids = self.exact_match_ids
            if student_ids.dim() != 1 or student_ids.shape != teacher_ids.shape:
                raise ValueError(
                    "`exact_match_ids` must be two 1-D tensors of the same length (student ids, teacher ids), got "
                    f"shapes {tuple(student_ids.shape)} and {tuple(teacher_ids.shape)}."
                )

    @staticmethod
    def chunk_terms(student_logits, teacher_logits, rows, spec, *, need_grad):
        return uld_chunk(student_logits, teacher_logits, rows, spec, need_grad=need_grad)


def _sorted_terms(q_top: torch.Tensor, p_top: torch.Tensor, distance: str, need_grad: bool):
    """Distance between sorted student `(C, k_s)` and teacher `(C, k_t)` probabilities; `q * dD/dq` `(C, k_s)`."""
    k = min(q_top.shape[-1], p_top.shape[-1])
    if distance == "wasserstein":
        diff = q_top[:, :k] - p_top[:, :k]
        # Past the shorter side the other is padded with zeros: |x - 0| = x.
        value = diff.abs().sum(-1) + q_top[:, k:].sum(-1) + p_top[:, k:].sum(-1)
        if not need_grad:
            return value, None
        sign = torch.cat([diff.sign_(), q_top.new_ones(q_top.shape[0], q_top.shape[-1] - k)], dim=-1)
        return value, sign.mul_(q_top)
    tiny = torch.finfo(q_top.dtype).tiny
    s_b = q_top[:, :k].clamp_min(tiny).log_()
    t_b = p_top[:, :k].clamp_min(tiny).log_()
    value, G, q_hat = divergence_terms(s_b, t_b, 0.0)  # forward KL of the renormalized vectors
    if not need_grad:
        return value, None
    # Through the renormalization q_hat = q / sum(q): q_r * dD/dq_r = G_r - q_hat_r * sum(G).
    qg = q_top.new_zeros(q_top.shape)
    qg[:, :k] = G.addcmul_(q_hat, G.sum(-1, keepdim=True), value=-1.0)
    return value, qg


def _exact_terms(q, p, student_ids, teacher_ids, q_rest, p_rest, beta, need_grad):
    """Token-level divergence over the identity-matched tokens plus one "other" bucket; `q * dD/dq` `(C, V_s)`."""
    tiny = torch.finfo(q.dtype).tiny
    q_other = q_rest.clamp_min(0.0).sum(-1, keepdim=True)  # the unmatched mass, summed directly for precision
    p_other = p_rest.clamp_min(0.0).sum(-1, keepdim=True)
    s_b = torch.cat([q.index_select(-1, student_ids), q_other], dim=-1).clamp_min_(tiny).log_()
    t_b = torch.cat([p.index_select(-1, teacher_ids), p_other], dim=-1).clamp_min_(tiny).log_()
    value, G, _ = divergence_terms(s_b, t_b, beta)
    if not need_grad:
        return value, None
    # Matched token m: q_m * dD/dq_m = G_m; unmatched j (in the bucket): q_j * G_o / q_o.
    qg = q * (G[:, -1:] / q_other.clamp_min(tiny))
    qg.index_copy_(-1, student_ids, G[:, :-1])
    return value, qg


def uld_chunk(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    rows: torch.Tensor,
    spec: ULDSpec,
    *,
    need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-row ULD and CE terms for one chunk, and the gradient of `alpha*T^2*ULD + (1-alpha)*CE` w.r.t. the logits.

    Args:
        student_logits (`torch.Tensor` of shape `(C, V_s)`): float32 student logits. Consumed (reused in place).
        teacher_logits (`torch.Tensor` of shape `(C, V_t)`): float32 teacher logits, another vocabulary. Consumed.
        rows (`torch.LongTensor` of shape `(C, 2)`): column 0 the label (for CE), column 1 whether the row has a
            teacher partner (1) or gets the CE term only (0).
        spec ([`ULDSpec`]): the hyper-parameters.
        need_grad (`bool`): whether to return the gradient.

    Returns:
        `(kd, ce, grad)`: `T^2 * D` per row `(C,)` (0 on rows without a partner), CE per row `(C,)`, and the `(C, V_s)`
        float32 gradient (or `None`).
    """
    labels, paired = rows[:, 0], rows[:, 1].to(student_logits.dtype)
    kd = ce = student_logits.new_zeros(student_logits.shape[0])
    ce_grad = None
    if spec.alpha < 1.0:  # one CE formula: the token-level one, at temperature 1
        _, ce, ce_grad = kd_chunk(student_logits, student_logits, labels, _CE_ONLY, need_grad=need_grad)
    if spec.alpha == 0.0:
        return kd, ce, ce_grad

    T = float(spec.temperature)
    q, p = student_logits.mul_(1.0 / T), teacher_logits.mul_(1.0 / T)
    softmax_inplace(q)
    softmax_inplace(p)
    value = q.new_zeros(q.shape[0])
    qg = q.new_zeros(q.shape) if need_grad else None
    q_rest, p_rest = q, p
    if spec.exact_match_ids is not None and spec.exact_match_ids[0].numel():
        student_ids, teacher_ids = (ids.to(q.device) for ids in spec.exact_match_ids)
        # -1 (below every probability) so that the sorted part never picks an identity-matched token.
        q_rest, p_rest = q.index_fill(-1, student_ids, -1.0), p.index_fill(-1, teacher_ids, -1.0)
        exact, exact_qg = _exact_terms(
            q, p, student_ids, teacher_ids, q_rest, p_rest, spec._kd.effective_beta, need_grad
        )
        value += exact
        if need_grad:
            qg += exact_qg
        unmatched_s, unmatched_t = q.shape[-1] - student_ids.numel(), p.shape[-1] - teacher_ids.numel()
    else:
        unmatched_s, unmatched_t = q.shape[-1], p.shape[-1]
    k_s = unmatched_s if spec.top_k is None else min(spec.top_k, unmatched_s)
    k_t = unmatched_t if spec.top_k is None else min(spec.top_k, unmatched_t)
    if k_s and k_t:
        q_top, q_idx = q_rest.topk(k_s, dim=-1, sorted=True)
        p_top = p_rest.topk(k_t, dim=-1, sorted=True).values
        sorted_value, sorted_qg = _sorted_terms(q_top, p_top, spec.distance, need_grad)
        value += sorted_value
        if need_grad:
            qg.scatter_add_(-1, q_idx, sorted_qg)

    kd = value.mul_(T * T).mul_(paired)
    if not need_grad:
        return kd, ce, None
    # dD/du = g - q * sum(g); d(T^2 D)/dz = T * dD/du; rows without a partner get no KD gradient.
    grad = qg.addcmul_(q, qg.sum(-1, keepdim=True), value=-1.0).mul_((spec.alpha * T) * paired[:, None])
    if ce_grad is not None:
        grad.add_(ce_grad, alpha=1.0 - spec.alpha)
    return kd, ce, grad


def _rows(labels, paired, leading_shape, spec, device):
    """Flat indices of the positions in the loss and their `(label, paired)` rows."""
    for name, value in (("labels", labels), ("paired", paired)):
        if value is not None and tuple(value.shape) != tuple(leading_shape):
            raise ValueError(f"`{name}` must have shape {tuple(leading_shape)}, got {tuple(value.shape)}.")
    if spec.alpha < 1.0 and labels is None:
        raise ValueError(
            f"`alpha={spec.alpha}` mixes in cross-entropy, which needs `labels`; pass them or set alpha=1."
        )
    flat_labels = None if labels is None else labels.to(device).reshape(-1).long()
    keep = torch.ones(math.prod(leading_shape), dtype=torch.bool, device=device)
    if flat_labels is not None:
        keep &= flat_labels != -100
    index = keep.nonzero().squeeze(-1)
    label_col = torch.zeros_like(index) if flat_labels is None else flat_labels.index_select(0, index)
    paired_col = (
        torch.ones_like(index) if paired is None else paired.to(device).reshape(-1).long().index_select(0, index)
    )
    return index, torch.stack([label_col, paired_col], dim=-1)


def _finish(total, kd_sum, ce_sum, rows, reduction, num_items_in_batch, return_components):
    loss = reduce_loss(total, rows.shape[0], reduction=reduction, num_items_in_batch=num_items_in_batch)
    if not return_components:
        return loss
    paired = rows[:, 1].sum()
    return DistillationLossOutput(
        loss, kd_sum / paired.clamp_min(1), ce_sum / max(rows.shape[0], 1), paired.to(loss.device)
    )


def _spec(reduction, distance, top_k, temperature, alpha, objective, beta, exact_match_ids) -> ULDSpec:
    check_reduction(reduction)
    return ULDSpec(
        distance=distance,
        top_k=top_k,
        temperature=temperature,
        alpha=alpha,
        objective=objective,
        beta=beta,
        exact_match_ids=exact_match_ids,
    )


def _check_width(name: str, width: int, vocab_size: int | None) -> int:
    if vocab_size is None:
        return width
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not 1 <= vocab_size <= width:
        raise ValueError(
            f"`{name}` must be an integer in [1, {width}] (the real tokens of that model), got {vocab_size!r}."
        )
    return vocab_size


def uld_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    labels: torch.Tensor | None = None,
    paired: torch.Tensor | None = None,
    distance: str = "wasserstein",
    top_k: int | None = 64,
    temperature: float = 1.0,
    alpha: float = 1.0,
    exact_match_ids: tuple[torch.Tensor, torch.Tensor] | None = None,
    objective: str = "forward_kl",
    beta: float = 0.5,
    student_vocab_size: int | None = None,
    teacher_vocab_size: int | None = None,
    reduction: str = "mean",
    num_items_in_batch: torch.Tensor | int | None = None,
    chunk_size: int | None = None,
    return_components: bool = False,
) -> torch.Tensor | DistillationLossOutput:
    r"""ULD loss between student and teacher logits over *different* vocabularies (see the module docstring).

    Per position: `alpha * T^2 * D(sorted teacher_T, sorted student_T) + (1 - alpha) * CE(student, label)`.

    Args:
        student_logits (`torch.Tensor` of shape `(..., V_s)`): student logits at the paired positions; gradients flow.
        teacher_logits (`torch.Tensor` of shape `(..., V_t)`): teacher logits at the same (paired) positions; `V_t`
            may differ from `V_s`. No gradient.
        labels (`torch.Tensor` of shape `(...)`, *optional*): student target ids; -100 leaves a position out entirely.
            Required when `alpha < 1`.
        paired (`torch.Tensor` of shape `(...)`, *optional*): boolean, `False` where a position has no teacher partner:
            it then gets the CE term only (it still counts in the mean). Default: all paired.
        distance (`str`): `"wasserstein"` (sum of absolute differences of the sorted probabilities) or `"kl"`
            (KL(teacher || student) of the renormalized sorted top-k vectors).
        top_k (`int`, *optional*): sorted entries kept per side (default 64); `None` = the whole vocabulary.
        temperature (`float`): softmax temperature `T` of both sides; the KD term is scaled by `T^2`.
        alpha (`float`): weight of the KD term; `1 - alpha` weighs the CE (at temperature 1).
        exact_match_ids (`tuple[torch.Tensor, torch.Tensor]`, *optional*): student and teacher ids of tokens with the
            same surface string (e.g. from [`trl_distill.alignment.shared_token_pairs`]); they are compared by identity
            with `objective` (and `beta`), the rest by sorted matching.
        student_vocab_size, teacher_vocab_size (`int`, *optional*): real tokens of each side; logits beyond (embedding
            padding rows) are dropped.
        reduction, num_items_in_batch, chunk_size, return_components: as in
            [`~trl_distill.losses.distillation_loss`]; with `return_components`, `num_tokens` counts paired positions.

    Returns:
        `torch.Tensor`: the scalar loss (already including `T^2`); zero with zero gradients when no position is left.
    """
    spec = _spec(reduction, distance, top_k, temperature, alpha, objective, beta, exact_match_ids)
    check_logits_shapes(student_logits, teacher_logits)
    widths = (
        _check_width("student_vocab_size", student_logits.shape[-1], student_vocab_size),
        _check_width("teacher_vocab_size", teacher_logits.shape[-1], teacher_vocab_size),
    )
    index, rows = _rows(labels, paired, student_logits.shape[:-1], spec, student_logits.device)
    total, kd_sum, ce_sum = logits_loss_sums(student_logits, teacher_logits, index, widths, rows, spec, chunk_size)
    return _finish(total, kd_sum, ce_sum, rows, reduction, num_items_in_batch, return_components)


def linear_uld_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    *,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    paired: torch.Tensor | None = None,
    distance: str = "wasserstein",
    top_k: int | None = 64,
    temperature: float = 1.0,
    alpha: float = 1.0,
    exact_match_ids: tuple[torch.Tensor, torch.Tensor] | None = None,
    objective: str = "forward_kl",
    beta: float = 0.5,
    student_vocab_size: int | None = None,
    teacher_vocab_size: int | None = None,
    reduction: str = "mean",
    num_items_in_batch: torch.Tensor | int | None = None,
    chunk_size: int | None = None,
    return_components: bool = False,
) -> torch.Tensor | DistillationLossOutput:
    r"""[`uld_loss`] on `student_hidden @ student_weight.T` and `teacher_hidden @ teacher_weight.T`, in chunks.

    Same driver as [`~trl_distill.losses.linear_distillation_loss`]: only the positions in the loss are projected, a
    chunk at a time, and the gradient with respect to the student's hidden states, `lm_head` weight and bias is formed
    during the forward pass. The caller gathers the paired rows first: row `n` of `student_hidden` is the student
    position predicting a response token, row `n` of `teacher_hidden` the teacher position predicting its partner.

    Args:
        student_hidden (`torch.Tensor` of shape `(..., H_s)`), student_weight (`(V_s, H_s)`): gradients flow here.
        teacher_hidden (`torch.Tensor` of shape `(..., H_t)`), teacher_weight (`(V_t, H_t)`): no gradient.
        student_bias, teacher_bias (`torch.Tensor`, *optional*): `lm_head` biases.
        labels, paired, distance, top_k, temperature, alpha, exact_match_ids, objective, beta, student_vocab_size,
        teacher_vocab_size, reduction, num_items_in_batch, chunk_size, return_components: as in [`uld_loss`].
    """
    spec = _spec(reduction, distance, top_k, temperature, alpha, objective, beta, exact_match_ids)
    check_linear_shapes(student_hidden, student_weight, teacher_hidden, teacher_weight)
    widths = (
        _check_width("student_vocab_size", student_weight.shape[0], student_vocab_size),
        _check_width("teacher_vocab_size", teacher_weight.shape[0], teacher_vocab_size),
    )
    index, rows = _rows(labels, paired, student_hidden.shape[:-1], spec, student_hidden.device)
    total, kd_sum, ce_sum = linear_loss_sums(
        (student_hidden, student_weight, student_bias),
        (teacher_hidden, teacher_weight, teacher_bias),
        index,
        widths,
        rows,
        spec,
        chunk_size,
    )
    return _finish(total, kd_sum, ce_sum, rows, reduction, num_items_in_batch, return_components)


__all__ = ["ULD_DISTANCES", "ULDSpec", "linear_uld_loss", "uld_chunk", "uld_loss"]
