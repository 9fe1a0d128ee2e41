"""Distill a teacher into a student from a YAML config: `DistillTrainer` driven by TRL's parser.

Launch (every key of the YAML is a field of `DistillScriptArguments`, TRL's `ModelConfig` or `DistillConfig`; flags
after the config override it; an unknown or misspelled key is an error that names it):

    # installed package (no clone needed): one process, or `accelerate launch` flags mixed in, as with `trl sft`
    trl-distill train --config x.yaml
    trl-distill train --config x.yaml --num_processes 8 --accelerate_config zero3
    accelerate launch --num_processes 8 -m trl_distill.scripts.distill --config x.yaml     # the same, explicitly
    # a clone: the thin entry point recipes/distill.py, with the configs of recipes/configs/
    accelerate launch --config_file recipes/accelerate_configs/zero3.yaml recipes/distill.py --config <config>.yaml
    # the tiny offline config (CPU, about a minute): write its local models and data first
    trl-distill recipe-assets && trl-distill train --config recipes/configs/tiny.yaml
    # two CPU processes (DDP on gloo; `--cpu` would start only one)
    trl-distill train --config recipes/configs/tiny.yaml --output_dir runs/recipes/tiny-ddp \\
        --accelerate_config recipes/accelerate_configs/ddp_cpu.yaml

Every `distill_mode` and every `DistillConfig` field works without edits here: the config class is parsed as a whole.
LoRA / QLoRA come from `ModelConfig` (`use_peft`, `lora_r`, `lora_alpha`, `lora_target_modules`, `load_in_4bit`, ...).
`dataset_name` is a Hub id, a local .json/.jsonl/.csv/.parquet file or directory of them, or a `save_to_disk`
directory ([`~trl_distill.scripts.data.load_splits`]). After training the student is saved to `output_dir`, held-out
KL(teacher‖student) is measured on up to `heldout_max_rows` rows of `dataset_test_split`, logged through the trainer
and written with the settings to `output_dir/stage.json`.
"""

from __future__ import annotations

from dataclasses import dataclass

from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config
from trl.models import unwrap_model_for_generation

from trl_distill import DistillConfig, DistillTrainer, heldout_metrics, save_artifact

from . import stage
from .data import load_splits


@dataclass
class DistillScriptArguments(ScriptArguments):
    """TRL's dataset arguments (`dataset_name`, `dataset_config`, `dataset_train_split`, `dataset_test_split`).

    The held-out rows are `DistillConfig`'s: `heldout_max_rows` rows of `dataset_test_split` (all when unset) are
    measured after training unless `heldout_eval: false`, and are the trainer's eval set when `eval_strategy` is set.
    """


def make_parser(prog: str | None = None) -> TrlParser:
    """The recipe's parser: every field of these dataclasses is a YAML key and a `--flag`."""
    return TrlParser((DistillScriptArguments, ModelConfig, DistillConfig), prog=prog)


def run(script_args: DistillScriptArguments, model_args: ModelConfig, training_args: DistillConfig) -> dict:
    """Train, save, measure; return the stage record (also written to `output_dir/stage.json`)."""
    train_dataset, test_dataset = load_splits(script_args)
    rows = stage.heldout_rows(test_dataset, stage.heldout_limit(training_args))
    eval_dataset = None
    if training_args.eval_strategy != "no" and rows:
        eval_dataset = test_dataset.select(range(len(rows)))
    trainer = DistillTrainer(
        model=stage.load_model(model_args, training_args),
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=stage.load_tokenizer(model_args.model_name_or_path),
        peft_config=get_peft_config(model_args),
    )
    results = stage.train_and_save(trainer, training_args.output_dir)
    if not trainer.is_deepspeed_enabled:
        results["rank_weight_digests"] = stage.rank_weight_digests(trainer.model)
    figures = None
    if not trainer.distill_mode.requires_shared_vocab:
        stage.logger.warning("Held-out KL is measured only for shared-vocabulary modes.")
    elif rows and trainer.teacher_model is not None:
        # Every rank runs the same rows (cheap next to training; keeps the ranks in step). Under DeepSpeed ZeRO-3 both
        # models are gathered whole on every rank for it, as TRL does to generate; elsewhere this only unwraps them.
        with (
            unwrap_model_for_generation(trainer.model_wrapped, trainer.accelerator) as student,
            unwrap_model_for_generation(trainer.teacher_model, trainer.accelerator) as teacher,
        ):
            figures = heldout_metrics(student, teacher, trainer.processing_class, rows, vocab_size=trainer.vocab_size)
        results.update({f"heldout_{key}": value for key, value in figures.items()})
    models = stage.models_record(
        training_args.output_dir,
        model_args.model_name_or_path,
        training_args.teacher_model_name_or_path,
        adapters=model_args.use_peft,
    )
    method = f"DistillTrainer distill_mode={training_args.distill_mode} objective={training_args.objective}"
    record = stage.finish_stage("distill", method, (script_args, model_args, training_args), results, models, trainer)
    # The receipt and the card carry the held-out figures too (not only stage.json), and cover stage.json: the
    # output passes `trl-distill verify --strict` (and `--replay` recomputes the figures on the recorded rows).
    if trainer.accelerator.is_main_process:
        save_artifact(trainer, training_args.output_dir, heldout=figures, heldout_rows=rows if figures else None)
    return record


def main(argv: list[str] | None = None) -> dict | None:
    """Parse `argv` (default: `sys.argv[1:]`), train, return the stage record (`None` after `--help`)."""
    return stage.run_recipe(run, make_parser(), argv, command="train")


if __name__ == "__main__":
    main()
