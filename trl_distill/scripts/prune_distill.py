"""Prune, then distill from the original: depth-prune a model, save the pruned student, distill it from the unpruned
model with `DistillTrainer`; one receipt for both stages ([Minitron](https://huggingface.co/papers/2407.14679)).

    trl-distill prune-distill --config recipes/configs/tiny_prune_distill.yaml      # after `trl-distill recipe-assets`
    trl-distill prune-distill --config recipes/configs/smollm2-prune-distill.yaml
    python recipes/prune_distill.py --config <config>.yaml                             # a clone's entry point

Every key of the YAML is a field of `PruneDistillScriptArguments` (the `prune_*` and `calibration_*` keys below, plus
TRL's dataset arguments), TRL's `ModelConfig` or `DistillConfig`. `model_name_or_path` is the model that is pruned
*and* the teacher (leave `teacher_model_name_or_path` unset). Steps:

1. load the model; take `calibration_rows` rows of the training split as calibration text;
2. score its decoder layers (`prune_scoring`): `"cosine"`, ShortGPT's block influence `1 - cos(h_in, h_out)`
   ([`~trl_distill.pruning.score_layers`], one forward), or `"kl"`, the KL(full‖without layer i) each single-layer
   removal causes on that text ([`~trl_distill.pruning.score_layers_by_kl`], one forward per layer);
3. keep `prune_num_keep` layers (or drop the fraction `prune_ratio`): the first `prune_keep_first` and last
   `prune_keep_last` always, then the highest scores ([`~trl_distill.pruning.select_layers`]);
4. save the depth-pruned copy to `pruned_output_dir` (default `<output_dir>-pruned`, a sibling, so the final
   artifact does not carry it) with `pruning.json` (kept/removed layers, scores, method) and a receipt whose one
   stage, `prune`, records them and the pruned model's held-out KL to the original;
5. distill it from the unpruned model with `DistillTrainer` (any `distill_mode`; with `feature_weight > 0` and no
   `feature_layer_map`, student layer `i` is matched to the teacher layer it was copied from);
6. save to `output_dir`, measure held-out KL, write `stage.json`, and chain the receipts: `output_dir`'s
   `distill_receipt.json` lists `prune` then `distill`, and passes `trl-distill verify --strict`.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field

from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config

from trl_distill import DistillConfig, DistillTrainer, heldout_metrics, save_artifact

from . import stage
from .data import load_splits


PRUNE_SCORINGS = ("cosine", "kl")
PRUNING_FILE = "pruning.json"
_SCORING_METHODS = {
    "cosine": "ShortGPT block influence 1 - cos(h_in, h_out) (arXiv:2403.03853)",
    "kl": "KL(full || without layer i) per token, one single-layer removal at a time",
}


@dataclass
class PruneDistillScriptArguments(ScriptArguments):
    """TRL's dataset arguments plus what to prune and how to score the layers.

    Exactly one of `prune_num_keep` and `prune_ratio` is set. The calibration text is the first `calibration_rows`
    rows of the training split (prompt + completion, `messages` through the chat template, or `text`).
    """

    prune_num_keep: int | None = field(
        default=None, metadata={"help": "Decoder layers to keep, in [1, num_layers). Or set `prune_ratio`."}
    )
    prune_ratio: float | None = field(
        default=None,
        metadata={"help": "Fraction of the decoder layers to remove, in (0, 1); keeps round(L * (1 - ratio))."},
    )
    prune_scoring: str = field(
        default="cosine",
        metadata={
            "help": "'cosine' (ShortGPT block influence) or 'kl' (KL each single-layer removal causes).",
            "choices": PRUNE_SCORINGS,
        },
    )
    prune_keep_first: int = field(default=1, metadata={"help": "First layers always kept (>= 0)."})
    prune_keep_last: int = field(default=1, metadata={"help": "Last layers always kept (>= 0)."})
    calibration_rows: int = field(default=32, metadata={"help": "Training rows the layers are scored on (>= 1)."})
    calibration_max_length: int = field(default=128, metadata={"help": "Token cap per calibration row (>= 1)."})
    calibration_batch_size: int = field(default=8, metadata={"help": "Calibration rows per forward (>= 1)."})
    pruned_output_dir: str | None = field(
        default=None, metadata={"help": "Where the pruned student is saved; default `<output_dir>-pruned`."}
    )

    def __post_init__(self):
        if hasattr(super(), "__post_init__"):
            super().__post_init__()
        if (self.prune_num_keep is None) == (self.prune_ratio is None):
            raise ValueError(
                f"Set exactly one of `prune_num_keep` (layers to keep) and `prune_ratio` (fraction of layers to "
                f"remove); got prune_num_keep={self.prune_num_keep!r}, prune_ratio={self.prune_ratio!r}."
            )
        if self.prune_ratio is not None and not (
            isinstance(self.prune_ratio, (int, float))
            and not isinstance(self.prune_ratio, bool)
            and 0 < self.prune_ratio < 1
        ):
            raise ValueError(
                f"`prune_ratio` must be a fraction of the layers to remove, strictly between 0 and 1, got "
                f"{self.prune_ratio!r} (e.g. 0.5 removes half the layers)."
            )
        if self.prune_num_keep is not None and (not _is_int(self.prune_num_keep) or self.prune_num_keep < 1):
            raise ValueError(f"`prune_num_keep` must be an int >= 1 (layers to keep), got {self.prune_num_keep!r}.")
        if self.prune_scoring not in PRUNE_SCORINGS:
            raise ValueError(f"`prune_scoring` must be one of {PRUNE_SCORINGS}, got {self.prune_scoring!r}.")
        for name in ("prune_keep_first", "prune_keep_last"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be an int >= 0, got {getattr(self, name)!r}.")
        for name in ("calibration_rows", "calibration_max_length", "calibration_batch_size"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be an int >= 1, got {getattr(self, name)!r}.")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def make_parser(prog: str | None = None) -> TrlParser:
    """The recipe's parser: every field of these dataclasses is a YAML key and a `--flag`."""
    return TrlParser((PruneDistillScriptArguments, ModelConfig, DistillConfig), prog=prog)


