"""What a `DistillTrainer` run records about itself: models, tokenizers, data, settings, results and papers.

[`distill_stage`] turns a trainer into one receipt stage. This module only describes; `artifact` writes (receipt, card,
signature), so `provenance`, `receipt` and `model_card` import none of each other.

How a mode is described (its label and papers) comes from the mode class when it declares `describe(args)` and
`papers` (see `trl_distill.modes`), else from [`MODE_DESCRIPTIONS`], the one table kept here.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import os
import platform
import types
import weakref
from collections.abc import Mapping
from importlib import metadata
from typing import Any

from .digests import tokenizer_sha256, weights_sha256


__all__ = [
    "HELDOUT_ROWS_NAME",
    "MODE_DESCRIPTIONS",
    "PAPERS",
    "applicable_settings",
    "describe_method",
    "distill_stage",
    "distillation_settings",
    "library_versions",
    "method_papers",
]

logger = logging.getLogger(__name__)

HELDOUT_ROWS_NAME = "distill_heldout_rows.jsonl"
_LIBRARIES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "evaluate", "tokenizers")
# DistillConfig fields that are not distillation settings (a local key path says nothing about how the model was made)
_NOT_SETTINGS = {"receipt_signing_key"}
_TRAINING_FIELDS = (
    "seed",
    "data_seed",
    "learning_rate",
    "lr_scheduler_type",
    "warmup_steps",
    "weight_decay",
    "optim",
    "num_train_epochs",
    "max_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "max_length",
    "packing",
    "completion_only_loss",
    "assistant_only_loss",
    "bf16",
    "fp16",
)

PAPERS = {
    "kd": ("1503.02531", "Distilling the Knowledge in a Neural Network"),
    "reverse_kl": ("2306.08543", "MiniLLM: Knowledge Distillation of Large Language Models"),
    "gkd": ("2306.13649", "On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes"),
    "seq_kd": ("1606.07947", "Sequence-Level Knowledge Distillation"),
    "uld": ("2402.12030", "Towards Cross-Tokenizer Distillation: the Universal Logit Distillation Loss for LLMs"),
    "feature": ("1412.6550", "FitNets: Hints for Thin Deep Nets"),
}
# Mode name -> (label, papers, settings that apply to it). Used when the mode class does not describe itself.
MODE_DESCRIPTIONS: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "token": (
        "token-level knowledge distillation",
        ("kd",),
        ("objective", "kd_temperature", "alpha", "loss_reduction", "kd_top_k", "teacher_cache"),
    ),
    "sequence": (
        "sequence-level knowledge distillation (cross-entropy on the teacher's completions)",
        ("seq_kd",),
        (
            "loss_reduction",
            "teacher_completion_column",
            "teacher_do_sample",
            "teacher_num_beams",
            "max_completion_length",
        ),
    ),
    "uld": (
        "universal logit distillation (cross-tokenizer)",
        ("kd", "uld"),
        ("objective", "kd_temperature", "alpha", "loss_reduction", "uld_top_k", "uld_distance", "uld_exact_match"),
    ),
}
# What the label adds per mode: the divergence for token KD, the distance (and exact-match divergence) for ULD.
_LABEL_DETAILS = {
    "token": lambda s: f" ({s.get('objective')})",
    "uld": lambda s: (
        f" ({s.get('uld_distance')} distance between sorted probabilities"
        + (f"; {s.get('objective')} on exactly matching tokens)" if s.get("uld_exact_match") else ")")
    ),
}
_ALWAYS = ("distill_mode", "teacher_model_name_or_path", "teacher_model_init_kwargs", "heldout_eval")
_SAMPLING = ("max_completion_length", "temperature", "top_p", "top_k")
_FEATURE = ("feature_weight", "feature_layer_map", "feature_loss", "feature_projection")
_TEACHER_HASHES: weakref.WeakKeyDictionary[Any, str | None] = weakref.WeakKeyDictionary()


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


def _mode_class(name):
    from .modes import get_mode

    try:
        return get_mode(name)
    except (ValueError, TypeError):
        return None


def _paper(entry) -> dict[str, str]:
    """A paper declared as a key of [`PAPERS`], an `(arxiv, title)` pair or a `{"arxiv", "title"}` dict."""
    if isinstance(entry, str) and entry in PAPERS:
        entry = PAPERS[entry]
    if isinstance(entry, Mapping):
        return {"arxiv": str(entry["arxiv"]), "title": str(entry.get("title", ""))}
    arxiv, title = entry
    return {"arxiv": str(arxiv), "title": str(title)}


def describe_method(settings: Mapping[str, Any], args=None) -> tuple[str, list[dict[str, str]]]:
    """The method's label (as the receipt and card print it) and its papers, from the settings of a run.

    The mode's own part comes from its class (`describe(args)`, `papers`) when it has them, else from
    [`MODE_DESCRIPTIONS`]; then what the objective and options add: the divergence (for modes that use `objective`),
    MiniLLM for reverse KL, GKD for JSD or on-policy samples (`lmbda > 0`), sequence-level KD for `seq_kd`, FitNets for
    a feature term (`feature_weight > 0`).
    """
    name = settings.get("distill_mode")
    mode_cls = _mode_class(name) if name else None
    table = MODE_DESCRIPTIONS.get(name)
    label, keys = (table[0], list(table[1])) if table else (f"{name} distillation", ["kd"])
    describe = getattr(mode_cls, "describe", None)
    if callable(describe):
        try:
            label = describe(args if args is not None else types.SimpleNamespace(**settings))
        except (AttributeError, TypeError) as error:  # a describe written for a full config: keep the table's label
            logger.debug("`%s.describe` failed on the recorded settings (%s)", mode_cls.__name__, error)
    elif name in _LABEL_DETAILS:
        label += _LABEL_DETAILS[name](settings)
    declared = getattr(mode_cls, "papers", None)
    papers = [_paper(p) for p in declared] if declared else [_paper(k) for k in keys]
    objective_used = table is None or "objective" in table[2]
    extra = []
    if objective_used and settings.get("objective") == "reverse_kl":
        extra.append("reverse_kl")
    jsd = objective_used and settings.get("objective") in ("jsd", "generalized_jsd")
    if jsd or (settings.get("lmbda") or 0) > 0:
        extra.append("gkd")
    if settings.get("teacher_cache"):
        label += ", from an offline teacher store"
    if (settings.get("lmbda") or 0) > 0:
        label += f", on-policy samples with probability lmbda={settings['lmbda']}"
    if settings.get("seq_kd"):
        extra.append("seq_kd")
        label += ", on teacher-generated completions (seq_kd)"
    if (settings.get("feature_weight") or 0) > 0:
        extra.append("feature")
        label += (
            f" + feature (hidden-state) distillation ({settings.get('feature_loss')}, weight "
            f"{settings['feature_weight']})"
        )
    papers += [_paper(k) for k in extra]
    seen, unique = set(), []
    for paper in papers:
        if paper["arxiv"] not in seen:
            seen.add(paper["arxiv"])
            unique.append(paper)
    return label, unique


def method_papers(settings: Mapping[str, Any], mode=None) -> list[dict[str, str]]:
    """arXiv ids and titles of the method (see [`describe_method`])."""
    return describe_method(settings)[1]


def applicable_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The settings that shape this run's loss and targets (what the model card lists), from all recorded ones.

    A mode class may declare them as `settings` (a tuple of field names); else [`MODE_DESCRIPTIONS`] says; a mode
    neither knows keeps them all.
    """
    name = settings.get("distill_mode")
    declared = getattr(_mode_class(name), "settings", None) if name else None
    if declared is None and name not in MODE_DESCRIPTIONS:
        return dict(settings)
    keys = list(_ALWAYS) + list(declared if declared is not None else MODE_DESCRIPTIONS[name][2])
    if settings.get("objective") == "generalized_jsd" and "objective" in keys:
        keys.append("beta")
    if name == "sequence" and settings.get("teacher_do_sample"):
        keys += ["temperature", "top_p", "top_k"]
    if (settings.get("lmbda") or 0) > 0 or settings.get("seq_kd"):
        keys += ["lmbda", "seq_kd", *_SAMPLING]
    if (settings.get("feature_weight") or 0) > 0:
        keys += list(_FEATURE)
    if settings.get("heldout_eval"):
        keys.append("heldout_max_rows")
    unset_is_default = ("kd_top_k", "teacher_cache", "teacher_model_init_kwargs", "teacher_model_name_or_path")
    return {
        key: settings[key]
        for key in dict.fromkeys(keys)
        if key in settings and not (key in unset_is_default and settings[key] is None)
    }


