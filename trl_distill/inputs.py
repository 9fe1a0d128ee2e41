"""Checks on what a user hands `DistillTrainer`: datasets and model paths, each failing with an error that names the
argument, the value and the fix, before a library deep below would fail with a bare `KeyError`, `StopIteration`,
`AttributeError` or a sampler's `num_samples=0`.

What each input gets is listed in the README's "Trainer inputs and resume" table (section Reliability).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping


__all__ = ["check_dataset", "check_model_path", "check_rows_left", "row_count"]

# Columns that make a row trainable without a `formatting_func` (besides `args.dataset_text_field`):
# `input_ids`: already tokenized; `messages` / `conversations`: conversational; `prompt` + `completion`.
_TOKENIZED, _CONVERSATIONAL = "input_ids", ("messages", "conversations")


def _datasets(dataset, name: str):
    """`(name, dataset)` pairs: an eval set may be a dict of named datasets."""
    if isinstance(dataset, Mapping):
        return [(f"{name}[{key!r}]", value) for key, value in dataset.items()]
    return [(name, dataset)]


def row_count(dataset) -> int | None:
    """The number of rows, or `None` for a dataset without a length (an `IterableDataset`)."""
    try:
        return len(dataset)
    except TypeError:
        return None


def check_dataset(dataset, name: str, *, text_field: str = "text", formatting_func=None) -> None:
    """
    Refuse a dataset `SFTTrainer` could not tokenize, naming `name` (`train_dataset` / `eval_dataset`).

    Checked: that it has rows, that its columns are one of the formats `SFTTrainer` reads (`text_field`, `messages` or
    `conversations`, `prompt` with `completion`, or tokenized `input_ids`; anything when a `formatting_func` builds the
    text), and that no row has `None` in the columns that are read. `None` (no dataset) passes.

    Raises:
        ValueError: naming the dataset, what is wrong (its columns, the row index) and the fix.
    """
    if dataset is None:
        return
    for label, part in _datasets(dataset, name):
        if row_count(part) == 0:
            purpose = "train" if name.startswith("train") else "evaluate"
            raise ValueError(
                f"`{label}` is empty (0 rows): there is nothing to {purpose} on. Pass a dataset with rows."
            )
        columns = list(getattr(part, "column_names", None) or [])
        if not columns or formatting_func is not None or _TOKENIZED in columns:
            continue
        _check_columns(part, label, columns, text_field)


def _check_columns(dataset, label: str, columns: list[str], text_field: str) -> None:
    formats = (
        f"`{text_field}` (plain text, see `dataset_text_field`), `messages` (conversations), `prompt` with "
        "`completion`, or tokenized `input_ids`; or pass a `formatting_func`"
    )
    if "prompt" in columns and "completion" not in columns:
        raise ValueError(
            f"`{label}` has a `prompt` column but no `completion` column (columns: {columns}). Add the responses as "
            f"`completion` (for on-policy training with `lmbda=1` a placeholder such as the empty string will do: the "
            "student's samples replace it), or use `distill_mode='sequence'` with a teacher, which writes them."
        )
    read = [c for c in ("prompt", "completion", text_field, *_CONVERSATIONAL) if c in columns]
    if not read:
        raise ValueError(
            f"`{label}` has none of the columns `DistillTrainer` reads (columns: {columns}): use {formats}."
        )
    if "prompt" not in columns and text_field not in read and not any(c in columns for c in _CONVERSATIONAL):
        raise ValueError(
            f"`{label}` has a `completion` column but no `prompt` column (columns: {columns}): use {formats}."
        )
    for column in read:
        _check_no_none(dataset, label, column)


def _check_no_none(dataset, label: str, column: str) -> None:
    try:  # Arrow-backed `datasets.Dataset`: count nulls without reading the rows into Python
        values = dataset.with_format("arrow")[column]
    except (AttributeError, TypeError, KeyError, ValueError):
        return  # an iterable or custom dataset: its rows are read lazily, not here
    if values.null_count == 0:
        return
    import pyarrow.compute as pc

    index = pc.index(pc.is_null(values), True).as_py()
    raise ValueError(
        f"Row {index} of `{label}` has `{column}=None` ({values.null_count} row(s) do). Every row needs a value in "
        f"`{column}`: fill or drop those rows, e.g. `dataset.filter(lambda row: row[{column!r}] is not None)`."
    )


def check_rows_left(raw_rows: int | None, dataset, name: str, *, max_length: int | None, packing: bool) -> None:
    """
    After `SFTTrainer` tokenized and truncated `dataset`: an error when no row is left, a warning naming how many
    rows were dropped.

    `SFTTrainer` truncates rows to `max_length` and drops those left with no token in the loss (a prompt that alone
    fills `max_length`): that is never silent here. `raw_rows` is the row count before tokenization (`None` when it
    has no length); with `packing` rows are merged, so only emptiness is checked.
    """
    for label, part in _datasets(dataset, name):
        left = row_count(part)
        before = raw_rows.get(label) if isinstance(raw_rows, Mapping) else raw_rows
        if left is None:
            continue
        cause = (
            f"their response lies entirely beyond `max_length={max_length}` (the prompt alone fills it), so no token "
            "is left in the loss"
            if max_length is not None
            else "no token of theirs is in the loss"
        )
        fix = (
            "Raise `max_length`, shorten the prompts, or set `truncation_mode='keep_end'`."
            if max_length is not None
            else "Check `completion_only_loss` / `assistant_only_loss` and the completions."
        )
        if left == 0:
            count = f"all {before} rows" if before else "every row"
            raise ValueError(f"No row of `{label}` is left: {count} were dropped because {cause}. {fix}")
        if before is not None and not packing and left < before:
            warnings.warn(
                f"{before - left} of {before} rows of `{label}` were dropped because {cause}. {fix}",
                UserWarning,
                stacklevel=3,
            )


def check_model_path(value, field: str) -> None:
    """Refuse a model given as a string that is a local path but not an existing directory, naming `field`.

    A string that could be a Hub id (`name` or `org/name`) and is no local directory is left to `from_pretrained`;
    anything else (an absolute or `./`/`~` path, more than one `/`, a file) must be a directory holding the model.
    """
    if not isinstance(value, str) or os.path.isdir(value):
        return
    if os.path.isfile(value):
        raise ValueError(
            f"`{field}={value!r}` is a file; pass the directory that holds the model (its `config.json` and weights)."
        )
    local = os.path.isabs(value) or value.startswith((".", "~")) or "\\" in value or value.count("/") > 1
    if local:
        raise ValueError(
            f"`{field}={value!r}` does not exist: no such directory (and it is not a Hub id, which has the form "
            "'name' or 'org/name'). Check the path, or pass the model itself."
        )
