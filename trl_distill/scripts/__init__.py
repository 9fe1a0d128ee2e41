"""The recipes, installed: one module per workflow, each with `make_parser()`, `run(...)` and `main(argv)`.

| command | module | recipe file (a clone's entry point) |
|---|---|---|
| `trl-distill train` | `trl_distill.scripts.distill` | `recipes/distill.py` |
| `trl-distill qat` | `trl_distill.scripts.qat` | `recipes/distill_qat.py` |
| `trl-distill dpo` | `trl_distill.scripts.dpo` | `recipes/distill_dpo.py` |
| `trl-distill grpo` | `trl_distill.scripts.grpo` | `recipes/distill_grpo.py` |
| `trl-distill pipeline` | `trl_distill.scripts.pipeline` | `recipes/pipeline.py` |
| `trl-distill prune-distill` | `trl_distill.scripts.prune_distill` | `recipes/prune_distill.py` |
| `trl-distill cache-teacher` | `trl_distill.scripts.cache_teacher` | `recipes/precompute_teacher.py` |

Three equivalent ways to run one (`--config x.yaml` parsed by TRL's parser, unknown keys fail):

```bash
trl-distill train --config x.yaml [--field value ...] [--num_processes 8] [--accelerate_config zero3|file.yaml]
accelerate launch [launch flags] -m trl_distill.scripts.distill --config x.yaml [--field value ...]
accelerate launch [launch flags] recipes/distill.py --config x.yaml [--field value ...]       # in a clone
```

Like `trl sft`, `trl-distill train` starts itself through `accelerate launch` (so the default `accelerate config`
applies); flags that are not fields of the recipe go to `accelerate launch`. [`COMMANDS`] describes each command for
the command line without importing TRL (`--help` stays fast); [`launch`](launch.py) starts them; [`data`](data.py)
loads every dataset; [`stage`](stage.py) holds what the recipes share.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    """A recipe as the command line shows it: `trl-distill <name>` runs `module` (`recipe` in a clone)."""

    name: str
    module: str
    recipe: str
    title: str  # one line, for `trl-distill --help`
    summary: str
    examples: tuple[str, ...]
    flags: tuple[tuple[str, str], ...]  # the most used fields: (flag, one-line help)


_TRAIN = (("--output_dir DIR", "where the model, its receipt and stage.json go"), ("--max_steps N", "training steps"))
COMMANDS = {
    "train": Command(
        "train",
        "trl_distill.scripts.distill",
        "recipes/distill.py",
        "Distill a teacher into a student (DistillTrainer) from a YAML config.",
        "Distill a teacher into a student with DistillTrainer (any distill_mode, LoRA/QLoRA), then measure held-out "
        "KL(teacher||student) and write OUTPUT_DIR/stage.json.",
        (
            "trl-distill train --config recipes/configs/tiny.yaml --max_steps 10",
            "trl-distill train --config x.yaml --num_processes 8 --accelerate_config zero3",
        ),
        (
            ("--model_name_or_path PATH", "the student"),
            ("--teacher_model_name_or_path PATH", "the teacher (or --teacher_cache STORE, from cache-teacher)"),
            ("--dataset_name NAME", "Hub id, .json/.jsonl/.csv/.parquet file, or save_to_disk directory"),
            ("--distill_mode MODE", "token (shared vocabulary), uld or sequence (any tokenizers)"),
            ("--objective NAME", "forward_kl, reverse_kl, jsd or generalized_jsd (--beta)"),
            ("--kd_temperature T / --alpha A", "loss temperature / KD-CE mix"),
            ("--use_peft true", "LoRA (--lora_r, --load_in_4bit for QLoRA)"),
            *_TRAIN,
        ),
    ),
    "qat": Command(
        "qat",
        "trl_distill.scripts.qat",
        "recipes/distill_qat.py",
        "Quantization-aware recovery by distillation (QLoRA or torchao QAT).",
        "Quantization-aware recovery: the full-precision model teaches its quantized copy (qlora: bitsandbytes 4-bit "
        "+ LoRA; qat: torchao fake-quantization), KL reported before/after quantization and after recovery.",
        ("trl-distill qat --config recipes/configs/tiny_qat.yaml",),
        (
            ("--model_name_or_path PATH", "the (distilled) full-precision model"),
            ("--quantization qlora|qat", "bitsandbytes 4-bit + LoRA, or torchao fake-quantization"),
            ("--qat_scheme NAME", "int8_dynact_int4_weight or int4_weight_only"),
            ("--reference_teacher PATH", "also report KL to the original teacher"),
            ("--dataset_name NAME", "Hub id, local file, or save_to_disk directory"),
            *_TRAIN,
        ),
    ),
    "dpo": Command(
        "dpo",
        "trl_distill.scripts.dpo",
        "recipes/distill_dpo.py",
        "DPO on the student's samples ranked by the teacher.",
        "DPO after distillation: the student's own samples, ranked by the teacher, as pairs for TRL's DPOTrainer.",
        ("trl-distill dpo --config recipes/configs/tiny_dpo.yaml",),
        (
            ("--model_name_or_path PATH", "the distilled student"),
            ("--teacher_model_name_or_path PATH", "the teacher that ranks the samples"),
            ("--num_samples N / --min_margin M", "samples per prompt / minimum score gap to keep a pair"),
            ("--beta B", "DPO's beta (TRL's DPOConfig)"),
            ("--dataset_name NAME", "prompts: Hub id, local file, or save_to_disk directory"),
            *_TRAIN,
        ),
    ),
    "grpo": Command(
        "grpo",
        "trl_distill.scripts.grpo",
        "recipes/distill_grpo.py",
        "GRPO on the student with reward functions named in the config.",
        "GRPO after distillation: TRL's GRPOTrainer on the student with reward functions named in the config.",
        ("trl-distill grpo --config recipes/configs/tiny_grpo.yaml",),
        (
            ("--model_name_or_path PATH", "the distilled student"),
            ("--reward_funcs PATH [PATH ...]", "import paths, e.g. trl_distill.demo:is_correct"),
            ("--teacher_model_name_or_path PATH", "optional: measure held-out KL to it"),
            ("--dataset_name NAME", "prompts: Hub id, local file, or save_to_disk directory"),
            *_TRAIN,
        ),
    ),
    "pipeline": Command(
        "pipeline",
        "trl_distill.scripts.pipeline",
        "recipes/pipeline.py",
        "Run distill -> qat -> dpo/grpo stages in order, with one receipt.",
        "Run stages (distill, qat, dpo, grpo) in order, each from the previous stage's model, with one receipt.",
        ("trl-distill pipeline --config recipes/configs/tiny_pipeline.yaml",),
        (("--output_dir DIR", "overrides the YAML's output_dir"),),
    ),
    "prune-distill": Command(
        "prune-distill",
        "trl_distill.scripts.prune_distill",
        "recipes/prune_distill.py",
        "Depth-prune a model, then distill the pruned copy from the original (one receipt).",
        "Prune, then distill from the original (Minitron): score the model's decoder layers on calibration rows "
        "(ShortGPT cosine or single-removal KL), save a copy keeping the most useful ones, distill it from the "
        "unpruned model with DistillTrainer; one receipt lists both stages.",
        (
            "trl-distill prune-distill --config recipes/configs/tiny_prune_distill.yaml",
            "trl-distill prune-distill --config recipes/configs/smollm2-prune-distill.yaml --prune_num_keep 15",
        ),
        (
            ("--model_name_or_path PATH", "the model to prune; it is also the teacher"),
            ("--prune_num_keep N / --prune_ratio R", "layers to keep / fraction of layers to remove"),
            ("--prune_scoring cosine|kl", "ShortGPT block influence, or the KL each single-layer removal causes"),
            ("--calibration_rows N", "training rows the layers are scored on"),
            ("--pruned_output_dir DIR", "where the pruned student goes (default: OUTPUT_DIR-pruned)"),
            ("--dataset_name NAME", "Hub id, local file, or save_to_disk directory"),
            ("--distill_mode MODE / --feature_weight W", "how to distill (feature KD maps layer i to keep[i])"),
            *_TRAIN,
        ),
    ),
    "cache-teacher": Command(
        "cache-teacher",
        "trl_distill.scripts.cache_teacher",
        "recipes/precompute_teacher.py",
        "Store a teacher's top-k log-probabilities once, to train without it.",
        "Run a teacher once over a dataset and store its top-k log-probabilities; train later with "
        "`teacher_cache` and the same YAML, without loading the teacher (resumable; one shard set per process).",
        (
            "trl-distill cache-teacher --config distill.yaml",
            "trl-distill cache-teacher --config distill.yaml --num_processes 8",
            "trl-distill cache-teacher --config distill.yaml --teacher_url http://teacher-host:8000",
        ),
        (
            ("--teacher_model_name_or_path PATH", "the teacher"),
            ("--teacher_cache DIR", "the store directory"),
            ("--dataset_name NAME", "Hub id, local file, or save_to_disk directory"),
            ("--kd_top_k K / --kd_temperature T", "entries per position / the temperature the store is exact at"),
            ("--tokenizer_name_or_path PATH", "the student's tokenizer (default: the teacher's)"),
            ("--teacher_batch_size N / --rows_per_shard N", "rows per forward / rows per shard file"),
            ("--teacher_url URL", "score with a vLLM server instead of loading the teacher"),
        ),
    ),
}


def short_help(command: Command, prog: str, *, launcher: bool) -> str:
    """The concise `--help` of `command` (`--help-all` prints every field). `launcher`: the `trl-distill` form,
    which also takes `accelerate launch` flags."""
    width = max(len(flag) for flag, _ in command.flags) + 2
    launch_flags = " [accelerate launch flags]" if launcher else ""
    lines = [
        f"usage: {prog} --config CONFIG.yaml [--<field> VALUE ...]{launch_flags}",
        "",
        textwrap.fill(command.summary, width=100),
        "",
        "examples:",
        *(f"  {example}" for example in command.examples),
        "",
        "options (a YAML key is the flag without --; flags override the YAML; unknown keys fail):",
        f"  {'--config CONFIG.yaml':<{width}}the recipe's YAML",
        *(f"  {flag:<{width}}{text}" for flag, text in command.flags),
        f"  {'--help-all':<{width}}every field (TRL's ScriptArguments, ModelConfig, the trainer's config)",
    ]
    if launcher:
        lines += [
            "",
            "launch: runs through `accelerate launch` like `trl sft`; its flags pass through, e.g. --num_processes 8,",
            "  --config_file FILE, --accelerate_config NAME|FILE (TRL's zero3, fsdp2, ...). Equivalent without this CLI:",
            f"  accelerate launch [launch flags] -m {command.module} --config CONFIG.yaml",
        ]
    return "\n".join(lines)