# ------------------------------------------------------------------------------------------------------ settings
def check_combination(script_args: PruneDistillScriptArguments, model_args: ModelConfig, training_args) -> None:
    """Refuse settings that cannot work with prune-then-distill, naming the field and the fix."""
    if not model_args.model_name_or_path:
        raise ValueError("`model_name_or_path` is required: the model to prune, which is also the teacher.")
    teacher = training_args.teacher_model_name_or_path
    if teacher is not None and os.path.normpath(teacher) != os.path.normpath(model_args.model_name_or_path):
        raise ValueError(
            f"`teacher_model_name_or_path={teacher!r}`: prune-distill distills the pruned model from the model it "
            f"was pruned from (`model_name_or_path={model_args.model_name_or_path!r}`). Remove "
            "`teacher_model_name_or_path`, or use `trl-distill train` with the pruned model from `pruned_output_dir`."
        )
    if training_args.teacher_cache is not None:
        raise ValueError(
            f"`teacher_cache={training_args.teacher_cache!r}`: prune-distill loads the full model anyway (to score "
            "and prune its layers) and distills from it live. Remove `teacher_cache`."
        )
    if model_args.load_in_4bit or model_args.load_in_8bit:
        raise ValueError(
            "`load_in_4bit`/`load_in_8bit`: layers are scored and copied from the full-precision model; quantize the "
            "distilled student afterwards (`trl-distill qat`). Set both to false."
        )
    if training_args.feature_layer_map is not None and training_args.feature_weight > 0:
        stage.logger.warning(
            "`feature_layer_map` is used as given; leave it unset to match each student layer to the teacher layer "
            "it was copied from."
        )


def resolve_num_keep(script_args: PruneDistillScriptArguments, num_layers: int) -> int:
    """Layers to keep: `prune_num_keep`, or `round(num_layers * (1 - prune_ratio))`; checked against the model."""
    protected = script_args.prune_keep_first + script_args.prune_keep_last
    if script_args.prune_num_keep is not None:
        num_keep, source = script_args.prune_num_keep, f"`prune_num_keep={script_args.prune_num_keep}`"
    else:
        num_keep = round(num_layers * (1 - script_args.prune_ratio))
        source = f"`prune_ratio={script_args.prune_ratio}` ({num_keep} of {num_layers} layers kept)"
    if not 1 <= num_keep < num_layers:
        raise ValueError(
            f"{source}: the model has {num_layers} decoder layers; keep between 1 and {num_layers - 1} of them "
            "(pruning must remove at least one layer and keep at least one)."
        )
    if num_keep < protected:
        raise ValueError(
            f"{source} is fewer than the protected layers (`prune_keep_first={script_args.prune_keep_first}` + "
            f"`prune_keep_last={script_args.prune_keep_last}`); keep more layers or protect fewer."
        )
    return num_keep


