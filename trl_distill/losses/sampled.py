"""Token-level KD against tokens sampled from the teacher (Random Sampling KD, an offline sampled store).

Sparse Logit Sampling (Anshumann et al., ACL 2025, https://arxiv.org/abs/2503.16870): instead of the teacher's top-k
(a biased target: the student is pulled towards the teacher's head only), store `K` tokens drawn from the teacher's
distribution at every position, with replacement, as distinct ids and counts. The empirical distribution of the draws,
`w = count / K`, is an unbiased estimate of the teacher's `p`; the loss against it is linear in `w`, so its expected
value is the full-vocabulary forward KL and its expected gradient the full-vocabulary gradient
([`~trl_distill.losses.divergences.sampled_terms`]).

- [`teacher_sampled_targets`] draws the `K` tokens from the teacher's hidden states and `lm_head`, chunk by chunk,
  given uniforms in `[0, 1)` (the caller seeds them, e.g. per stored row, so a resumed store is identical).
- [`linear_sampled_distillation_loss`] computes the loss from the student's hidden states and `lm_head` with the
  chunking driver of [`~trl_distill.losses.linear_distillation_loss`] (the student's full normalizer, no `(N, V)`
  logits held, the gradient computed during the forward pass).

Only the forward KL can be estimated this way: reverse KL and the JSD weigh the teacher's log-probability at the
student's likely tokens, which the draws do not hold.
"""

from __future__ import annotations

import torch

from .chunked import (
    DistillationLossOutput,
    apply_linear,
    chunk_rows,
    projected_teacher,
    stored_teacher_rows,
)
from .divergences import KDSpec, SampledTargets
from .reduction import check_reduction


class SampledObjectiveError(ValueError):
    """An objective other than the forward KL was asked of a sampled teacher (it has no unbiased estimate)."""


def check_sampled_objective(objective: str, beta: float = 0.5) -> None:
    """Refuse objectives a sampled teacher cannot estimate without bias; only the forward KL passes."""
    effective = KDSpec(objective=objective, beta=beta).effective_beta
    if effective != 0.0:
        raise SampledObjectiveError(
            f"`objective={objective!r}`"
            + (f" with `beta={beta}`" if objective == "generalized_jsd" else "")
            + " cannot be trained from a sampled teacher store: reverse KL and the JSD need the teacher's probability "
            "at the student's likely tokens, which the draws do not hold, so no estimate from them is unbiased. Use "
            "`objective='forward_kl'`, or a top-k store (`kd_top_k=k`, `teacher_cache_kind='topk'`)."
        )


def linear_sampled_distillation_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_weights: torch.Tensor,
    teacher_entropy: torch.Tensor,
    *,
    student_bias: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    objective: str = "forward_kl",
    temperature: float = 1.0,
    alpha: float = 1.0,
    vocab_size: int | None = None,
    reduction: str = "mean",
    num_items_in_batch: torch.Tensor | int | None = None,
    chunk_size: int | None = None,
    return_components: bool = False,
) -> torch.Tensor | DistillationLossOutput:
    r"""`alpha * T^2 * KL_hat(p_T || q_T) + (1 - alpha) * CE(student, label)` with the teacher given by samples.

    Per position, `KL_hat = -sum_i w_i log q_T(id_i) - H(p_T)` (see
    [`~trl_distill.losses.divergences.sampled_terms`]): its expectation over the draws is the full-vocabulary forward
    KL at temperature `T`, and its expected gradient the full-vocabulary gradient. `log q_T` is the student's
    temperature-`T` log-softmax over the whole vocabulary, projected a chunk of rows at a time (no `(N, V)` logits
    held); the gradient with respect to `student_hidden`, `student_weight` and `student_bias` is computed during the
    forward pass.

    Args:
        student_hidden (`torch.Tensor` of shape `(..., H)`): the student's final hidden states, aligned so that
            position `i` predicts `labels[i]`. Gradients flow here.
        student_weight (`torch.Tensor` of shape `(V_s, H)`): the student's `lm_head` weight.
        teacher_ids (`torch.Tensor` of shape `(..., K)`, integer): distinct token ids drawn from the teacher.
        teacher_weights (`torch.Tensor` of shape `(..., K)`): `count / K` per id (0 for unused slots).
        teacher_entropy (`torch.Tensor` of shape `(...)`): the teacher's entropy at `temperature` (no gradient).
        objective (`str`): must be `"forward_kl"` (or `"generalized_jsd"` with `beta=0`); others raise
            [`SampledObjectiveError`].
        labels, mask, temperature, alpha, vocab_size, reduction, num_items_in_batch, chunk_size, return_components:
            as in [`~trl_distill.losses.linear_top_k_distillation_loss`]. The draws must have been taken at
            `temperature` (they cannot be re-weighted to another one).

    Returns:
        `torch.Tensor` (or [`DistillationLossOutput`]): the scalar loss, `T^2` included.
    """
    check_sampled_objective(objective, beta=0.0 if objective == "generalized_jsd" else 0.5)
    spec = KDSpec(objective="forward_kl", temperature=temperature, alpha=alpha)
    check_reduction(reduction)
    if teacher_ids.dim() < 1 or teacher_ids.shape[-1] < 1:
        raise ValueError(f"`teacher_ids` must have shape (..., K) with K >= 1, got {tuple(teacher_ids.shape)}.")
    k = teacher_ids.shape[-1]
    leading = student_hidden.shape[:-1]
    if (tuple(teacher_ids.shape), tuple(teacher_weights.shape), tuple(teacher_entropy.shape)) != (
        (*leading, k),
        (*leading, k),
        tuple(leading),
    ):
        raise ValueError(
            f"`teacher_ids` and `teacher_weights` must have shape {(*leading, k)} and `teacher_entropy` "
            f"{tuple(leading)} to match `student_hidden` {tuple(student_hidden.shape)}; got "
            f"{tuple(teacher_ids.shape)}, {tuple(teacher_weights.shape)} and {tuple(teacher_entropy.shape)}."
        )
    width, index, flat_labels, h_s, ids = stored_teacher_rows(
        student_hidden, student_weight, student_bias, teacher_ids, vocab_size, labels, mask, spec
    )
    device = h_s.device
    weights = teacher_weights.detach().reshape(-1, k).to(device).index_select(0, index).float()
    entropy = teacher_entropy.detach().reshape(-1).to(device).index_select(0, index).float()
    if weights.numel() and bool((weights < 0).any() | ~torch.isfinite(weights).all()):
        raise ValueError("`teacher_weights` must be finite and >= 0 (count / K of each sampled id).")

    def teacher_fn(rows):
        return SampledTargets(ids[rows], weights[rows], entropy[rows])

    return apply_linear(
        h_s,
        student_weight,
        student_bias,
        width,
        teacher_fn,
        flat_labels,
        spec,
        chunk_size,
        reduction,
        num_items_in_batch,
        return_components,
    )


