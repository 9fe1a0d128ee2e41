"""Feature-KD layer maps: the config's forms (`parse_layer_map`) and indices checked against the models.

A leaf module (standard library only), so that `DistillConfig` can validate `feature_layer_map` without importing the
feature term's torch code. Layer `i` means the output of decoder layer `i` (0-based); negative indices count from the
end.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any


FEATURE_PROJECTION_MODES = ("auto", "always")
_LAYER_MAP_EXAMPLE = "'0:1,1:3' or [[0, 1], [1, 3]]"


def parse_layer_map(value: Any) -> list[list[int]] | None:
    """Normalize `DistillConfig.feature_layer_map` to `[[student_layer, teacher_layer], ...]` (or `None`: default).

    Accepted: `"0:1,1:3"` (command line), a JSON string `"[[0, 1], [1, 3]]"`, a list of pairs `[[0, 1], (1, 3)]` or of
    `"s:t"` strings (Python, YAML). Checks the form only; indices are checked against the models at trainer start.
    """
    if value is None:
        return None
    try:
        if isinstance(value, str):
            text = value.strip()
            items = json.loads(text) if text.startswith("[") else [item for item in text.split(",") if item.strip()]
        elif isinstance(value, (list, tuple)):
            items = list(value)
        else:
            raise ValueError(f"a {type(value).__name__} is neither a string nor a list")
        pairs = [_pair(item) for item in items]
    except ValueError as error:
        raise ValueError(
            f"`feature_layer_map` must be (student layer, teacher layer) pairs such as {_LAYER_MAP_EXAMPLE}; got "
            f"{value!r} ({error})."
        ) from None
    if not pairs:
        raise ValueError(
            f"`feature_layer_map` is empty ({value!r}); give at least one pair such as {_LAYER_MAP_EXAMPLE}, or leave "
            "it unset for evenly spaced pairs."
        )
    return pairs


def _pair(item: Any) -> list[int]:
    if isinstance(item, str):
        parts = item.split(":")
        if len(parts) != 2:
            raise ValueError(f"{item.strip()!r} is not of the form 'student:teacher'")
        try:
            return [int(parts[0]), int(parts[1])]
        except ValueError:
            raise ValueError(f"{item.strip()!r} has a non-integer layer index") from None
    if isinstance(item, (list, tuple)) and len(item) == 2 and all(_is_int(i) for i in item):
        return [int(item[0]), int(item[1])]
    raise ValueError(f"{item!r} is not a pair of integers")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def default_layer_map(student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """`min(L_s, L_t)` pairs evenly spaced over both models, the last pair matching the last layers.

    Pair `k` (1-based) of `n` maps student layer `k * L_s // n - 1` to teacher layer `k * L_t // n - 1`; a 2-layer
    student and a 4-layer teacher give `[(0, 1), (1, 3)]`.
    """
    n = min(student_layers, teacher_layers)
    return [(k * student_layers // n - 1, k * teacher_layers // n - 1) for k in range(1, n + 1)]


def resolve_layer_map(
    layer_map: Sequence[Sequence[int]] | None, student_layers: int, teacher_layers: int
) -> tuple[tuple[int, int], ...]:
    """The layer map with non-negative indices, checked against the models' depths (the default when `None`)."""
    if layer_map is None:
        return tuple(default_layer_map(student_layers, teacher_layers))
    resolved = []
    for pair in layer_map:
        s, t = int(pair[0]), int(pair[1])
        if not (-student_layers <= s < student_layers and -teacher_layers <= t < teacher_layers):
            raise ValueError(
                f"`feature_layer_map` pair {s}:{t} is out of range: the student has {student_layers} layers (indices "
                f"0..{student_layers - 1}) and the teacher {teacher_layers} (0..{teacher_layers - 1}); negative "
                "indices count from the end. Fix the pair, or leave `feature_layer_map` unset for the default "
                f"{format_layer_map(default_layer_map(student_layers, teacher_layers))!r}."
            )
        resolved.append((s % student_layers, t % teacher_layers))
    if len(set(resolved)) != len(resolved):
        raise ValueError(
            f"`feature_layer_map` {format_layer_map(resolved)!r} lists the same pair twice; remove the duplicate."
        )
    return tuple(resolved)


def format_layer_map(layer_map) -> str:
    """`[(0, 1), (1, 3)]` -> `"0:1,1:3"` (the command-line form)."""
    return ",".join(f"{s}:{t}" for s, t in layer_map)
