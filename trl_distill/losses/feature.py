"""Feature (hidden-state) distillation loss: match the student's projected hidden states to the teacher's.

FitNets (Romero et al. 2015, https://arxiv.org/abs/1412.6550) pull an intermediate student representation toward the
teacher's through a learned regressor. Here the regressor lives outside this package (`trl_distill.features`); this
module only measures the gap between already-projected student features and teacher features, per position, and
reduces it through [`~trl_distill.losses.reduce_loss`] like the logit loss, so the two can be added.

Per position and layer pair, with `s` the projected student feature and `t` the teacher feature (both of width `D`):

- `"mse"`:    `||s - t||^2 / D` (the mean over dimensions: the value does not grow with the hidden size);
- `"cosine"`: `1 - <s, t> / (||s|| ||t||)` (in [0, 2], independent of both width and scale);
- `"relative_mse"`: `||s - t||^2 / ||t||^2` (1 at `s = 0`, independent of width and of the teacher's scale at that
  position, yet still asks the student to match the magnitude, which cosine ignores).

Real LMs carry massive activations (SmolLM2-135M: |h| ~ 25,000 in one dimension at the first position, hidden
values ~1-10 elsewhere): with `"mse"` those positions and layers dominate the term (thousands of nats-equivalents
beside a KD term of ~10), so `"relative_mse"` normalizes each position by the teacher's own energy there.

The loss is the average over layer pairs of the reduced per-position values, so adding pairs does not change its scale.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from .reduction import check_reduction, reduce_loss


FEATURE_LOSSES = ("mse", "cosine", "relative_mse")

# Norms below this count as zero in the cosine loss (its value is then 1 and its gradient finite), and squared teacher
# norms below its square as that floor in `relative_mse` (a zero teacher feature gives a finite value and gradient).
_COSINE_EPS = 1e-8


class FeatureLossOutput(NamedTuple):
    """Feature loss and its parts, as returned with `return_components=True`.

    Attributes:
        loss (`torch.Tensor`): the reduced, differentiable loss (mean over pairs).
        feature_loss (`torch.Tensor`): mean per-position value over the positions of this call (mean over pairs),
            detached; zero when no position is selected.
        num_positions (`torch.Tensor`): number of positions in the loss (per pair).
    """

    loss: torch.Tensor
    feature_loss: torch.Tensor
    num_positions: torch.Tensor


def feature_terms(student: torch.Tensor, teacher: torch.Tensor, *, loss: str = "mse") -> torch.Tensor:
    """Per-row feature loss, in float32.

    Args:
        student (`torch.Tensor` of shape `(N, D)`): projected student features; gradients flow to them.
        teacher (`torch.Tensor` of shape `(N, D)`): teacher features, treated as constants.
        loss (`str`): `"mse"` (`||s - t||^2 / D`), `"cosine"` (`1 - cos(s, t)`) or `"relative_mse"`
            (`||s - t||^2 / ||t||^2`).

    Returns:
        `torch.Tensor` of shape `(N,)`, float32.
    """
    if loss not in FEATURE_LOSSES:
        raise ValueError(f"`loss` must be one of {FEATURE_LOSSES}, got {loss!r}.")
    s = student.float()
    t = teacher.detach().float()
    if loss == "mse":
        return (s - t).pow(2).mean(-1)
    if loss == "relative_mse":
        return (s - t).pow(2).sum(-1) / t.pow(2).sum(-1).clamp_min(_COSINE_EPS**2)
    # Normalize each side separately, clamping the norm, so a zero feature gives a finite gradient (never NaN).
    s_unit = s / s.norm(dim=-1, keepdim=True).clamp_min(_COSINE_EPS)
    t_unit = t / t.norm(dim=-1, keepdim=True).clamp_min(_COSINE_EPS)
    return 1.0 - (s_unit * t_unit).sum(-1)


def feature_distillation_loss(
    student_features: torch.Tensor | Sequence[torch.Tensor],
    teacher_features: torch.Tensor | Sequence[torch.Tensor],
    *,
    mask: torch.Tensor | None = None,
    loss: str = "mse",
    reduction: str = "mean",
    num_items_in_batch: torch.Tensor | int | None = None,
    return_components: bool = False,
) -> torch.Tensor | FeatureLossOutput:
    r"""Hidden-state distillation loss over the positions selected by `mask`, averaged over layer pairs.

    `L = (1 / P) * sum_p reduce_i l(s_{p,i}, t_{p,i})`, with `l` from [`feature_terms`], `i` over the positions where
    `mask` is true and `P` the number of pairs.

    Args:
        student_features (`torch.Tensor` or a sequence of them, each of shape `(..., D_p)`): the student's hidden states
            of each layer pair, already projected to the teacher's width; gradients flow to them (and so to the
            student and the projection).
        teacher_features (`torch.Tensor` or a sequence of them, each of shape `(..., D_p)`): the teacher's hidden
            states of the same pairs; treated as constants (detached).
        mask (`torch.Tensor` of shape `(...)`, *optional*): boolean, `True` where the position is in the loss (use the
            logit loss's mask: response tokens, no prompt or padding). `None` selects every position.
        loss (`str`): `"mse"`, `"cosine"` or `"relative_mse"`, see [`feature_terms`].
        reduction (`str`): `"mean"` over the selected positions, or `"sum"`.
        num_items_in_batch (`torch.Tensor` or `int`, *optional*): with `"mean"`, the number of positions of the whole
            accumulated batch, used as denominator so gradient accumulation gives the gradient of one big batch.
        return_components (`bool`): also return the detached per-position mean and the position count.

    Returns:
        `torch.Tensor` (float32 scalar) or [`FeatureLossOutput`]. When no position is selected the loss is an exact
        zero with zero gradients, never NaN.
    """
    check_reduction(reduction)
    if isinstance(student_features, torch.Tensor):
        student_features = [student_features]
    if isinstance(teacher_features, torch.Tensor):
        teacher_features = [teacher_features]
    if len(student_features) != len(teacher_features) or not student_features:
        raise ValueError(
            f"Expected the same non-zero number of student and teacher features (one per layer pair), got "
            f"{len(student_features)} and {len(teacher_features)}."
        )
    losses, values = [], []
    count = torch.zeros((), dtype=torch.long)
    for pair, (student, teacher) in enumerate(zip(student_features, teacher_features)):
        if student.shape != teacher.shape:
            raise ValueError(
                f"Layer pair {pair}: student features of shape {tuple(student.shape)} do not match the teacher's "
                f"{tuple(teacher.shape)}; project the student's hidden states to the teacher's width first."
            )
        width = student.shape[-1]
        keep = _selection(mask, student.shape[:-1], student.device)
        rows = feature_terms(student.reshape(-1, width)[keep], teacher.reshape(-1, width)[keep], loss=loss)
        total, count = rows.sum(), keep.sum()
        losses.append(reduce_loss(total, count, reduction=reduction, num_items_in_batch=num_items_in_batch))
        values.append(total.detach() / count.clamp(min=1))
    result = torch.stack(losses).mean()
    if not return_components:
        return result
    return FeatureLossOutput(result, torch.stack(values).mean(), count)


def _selection(mask: torch.Tensor | None, leading_shape: torch.Size, device: torch.device) -> torch.Tensor:
    if mask is None:
        return torch.ones(leading_shape.numel(), dtype=torch.bool, device=device)
    if tuple(mask.shape) != tuple(leading_shape):
        raise ValueError(
            f"`mask` must have shape {tuple(leading_shape)} (the features without the last dim), got {tuple(mask.shape)}."
        )
    return mask.to(device).bool().reshape(-1)
