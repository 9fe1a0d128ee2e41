"""`trl-distill cache-teacher`: run a teacher once over a dataset and store its top-k log-probabilities.

One YAML serves caching and training: caching reads `teacher_model_name_or_path`, `teacher_cache`, `kd_top_k`,
`kd_temperature` and the tokenization settings of its `DistillConfig`, plus the dataset keys and
[`CacheTeacherArguments`]; training then runs with `teacher_model_name_or_path` ignored (the store replaces it).

```yaml
# distill.yaml
teacher_model_name_or_path: Qwen/Qwen2.5-7B-Instruct
teacher_model_init_kwargs: {dtype: bfloat16}
teacher_cache: runs/qwen7b-top64          # the store directory
kd_top_k: 64                              # stored entries per position (260 bytes); training may use fewer
kd_temperature: 2.0                       # the store is exact at this temperature only
max_length: 1024
dataset_name: data/train.jsonl            # or a Hub id, or a save_to_disk directory
tokenizer_name_or_path: Qwen/Qwen2.5-0.5B-Instruct   # the student's tokenizer (same vocabulary)
teacher_batch_size: 16
rows_per_shard: 1024
output_dir: runs/student
```

```bash
# the store: one process, or one per GPU writing disjoint shards (re-run the same command to resume)
trl-distill cache-teacher --config distill.yaml
trl-distill cache-teacher --config distill.yaml --num_processes 8
accelerate launch --num_processes 8 -m trl_distill.scripts.cache_teacher --config distill.yaml   # the same
# then train from the store (teacher_model_name_or_path is not loaded):
trl-distill train --config distill.yaml --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct
```
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from . import stage
from .data import load_splits


logger = logging.getLogger(__name__)


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
        metadata={
            "help": "A vLLM (OpenAI-compatible) server serving the teacher, e.g. http://host:8000; "
            "replaces `teacher_model_name_or_path`. Needs `kd_temperature: 1.0`."
        },
    )
    teacher_served_model: str | None = field(
        default=None, metadata={"help": "The served model name; default the first one the server reports."}
    )
    teacher_prompts_per_request: int = field(default=8, metadata={"help": "Rows per request to the teacher server."})
    teacher_max_concurrency: int = field(default=4, metadata={"help": "Requests to the teacher server in flight."})
    teacher_request_timeout: float = field(default=120.0, metadata={"help": "Seconds per request before a retry."})
    teacher_max_retries: int = field(
        default=5, metadata={"help": "Retries (exponential backoff) after timeouts, resets and HTTP 5xx/429."}
    )


def make_parser(prog: str | None = None):
    """`TrlParser` over TRL's `ScriptArguments` (dataset), [`CacheTeacherArguments`] and `DistillConfig`."""
    from trl import ScriptArguments, TrlParser

    from trl_distill import DistillConfig

    return TrlParser((ScriptArguments, CacheTeacherArguments, DistillConfig), prog=prog)


cache_teacher_parser = make_parser  # the public name (`trl_distill.cache_teacher_parser`)


def run_cache_teacher(parser=None, argv: Sequence[str] | None = None) -> int:
    """Parse `argv` (`--config x.yaml` and/or flags; unknown keys fail), write the store; return an exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = parser or make_parser()
    if stage.print_help("cache-teacher", parser, argv):
        return 0
    try:
        return _cache(*stage.parse_args(parser, argv))
    finally:
        stage.finish_distributed()


def main(argv: Sequence[str] | None = None) -> int:
    return run_cache_teacher(argv=argv)


def _cache(script_args, cache_args, args) -> int:
    from accelerate import PartialState
    from transformers import AutoTokenizer

    from trl_distill.teachers.cache import cache_teacher

    if cache_args.teacher_url is not None:  # a served teacher: trl_distill/teachers/served.py
        return run_cache_teacher_served(script_args, cache_args, args)
    if args.teacher_model_name_or_path is None:
        raise ValueError("`teacher_model_name_or_path` is required: the teacher whose top-k are stored.")
    tokenizer = AutoTokenizer.from_pretrained(
        cache_args.tokenizer_name_or_path or args.teacher_model_name_or_path, trust_remote_code=args.trust_remote_code
    )
    train_dataset, eval_dataset = load_splits(script_args)
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
    return 0


def run_cache_teacher_served(script_args, cache_args, args) -> int:
    """`trl-distill cache-teacher --teacher_url URL ...`: the parsed arguments of `cache_teacher_parser` -> a store."""
    from accelerate import PartialState
    from transformers import AutoTokenizer

    from ..teachers.served import cache_teacher_served

    if PartialState().num_processes > 1:
        raise ValueError(
            f"`teacher_url` with {PartialState().num_processes} processes: a served teacher is scored from one "
            "process (`teacher_max_concurrency` requests in flight). Run `trl-distill cache-teacher` without "
            "`--num_processes`."
        )
    if cache_args.tokenizer_name_or_path is None:
        raise ValueError("`tokenizer_name_or_path` (the student's tokenizer) is required with `teacher_url`.")
    if args.teacher_model_name_or_path is not None:
        logger.warning("`teacher_model_name_or_path` is ignored: the teacher is scored by `teacher_url`.")
    tokenizer = AutoTokenizer.from_pretrained(
        cache_args.tokenizer_name_or_path, trust_remote_code=args.trust_remote_code
    )
    train_dataset, eval_dataset = load_splits(script_args)
    manifest = cache_teacher_served(
        cache_args.teacher_url,
        train_dataset,
        eval_dataset=eval_dataset,
        args=args,
        processing_class=tokenizer,
        teacher_model=cache_args.teacher_served_model,
        rows_per_shard=cache_args.rows_per_shard,
        progress=not args.disable_tqdm,
        prompts_per_request=cache_args.teacher_prompts_per_request,
        max_concurrency=cache_args.teacher_max_concurrency,
        timeout=cache_args.teacher_request_timeout,
        max_retries=cache_args.teacher_max_retries,
    )
    positions = sum(info["positions"] for info in manifest["splits"].values())
    print(
        f"Teacher store {args.teacher_cache} from {manifest['teacher']['served']['url']} "
        f"({manifest['teacher']['name_or_path']}): {len(manifest['shards'])} shards, {positions} positions "
        f"(k={manifest['top_k']}, T={manifest['temperature']})."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
