"""Float64 reference of the feature (hidden-state) KD loss, written from the formula (shares no code with the package).

Per position and layer pair: `mse = sum_d (s_d - t_d)^2 / D`, `cosine = 1 - sum_d s_d t_d / (sqrt(sum_d s_d^2) *
sqrt(sum_d t_d^2))`, `relative_mse = sum_d (s_d - t_d)^2 / sum_d t_d^2`; each pair's values are summed over the selected positions and divided by their number (or by
`num_items_in_batch`; not divided for `reduction="sum"`), and the pairs are averaged.
"""

from __future__ import annotations

import torch


def per_position(s: torch.Tensor, t: torch.Tensor, loss: str) -> torch.Tensor:
    s, t = s.double(), t.double()
    if loss == "mse":
        return ((s - t) ** 2).sum(-1) / s.shape[-1]
    if loss == "relative_mse":
        return ((s - t) ** 2).sum(-1) / (t * t).sum(-1)
    dot = (s * t).sum(-1)
    return 1.0 - dot / (torch.sqrt((s * s).sum(-1)) * torch.sqrt((t * t).sum(-1)))


def reference_feature_loss(students, teachers, *, mask=None, loss="mse", reduction="mean", num_items_in_batch=None):
    """`students`/`teachers`: lists of `(..., D_p)` tensors; `mask`: `(...)` booleans or None. Returns a float64 scalar."""
    values = []
    for s, t in zip(students, teachers):
        keep = torch.ones(s.shape[:-1], dtype=torch.bool) if mask is None else mask.bool()
        total = per_position(s[keep], t[keep], loss).sum()
        if reduction == "sum":
            values.append(total)
        else:
            count = int(keep.sum()) if num_items_in_batch is None else int(num_items_in_batch)
            values.append(total / max(count, 1))
    return sum(values) / len(values)
