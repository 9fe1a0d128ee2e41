"""Quantization-aware recovery: win back with distillation what quantizing a (distilled) student cost.

The full-precision model is the teacher of its own quantized copy; `DistillTrainer` trains the quantized student
with the distillation loss. Two paths (`quantization`):

- `qlora`: the student is loaded in bitsandbytes 4-bit (NF4) and LoRA adapters are trained (QLoRA recovery). The
  output is the adapters over the 4-bit base. (On CPUs with avx512-bf16 the 4-bit layers' repacking is turned off,
  or training breaks after the first no-grad forward.)
- `qat`: torchao fake-quantization (`qat_scheme`, default int8 dynamic activations + int4 weights in groups of
  `qat_group_size`) is inserted in every linear layer but the `lm_head`, the student is trained, and the weights are
  converted. The output is the trained full-precision weights; `trl_distill.qat_convert(model, scheme=...,
  group_size=...)` (settings in `quantization.json`) turns them into exactly the model that was evaluated.

Held-out KL(teacher‖student) is reported before quantization, after quantization and after recovery, against the
full-precision model (`*_kl_to_fp`) and, with `reference_teacher`, against the original teacher of the distillation
(`*_kl_to_reference`).

    trl-distill qat --config recipes/configs/tiny_qlora.yaml     # needs bitsandbytes
    trl-distill qat --config recipes/configs/tiny_qat.yaml       # needs torchao
    accelerate launch -m trl_distill.scripts.qat --config recipes/configs/qwen2.5-0.5b-qlora-recovery.yaml
    accelerate launch recipes/distill_qat.py --config <config>.yaml                  # a clone's entry point
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import dataclass, field

from trl import ModelConfig, TrlParser, get_peft_config

from trl_distill import DistillConfig, DistillTrainer, qat_convert, qat_prepare, unwrap_fake_quantized

from . import stage
from .data import load_splits
from .distill import DistillScriptArguments


QUANTIZATIONS = ("qlora", "qat")


@dataclass
class QATScriptArguments(DistillScriptArguments):
    quantization: str = field(
        default="qlora",
        metadata={
            "help": "'qlora': bitsandbytes 4-bit student + LoRA adapters; 'qat': torchao fake-quantization.",
            "choices": QUANTIZATIONS,
        },
    )
    qat_scheme: str = field(
        default="int8_dynact_int4_weight",
        metadata={"help": "torchao scheme for quantization='qat': 'int8_dynact_int4_weight' or 'int4_weight_only'."},
    )
    qat_group_size: int = field(default=32, metadata={"help": "Weights per int4 scale (quantization='qat')."})
    reference_teacher: str | None = field(
        default=None,
        metadata={"help": "The original teacher of the distillation, to also report held-out KL against it."},
    )

    def __post_init__(self):
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"`quantization` must be one of {QUANTIZATIONS}, got {self.quantization!r}.")


def make_parser(prog: str | None = None) -> TrlParser:
    """The recipe's parser: every field of these dataclasses is a YAML key and a `--flag`."""
    return TrlParser((QATScriptArguments, ModelConfig, DistillConfig), prog=prog)


def _kl(student, teachers: dict, tokenizer, rows, when: str) -> dict[str, float]:
    """Held-out KL(teacher‖student) against each named teacher, keyed `<when>_kl_to_<name>`."""
    return {
        f"{when}_kl_to_{name}": stage.measure(student, teacher, tokenizer, rows)["kl_teacher_student"]
        for name, teacher in teachers.items()
        if teacher is not None and rows is not None
    }


def run(script_args: QATScriptArguments, model_args: ModelConfig, training_args: DistillConfig) -> dict:
    from transformers import AutoModelForCausalLM

    train_dataset, test_dataset = load_splits(script_args)
    rows = stage.heldout_rows(test_dataset, stage.heldout_limit(training_args))
    tokenizer = stage.load_tokenizer(model_args.model_name_or_path)
    fp_args = dataclasses.replace(model_args, load_in_4bit=False, load_in_8bit=False, use_peft=False)
    full_precision = stage.load_model(fp_args, training_args)
    teacher = full_precision
    if training_args.teacher_model_name_or_path not in (None, model_args.model_name_or_path):
        teacher = AutoModelForCausalLM.from_pretrained(training_args.teacher_model_name_or_path)
    reference = script_args.reference_teacher and AutoModelForCausalLM.from_pretrained(script_args.reference_teacher)
    teachers = {"fp": teacher, "reference": reference or None}
    results = _kl(full_precision, {"reference": reference or None}, tokenizer, rows, "before_quant")

    peft_config = None
    if script_args.quantization == "qlora":
        student = stage.load_model(
            dataclasses.replace(model_args, load_in_4bit=True, load_in_8bit=False), training_args
        )
        results.update(_kl(student, teachers, tokenizer, rows, "after_quant"))
        peft_config = get_peft_config(dataclasses.replace(model_args, use_peft=True))
        method = "QLoRA recovery: bitsandbytes 4-bit student + LoRA, distilled from the full-precision model"
    else:
        quant = {"scheme": script_args.qat_scheme, "group_size": script_args.qat_group_size}
        results.update(
            _kl(qat_convert(copy.deepcopy(full_precision), **quant), teachers, tokenizer, rows, "after_quant")
        )
        student = qat_prepare(copy.deepcopy(full_precision), **quant)
        method = f"QAT (torchao {script_args.qat_scheme}, group {script_args.qat_group_size}), distilled from fp"

    trainer = DistillTrainer(
        model=student,
        teacher_model=teacher,
        args=training_args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        teacher_processing_class=tokenizer,
        peft_config=peft_config,
    )
    train_result = trainer.train()
    results.update(train_loss=train_result.training_loss, train_steps=train_result.global_step)
    recovered = trainer.model
    if script_args.quantization == "qat":
        recovered = qat_convert(copy.deepcopy(trainer.model), **quant)
        unwrap_fake_quantized(trainer.model)  # plain linear layers again, so the weights save as usual
    results.update(_kl(recovered, teachers, tokenizer, rows, "after_recovery"))
    trainer.save_model(training_args.output_dir)
    if script_args.quantization == "qat" and trainer.accelerator.is_main_process:
        with open(os.path.join(training_args.output_dir, "quantization.json"), "w", encoding="utf-8") as f:
            json.dump({"library": "torchao", "function": "trl_distill.qat_convert", "skip": ["lm_head"], **quant}, f)

    teacher_path = training_args.teacher_model_name_or_path or model_args.model_name_or_path
    models = stage.models_record(
        training_args.output_dir,
        model_args.model_name_or_path,
        teacher_path,
        adapters=script_args.quantization == "qlora",
    )
    if script_args.reference_teacher:
        models["reference_teacher"] = {"name_or_path": script_args.reference_teacher}
    return stage.finish_stage("qat", method, (script_args, model_args, training_args), results, models, trainer)


def main(argv: list[str] | None = None) -> dict | None:
    """Parse `argv` (default: `sys.argv[1:]`), run, return the stage record (`None` after `--help`)."""
    return stage.run_recipe(run, make_parser(), argv, command="qat")


if __name__ == "__main__":
    main()
