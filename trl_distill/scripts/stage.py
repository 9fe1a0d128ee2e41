"""What every recipe shares: strict parsing, loading the model and data, held-out KL, the stage record, clean exit.

Not a recipe itself: `distill.py`, `qat.py`, `dpo.py`, `grpo.py` and `pipeline.py` of this package import it; the
datasets come from [`~trl_distill.scripts.data.load_splits`] (one loader for every command).

A recipe's result is a **stage record**, written to `<output_dir>/stage.json` and handed to the next stage of a
pipeline; its keys are those of a receipt stage (`trl_distill.append_stage`):

```
{"name": "distill", "method": "...", "settings": {non-default fields}, "results": {held-out metrics, ...},
 "models": {"student": {"name_or_path": "<output_dir>", "initial": "<path>", "adapters": false},
            "teacher": {"name_or_path": "<path>"}}}
```
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import os
import sys
from typing import Any

import yaml
from transformers import HfArgumentParser
from trl import TrlParser


logger = logging.getLogger("trl_distill.scripts")
STAGE_FILE = "stage.json"


# ----------------------------------------------------------------------------------------------------------- parsing
def unknown_key_error(key: str, value: Any, known: list[str], source: str, types) -> ValueError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"Did you mean `{close[0]}`? " if close else ""
    names = ", ".join(t.__name__ for t in types) or "the stages' recipes"
    return ValueError(
        f"{source}: unknown key `{key}` (value {value!r}). {hint}This recipe reads the fields of {names}; remove or "
        "rename the key (recipes fail on unknown keys instead of ignoring them)."
    )


def known_keys(parser: HfArgumentParser) -> list[str]:
    return sorted({action.dest for action in parser._actions} - {"help"})


def check_keys(mapping: dict, parser: HfArgumentParser, source: str, *, extra: tuple[str, ...] = ()) -> None:
    """Raise a `ValueError` naming the first key of `mapping` that no dataclass of `parser` has (with a suggestion)."""
    known = known_keys(parser) + list(extra)
    for key, value in mapping.items():
        if key not in known:
            raise unknown_key_error(key, value, known, source, parser.dataclass_types)


def parse_args(parser: TrlParser, argv: list[str] | None = None) -> tuple:
    """Parse `--config file.yaml` and command-line overrides into `dataclass_types`, failing on any unknown key.

    YAML values set the defaults, command-line flags override them (TRL's `TrlParser`); `env:` in the YAML sets
    environment variables. Unlike TRL's scripts, an unknown or misspelled key is an error that names it.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if "--config" in args:
        path = read_config_path(args)
        with open(path, encoding="utf-8") as f:
            config = yaml.safe_load(f) or {}
        if not isinstance(config, dict):
            raise ValueError(f"{path}: a recipe config must be a YAML mapping of field names to values.")
        check_keys(config, parser, path, extra=("env",))
    options = parser._option_string_actions
    for token in args:
        flag = token.split("=", 1)[0]
        if flag.startswith("--") and flag != "--config" and flag not in options:
            raise unknown_key_error(flag[2:], token, known_keys(parser), "command line", parser.dataclass_types)
    return parser.parse_args_and_config(args)


def read_config_path(args: list[str]) -> str:
    """The value of `--config` in `args`, checked to be an existing file (a `FileNotFoundError` naming it if not)."""
    index = args.index("--config")
    if index + 1 >= len(args) or args[index + 1].startswith("--"):
        raise ValueError(
            "`--config` needs a value: the recipe's YAML file, e.g. `--config recipes/configs/tiny.yaml`."
        )
    path = args[index + 1]
    if not os.path.isfile(path):
        raise FileNotFoundError(f"`--config {path}`: no such file (relative paths start at {os.getcwd()!r}).")
    return path


def print_help(command_name: str, parser, argv: list[str]) -> bool:
    """`--help`/`-h`: print the concise help of `command_name` (see `trl_distill.scripts.COMMANDS`); `--help-all`:
    the parser's full list of fields. Returns whether help was printed (the recipe then does nothing else)."""
    from . import COMMANDS, short_help

    if "--help-all" in argv:
        parser.print_help()
        return True
    if "-h" not in argv and "--help" not in argv:
        return False
    command = COMMANDS[command_name]
    script = sys.argv[0]
    if script.endswith(".py") and "trl_distill" not in script:
        prog = f"python {os.path.relpath(script)}"  # a recipe file of a clone
    else:
        prog = f"python -m {command.module}"
    print(short_help(command, prog, launcher=False))
    return True


def parse_mapping(parser: HfArgumentParser, mapping: dict, source: str) -> tuple:
    """Build the parser's dataclasses from a mapping (a pipeline stage's YAML section), failing on any unknown key."""
    check_keys(mapping, parser, source)
    return parser.parse_dict(mapping, allow_extra_keys=False)


def changed_settings(*configs) -> dict[str, Any]:
    """The fields of `configs` that differ from their defaults, JSON-ready: what a stage record calls its settings."""
    settings = {}
    for config in configs:
        for f in dataclasses.fields(config):
            if not f.init or f.name.endswith("_token") or f.name.startswith("_"):
                continue
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            value = getattr(config, f.name)
            if value != default:
                settings[f.name] = json.loads(json.dumps(value, default=str))
    return settings


# ----------------------------------------------------------------------------------------------------- model & data
def load_model(model_args, training_args, path: str | None = None):
    """Load the causal LM named by `model_args` (dtype, revision, attention, bitsandbytes 4/8-bit) for training."""
    from transformers import AutoModelForCausalLM
    from trl import get_quantization_config

    from trl_distill import disable_bnb_cpu_repack

    kwargs = {
        "revision": model_args.model_revision,
        "attn_implementation": model_args.attn_implementation,
        "trust_remote_code": getattr(training_args, "trust_remote_code", False),
    }
    if model_args.dtype not in (None, "auto"):
        import torch

        kwargs["dtype"] = getattr(torch, model_args.dtype)
    quantization_config = get_quantization_config(model_args)
    if quantization_config is not None:
        kwargs.update(quantization_config=quantization_config, device_map={"": str(training_args.device)})
    model = AutoModelForCausalLM.from_pretrained(path or model_args.model_name_or_path, **kwargs)
    if quantization_config is not None and disable_bnb_cpu_repack(model):
        logger.info("bitsandbytes: avx512-bf16 repacking turned off on the 4-bit layers (it breaks CPU training).")
    return model


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def heldout_limit(training_args) -> int | None:
    """How many test rows a `DistillConfig` asks to measure: 0 with `heldout_eval=False`, `None` for all of them."""
    return training_args.heldout_max_rows if training_args.heldout_eval else 0


def heldout_rows(test_dataset, max_rows: int | None) -> list[dict] | None:
    """Up to `max_rows` (`None`: all) prompt/completion rows for held-out metrics (`messages` rows are split at the
    last turn)."""
    if test_dataset is None or max_rows == 0:
        return None
    rows = list(test_dataset) if max_rows is None else [row for _, row in zip(range(max_rows), test_dataset)]
    if rows and "prompt" not in rows[0] and "messages" in rows[0]:
        rows = [{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in rows]
    if not rows or not {"prompt", "completion"} <= set(rows[0]):
        logger.warning("Held-out KL is not measured: the test split has no prompt/completion (or messages) rows.")
        return None
    return rows


def measure(student, teacher, tokenizer, rows, *, prefix: str = "") -> dict[str, float]:
    """Held-out KL(teacher‖student), KL(student‖teacher), top-1 agreement and perplexity, keys prefixed."""
    from trl_distill import heldout_metrics

    if rows is None or teacher is None:
        return {}
    metrics = heldout_metrics(student, teacher, tokenizer, rows)
    return {f"{prefix}{key}": value for key, value in metrics.items()}


# ------------------------------------------------------------------------------------------------- record & exit
def models_record(student: str, initial_student: str, teacher: str | None, *, adapters: bool = False) -> dict:
    """The `models` of a stage record, in the receipt's shape (`{"student": {"name_or_path": ...}, ...}`)."""
    models = {"student": {"name_or_path": student, "initial": initial_student, "adapters": bool(adapters)}}
    if teacher:
        models["teacher"] = {"name_or_path": teacher}
    return models


def write_stage(output_dir: str, stage: dict, trainer=None) -> dict:
    """Log the stage's results through the trainer and write `<output_dir>/stage.json` (main process only)."""
    if trainer is not None and stage["results"]:
        trainer.log({key: value for key, value in stage["results"].items() if isinstance(value, (int, float))})
    if trainer is None or trainer.accelerator.is_main_process:
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, STAGE_FILE), "w", encoding="utf-8") as f:
            json.dump(stage, f, indent=2, sort_keys=True, default=str)
        print(
            f"[{stage['name']}] "
            + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in stage["results"].items()),
            flush=True,
        )
    return stage


