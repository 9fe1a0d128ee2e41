"""Token-level KD against a teacher given only by its top-k (e.g. read from an offline store, issue 6).

[`teacher_top_k_targets`] computes the teacher's side from its hidden states and `lm_head`, projected and scaled as
the online loss does it.

The teacher's side of a top-k loss is all the online path ever uses: its k most likely ids and the log-probabilities
(at the loss temperature) of those ids and of the "other" bucket. [`linear_top_k_distillation_loss`] takes exactly
that and runs the same chunking driver and the same divergence kernel
([`~trl_distill.losses.divergences.kd_chunk`]) as [`~trl_distill.losses.linear_distillation_loss`] with `top_k=k`, so
with the same targets the two give the same value and gradients.
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
from .divergences import KDSpec, TopKTargets, teacher_top_k
from .reduction import check_reduction


def linear_top_k_distillation_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_log_probs: torch.Tensor,
    *,
    student_bias: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    objective: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    alpha: float = 1.0,
    vocab_size: int | None = None,
    reduction: str = "mean",
    num_items_in_batch: torch.Tensor | int | None = None,
    chunk_size: int | None = None,
    return_components: bool = False,
) -> torch.Tensor | DistillationLossOutput:
    r"""[`~trl_distill.losses.linear_distillation_loss`] with `top_k=k`, the teacher given by its top-k only.

    Per position: `alpha * T^2 * D(p_b, q_b) + (1 - alpha) * CE(student, label)`, where `p_b` is the teacher's
    distribution over its k ids plus one "other" bucket (`teacher_log_probs`, renormalized) and `q_b` the student's
    temperature-`T` softmax folded the same way: its probabilities at `teacher_ids`, and the summed mass of every
    other token. The student's `(N, V)` logits are never held: rows are projected a chunk at a time and the gradient
    with respect to `student_hidden`, `student_weight` and `student_bias` is computed during the forward pass.

    Args:
        student_hidden (`torch.Tensor` of shape `(..., H)`): the student's final hidden states, aligned so that
            position `i` predicts `labels[i]`. Gradients flow here.
        student_weight (`torch.Tensor` of shape `(V_s, H)`): the student's `lm_head` weight.
        teacher_ids (`torch.Tensor` of shape `(..., k)`, integer): the teacher's top-k token ids at each position.
        teacher_log_probs (`torch.Tensor` of shape `(..., k + 1)`): the teacher's log-probabilities **at temperature
            `temperature`** of `teacher_ids`, then of the "other" bucket in the last column. They cannot be rescaled
            to another temperature: the bucket's mass at another temperature depends on the tokens that were dropped.
        student_bias (`torch.Tensor` of shape `(V_s,)`, *optional*): `lm_head` bias.
        vocab_size (`int`, *optional*): real tokens; student logits beyond it (embedding padding) are dropped.
        labels, mask, objective, beta, temperature, alpha, reduction, num_items_in_batch, chunk_size,
        return_components: as in [`~trl_distill.losses.distillation_loss`].

    Returns:
        `torch.Tensor` (or [`DistillationLossOutput`]): the scalar loss, `T^2` included.
    """
    if teacher_ids.dim() < 1 or teacher_ids.shape[-1] < 1:
        raise ValueError(f"`teacher_ids` must have shape (..., k) with k >= 1, got {tuple(teacher_ids.shape)}.")
    k = teacher_ids.shape[-1]
    spec = KDSpec(objective=objective, beta=beta, temperature=temperature, top_k=k, alpha=alpha)
    check_reduction(reduction)
    leading = student_hidden.shape[:-1]
    if tuple(teacher_ids.shape) != (*leading, k) or tuple(teacher_log_probs.shape) != (*leading, k + 1):
        raise ValueError(
            f"`teacher_ids` must have shape {(*leading, k)} and `teacher_log_probs` {(*leading, k + 1)} (k entries "
            f"plus the 'other' bucket) to match `student_hidden` {tuple(student_hidden.shape)}; got "
            f"{tuple(teacher_ids.shape)} and {tuple(teacher_log_probs.shape)}."
        )
    width, index, flat_labels, h_s, ids = stored_teacher_rows(
        student_hidden, student_weight, student_bias, teacher_ids, vocab_size, labels, mask, spec
    )
    device = h_s.device
    log_probs = teacher_log_probs.detach().reshape(-1, k + 1).to(device).index_select(0, index)

    def teacher_fn(rows):
        # A copy: the kernel consumes its buffers.
        return TopKTargets(ids[rows], log_probs[rows].to(torch.float32, copy=True))

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
def teacher_top_k_targets(
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    *,
    top_k: int,
    temperature: float = 1.0,
    teacher_bias: torch.Tensor | None = None,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
    sorted: bool = True,
) -> TopKTargets:
    """The teacher's top-k ids and bucket log-probabilities at `temperature` for `N` positions, chunk by chunk.

    The logits are projected in the teacher's precision and divided by the temperature exactly as in
    [`~trl_distill.losses.linear_distillation_loss`], so these targets reproduce its `top_k` loss.

    Args:
        teacher_hidden (`torch.Tensor` of shape `(N, H)`): the teacher's final hidden states at the loss positions.
        teacher_weight (`torch.Tensor` of shape `(V_t, H)`): its `lm_head` weight; `teacher_bias` its bias.
        top_k (`int`): entries kept, `1 <= top_k < vocab_size`.
        temperature (`float`): the loss temperature the log-probabilities are taken at.
        vocab_size (`int`, *optional*): real tokens; rows of `teacher_weight` beyond it (padding) are dropped.
        chunk_size (`int`, *optional*): positions projected at once.
        sorted (`bool`): order each row's ids by decreasing probability (a store needs it to fold to a smaller k).

    Returns:
        [`TopKTargets`]: `ids` `(N, top_k)` int64, `log_probs` `(N, top_k + 1)` float32 (last column: "other").
    """
    KDSpec(temperature=temperature, top_k=top_k)  # validates both
    width = teacher_weight.shape[0] if vocab_size is None else vocab_size
    if not top_k < width <= teacher_weight.shape[0]:
        raise ValueError(
            f"`top_k={top_k}` must be below the vocabulary size ({width}) and `vocab_size` at most the "
            f"{teacher_weight.shape[0]} rows of the `lm_head`."
        )
    project = projected_teacher(
        teacher_hidden, teacher_weight[:width], None if teacher_bias is None else teacher_bias[:width]
    )
    rows = chunk_rows(chunk_size, width)
    ids, log_probs = [], []
    with torch.autocast(teacher_hidden.device.type, enabled=False):
        for start in range(0, teacher_hidden.shape[0], rows):
            # Divided by the temperature inside, exactly as the online kernel does it.
            chunk = teacher_top_k(project(slice(start, start + rows)), top_k, sorted=sorted, temperature=temperature)
            ids.append(chunk.ids)
            log_probs.append(chunk.log_probs)
    if not ids:
        empty = teacher_hidden.new_zeros((0, top_k), dtype=torch.long)
        return TopKTargets(empty, teacher_hidden.new_zeros((0, top_k + 1), dtype=torch.float32))
    return TopKTargets(torch.cat(ids), torch.cat(log_probs))