def calibration_texts(dataset, num_rows: int, tokenizer) -> list[str]:
    """The first `num_rows` rows of `dataset` as text: `text`, prompt + completion, or `messages` (chat template)."""
    rows = [row for _, row in zip(range(num_rows), dataset)]
    if not rows:
        raise ValueError("`calibration_rows`: the training split is empty; the layers need calibration text.")
    texts = []
    for row in rows:
        if isinstance(row.get("text"), str):
            texts.append(row["text"])
        elif "prompt" in row and "completion" in row:
            prompt, completion = row["prompt"], row["completion"]
            if isinstance(prompt, str):
                texts.append(prompt + completion)
            else:  # conversational prompt/completion
                texts.append(tokenizer.apply_chat_template(list(prompt) + list(completion), tokenize=False))
        elif "messages" in row:
            texts.append(tokenizer.apply_chat_template(row["messages"], tokenize=False))
        else:
            raise ValueError(
                f"Calibration text: the training rows have columns {sorted(row)}; prune-distill reads `text`, "
                "`prompt`/`completion` or `messages`."
            )
    return texts


# ------------------------------------------------------------------------------------------------------- pruning
def prune(script_args: PruneDistillScriptArguments, teacher, tokenizer, train_dataset) -> dict:
    """Score the layers of `teacher` on calibration rows and select the ones to keep: the pruning record.

    Returns `{"scoring", "method", "scores", "num_layers", "kept_layers", "removed_layers", "calibration"}`.
    """
    from trl_distill.pruning import (
        calibration_batches,
        decoder_layers,
        score_layers,
        score_layers_by_kl,
        select_layers,
    )

    num_layers = len(decoder_layers(teacher))
    num_keep = resolve_num_keep(script_args, num_layers)
    texts = calibration_texts(train_dataset, script_args.calibration_rows, tokenizer)
    batches = calibration_batches(
        tokenizer, texts, batch_size=script_args.calibration_batch_size, max_length=script_args.calibration_max_length
    )
    scorer = score_layers_by_kl if script_args.prune_scoring == "kl" else score_layers
    scores = [float(s) for s in scorer(teacher, batches)]
    keep = select_layers(
        scores, num_keep, keep_first=script_args.prune_keep_first, keep_last=script_args.prune_keep_last
    )
    return {
        "scoring": script_args.prune_scoring,
        "method": _SCORING_METHODS[script_args.prune_scoring],
        "scores": scores,
        "num_layers": num_layers,
        "kept_layers": keep,
        "removed_layers": [i for i in range(num_layers) if i not in keep],
        "keep_first": script_args.prune_keep_first,
        "keep_last": script_args.prune_keep_last,
        "calibration": {
            "rows": len(texts),
            "tokens": sum(int(b["attention_mask"].sum()) for b in batches),
            "max_length": script_args.calibration_max_length,
        },
    }


def pruned_dir(script_args: PruneDistillScriptArguments, output_dir: str) -> str:
    return script_args.pruned_output_dir or os.path.normpath(output_dir) + "-pruned"


def save_pruned(student, tokenizer, pruning: dict, directory: str, source: str, heldout: dict | None) -> dict:
    """Save the pruned model, `pruning.json` and a receipt with one `prune` stage; return that stage."""
    from trl_distill.artifact import append_stage
    from trl_distill.receipt import receipt_path

    os.makedirs(directory, exist_ok=True)
    if receipt_path(directory).is_file():  # an earlier run's receipt: this run starts a new one
        os.remove(receipt_path(directory))
    student.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    with open(os.path.join(directory, PRUNING_FILE), "w", encoding="utf-8") as f:
        json.dump({"source": source, **pruning}, f, indent=2)
    kept, total = len(pruning["kept_layers"]), pruning["num_layers"]
    prune_stage = {
        "name": "prune",
        "method": f"depth pruning: {kept} of {total} decoder layers kept, scored by {pruning['method']}",
        "papers": [
            {"arxiv": "2407.14679", "title": "Compact Language Models via Pruning and Knowledge Distillation"},
            {
                "arxiv": "2403.03853",
                "title": "ShortGPT: Layers in Large Language Models are More Redundant Than You Expect",
            },
        ],
        "models": {"source": {"name_or_path": source}, "student": {"name_or_path": directory, "initial": source}},
        "settings": {key: pruning[key] for key in ("scoring", "keep_first", "keep_last", "calibration")},
        "results": {
            "num_layers": total,
            "kept_layers": pruning["kept_layers"],
            "removed_layers": pruning["removed_layers"],
            "scores": pruning["scores"],
            "heldout": heldout,
        },
    }
    append_stage(directory, prune_stage)
    return prune_stage


