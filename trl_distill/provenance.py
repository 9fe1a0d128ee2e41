"""What a `DistillTrainer` run records about itself: models, tokenizers, data, settings, results and papers.

[`distill_stage`] turns a trainer into one receipt stage; [`save_artifact`] writes the held-out rows, the receipt, its
signature and the model card beside weights that `save_model` just wrote.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import logging
import os
import platform
import weakref
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any


__all__ = [
    "HELDOUT_ROWS_NAME",
    "distill_stage",
    "distillation_settings",
    "library_versions",
    "method_papers",
    "save_artifact",
    "state_dict_sha256",
    "tokenizer_sha256",
]

logger = logging.getLogger(__name__)

HELDOUT_ROWS_NAME = "distill_heldout_rows.jsonl"
_LIBRARIES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "evaluate", "tokenizers")
# DistillConfig fields that are not distillation settings (a local key path says nothing about how the model was made)
_NOT_SETTINGS = {"receipt_signing_key"}
_TRAINING_FIELDS = (
    "seed", "data_seed", "learning_rate", "lr_scheduler_type", "warmup_steps", "weight_decay", "optim",
    "num_train_epochs", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps", "max_length",
    "packing", "completion_only_loss", "assistant_only_loss", "bf16", "fp16",
)  # fmt: skip

PAPERS = {
    "kd": ("1503.02531", "Distilling the Knowledge in a Neural Network"),
    "reverse_kl": ("2306.08543", "MiniLLM: Knowledge Distillation of Large Language Models"),
    "gkd": ("2306.13649", "On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes"),
    "seq_kd": ("1606.07947", "Sequence-Level Knowledge Distillation"),
    "uld": ("2402.12030", "Towards Cross-Tokenizer Distillation: the Universal Logit Distillation Loss for LLMs"),
    "feature": ("1412.6550", "FitNets: Hints for Thin Deep Nets"),
}
_MODE_LABELS = {
    "token": "token-level knowledge distillation",
    "sequence": "sequence-level knowledge distillation",
    "uld": "universal logit distillation (cross-tokenizer)",
    "feature": "feature (hidden-state) distillation",
}
_TEACHER_HASHES: "weakref.WeakKeyDictionary[Any, str | None]" = weakref.WeakKeyDictionary()


def jsonable(value: Any) -> Any:
    """A JSON-able copy of a config value (dtypes, enums and other objects become strings)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, enum.Enum):
        return jsonable(value.value)
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted(jsonable(v) for v in value)
    return str(value)


def library_versions() -> dict[str, str | None]:
    """Versions of Python, trl_distill and the libraries a run depends on (`None` when not installed)."""
    from trl_distill import __version__

    versions = {"python": platform.python_version(), "trl_distill": __version__}
    for name in _LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def distillation_settings(args) -> dict[str, Any]:
    """Every field `type(args)` declares beyond `trl.SFTConfig` (so fields added by any mode are recorded)."""
    from trl import SFTConfig

    inherited = {f.name for f in dataclasses.fields(SFTConfig)}
    return {
        f.name: jsonable(getattr(args, f.name))
        for f in dataclasses.fields(args)
        if f.name not in inherited and f.name not in _NOT_SETTINGS
    }


def method_papers(settings: Mapping[str, Any], mode=None) -> list[dict[str, str]]:
    """arXiv ids and titles of the method: Hinton et al. plus what the objective, mode and options add."""
    keys = ["kd"]
    if settings.get("objective") == "reverse_kl":
        keys.append("reverse_kl")
    if settings.get("objective") in ("jsd", "generalized_jsd") or (settings.get("lmbda") or 0) > 0:
        keys.append("gkd")
    if settings.get("seq_kd"):
        keys.append("seq_kd")
    if settings.get("distill_mode") in PAPERS:
        keys.append(settings["distill_mode"])
    papers = [{"arxiv": PAPERS[k][0], "title": PAPERS[k][1]} for k in keys]
    for paper in getattr(mode, "papers", ()) or ():  # a mode may declare its own: ({"arxiv": ..., "title": ...},)
        papers.append({"arxiv": str(paper["arxiv"]), "title": str(paper.get("title", ""))})
    seen, unique = set(), []
    for paper in papers:
        if paper["arxiv"] not in seen:
            seen.add(paper["arxiv"])
            unique.append(paper)
    return unique


