"""Type checks of a config dataclass's own fields, from their annotations (used by [`~trl_distill.DistillConfig`])."""

from __future__ import annotations

import dataclasses
import functools
import numbers
import types
import typing


def positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


# What a field's annotation admits, for the type check of the fields `DistillConfig` adds (`check_field_types`).
TYPE_CHECKS = {
    "float": (lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool), "a number", "2.0"),
    # A non-integral number is left to the field's own range check (a `ValueError` naming it).
    "int": (lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool), "an integer", "8"),
    "bool": (lambda v: isinstance(v, bool), "True or False", "True"),
    "str": (lambda v: isinstance(v, str), "a string", "'forward_kl'"),
}


@functools.cache
def own_field_kinds(cls, base) -> dict[str, tuple[str, bool]]:
    """`{field: (kind, optional)}` for the simple-typed fields `cls` adds to `base` (kind: a `TYPE_CHECKS` key).

    Read from the resolved annotations, not `Field.type`: `HfArgumentParser` replaces the latter in place.
    """
    hints = typing.get_type_hints(cls)
    inherited = {f.name for f in dataclasses.fields(base)}
    kinds = {}
    for f in dataclasses.fields(cls):
        if f.name in inherited or f.name not in hints:
            continue
        hint = hints[f.name]
        args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        named = [getattr(arg, "__name__", None) for arg in args if arg is not type(None)]
        if len(named) == 1 and named[0] in TYPE_CHECKS:
            kinds[f.name] = (named[0], type(None) in args)
    return kinds


def check_field_types(config, base) -> None:
    """`TypeError` naming the field when a field `type(config)` adds to the dataclass `base` holds a value of another
    type.

    Command-line and YAML values are converted by TRL's parser from the annotations before they get here; this catches
    Python calls such as `DistillConfig(kd_temperature="2")`, which would otherwise fail deep inside a comparison (or,
    for a boolean, silently count as true). Fields of compound types (`list | str | None`, dicts) are checked by their
    own validation.
    """
    defaults = {f.name: f.default for f in dataclasses.fields(config)}
    for name, (kind, optional) in own_field_kinds(type(config), base).items():
        value = getattr(config, name)
        accepts, expected, example = TYPE_CHECKS[kind]
        if (value is None and optional) or accepts(value):
            continue
        if defaults[name] is not None and defaults[name] is not dataclasses.MISSING and accepts(defaults[name]):
            example = repr(defaults[name])
        hint = f"For example `{name}={example}`."
        if isinstance(value, str) and kind in ("float", "int"):
            try:
                number = int(value) if kind == "int" else float(value)
                hint = f"Pass the number, `{name}={number!r}`, not a string."
            except ValueError:
                pass
        raise TypeError(
            f"`{name}` must be {expected}{' or None' if optional else ''}, got {value!r} "
            f"({type(value).__name__}). {hint}"
        )