def chain_receipt(output_dir: str, previous: str, signing_key: str | None = None) -> dict:
    """Rewrite `output_dir`'s receipt with the stages of `previous` first (prune, then distill), re-hashed."""
    from trl_distill import model_card
    from trl_distill import receipt as receipts

    earlier = receipts.load_receipt(previous)["stages"]
    current = receipts.load_receipt(output_dir)
    stages = current["stages"]
    if stages[: len(earlier)] != earlier:
        stages = earlier + stages
    chained = receipts.new_receipt(output_dir, stages, card=current.get("card"))
    receipts.write_receipt(output_dir, chained)
    if signing_key:
        receipts.sign_receipt(output_dir, signing_key)
    model_card.write_model_card(output_dir, chained)
    return chained


# -------------------------------------------------------------------------------------------------------- recipe
def run(script_args: PruneDistillScriptArguments, model_args: ModelConfig, training_args: DistillConfig) -> dict:
    """Prune, save, distill from the original, measure; return the stage record (also `output_dir/stage.json`)."""
    if model_args.model_name_or_path and model_args.model_name_or_path.startswith("~"):
        model_args.model_name_or_path = os.path.expanduser(model_args.model_name_or_path)  # YAML paths under $HOME
    check_combination(script_args, model_args, training_args)
    source = model_args.model_name_or_path
    train_dataset, test_dataset = load_splits(script_args)
    rows = stage.heldout_rows(test_dataset, stage.heldout_limit(training_args))
    tokenizer = stage.load_tokenizer(source)
    teacher = stage.load_model(model_args, training_args).eval()
    main_process = training_args.process_index == 0

    from trl_distill.pruning import depth_prune

    pruning = prune(script_args, teacher, tokenizer, train_dataset)
    directory = pruned_dir(script_args, training_args.output_dir)
    pruned = depth_prune(copy.deepcopy(teacher), pruning["kept_layers"])
    before = heldout_metrics(pruned, teacher, tokenizer, rows) if rows else None
    if main_process:
        prune_stage = save_pruned(pruned, tokenizer, pruning, directory, source, before)
        print(
            f"[prune] {prune_stage['method']}; removed layers {pruning['removed_layers']}; saved to {directory}"
            + (f"; held-out KL {before['kl_teacher_student']:.4g}" if before else ""),
            flush=True,
        )
    del pruned
    _wait_for_everyone()
    student = stage.load_model(model_args, training_args, path=directory)  # what is on disk, named by its directory

    if training_args.feature_weight > 0 and training_args.feature_layer_map is None:
        training_args.feature_layer_map = [[i, layer] for i, layer in enumerate(pruning["kept_layers"])]
    training_args.teacher_model_name_or_path = source  # the receipt and the card name the teacher
    eval_dataset = test_dataset.select(range(len(rows))) if training_args.eval_strategy != "no" and rows else None
    trainer = DistillTrainer(
        model=student,
        teacher_model=teacher,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        teacher_processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    results = stage.train_and_save(trainer, training_args.output_dir)
    runtime = [log["train_runtime"] for log in trainer.state.log_history if "train_runtime" in log]
    results["train_runtime_s"] = float(runtime[-1]) if runtime else None
    figures = None
    if rows and trainer.distill_mode.requires_shared_vocab:
        figures = heldout_metrics(trainer.model, teacher, tokenizer, rows, vocab_size=trainer.vocab_size)
    results.update({f"pruned_{key}": value for key, value in (before or {}).items()})
    results.update({f"heldout_{key}": value for key, value in (figures or {}).items()})
    results.update(kept_layers=pruning["kept_layers"], removed_layers=pruning["removed_layers"])
    models = stage.models_record(training_args.output_dir, directory, source, adapters=model_args.use_peft)
    models["source"] = {"name_or_path": source}
    method = (
        f"prune ({len(pruning['kept_layers'])}/{pruning['num_layers']} layers, {script_args.prune_scoring}) "
        f"then DistillTrainer distill_mode={training_args.distill_mode} objective={training_args.objective}"
    )
    record = stage.finish_stage(
        "prune_distill", method, (script_args, model_args, training_args), results, models, trainer
    )
    if trainer.accelerator.is_main_process:
        save_artifact(trainer, training_args.output_dir, heldout=figures, heldout_rows=rows if figures else None)
        chain_receipt(training_args.output_dir, directory, training_args.receipt_signing_key)
    return record


def _wait_for_everyone() -> None:
    """Other ranks load the pruned model only once the main process has saved it."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def main(argv: list[str] | None = None) -> dict | None:
    """Parse `argv` (default: `sys.argv[1:]`), prune, distill, return the stage record (`None` after `--help`)."""
    return stage.run_recipe(run, make_parser(), argv, command="prune-distill")


if __name__ == "__main__":
    main()
