"""Chunked token-level distillation losses: from logits, or from hidden states and `lm_head` weights.

Both entry points run one chunking driver over the selected (unmasked) positions. For each chunk of rows the driver
projects to logits (for [`linear_distillation_loss`]), upcasts to float32, and asks
[`~trl_distill.losses.divergences.kd_chunk`] for the loss terms *and* the gradient with respect to the student logits.
That gradient is immediately pushed through the projection (`grad_hidden = dz @ W`, `grad_W += dz^T @ h`), so the
`(N, V)` logits of neither model are ever held at once and nothing is re-projected in backward: per step the cost is
the floor of three vocabulary GEMMs (teacher logits, student logits, hidden gradient) plus one for the weight gradient
when the `lm_head` is trained.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch

from .divergences import KDSpec, TopKTargets, kd_chunk
from .reduction import check_reduction, reduce_loss


# Rows per chunk: 256 keeps the vocabulary GEMMs efficient (the weight is streamed once per 256 rows) while a float32
# (rows x V) block stays ~30-150 MiB for V = 32k-152k; from about 185k tokens (where the power of two nearest to
# 128 MiB / (4 V) drops to 128) it shrinks to keep one block near 128 MiB.
# Measured in benchmarks/loss_memory.py: at V=151936, 32 rows took 2.3x the time of 256 rows.
_TARGET_CHUNK_ELEMENTS = 1 << 25
_MAX_CHUNK_ROWS = 256


class DistillationLossOutput(NamedTuple):
    """Loss and its parts, as returned with `return_components=True`.

    Attributes:
        loss (`torch.Tensor`): the reduced, differentiable `alpha * T^2 * D + (1 - alpha) * CE`.
        kd_loss (`torch.Tensor`): mean of the `T^2 * D` term over the positions of this call, detached.
        ce_loss (`torch.Tensor`): mean of the CE term over the positions of this call, detached (zero when
            `alpha == 1`).
        num_tokens (`torch.Tensor`): number of positions in the loss.
    """

    loss: torch.Tensor
    kd_loss: torch.Tensor
    ce_loss: torch.Tensor
    num_tokens: torch.Tensor


def default_chunk_size(vocab_size: int) -> int:
    """Rows per chunk: 256, or the power of two keeping one float32 `(rows, V)` block near 128 MiB if smaller."""
    rows = _TARGET_CHUNK_ELEMENTS / max(vocab_size, 1)
    return int(min(_MAX_CHUNK_ROWS, max(16, 2 ** round(math.log2(max(rows, 1.0))))))


def _run_chunks(
    num_rows: int,
    chunk_size: int,
    student_logits_fn: Callable[[slice], torch.Tensor],
    teacher_fn: Callable[[slice], torch.Tensor | TopKTargets],
    labels: torch.Tensor | None,
    spec: KDSpec,
    grad_fn: Callable[[slice, torch.Tensor], None] | None,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunking driver: sums of the KD and CE terms; calls `grad_fn(rows, dz)` with each chunk's logit gradient.

    `teacher_fn(rows)` gives the teacher's side of those rows: float32 logits, or stored [`TopKTargets`].
    """
    kd_sum = torch.zeros((), dtype=torch.float32, device=device)
    ce_sum = torch.zeros((), dtype=torch.float32, device=device)
    for start in range(0, num_rows, chunk_size):
        rows = slice(start, min(start + chunk_size, num_rows))
        z_s = student_logits_fn(rows).float()
        teacher = teacher_fn(rows)
        chunk_labels = None if labels is None else labels[rows]
        # Token-level KD by default; another loss (ULD) brings its own per-chunk terms on its spec.
        chunk_terms = kd_chunk if isinstance(spec, KDSpec) else spec.chunk_terms
        kd, ce, dz = chunk_terms(z_s, teacher, chunk_labels, spec, need_grad=grad_fn is not None)
        del z_s, teacher
        kd_sum += kd.sum()
        ce_sum += ce.sum()
        if grad_fn is not None:
            grad_fn(rows, dz)
    return kd_sum, ce_sum