def state_dict_sha256(model) -> str | None:
    """sha256 over the names, dtypes, shapes and bytes of `model.state_dict()`, sorted by name.

    `None` when the weights are not all materialized here (meta tensors, DeepSpeed ZeRO-3 shards).
    """
    import torch
    from tqdm.auto import tqdm

    state = model.state_dict()
    digest = hashlib.sha256()
    for name in tqdm(sorted(state), desc="Hashing teacher weights", disable=len(state) < 1000):
        tensor = state[name]
        if tensor.is_meta or hasattr(tensor, "ds_shape"):
            return None
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{flat.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(memoryview(flat.view(torch.uint8).numpy()))
    return digest.hexdigest()


def tokenizer_sha256(tokenizer) -> str | None:
    """sha256 of what fixes token ids: the vocabulary, the special tokens and the chat template."""
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    if tokenizer is None or not hasattr(tokenizer, "get_vocab"):
        return None
    payload = {
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special_tokens": sorted(map(str, getattr(tokenizer, "all_special_tokens", []))),
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode("utf-8")).hexdigest()


def _unwrap(model):
    model = getattr(model, "module", model)  # DDP / DeepSpeed engine
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def model_record(model, init_kwargs: Mapping | None = None) -> dict[str, Any]:
    """Id/path, revision, architecture, dtype and parameter counts of a model (LoRA r/alpha for a PeftModel)."""
    base = _unwrap(model)
    config = getattr(base, "config", None)
    parameters = list(model.parameters())
    record = {
        "name_or_path": getattr(config, "_name_or_path", None) or None,
        "revision": (init_kwargs or {}).get("revision"),
        "model_type": getattr(config, "model_type", None),
        "dtype": str(parameters[0].dtype).replace("torch.", "") if parameters else None,
        "num_parameters": sum(p.numel() for p in parameters),
        "trainable_parameters": sum(p.numel() for p in parameters if p.requires_grad),
    }
    peft_config = getattr(getattr(model, "module", model), "peft_config", None)
    if isinstance(peft_config, Mapping):
        record["adapters"] = {
            name: {
                "peft_type": jsonable(getattr(cfg, "peft_type", None)),
                "r": getattr(cfg, "r", None),
                "lora_alpha": getattr(cfg, "lora_alpha", None),
                "lora_dropout": getattr(cfg, "lora_dropout", None),
                "target_modules": jsonable(getattr(cfg, "target_modules", None)),
            }
            for name, cfg in peft_config.items()
        }
    return record


def _teacher_record(trainer) -> dict[str, Any] | None:
    teacher = getattr(trainer, "teacher_model", None)
    if teacher is None:
        return None
    teacher = getattr(teacher, "module", teacher)
    if teacher not in _TEACHER_HASHES:  # the teacher is frozen: hash its weights once per trainer lifetime
        _TEACHER_HASHES[teacher] = state_dict_sha256(teacher)
    record = model_record(teacher, trainer.args.teacher_model_init_kwargs
                          if isinstance(trainer.args.teacher_model_init_kwargs, Mapping) else None)  # fmt: skip
    record["weights_sha256"] = _TEACHER_HASHES[teacher]
    record["tokenizer_sha256"] = tokenizer_sha256(getattr(trainer, "teacher_processing_class", None))
    return record


def dataset_record(dataset) -> dict[str, Any] | None:
    """Row count and `datasets` fingerprint (of the tokenized dataset the trainer used)."""
    if dataset is None:
        return None
    if isinstance(dataset, Mapping):
        return {name: dataset_record(d) for name, d in dataset.items()}
    rows = len(dataset) if hasattr(dataset, "__len__") else None
    return {"rows": rows, "fingerprint": getattr(dataset, "_fingerprint", None)}


def _training_record(trainer) -> dict[str, Any]:
    args, state = trainer.args, trainer.state
    record = {name: jsonable(getattr(args, name)) for name in _TRAINING_FIELDS if hasattr(args, name)}
    losses = [log["loss"] for log in state.log_history if "loss" in log]
    summary = next((log for log in reversed(state.log_history) if "train_loss" in log), {})
    record.update(
        world_size=args.world_size,
        global_step=state.global_step,
        epoch=state.epoch,
        final_train_loss=losses[-1] if losses else None,
        mean_train_loss=summary.get("train_loss"),
    )
    return record


def distill_stage(trainer, heldout: Mapping[str, float] | None = None, rows_file: str | None = None) -> dict[str, Any]:
    """The receipt stage describing `trainer`'s run: method, models, settings, data, training, results, papers."""
    settings = distillation_settings(trainer.args)
    mode = getattr(trainer, "distill_mode", None)
    label = _MODE_LABELS.get(settings.get("distill_mode"), f"{settings.get('distill_mode')} distillation")
    student = model_record(trainer.model, trainer.args.model_init_kwargs
                           if isinstance(trainer.args.model_init_kwargs, Mapping) else None)  # fmt: skip
    student["tokenizer_sha256"] = tokenizer_sha256(trainer.processing_class)
    results: dict[str, Any] = {"final_train_loss": _training_record(trainer)["final_train_loss"], "heldout": None}
    if heldout is not None:
        results.update(heldout=dict(heldout), heldout_rows_file=rows_file, heldout_vocab_size=trainer.vocab_size)
    return {
        "name": "distill",
        "method": f"{label} ({settings.get('objective')})" if "objective" in settings else label,
        "trainer": type(trainer).__name__,
        "papers": method_papers(settings, mode),
        "models": {"teacher": _teacher_record(trainer), "student": student},
        "settings": settings,
        "training": _training_record(trainer),
        "data": {"train": dataset_record(trainer.train_dataset), "eval": dataset_record(trainer.eval_dataset)},
        "results": results,
        "libraries": library_versions(),
    }


def _write_rows(path: Path, rows: list[Mapping]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(jsonable(dict(row)), ensure_ascii=False, sort_keys=True) + "\n")


def save_artifact(trainer, output_dir: str | os.PathLike) -> dict:
    """
    Make `output_dir` (where `save_model` just wrote the weights) a complete, verifiable artifact.

    Writes the held-out rows measured at this step ([`HELDOUT_ROWS_NAME`], for `trl-distill verify --replay`), the
    receipt (one stage: this run), its Ed25519 signature when `args.receipt_signing_key` is set, and the model card.
    Returns the receipt.
    """
    from .callbacks import heldout_results
    from .model_card import trainer_tags, write_model_card
    from .receipt import new_receipt, sign_receipt, write_receipt

    output_dir = Path(output_dir)
    heldout, rows = heldout_results(trainer)
    rows_path = output_dir / HELDOUT_ROWS_NAME
    if rows is not None:
        _write_rows(rows_path, rows)
    elif rows_path.exists():
        rows_path.unlink()  # from an earlier save: the figures it backed are not in this receipt
    stage = distill_stage(trainer, heldout, HELDOUT_ROWS_NAME if rows is not None else None)
    receipt = new_receipt(output_dir, [stage])
    write_receipt(output_dir, receipt)
    if trainer.args.receipt_signing_key:
        sign_receipt(output_dir, trainer.args.receipt_signing_key)
    hub_model_id = getattr(trainer, "hub_model_id", None)
    write_model_card(output_dir, receipt, tags=trainer_tags(trainer), hub_model_id=hub_model_id)
    trainer._written_receipts = {**getattr(trainer, "_written_receipts", {}), str(output_dir.resolve()): receipt}
    logger.info("Wrote %s (content id %s) in %s", "distill_receipt.json", receipt["content_id"], output_dir)
    return receipt
