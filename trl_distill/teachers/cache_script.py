"""`trl-distill cache-teacher` and `recipes/precompute_teacher.py`: [`cache_teacher`] from a YAML config / the CLI.

The same `DistillConfig` YAML serves caching and training: caching reads `teacher_model_name_or_path`,
`teacher_cache`, `kd_top_k`, `kd_temperature` and the tokenization settings from it; training then runs with
`teacher_model_name_or_path` ignored (the store replaces the teacher).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class CacheTeacherArguments:
    """Settings of the caching run that training does not need.

    Args:
        tokenizer_name_or_path (`str`, *optional*):
            The student's tokenizer (the one training uses). Defaults to the teacher's.
        teacher_batch_size (`int`, *optional*):
            Rows per teacher forward; defaults to `per_device_eval_batch_size`.
        rows_per_shard (`int`, *optional*, defaults to `1024`):
            Rows per shard file: the unit of resumption, of memory and of work split between processes.
    """

    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "The student's tokenizer (used in training); defaults to the teacher's."}
    )
    teacher_batch_size: int | None = field(
        default=None, metadata={"help": "Rows per teacher forward; defaults to `per_device_eval_batch_size`."}
    )
    rows_per_shard: int = field(
        default=1024, metadata={"help": "Rows per shard file (the unit of resumption and of work per process)."}
    )
    # A served teacher (trl_distill/teachers/served.py): scored by a vLLM server instead of loaded here.
    teacher_url: str | None = field(
        default=None,
        metadata={"help": "A vLLM (OpenAI-compatible) server serving the teacher, e.g. http://host:8000; "
                          "replaces `teacher_model_name_or_path`. Needs `kd_temperature: 1.0`."},
    )  # fmt: skip
    teacher_served_model: str | None = field(
        default=None, metadata={"help": "The served model name; default the first one the server reports."}
    )
    teacher_prompts_per_request: int = field(default=8, metadata={"help": "Rows per request to the teacher server."})
    teacher_max_concurrency: int = field(default=4, metadata={"help": "Requests to the teacher server in flight."})
    teacher_request_timeout: float = field(default=120.0, metadata={"help": "Seconds per request before a retry."})
    teacher_max_retries: int = field(
        default=5, metadata={"help": "Retries (exponential backoff) after timeouts, resets and HTTP 5xx/429."}
    )


def cache_teacher_parser():
    """`TrlParser` over TRL's `ScriptArguments` (dataset), [`CacheTeacherArguments`] and `DistillConfig`."""
    from trl import ScriptArguments, TrlParser

    from ..config import DistillConfig

    return TrlParser((ScriptArguments, CacheTeacherArguments, DistillConfig), prog="trl-distill cache-teacher")


def load_datasets(script_args):
    """The train split and, when the dataset has it, the `dataset_test_split` split (a local path or a Hub id)."""
    from datasets import DatasetDict, load_dataset, load_from_disk

    name = script_args.dataset_name
    if name is None:
        raise ValueError("`dataset_name` is required: a local dataset (json/parquet/csv file or directory) or a Hub id.")
    if os.path.isdir(name) and os.path.isfile(os.path.join(name, "dataset_dict.json")):
        data = load_from_disk(name)
    elif os.path.isdir(name) and os.path.isfile(os.path.join(name, "state.json")):
        data = DatasetDict({script_args.dataset_train_split: load_from_disk(name)})
    elif os.path.isfile(name):
        extension = os.path.splitext(name)[1].lstrip(".").replace("jsonl", "json")
        data = load_dataset(extension, data_files={script_args.dataset_train_split: name})
    else:
        data = load_dataset(name, name=script_args.dataset_config)
    if script_args.dataset_train_split not in data:
        raise ValueError(
            f"`dataset_train_split={script_args.dataset_train_split!r}` is not a split of {name!r} "
            f"(splits: {sorted(data)})."
        )
    return data[script_args.dataset_train_split], data.get(script_args.dataset_test_split)


def run_cache_teacher(parser=None, argv: Sequence[str] | None = None) -> int:
    """Parse `argv` (`--config x.yaml` and/or flags; unknown keys fail) and write the store; return an exit code."""
    from accelerate import PartialState
    from transformers import AutoTokenizer

    from .cache import cache_teacher

    parser = parser or cache_teacher_parser()
    script_args, cache_args, args = parser.parse_args_and_config(argv)
    if cache_args.teacher_url is not None:
        from .served import run_cache_teacher_served

        return run_cache_teacher_served(script_args, cache_args, args)
    if args.teacher_model_name_or_path is None:
        raise ValueError("`teacher_model_name_or_path` is required: the teacher whose top-k are stored.")
    tokenizer = AutoTokenizer.from_pretrained(
        cache_args.tokenizer_name_or_path or args.teacher_model_name_or_path, trust_remote_code=args.trust_remote_code
    )
    train_dataset, eval_dataset = load_datasets(script_args)
    manifest = cache_teacher(
        args.teacher_model_name_or_path,
        train_dataset,
        eval_dataset=eval_dataset,
        args=args,
        processing_class=tokenizer,
        batch_size=cache_args.teacher_batch_size,
        rows_per_shard=cache_args.rows_per_shard,
        progress=not args.disable_tqdm,
    )
    if manifest is not None and PartialState().is_main_process:
        positions = sum(info["positions"] for info in manifest["splits"].values())
        print(
            f"Teacher store {args.teacher_cache}: {len(manifest['shards'])} shards, {positions} positions, "
            f"{manifest['total_bytes'] / max(positions, 1):.1f} bytes per position (k={manifest['top_k']}, "
            f"T={manifest['temperature']})."
        )
    _finish_distributed()
    return 0


def _finish_distributed() -> None:
    """Under `accelerate launch` / `torchrun`: wait for every process, then destroy the process group (without it,
    gloo runs sometimes abort after finishing)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
