"""The model card (`README.md`) of a distilled model: a pure function of its receipt.

[`card_text`] renders the card from `distill_receipt.json` alone (the model name and tags are recorded in the receipt's
`card` entry), so `trl-distill verify` regenerates it and compares it line by line: every claim of the card (the
`model-index` figures the Hub displays, `base_model`, the teacher's name, the held-out table, the settings) is checked.

Metadata: `base_model` (the student's starting point, when it is a Hub id), `tags` (with `distillation`), a
`distillation` block (teacher, method, settings, held-out results, papers, the receipt's content id) and the held-out
figures in `model-index` form. The text says the same for people, and how to verify and reproduce the artifact. No
local path is written: a model loaded from a directory is shown by the directory's name and its weights digest.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any


__all__ = ["CARD_NAME", "build_model_card", "card_text", "distill_stage_of", "write_model_card"]

CARD_NAME = "README.md"
BASE_TAGS = ("distillation", "trl-distill", "trl")
HELDOUT_METRICS = (  # key, model-index metric type, readable name
    ("kl_teacher_student", "kl_divergence", "KL(teacher‖student)"),
    ("kl_student_teacher", "kl_divergence", "KL(student‖teacher)"),
    ("top1_agreement", "accuracy", "top-1 agreement with the teacher"),
    ("acceptance_rate", "acceptance_rate", "speculative acceptance rate (1 - TV)"),
    ("student_perplexity", "perplexity", "student perplexity"),
    ("teacher_perplexity", "perplexity", "teacher perplexity"),
)
# What "Reproduce" sets besides the distillation settings (from the stage's `training` record).
REPRODUCE_FIELDS = (
    "max_length",
    "learning_rate",
    "max_steps",
    "num_train_epochs",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "seed",
)
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def distill_stage_of(receipt: Mapping) -> Mapping:
    """The stage the card describes: the last one with a teacher, else the last one."""
    stages = receipt.get("stages") or [{}]
    with_teacher = [s for s in stages if isinstance(s, Mapping) and (s.get("models") or {}).get("teacher")]
    return with_teacher[-1] if with_teacher else stages[-1]


def _is_path(value: str) -> bool:
    return value.startswith(("/", "./", "../", "~")) or "\\" in value or not _HUB_ID.fullmatch(value)


def public_name(record: Mapping | None) -> str | None:
    """How the card names a model record: its Hub id, or `local:<directory name>` (never a local path)."""
    name = (record or {}).get("name_or_path")
    if not name:
        return None
    if record.get("local") or _is_path(str(name)):
        return "local:" + Path(str(name).rstrip("/\\")).name
    return str(name)


def _public_value(value: Any) -> Any:
    """A setting as the card shows it: local paths become `local:<name>`."""
    if isinstance(value, str) and value and _is_path(value) and ("/" in value or "\\" in value):
        return "local:" + Path(value.rstrip("/\\")).name
    if isinstance(value, Mapping):
        return {k: _public_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_public_value(v) for v in value]
    return value


def _shown_settings(stage: Mapping) -> dict[str, Any]:
    settings = dict(stage.get("settings") or {})
    names = stage.get("applicable_settings")
    if isinstance(names, list):
        settings = {name: settings[name] for name in names if name in settings}
    return {key: _public_value(value) for key, value in sorted(settings.items())}


def _card_inputs(receipt: Mapping) -> tuple[str, list[str]]:
    card = receipt.get("card") if isinstance(receipt.get("card"), Mapping) else {}
    return str(card.get("model_name") or "model"), sorted(set(BASE_TAGS) | set(card.get("tags") or ()))


def _metadata(receipt: Mapping, stage: Mapping) -> dict[str, Any]:
    model_name, tags = _card_inputs(receipt)
    models = stage.get("models") or {}
    teacher, student = models.get("teacher") or {}, models.get("student") or {}
    heldout = (stage.get("results") or {}).get("heldout") or {}
    metadata: dict[str, Any] = {"library_name": "peft" if student.get("adapters") else "transformers", "tags": tags}
    student_name = public_name(student)
    if student_name and not student_name.startswith("local:"):
        metadata["base_model"] = student_name
    metadata["distillation"] = {
        "teacher": public_name(teacher),
        "teacher_revision": teacher.get("revision"),
        "teacher_weights_sha256": teacher.get("weights_sha256"),
        "teacher_store_manifest_sha256": (teacher.get("store") or {}).get("manifest_sha256"),
        "student_base": student_name,
        "method": stage.get("method"),
        "stages": [s.get("name") for s in receipt.get("stages", [])],
        "settings": _shown_settings(stage),
        "heldout": dict(heldout),
        "papers": [f"arXiv:{p['arxiv']}" for p in stage.get("papers") or []],
        "receipt": receipt.get("content_id"),
    }
    if heldout:
        metadata["model-index"] = [
            {
                "name": model_name,
                "results": [
                    {
                        "task": {"type": "text-generation", "name": "Teacher-forced held-out distillation gap"},
                        "dataset": {"type": "heldout", "name": f"held-out rows ({heldout.get('num_tokens')} tokens)"},
                        "metrics": [
                            {"type": kind, "value": heldout[key], "name": name}
                            for key, kind, name in HELDOUT_METRICS
                            if key in heldout
                        ],
                    }
                ],
            }
        ]
    return metadata


def _teacher_phrase(teacher: Mapping) -> str:
    name = public_name(teacher)
    if not name:
        return "an in-memory teacher (no id recorded)"
    digest = teacher.get("weights_sha256")
    return f"{name} (weights sha256 {digest[:12]}…)" if name.startswith("local:") and digest else name


def _text(receipt: Mapping, stage: Mapping, meta: Mapping) -> str:
    model_name, _ = _card_inputs(receipt)
    block = meta["distillation"]
    teacher_record = (stage.get("models") or {}).get("teacher") or {}
    teacher = _teacher_phrase(teacher_record)
    student = block["student_base"] or "a student built in memory"
    lines = [
        f"# {model_name}",
        "",
        f"A student distilled from **{teacher}** into **{student}** with trl_distill "
        f"(`{stage.get('trainer') or 'DistillTrainer'}`, {block['method']}).",
        "",
    ]
    if len(block["stages"]) > 1:
        lines += [f"Training stages, in order: {' → '.join(map(str, block['stages']))}.", ""]
    lines += ["## Distillation", "", "| setting | value |", "|---|---|"]
    revision = block["teacher_revision"] or "unrecorded"
    lines += [f"| teacher | `{block['teacher'] or 'unrecorded'}` (revision {revision}) |"]
    if block["teacher_weights_sha256"]:
        lines += [f"| teacher weights sha256 | `{block['teacher_weights_sha256']}` |"]
    if block["teacher_store_manifest_sha256"]:
        lines += [f"| offline teacher store (manifest sha256) | `{block['teacher_store_manifest_sha256']}` |"]
    lines += [f"| `{k}` | `{v}` |" for k, v in block["settings"].items()]
    heldout = block["heldout"]
    lines += ["", "## Held-out results", ""]
    if heldout:
        rows_file = (stage.get("results") or {}).get("heldout_rows_file") or "not kept"
        lines += [
            "Teacher-forced, temperature 1, completion tokens of the held-out rows "
            f"(`{rows_file}`, {heldout.get('num_tokens')} tokens):",
            "",
            "| metric | value |",
            "|---|---|",
        ]
        lines += [f"| {name} | {heldout[key]:.6g} |" for key, _, name in HELDOUT_METRICS if key in heldout]
    else:
        lines += ["Not measured (no eval set, or the weights changed since the last measurement)."]
    lines += ["", "## Receipt", ""]
    if receipt.get("content_id"):
        lines += [
            f"`distill_receipt.json` records the models, tokenizers, data fingerprints, settings, results, "
            f"library versions and the sha256 of every file. Its content id is `{receipt['content_id']}`. This "
            "card is generated from it, and `verify` regenerates and compares it.",
            "",
            "```bash",
            "trl-distill verify . --strict   # re-hash every file, regenerate this card",
            "trl-distill verify . --replay   # also recompute the held-out figures with teacher and student",
            "```",
        ]
    else:
        lines += ["No receipt yet: `trainer.save_model()` writes `distill_receipt.json` beside the weights."]
    training = stage.get("training") or {}
    reproduce = {k: training[k] for k in REPRODUCE_FIELDS if training.get(k) is not None}
    if (reproduce.get("max_steps") or 0) > 0:
        reproduce.pop("num_train_epochs", None)  # `max_steps` overrides it
    arguments = [f"    {k}={v!r}," for k, v in {**reproduce, **block["settings"]}.items()]
    lines += [
        "",
        "## Reproduce",
        "",
        "```python",
        "from trl_distill import DistillConfig, DistillTrainer",
        "",
        "args = DistillConfig(",
        '    output_dir="out",',
        *arguments,
        ")",
        f"trainer = DistillTrainer(model={block['student_base'] or '<student>'!r}, "
        f"teacher_model={block['teacher'] or '<teacher>'!r}, args=args, train_dataset=...)",
        "trainer.train()",
        "```",
        "",
        "## Papers",
        "",
    ]
    lines += [f"- {p['title']}: https://arxiv.org/abs/{p['arxiv']}" for p in stage.get("papers") or []]
    versions = stage.get("libraries") or {}
    lines += ["", "## Framework versions", ""] + [f"- {k}: {v}" for k, v in sorted(versions.items()) if v]
    return "\n".join(lines) + "\n"


def card_text(receipt: Mapping) -> str:
    """The exact text of the model card of the artifact `receipt` describes (YAML metadata, then Markdown)."""
    import yaml

    receipt = json.loads(json.dumps(receipt, sort_keys=True))  # the card of a receipt, not of its keys' order
    stage = distill_stage_of(receipt)
    metadata = _metadata(receipt, stage)
    header = yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True, width=1000)
    return f"---\n{header}---\n\n{_text(receipt, stage, metadata)}"


def build_model_card(receipt: Mapping):
    """A `huggingface_hub.ModelCard` holding [`card_text`]`(receipt)`."""
    from huggingface_hub import ModelCard

    return ModelCard(card_text(receipt))


def write_model_card(output_dir, receipt: Mapping) -> Path:
    """Write `output_dir/README.md` as [`card_text`]`(receipt)`, byte for byte (what `verify` regenerates)."""
    path = Path(output_dir) / CARD_NAME
    path.write_bytes(card_text(receipt).encode("utf-8"))
    return path