@torch.no_grad()
def teacher_sampled_targets(
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    uniforms: torch.Tensor,
    *,
    temperature: float = 1.0,
    teacher_bias: torch.Tensor | None = None,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw `K` tokens per position from the teacher's temperature-`T` softmax, by inverting its CDF at `uniforms`.

    Draws are with replacement and exact up to float64 rounding of the CDF: draw `k` of row `n` is the first token
    whose cumulative probability exceeds `uniforms[n, k]` (a token of probability 0 is never drawn). The logits are
    projected in the teacher's precision and divided by the temperature as the online loss does it.

    Args:
        teacher_hidden (`torch.Tensor` of shape `(N, H)`): the teacher's final hidden states at the loss positions.
        teacher_weight (`torch.Tensor` of shape `(V_t, H)`): its `lm_head` weight; `teacher_bias` its bias.
        uniforms (`torch.Tensor` of shape `(N, K)`): numbers in `[0, 1)`, one per draw (float64 recommended).
        temperature (`float`): the loss temperature the draws are taken at.
        vocab_size (`int`, *optional*): real tokens; rows of `teacher_weight` beyond it (padding) are dropped.
        chunk_size (`int`, *optional*): positions projected at once.

    Returns:
        `(ids, counts, entropy)`: `ids` `(N, K)` int64, the distinct drawn ids of each row in increasing order, then
        zeros; `counts` `(N, K)` int64, how often each was drawn (0 in unused slots; each row sums to `K`);
        `entropy` `(N,)` float32, the teacher's exact entropy at `temperature`.
    """
    KDSpec(temperature=temperature)  # validates it
    width = teacher_weight.shape[0] if vocab_size is None else vocab_size
    if not 1 < width <= teacher_weight.shape[0]:
        raise ValueError(f"`vocab_size` must be in [2, {teacher_weight.shape[0]}], got {vocab_size!r}.")
    if uniforms.dim() != 2 or uniforms.shape[0] != teacher_hidden.shape[0] or uniforms.shape[1] < 1:
        raise ValueError(
            f"`uniforms` must have shape ({teacher_hidden.shape[0]}, K) with K >= 1 (one per draw), got "
            f"{tuple(uniforms.shape)}."
        )
    if uniforms.numel() and not bool(((uniforms >= 0) & (uniforms < 1)).all()):
        raise ValueError("`uniforms` must lie in [0, 1).")
    project = projected_teacher(
        teacher_hidden, teacher_weight[:width], None if teacher_bias is None else teacher_bias[:width]
    )
    rows = chunk_rows(chunk_size, width)
    ids, counts, entropy = [], [], []
    with torch.autocast(teacher_hidden.device.type, enabled=False):
        for start in range(0, teacher_hidden.shape[0], rows):
            logits = project(slice(start, start + rows))
            log_p = torch.log_softmax(logits / temperature, dim=-1)
            p = log_p.exp()
            entropy.append(-torch.where(p > 0, p * log_p, p.new_zeros(())).sum(-1))
            cdf = p.double().cumsum(-1)
            u = uniforms[start : start + rows].to(cdf.device, torch.float64)
            draws = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=width - 1)
            chunk_ids, chunk_counts = _distinct_counts(draws)
            ids.append(chunk_ids)
            counts.append(chunk_counts)
    k = uniforms.shape[1]
    if not ids:
        empty = teacher_hidden.new_zeros((0, k), dtype=torch.long)
        return empty, empty.clone(), teacher_hidden.new_zeros((0,), dtype=torch.float32)
    return torch.cat(ids), torch.cat(counts), torch.cat(entropy).float()


def _distinct_counts(draws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(N, K)` draws -> their distinct ids (increasing, then zeros) and counts (then zeros), row by row."""
    ordered = draws.sort(-1).values
    first = torch.ones_like(ordered, dtype=torch.bool)
    first[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    slot = first.long().cumsum(-1) - 1
    ids = torch.zeros_like(ordered).scatter_(-1, slot, ordered)
    counts = torch.zeros_like(ordered).scatter_add_(-1, slot, torch.ones_like(ordered))
    return ids, counts
