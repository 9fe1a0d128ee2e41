"""DPO after distillation: the student's own samples, ranked by the teacher, as preference pairs for TRL's `DPOTrainer`.

The pair rule (`trl_distill.teacher_ranked_pairs`): for each training prompt the student samples `num_samples`
completions; the teacher scores each by its mean log-probability per completion token; the best-scored is `chosen`,
the worst-scored `rejected`; prompts whose two are the same text, or closer than `min_margin` nats per token, are
dropped. Held-out KL(teacher‖student) is measured before and after DPO.

    trl-distill dpo --config recipes/configs/tiny_dpo.yaml     # after recipes/configs/tiny.yaml
    accelerate launch -m trl_distill.scripts.dpo --config <config>.yaml
    accelerate launch recipes/distill_dpo.py --config <config>.yaml     # a clone's entry point

Keys: TRL's `ScriptArguments` and `ModelConfig` (the student: the distilled model), `DPOConfig`, and the pair
settings below. `beta` here is DPO's (TRL's `DPOConfig.beta`), not the generalized-JSD one of `DistillConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import DPOConfig, DPOTrainer, ModelConfig, ScriptArguments, TrlParser, get_peft_config

from trl_distill import teacher_ranked_pairs

from . import stage
from .data import load_splits


@dataclass
class PairScriptArguments(ScriptArguments):
    """TRL's dataset arguments (the prompts come from `dataset_train_split`'s `prompt` column) plus:"""

    teacher_model_name_or_path: str | None = field(
        default=None, metadata={"help": "The teacher that ranks the student's samples (and that KL is measured to)."}
    )
    num_samples: int = field(default=4, metadata={"help": "Student samples per prompt (at least 2)."})
    max_new_tokens: int = field(default=32, metadata={"help": "Length limit of each sample."})
    sample_temperature: float = field(default=1.0, metadata={"help": "Sampling temperature of the student's samples."})
    min_margin: float = field(default=0.0, metadata={"help": "Minimum teacher score gap (nats/token) to keep a pair."})
    max_prompts: int = field(default=512, metadata={"help": "Training prompts to build pairs from."})
    heldout_max_rows: int = field(default=256, metadata={"help": "Held-out rows for KL(teacher||student); 0: none."})

    def __post_init__(self):
        if not self.teacher_model_name_or_path:
            raise ValueError("`teacher_model_name_or_path` is required: the teacher ranks the student's samples.")


def make_parser(prog: str | None = None) -> TrlParser:
    """The recipe's parser: every field of these dataclasses is a YAML key and a `--flag`."""
    return TrlParser((PairScriptArguments, ModelConfig, DPOConfig), prog=prog)


def run(script_args: PairScriptArguments, model_args: ModelConfig, training_args: DPOConfig) -> dict:
    from transformers import AutoModelForCausalLM

    train_dataset, test_dataset = load_splits(script_args)
    rows = stage.heldout_rows(test_dataset, script_args.heldout_max_rows)
    tokenizer = stage.load_tokenizer(model_args.model_name_or_path)
    student = stage.load_model(model_args, training_args)
    teacher = AutoModelForCausalLM.from_pretrained(script_args.teacher_model_name_or_path).to(training_args.device)
    results = stage.measure(student, teacher, tokenizer, rows, prefix="before_")

    prompts = train_dataset.select(range(min(script_args.max_prompts, len(train_dataset))))["prompt"]
    teacher_tokenizer = stage.load_tokenizer(script_args.teacher_model_name_or_path)
    pairs, pair_stats = teacher_ranked_pairs(
        student,
        teacher,
        tokenizer,
        prompts,
        teacher_tokenizer=teacher_tokenizer,
        num_samples=script_args.num_samples,
        max_new_tokens=script_args.max_new_tokens,
        temperature=script_args.sample_temperature,
        min_margin=script_args.min_margin,
        seed=training_args.seed,
    )
    if len(pairs) == 0:
        raise ValueError(
            f"No preference pair: the student's {script_args.num_samples} samples per prompt were identical or closer "
            f"than `min_margin={script_args.min_margin}`. Raise `sample_temperature` or `num_samples`."
        )
    results.update({f"pairs_{key}": value for key, value in pair_stats.items()})
    pairs_dataset = pairs.select_columns(["prompt", "chosen", "rejected"])
    trainer = DPOTrainer(
        model=student,
        args=training_args,
        train_dataset=pairs_dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    results.update(stage.train_and_save(trainer, training_args.output_dir))
    results.update(stage.measure(trainer.model, teacher, tokenizer, rows, prefix="after_"))
    models = stage.models_record(
        training_args.output_dir,
        model_args.model_name_or_path,
        script_args.teacher_model_name_or_path,
        adapters=model_args.use_peft,
    )
    method = "DPOTrainer on student samples ranked by the teacher (mean log-prob per completion token)"
    return stage.finish_stage("dpo", method, (script_args, model_args, training_args), results, models, trainer)


def main(argv: list[str] | None = None) -> dict | None:
    """Parse `argv` (default: `sys.argv[1:]`), run, return the stage record (`None` after `--help`)."""
    return stage.run_recipe(run, make_parser(), argv, command="dpo")


if __name__ == "__main__":
    main()