def _unwrap(model):
    model = getattr(model, "module", model)  # DDP / DeepSpeed engine
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def model_record(model, init_kwargs: Mapping | None = None) -> dict[str, Any]:
    """Id/path, revision, architecture, dtype and parameter counts of a model (LoRA r/alpha for a PeftModel).

    `local` says whether `name_or_path` was a local directory when recorded (the model card then shows only its
    name: no local path is published).
    """
    base = _unwrap(model)
    config = getattr(base, "config", None)
    parameters = list(model.parameters())
    name = getattr(config, "_name_or_path", None) or None
    record = {
        "name_or_path": name,
        "local": bool(name) and (os.path.isabs(name) or os.path.exists(name)),
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


def teacher_record(trainer) -> dict[str, Any] | None:
    """The teacher: the live one (its weights hashed once per model object), else the one behind `teacher_cache`.

    A student trained from an offline store records the store's teacher (name, revision, dtype, `weights_sha256`,
    tokenizer) and the store's `manifest_sha256`, so `trl-distill verify --replay` can check both.
    """
    teacher = getattr(trainer, "teacher_model", None)
    if teacher is None:
        store_path = getattr(trainer.args, "teacher_cache", None)
        if not store_path:
            return None
        from .teachers.store import TeacherStore

        store = getattr(getattr(trainer, "distill_mode", None), "store", None)
        if not isinstance(store, TeacherStore):
            store = TeacherStore(store_path, verify_hashes=False)
        record = store.teacher_record
        name = record.get("name_or_path")
        record["local"] = bool(name) and (os.path.isabs(name) or os.path.exists(name))
        return record
    teacher = getattr(teacher, "module", teacher)
    if teacher not in _TEACHER_HASHES:  # the teacher is frozen: hash its weights once per model object
        _TEACHER_HASHES[teacher] = weights_sha256(teacher)
    kwargs = trainer.args.teacher_model_init_kwargs
    record = model_record(teacher, kwargs if isinstance(kwargs, Mapping) else None)
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


def distill_stage(
    trainer,
    heldout: Mapping[str, float] | None = None,
    rows_file: str | None = None,
    heldout_vocab_size: int | None = None,
) -> dict[str, Any]:
    """The receipt stage describing `trainer`'s run: method, models, settings, data, training, results, papers.

    `heldout` (figures from `trl_distill.evaluation.heldout_metrics`), `rows_file` (the rows they were measured on,
    relative to the artifact) and `heldout_vocab_size` (the logits compared; default `trainer.vocab_size`) go to
    `results`.
    """
    settings = distillation_settings(trainer.args)
    method, papers = describe_method(settings, trainer.args)
    kwargs = trainer.args.model_init_kwargs
    student = model_record(trainer.model, kwargs if isinstance(kwargs, Mapping) else None)
    student["tokenizer_sha256"] = tokenizer_sha256(trainer.processing_class)
    training = _training_record(trainer)
    results: dict[str, Any] = {"final_train_loss": training["final_train_loss"], "heldout": None}
    if heldout is not None:
        vocab_size = heldout_vocab_size if heldout_vocab_size is not None else getattr(trainer, "vocab_size", None)
        results.update(heldout=dict(heldout), heldout_rows_file=rows_file, heldout_vocab_size=vocab_size)
    return {
        "name": "distill",
        "method": method,
        "trainer": type(trainer).__name__,
        "papers": papers,
        "models": {"teacher": teacher_record(trainer), "student": student},
        "settings": settings,
        "training": training,
        "data": {"train": dataset_record(trainer.train_dataset), "eval": dataset_record(trainer.eval_dataset)},
        "results": results,
        "libraries": library_versions(),
    }
