"""Dataset loading for every recipe and command: one function, three kinds of `dataset_name`.

`dataset_name` (TRL's `ScriptArguments`) may be

- a **`save_to_disk` directory** (`Dataset.save_to_disk` / `DatasetDict.save_to_disk`): read with `load_from_disk`; a
  single `Dataset` becomes the `dataset_train_split` split;
- a **local data file** (`.json`, `.jsonl`, `.csv`, `.parquet`): its rows are the `dataset_train_split` split;
- a **local directory of data files** (`train.jsonl`, `test.jsonl`, ...) or a **Hub dataset id** (`org/name`):
  `datasets.load_dataset(dataset_name, name=dataset_config)`, as TRL's scripts do.

A name that looks like a local path (it starts with `/`, `.` or `~`, has a data file's extension, or has more than one
`/`) but does not exist is a `FileNotFoundError` naming it, not a Hub look-up.
"""

from __future__ import annotations

import logging
import os


logger = logging.getLogger(__name__)

# file extension -> `datasets` builder
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def _looks_local(name: str) -> bool:
    """A path, not a Hub id: Hub ids are `name` or `org/name`."""
    return (
        name.startswith(("/", ".", "~"))
        or os.path.splitext(name)[1].lower() in FILE_BUILDERS
        or name.count("/") > 1
        or (os.sep != "/" and os.sep in name)
    )


def load_dataset_dict(
    name: str | None, *, config: str | None = None, train_split: str = "train", streaming: bool = False
):
    """Load `name` (see the module docstring) as a `DatasetDict` (`IterableDatasetDict` with `streaming`)."""
    from datasets import Dataset, DatasetDict, IterableDatasetDict, load_dataset, load_from_disk

    if not name:
        raise ValueError(
            "`dataset_name` is required: a Hub dataset id (`org/name`), a local data file (.json, .jsonl, .csv, "
            ".parquet), a directory of such files, or a `save_to_disk` directory."
        )
    path = os.path.expanduser(name)
    if os.path.isdir(path) and (
        os.path.isfile(os.path.join(path, "dataset_dict.json")) or os.path.isfile(os.path.join(path, "state.json"))
    ):
        if config:
            logger.warning("`dataset_config=%r` is ignored: %r is a `save_to_disk` directory.", config, name)
        data = load_from_disk(path)
        if isinstance(data, Dataset):
            data = DatasetDict({train_split: data})
        if streaming:
            data = IterableDatasetDict({split: dataset.to_iterable_dataset() for split, dataset in data.items()})
        return data
    if os.path.isfile(path):
        extension = os.path.splitext(path)[1].lower()
        if extension not in FILE_BUILDERS:
            raise ValueError(
                f"`dataset_name={name!r}`: cannot read {extension or 'extension-less'} files; use one of "
                f"{sorted(FILE_BUILDERS)}, a directory of them, or a `save_to_disk` directory."
            )
        return load_dataset(FILE_BUILDERS[extension], data_files={train_split: path}, streaming=streaming)
    if not os.path.exists(path) and _looks_local(name):
        raise FileNotFoundError(
            f"`dataset_name={name!r}`: no such file or directory (relative paths start at {os.getcwd()!r}). Give an "
            "existing local path, or a Hub dataset id like `org/name`."
        )
    return load_dataset(path if os.path.isdir(path) else name, name=config, streaming=streaming)


def load_splits(script_args):
    """`(train, test)` named by TRL's `ScriptArguments` (`dataset_name`, `dataset_config`, `dataset_train_split`,
    `dataset_test_split`, `dataset_streaming`); `test` is `None` when the dataset has no such split."""
    data = load_dataset_dict(
        script_args.dataset_name,
        config=script_args.dataset_config,
        train_split=script_args.dataset_train_split,
        streaming=getattr(script_args, "dataset_streaming", False),
    )
    if script_args.dataset_train_split not in data:
        raise ValueError(
            f"`dataset_train_split={script_args.dataset_train_split!r}` is not a split of "
            f"{script_args.dataset_name!r} (splits: {sorted(data)}); set `dataset_train_split` to one of them."
        )
    test = data.get(script_args.dataset_test_split)
    return data[script_args.dataset_train_split], test
