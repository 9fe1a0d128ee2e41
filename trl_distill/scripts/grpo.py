"""GRPO after distillation: TRL's `GRPOTrainer` on the distilled student, with reward functions named in the config.

`reward_funcs` lists import paths, `module:function` or `module.function`. A function with `prompts` and
`completions` parameters is used as TRL calls reward functions (a batch, returning floats); any other function is
called once per row as `f(prompt, completion) -> bool | float` (e.g. the demo task's verifiable
`trl_distill.demo:is_correct`). Held-out KL(teacher‖student) is measured before and after when a teacher is given.

    trl-distill grpo --config recipes/configs/tiny_grpo.yaml   # after recipes/configs/tiny.yaml
    accelerate launch -m trl_distill.scripts.grpo --config <config>.yaml
    accelerate launch recipes/distill_grpo.py --config <config>.yaml     # a clone's entry point

Keys: TRL's `ScriptArguments` and `ModelConfig` (the student), `GRPOConfig`, and the fields below. `beta` here is
GRPO's KL coefficient to the reference model (TRL's `GRPOConfig.beta`).
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, field

from trl import GRPOConfig, GRPOTrainer, ModelConfig, ScriptArguments, TrlParser, get_peft_config

from . import stage
from .data import load_splits


@dataclass
class RewardScriptArguments(ScriptArguments):
    """TRL's dataset arguments (the prompts come from `dataset_train_split`'s `prompt` column) plus:"""

    reward_funcs: list[str] = field(
        default_factory=lambda: ["trl_distill.demo:is_correct"],
        metadata={"help": "Reward functions by import path ('module:function'); see the module docstring."},
    )
    teacher_model_name_or_path: str | None = field(
        default=None, metadata={"help": "The distillation's teacher, to measure held-out KL to (optional)."}
    )
    max_prompts: int = field(default=512, metadata={"help": "Training prompts to use."})
    heldout_max_rows: int = field(default=256, metadata={"help": "Held-out rows for KL(teacher||student); 0: none."})


def load_reward(path: str):
    """The reward function at `path` ('module:function' or 'module.function'), adapted to TRL's batch signature."""
    module_name, sep, attr = path.partition(":") if ":" in path else path.rpartition(".")
    if not sep or not module_name or not attr:
        raise ValueError(f"`reward_funcs` entries are import paths like 'package.module:function', got {path!r}.")
    try:
        function = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"`reward_funcs`: cannot import {path!r} ({error}).") from error
    parameters = inspect.signature(function).parameters
    if {"prompts", "completions"} <= set(parameters):
        return function

    def per_row(prompts, completions, **kwargs):
        return [
            float(function(p, c if isinstance(c, str) else c[-1]["content"])) for p, c in zip(prompts, completions)
        ]

    per_row.__name__ = attr  # TRL logs each reward under its function's name
    return per_row


def make_parser(prog: str | None = None) -> TrlParser:
    """The recipe's parser: every field of these dataclasses is a YAML key and a `--flag`."""
    return TrlParser((RewardScriptArguments, ModelConfig, GRPOConfig), prog=prog)


def run(script_args: RewardScriptArguments, model_args: ModelConfig, training_args: GRPOConfig) -> dict:
    from transformers import AutoModelForCausalLM

    rewards = [load_reward(path) for path in script_args.reward_funcs]  # fail on a bad path before loading models
    train_dataset, test_dataset = load_splits(script_args)
    rows = stage.heldout_rows(test_dataset, script_args.heldout_max_rows)
    tokenizer = stage.load_tokenizer(model_args.model_name_or_path)
    student = stage.load_model(model_args, training_args)
    teacher = None
    if script_args.teacher_model_name_or_path:
        teacher = AutoModelForCausalLM.from_pretrained(script_args.teacher_model_name_or_path).to(training_args.device)
    results = stage.measure(student, teacher, tokenizer, rows, prefix="before_")
    prompts = train_dataset.select(range(min(script_args.max_prompts, len(train_dataset)))).select_columns(["prompt"])
    trainer = GRPOTrainer(
        model=student,
        reward_funcs=rewards,
        args=training_args,
        train_dataset=prompts,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    results.update(stage.train_and_save(trainer, training_args.output_dir))
    rewards_logged = [entry for entry in trainer.state.log_history if "reward" in entry]
    if rewards_logged:
        results.update(first_reward=rewards_logged[0]["reward"], last_reward=rewards_logged[-1]["reward"])
    results.update(stage.measure(trainer.model, teacher, tokenizer, rows, prefix="after_"))
    models = stage.models_record(
        training_args.output_dir,
        model_args.model_name_or_path,
        script_args.teacher_model_name_or_path,
        adapters=model_args.use_peft,
    )
    method = f"GRPOTrainer with rewards {script_args.reward_funcs}"
    return stage.finish_stage("grpo", method, (script_args, model_args, training_args), results, models, trainer)


def main(argv: list[str] | None = None) -> dict | None:
    """Parse `argv` (default: `sys.argv[1:]`), run, return the stage record (`None` after `--help`)."""
    return stage.run_recipe(run, make_parser(), argv, command="grpo")


if __name__ == "__main__":
    main()