def _scaled_saved_gradients(ctx, grad_total: torch.Tensor, dtypes) -> list[torch.Tensor | None]:
    """The gradients computed during forward, scaled by the incoming gradient *in place*, in the inputs' dtypes.

    In place, because a `(V, H)` weight gradient (671 MB at V = 262144, H = 640) would otherwise exist twice at the
    peak of backward, and the autograd engine can then adopt the returned tensor as `.grad` without a copy. The cost:
    one backward per forward (`retain_graph=True` and a second backward are refused with an error, never a wrong
    gradient).
    """
    if getattr(ctx, "backward_done", False):
        raise RuntimeError(
            "The chunked distillation loss computes its gradient during the forward pass and scales it in place in "
            "backward, so it can be backpropagated once only; compute the loss again for a second backward."
        )
    ctx.backward_done = True
    grads = []
    for saved, dtype in zip(ctx.saved_tensors, dtypes):
        grads.append(None if saved is None else saved.mul_(grad_total).to(dtype))
    return grads


def _outputs(ctx, spec: KDSpec, kd_sum: torch.Tensor, ce_sum: torch.Tensor):
    total = spec.alpha * kd_sum + (1.0 - spec.alpha) * ce_sum
    ctx.mark_non_differentiable(kd_sum, ce_sum)
    return total, kd_sum, ce_sum


class _LogitsKD(torch.autograd.Function):
    """Sum of the per-token loss over selected rows of logits; the gradient is computed during forward."""

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, labels, spec, chunk_size, need_grad):
        grad = torch.empty_like(student_logits, dtype=torch.float32) if need_grad else None

        def grad_fn(rows, dz):
            grad[rows] = dz

        kd_sum, ce_sum = _run_chunks(
            student_logits.shape[0],
            chunk_size,
            # Copies: `kd_chunk` consumes its buffers, and these rows belong to the caller.
            lambda rows: student_logits[rows].to(torch.float32, copy=True),
            lambda rows: teacher_logits[rows].to(torch.float32, copy=True),
            labels,
            spec,
            grad_fn if need_grad else None,
            student_logits.device,
        )
        ctx.save_for_backward(grad)
        ctx.student_dtype = student_logits.dtype
        return _outputs(ctx, spec, kd_sum, ce_sum)

    @staticmethod
    def backward(ctx, grad_total, _grad_kd, _grad_ce):
        (grad,) = _scaled_saved_gradients(ctx, grad_total, (ctx.student_dtype,))
        return grad, None, None, None, None, None


class _LinearKD(torch.autograd.Function):
    """Sum of the per-token loss of `h_s @ W_s^T (+ b_s)` against the teacher's side of the given rows.

    `teacher_fn(rows)` gives the teacher's float32 logits (projected by [`projected_teacher`]) or its stored
    [`TopKTargets`]; it is called with autocast disabled. Only the first `width` rows of `w_s` / `b_s` are the
    vocabulary; the gradient of the padded rows after them is zero. The whole (padded) weight is the input, not a
    `w_s[:width]` view, whose backward would allocate and copy another `(V, H)` gradient.
    """

    @staticmethod
    def forward(ctx, h_s, w_s_full, b_s_full, teacher_fn, labels, spec, chunk_size, needs, width):
        need_h, need_w, need_b = needs
        w_s = w_s_full[:width]
        b_s = None if b_s_full is None else b_s_full[:width]
        # Under autocast, project in the autocast dtype like the model's own `lm_head` would; accumulate in float32.
        device_type = h_s.device.type
        if torch.is_autocast_enabled(device_type):
            compute_dtype = torch.get_autocast_dtype(device_type)
        else:
            compute_dtype = torch.promote_types(h_s.dtype, w_s.dtype)
        with torch.autocast(device_type, enabled=False):
            w_s_c = w_s.to(compute_dtype)
            b_s_c = None if b_s is None else b_s.to(compute_dtype)

            grad_h = torch.empty(h_s.shape, dtype=torch.float32, device=h_s.device) if need_h else None
            grad_w_full = torch.zeros(w_s_full.shape, dtype=torch.float32, device=w_s.device) if need_w else None
            grad_b_full = torch.zeros(w_s_full.shape[0], dtype=torch.float32, device=w_s.device) if need_b else None
            grad_w = None if grad_w_full is None else grad_w_full[:width]
            grad_b = None if grad_b_full is None else grad_b_full[:width]

            def student_logits(rows):
                z = h_s[rows].to(compute_dtype) @ w_s_c.T
                return z if b_s_c is None else z + b_s_c

            def grad_fn(rows, dz):
                dz_c = dz.to(compute_dtype)
                if need_h:
                    grad_h[rows] = dz_c @ w_s_c
                if need_w:
                    h = h_s[rows].to(compute_dtype)
                    if compute_dtype == torch.float32:
                        grad_w.addmm_(dz_c.T, h)
                    elif compute_dtype == torch.float16:
                        # A chunk's sum over rows can pass float16's 65504 although the reduced gradient (scaled by
                        # 1 / N in backward) fits: accumulate this GEMM in float32.
                        grad_w.addmm_(dz.T, h.float())
                    else:
                        grad_w.add_((dz_c.T @ h).float())
                if need_b:
                    grad_b.add_(dz.sum(0))

            kd_sum, ce_sum = _run_chunks(
                h_s.shape[0],
                chunk_size,
                student_logits,
                teacher_fn,
                labels,
                spec,
                grad_fn if any(needs) else None,
                h_s.device,
            )
        ctx.save_for_backward(grad_h, grad_w_full, grad_b_full)
        ctx.dtypes = (h_s.dtype, w_s.dtype, None if b_s is None else b_s.dtype)
        return _outputs(ctx, spec, kd_sum, ce_sum)

    @staticmethod
    def backward(ctx, grad_total, _grad_kd, _grad_ce):
        grad_h, grad_w, grad_b = _scaled_saved_gradients(ctx, grad_total, ctx.dtypes)
        return grad_h, grad_w, grad_b, None, None, None, None, None, None


