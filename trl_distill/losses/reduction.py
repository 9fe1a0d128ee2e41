"""The one place where per-token loss sums become the scalar that is optimized (house style, convention 3)."""

from __future__ import annotations

import torch


REDUCTIONS = ("mean", "sum")


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"`reduction` must be one of {REDUCTIONS}, got {reduction!r}.")


def reduce_loss(
    total: torch.Tensor,
    count: torch.Tensor | int,
    *,
    reduction: str = "mean",
    num_items_in_batch: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """Reduce a summed per-token loss.

    Args:
        total (`torch.Tensor`): scalar sum of the per-token losses.
        count (`torch.Tensor` or `int`): number of tokens that contributed to `total`.
        reduction (`str`): `"mean"` divides by the token count, `"sum"` returns `total`.
        num_items_in_batch (`torch.Tensor` or `int`, *optional*): with `"mean"`, the token count of the whole
            (gradient-accumulated, possibly cross-rank) batch, used instead of `count` so that accumulating micro-batches
            gives the gradient of one big batch.

    Returns:
        `torch.Tensor`: the scalar loss. With `"mean"` the denominator is clamped at 1, so a batch where every position
        is masked gives an exact (differentiable) zero instead of `0 / 0 = NaN`. A negative `num_items_in_batch`, or
        0 while this call has positions in the loss, raises `ValueError` (it cannot be the batch's token count).
    """
    check_reduction(reduction)
    if num_items_in_batch is not None:
        check_num_items(num_items_in_batch, count)
    if reduction == "sum":
        return total
    denominator = count if num_items_in_batch is None else num_items_in_batch
    denominator = torch.as_tensor(denominator, device=total.device).to(total.dtype).clamp(min=1)
    return total / denominator


def check_num_items(num_items_in_batch: torch.Tensor | int, count: torch.Tensor | int) -> None:
    """`num_items_in_batch` counts the loss positions of the whole accumulated batch, so it is at least `count`'s 1."""
    if isinstance(num_items_in_batch, bool) or not isinstance(num_items_in_batch, (int, float, torch.Tensor)):
        raise TypeError(
            f"`num_items_in_batch` must be an int or a scalar tensor (the batch's token count), got "
            f"{type(num_items_in_batch).__name__}."
        )
    value = float(num_items_in_batch)
    if value < 0 or (value == 0 and int(count) > 0):
        raise ValueError(
            f"`num_items_in_batch={value:g}` cannot be the token count of a batch that has {int(count)} positions in "
            "this call's loss; pass the number of positions in the loss over the whole accumulated batch (or None)."
        )