def train_and_save(trainer, output_dir: str) -> dict:
    """Train, save the model (adapters for PEFT) to `output_dir`; return the loss and step count for the record."""
    result = trainer.train(resume_from_checkpoint=getattr(trainer.args, "resume_from_checkpoint", None))
    trainer.save_model(output_dir)
    return {"train_loss": result.training_loss, "train_steps": result.global_step}


def finish_stage(name: str, method: str, args: tuple, results: dict, models: dict, trainer) -> dict:
    """Build the stage record (settings: what `args` change from the defaults) and write it (see `write_stage`)."""
    record = {
        "name": name,
        "method": method,
        "settings": changed_settings(*args),
        "results": results,
        "models": models,
    }
    return write_stage(args[-1].output_dir, record, trainer)


def run_recipe(run, parser: TrlParser, argv: list[str] | None = None, *, command: str) -> dict | None:
    """`run(*parsed_args)` for a recipe's `main` (the `trl-distill` subcommand `command`; `--help` prints its concise
    help and returns `None`), then leave the process group cleanly, even on an error."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if print_help(command, parser, argv):
        return None
    try:
        return run(*parse_args(parser, argv))
    finally:
        finish_distributed()


def read_stage(output_dir: str) -> dict:
    path = os.path.join(output_dir, STAGE_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No {STAGE_FILE} in {output_dir!r}: that directory was not written by a recipe.")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def rank_weight_digests(model) -> list[str] | None:
    """SHA-256 of the trainable weights on every rank (`None` in a single process): DDP ranks must all agree."""
    import hashlib

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        if param.requires_grad:
            digest.update(name.encode())
            digest.update(param.detach().float().cpu().numpy().tobytes())
    digests = [None] * dist.get_world_size()
    dist.all_gather_object(digests, digest.hexdigest())
    if len(set(digests)) > 1:
        logger.warning("The ranks ended with different weights: %s", digests)
    return digests


def finish_distributed() -> None:
    """Wait for every rank, then destroy the process group: without it some gloo runs abort after finishing."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