def projected_teacher(h_t: torch.Tensor, w_t: torch.Tensor, b_t: torch.Tensor | None):
    """`rows -> float32 h_t[rows] @ w_t^T (+ b_t)`, in the teacher's own precision (no gradient)."""
    teacher_dtype = torch.promote_types(h_t.dtype, w_t.dtype)
    w_t_c = w_t.to(teacher_dtype)
    b_t_c = None if b_t is None else b_t.to(teacher_dtype)

    def teacher_logits(rows):
        z = h_t[rows].to(teacher_dtype) @ w_t_c.T
        return (z if b_t_c is None else z + b_t_c).float()

    return teacher_logits


def row_selection(
    leading_shape: torch.Size,
    labels: torch.Tensor | None,
    mask: torch.Tensor | None,
    spec: KDSpec,
    device: torch.device,
    num_classes: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Flat indices of the positions in the loss, and their labels (checked to lie in `[0, num_classes)` when the
    cross-entropy reads them)."""
    if mask is not None and tuple(mask.shape) != tuple(leading_shape):
        raise ValueError(
            f"`mask` must have shape {tuple(leading_shape)} (the inputs without the last dim), got {tuple(mask.shape)}."
        )
    if labels is not None and tuple(labels.shape) != tuple(leading_shape):
        raise ValueError(f"`labels` must have shape {tuple(leading_shape)}, got {tuple(labels.shape)}.")
    if spec.needs_ce and labels is None:
        raise ValueError(
            f"`alpha={spec.alpha}` mixes in cross-entropy, which needs `labels`; pass `labels` or set `alpha=1.0`."
        )
    keep = torch.ones(leading_shape, dtype=torch.bool, device=device) if mask is None else mask.to(device).bool()
    if labels is not None:
        # Positions whose label is -100 (prompt, padding) are never in the loss.
        keep = keep & (labels.to(device) != -100)
    index = keep.reshape(-1).nonzero().squeeze(-1)
    flat_labels = None if labels is None else labels.to(device).reshape(-1).index_select(0, index).long()
    if spec.needs_ce and num_classes is not None and flat_labels.numel():
        low, high = int(flat_labels.min()), int(flat_labels.max())
        if low < 0 or high >= num_classes:
            raise ValueError(
                f"`labels` must be token ids in [0, {num_classes}) (the vocabulary in the loss) or -100 (ignored), got "
                f"{low if low < 0 else high} at a position in the loss; check the tokenizer/`vocab_size` pairing."
            )
    return index, flat_labels


def _vocab_width(student_width: int, teacher_width: int, vocab_size: int | None) -> int:
    if vocab_size is None:
        if student_width != teacher_width:
            raise ValueError(
                f"Student and teacher have {student_width} and {teacher_width} vocabulary rows; pass `vocab_size` (the "
                "number of real tokens, e.g. `len(tokenizer)`) so that padding rows are excluded from both distributions."
            )
        return student_width
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"`vocab_size` must be a positive integer, got {vocab_size!r}.")
    if vocab_size > min(student_width, teacher_width):
        raise ValueError(
            f"`vocab_size={vocab_size}` exceeds the vocabulary rows of the student ({student_width}) or the teacher "
            f"({teacher_width})."
        )
    return vocab_size


def chunk_rows(chunk_size: int | None, width: int) -> int:
    if chunk_size is None:
        return default_chunk_size(width)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"`chunk_size` must be None or a positive integer, got {chunk_size!r}.")
    return chunk_size


def _finish(total, kd_sum, ce_sum, count, reduction, num_items_in_batch, return_components):
    loss = reduce_loss(total, count, reduction=reduction, num_items_in_batch=num_items_in_batch)
    if not return_components:
        return loss
    # The parts are per-token means over this call's positions, whatever the reduction: they are for logging.
    denominator = max(int(count), 1)
    return DistillationLossOutput(
        loss, kd_sum / denominator, ce_sum / denominator, torch.as_tensor(count, device=loss.device)
    )


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    labels: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    objective: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    top_k: int | None = None,
    alpha: float = 1.0,
    vocab_size: int | None = None,
    reduction: str = "mean",
    num_items_in_batch: torch.Tensor | int | None = None,
    chunk_size: int | None = None,
    return_components: bool = False,
) -> torch.Tensor | DistillationLossOutput:
    r"""Token-level distillation loss between student and teacher logits.

    Per position: `alpha * T^2 * D(teacher_T || student_T) + (1 - alpha) * CE(student, label)`, where `D` is the divergence
    chosen by `objective` between the temperature-`T` softmaxes (see [`trl_distill.losses.divergences`]). With the default
    `alpha=1.0` this is the pure divergence `T^2 * D`, the `T^2` factor keeping gradient magnitudes comparable across
    temperatures (Hinton et al. 2015, https://arxiv.org/abs/1503.02531).

    Args:
        student_logits (`torch.Tensor` of shape `(..., V_s)`): student logits; gradients flow to them.
        teacher_logits (`torch.Tensor` of shape `(..., V_t)`): teacher logits; treated as constants (no gradient).
        labels (`torch.Tensor` of shape `(...)`, *optional*): target ids; positions equal to -100 are excluded. Required
            when `alpha < 1`.
        mask (`torch.Tensor` of shape `(...)`, *optional*): boolean, `True` where the position is in the loss.
        objective (`str`): `"forward_kl"` = KL(teacher || student) (mode-covering), `"reverse_kl"` = KL(student ||
            teacher) (mode-seeking), `"jsd"` (beta = 0.5) or `"generalized_jsd"` (uses `beta`).
        beta (`float`): generalized-JSD interpolation, TRL's meaning: 0 forward KL, 1 reverse KL. Only read with
            `objective="generalized_jsd"`.
        temperature (`float`): softmax temperature `T` shared by both sides.
        top_k (`int`, *optional*): keep the teacher's top-k tokens and fold the rest of the vocabulary into one "other"
            bucket (by logsumexp, on both sides); `None` uses the full vocabulary.
        alpha (`float`): weight of the KD term; `1 - alpha` weighs the CE on `labels` (at temperature 1).
        vocab_size (`int`, *optional*): number of real tokens; logits beyond it (embedding padding rows) are dropped on
            both sides. Required when the two widths differ.
        reduction (`str`): `"mean"` over the positions in the loss, or `"sum"`.
        num_items_in_batch (`int` or `torch.Tensor`, *optional*): with `"mean"`, the token count of the full
            accumulated batch (gradient accumulation gives the gradient of one big batch).
        chunk_size (`int`, *optional*): rows processed at once; default 256 (fewer from about 185k tokens).
        return_components (`bool`): return a [`DistillationLossOutput`] with the KD and CE parts.

    Returns:
        `torch.Tensor`: scalar loss (already including `T^2`); zero (with zero gradients) when no position is selected.
    """
    spec = KDSpec(objective=objective, beta=beta, temperature=temperature, top_k=top_k, alpha=alpha)
    check_reduction(reduction)
    check_logits_shapes(student_logits, teacher_logits)
    width = _vocab_width(student_logits.shape[-1], teacher_logits.shape[-1], vocab_size)
    index, flat_labels = row_selection(
        student_logits.shape[:-1], labels, mask, spec, student_logits.device, num_classes=width
    )
    total, kd_sum, ce_sum = logits_loss_sums(
        student_logits, teacher_logits, index, (width, width), flat_labels, spec, chunk_size
    )
    return _finish(total, kd_sum, ce_sum, index.numel(), reduction, num_items_in_batch, return_components)


def linear_distillation_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    *,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    objective: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    top_k: int | None = None,
    alpha: float = 1.0,
    vocab_size: int | None = None,
    reduction: str = "mean",
    num_items_in_batch: torch.Tensor | int | None = None,
    chunk_size: int | None = None,
    return_components: bool = False,
) -> torch.Tensor | DistillationLossOutput:
    r"""[`distillation_loss`] on `student_hidden @ student_weight.T` and `teacher_hidden @ teacher_weight.T`, in chunks.

    Only the selected positions are projected, a chunk of rows at a time, and the gradient with respect to the student's
    hidden states, `lm_head` weight and bias is computed during the forward pass, so neither model's full `(N, V)`
    logits are ever materialized and backward does not re-project. Student and teacher may differ in hidden size
    and in the number of (padded) vocabulary rows.

    Args:
        student_hidden (`torch.Tensor` of shape `(..., H_s)`): final hidden states of the student, aligned so that
            position `i` predicts `labels[i]` (shift them before calling). Gradients flow here.
        student_weight (`torch.Tensor` of shape `(V_s, H_s)`): student `lm_head` weight; gets a gradient if it requires one.
        teacher_hidden (`torch.Tensor` of shape `(..., H_t)`): teacher hidden states at the same positions (no gradient).
        teacher_weight (`torch.Tensor` of shape `(V_t, H_t)`): teacher `lm_head` weight (no gradient).
        student_bias, teacher_bias (`torch.Tensor` of shape `(V,)`, *optional*): `lm_head` biases.
        chunk_size (`int`, *optional*): positions projected at once; trades peak memory for GEMM efficiency.
        labels, mask, objective, beta, temperature, top_k, alpha, vocab_size, reduction, num_items_in_batch,
        return_components: as in [`distillation_loss`].

    Returns:
        `torch.Tensor`: the same scalar as [`distillation_loss`] on the projected logits.
    """
    spec = KDSpec(objective=objective, beta=beta, temperature=temperature, top_k=top_k, alpha=alpha)
    check_reduction(reduction)
    check_linear_shapes(student_hidden, student_weight, teacher_hidden, teacher_weight)
    check_bias("student", student_bias, student_weight)
    check_bias("teacher", teacher_bias, teacher_weight)
    width = _vocab_width(student_weight.shape[0], teacher_weight.shape[0], vocab_size)
    index, flat_labels = row_selection(
        student_hidden.shape[:-1], labels, mask, spec, student_hidden.device, num_classes=width
    )
    total, kd_sum, ce_sum = linear_loss_sums(
        (student_hidden, student_weight, student_bias),
        (teacher_hidden, teacher_weight, teacher_bias),
        index,
        (width, width),
        flat_labels,
        spec,
        chunk_size,
    )
    return _finish(total, kd_sum, ce_sum, index.numel(), reduction, num_items_in_batch, return_components)


# Entry points of the chunking driver shared by every loss over two vocabularies (token-level KD, ULD): validate the
# shapes, then project and reduce the selected rows. `row_data` is sliced per chunk and handed to the spec's terms
# (labels for token-level KD).


def check_logits_shapes(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> None:
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise ValueError(
            f"`student_logits` {tuple(student_logits.shape)} and `teacher_logits` {tuple(teacher_logits.shape)} must "
            "agree on every dimension but the last."
        )


def check_bias(name: str, bias: torch.Tensor | None, weight: torch.Tensor) -> None:
    """A `lm_head` bias must hold one entry per row of its weight."""
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(
            f"`{name}_bias` must have shape ({weight.shape[0]},) (one entry per row of `{name}_weight`), got "
            f"{tuple(bias.shape)}."
        )


def check_linear_shapes(student_hidden, student_weight, teacher_hidden, teacher_weight) -> None:
    if student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
        raise ValueError(
            f"`student_hidden` {tuple(student_hidden.shape)} and `teacher_hidden` {tuple(teacher_hidden.shape)} must "
            "agree on every dimension but the last (the hidden sizes may differ)."
        )
    for name, hidden, weight in (
        ("student", student_hidden, student_weight),
        ("teacher", teacher_hidden, teacher_weight),
    ):
        if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
            raise ValueError(
                f"`{name}_weight` must have shape (vocab, {hidden.shape[-1]}) to match `{name}_hidden`, got "
                f"{tuple(weight.shape)}."
            )


def logits_loss_sums(student_logits, teacher_logits, index, widths, row_data, spec, chunk_size):
    """`(total, kd_sum, ce_sum)` over the rows `index` of two logit tensors, keeping the first `widths` columns."""
    width_s, width_t = widths
    s = student_logits.reshape(-1, student_logits.shape[-1])[:, :width_s].index_select(0, index)
    t = teacher_logits.detach().reshape(-1, teacher_logits.shape[-1])[:, :width_t].index_select(0, index)
    need_grad = torch.is_grad_enabled() and student_logits.requires_grad
    return _LogitsKD.apply(s, t, row_data, spec, chunk_rows(chunk_size, max(widths)), need_grad)


def linear_loss_sums(student, teacher, index, widths, row_data, spec, chunk_size):
    """The same from `(hidden, lm_head weight, bias)` of each side, projected chunk by chunk."""
    (student_hidden, student_weight, student_bias), (teacher_hidden, teacher_weight, teacher_bias) = student, teacher
    width_s, width_t = widths
    h_s = student_hidden.reshape(-1, student_hidden.shape[-1]).index_select(0, index)
    h_t = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1]).index_select(0, index)
    w_t = teacher_weight.detach()[:width_t]
    b_t = None if teacher_bias is None else teacher_bias.detach()[:width_t]
    teacher_fn = projected_teacher(h_t, w_t, b_t)
    return _student_side_sums(h_s, student_weight, student_bias, width_s, teacher_fn, row_data, spec, chunk_size)


def _student_side_sums(h_s, student_weight, student_bias, width, teacher_fn, row_data, spec, chunk_size):
    """Run [`_LinearKD`] on the selected student rows against `teacher_fn`'s side, over `width` vocabulary rows."""
    grad_on = torch.is_grad_enabled()
    needs = (
        grad_on and h_s.requires_grad,
        grad_on and student_weight.requires_grad,
        grad_on and student_bias is not None and student_bias.requires_grad,
    )
    return _LinearKD.apply(
        h_s, student_weight, student_bias, teacher_fn, row_data, spec, chunk_rows(chunk_size, width), needs, width
    )


def stored_teacher_rows(student_hidden, student_weight, student_bias, teacher_ids, vocab_size, labels, mask, spec):
    """What the stored-teacher losses (top-k, sampled) share before the chunks: the student `lm_head`'s shape,
    `vocab_size` and bias checked, the positions in the loss selected, and the teacher's `(..., K)` ids at those
    positions range-checked.

    Returns:
        `(width, index, flat_labels, h_s, ids)`: the vocabulary rows, the selected flat positions (to select the
        teacher's other tensors with), their labels, the student's hidden states and the teacher's ids there (int64).
    """
    if student_weight.dim() != 2 or student_weight.shape[1] != student_hidden.shape[-1]:
        raise ValueError(
            f"`student_weight` must have shape (vocab, {student_hidden.shape[-1]}), got {tuple(student_weight.shape)}."
        )
    width = student_weight.shape[0] if vocab_size is None else vocab_size
    if isinstance(width, bool) or not isinstance(width, int) or not 1 <= width <= student_weight.shape[0]:
        raise ValueError(f"`vocab_size` must be an integer in [1, {student_weight.shape[0]}], got {vocab_size!r}.")
    device = student_hidden.device
    check_bias("student", student_bias, student_weight)
    index, flat_labels = row_selection(student_hidden.shape[:-1], labels, mask, spec, device, num_classes=width)
    h_s = student_hidden.reshape(-1, student_hidden.shape[-1]).index_select(0, index)
    ids = teacher_ids.reshape(-1, teacher_ids.shape[-1]).to(device).index_select(0, index).long()
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= width):
        raise ValueError(
            f"`teacher_ids` must be token ids in [0, {width}) (the vocabulary), got values in "
            f"[{int(ids.min())}, {int(ids.max())}]."
        )
    return width, index, flat_labels, h_s, ids


def apply_linear(
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
):
    """[`_student_side_sums`] reduced to a [`DistillationLossOutput`] (the stored-teacher loss's entry)."""
    total, kd_sum, ce_sum = _student_side_sums(
        h_s, student_weight, student_bias, width, teacher_fn, flat_labels, spec, chunk_size
    )
    return _finish(total, kd_sum, ce_sum, h_s.shape[0], reduction, num_items_in_batch, return_components)
