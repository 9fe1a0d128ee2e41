"""The model card (`README.md`) of a distilled model, written from its receipt.

Metadata: `base_model` (the student's starting point, when it is a Hub id), `tags` (with `distillation`), a
`distillation` block (teacher, method, settings, held-out results, papers, the receipt's content id) and the held-out
figures in `model-index` form. The text says the same for people, and how to verify and reproduce the artifact.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any


__all__ = [
    "build_model_card", "distill_stage_of", "push_offline_error", "write_model_card", "write_trainer_model_card"
]  # fmt: skip

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


def distill_stage_of(receipt: Mapping) -> Mapping:
    """The stage the card describes: the last one with a teacher, else the last one."""
    stages = receipt.get("stages") or [{}]
    with_teacher = [s for s in stages if (s.get("models") or {}).get("teacher")]
    return with_teacher[-1] if with_teacher else stages[-1]


def _hub_id(name: str | None) -> str | None:
    """`name` if it looks like a Hub repo id (not a local path), else None."""
    if not name or os.path.isabs(name) or os.path.exists(name) or name.count("/") > 1 or name.startswith("."):
        return None
    return name


def _metadata(receipt: Mapping, stage: Mapping, model_name: str, tags) -> dict[str, Any]:
    models = stage.get("models") or {}
    teacher, student = models.get("teacher") or {}, models.get("student") or {}
    heldout = (stage.get("results") or {}).get("heldout") or {}
    metadata = {
        "library_name": "peft" if student.get("adapters") else "transformers",
        "tags": sorted(set(BASE_TAGS) | set(tags or ())),
        "distillation": {
            "teacher": teacher.get("name_or_path"),
            "teacher_revision": teacher.get("revision"),
            "student_base": student.get("name_or_path"),
            "method": stage.get("method"),
            "stages": [s.get("name") for s in receipt.get("stages", [])],
            "settings": dict(stage.get("settings") or {}),
            "heldout": dict(heldout),
            "papers": [f"arXiv:{p['arxiv']}" for p in stage.get("papers") or []],
            "receipt": receipt.get("content_id"),
        },
    }
    if _hub_id(student.get("name_or_path")):
        metadata["base_model"] = student["name_or_path"]
    if heldout:
        metadata["model-index"] = [{
            "name": model_name,
            "results": [{
                "task": {"type": "text-generation", "name": "Teacher-forced held-out distillation gap"},
                "dataset": {"type": "heldout", "name": f"held-out rows ({heldout.get('num_tokens')} tokens)"},
                "metrics": [{"type": kind, "value": heldout[key], "name": name}
                            for key, kind, name in HELDOUT_METRICS if key in heldout],
            }],
        }]  # fmt: skip
    return metadata


def _text(receipt: Mapping, stage: Mapping, model_name: str) -> str:
    meta = _metadata(receipt, stage, model_name, ())["distillation"]
    teacher = meta["teacher"] or "an in-memory teacher (no id recorded)"
    student = meta["student_base"] or "a student built in memory"
    lines = [f"# {model_name}", "", f"A student distilled from **{teacher}** into **{student}** with trl_distill "
             f"(`DistillTrainer`, {meta['method']}).", ""]  # fmt: skip
    if len(meta["stages"]) > 1:
        lines += [f"Training stages, in order: {' → '.join(map(str, meta['stages']))}.", ""]
    lines += ["## Distillation", "", "| setting | value |", "|---|---|"]
    lines += [f"| teacher | `{teacher}` (revision {meta['teacher_revision'] or 'unrecorded'}) |"]
    lines += [f"| `{k}` | `{v}` |" for k, v in sorted(meta["settings"].items())]
    heldout = meta["heldout"]
    lines += ["", "## Held-out results", ""]
    if heldout:
        lines += ["Teacher-forced, temperature 1, completion tokens of the held-out rows "
                  f"(`distill_heldout_rows.jsonl`, {heldout.get('num_tokens')} tokens):", "",
                  "| metric | value |", "|---|---|"]  # fmt: skip
        lines += [f"| {name} | {heldout[key]:.6g} |" for key, _, name in HELDOUT_METRICS if key in heldout]
    else:
        lines += ["Not measured (no eval set, or the weights changed since the last measurement)."]
    lines += ["", "## Receipt", ""]
    if receipt.get("content_id"):
        lines += [f"`distill_receipt.json` records the models, tokenizers, data fingerprints, settings, results, "
                  f"library versions and the sha256 of every file. Its content id is `{receipt['content_id']}`.", "",
                  "```bash", "trl-distill verify .            # re-hash every file against the receipt",
                  "trl-distill verify . --replay   # also recompute the held-out figures with teacher and student",
                  "```"]  # fmt: skip
    else:
        lines += ["No receipt yet: `trainer.save_model()` writes `distill_receipt.json` beside the weights."]
    lines += ["", "## Reproduce", "", "```python", "from trl_distill import DistillConfig, DistillTrainer", "",
              f"args = DistillConfig(output_dir=\"out\", **{meta['settings']!r})",
              f"trainer = DistillTrainer(model={meta['student_base'] or '<student>'!r}, "
              f"teacher_model={meta['teacher'] or '<teacher>'!r}, args=args, train_dataset=...)",
              "trainer.train()", "```", "", "## Papers", ""]  # fmt: skip
    lines += [f"- {p['title']}: https://arxiv.org/abs/{p['arxiv']}" for p in stage.get("papers") or []]
    versions = stage.get("libraries") or {}
    lines += ["", "## Framework versions", ""] + [f"- {k}: {v}" for k, v in sorted(versions.items()) if v]
    return "\n".join(lines) + "\n"


def build_model_card(receipt: Mapping, *, model_name: str, tags=None):
    """A `huggingface_hub.ModelCard` for the artifact `receipt` describes."""
    import yaml
    from huggingface_hub import ModelCard

    stage = distill_stage_of(receipt)
    metadata = yaml.safe_dump(_metadata(receipt, stage, model_name, tags), sort_keys=False, allow_unicode=True)
    return ModelCard(f"---\n{metadata}---\n\n{_text(receipt, stage, model_name)}")


def write_model_card(output_dir, receipt: Mapping, *, model_name: str | None = None, tags=None,
                     hub_model_id: str | None = None) -> Path:  # fmt: skip
    """Write `output_dir/README.md` from `receipt`; the model name defaults to the Hub id's or directory's name."""
    output_dir = Path(output_dir)
    model_name = model_name or (hub_model_id or "").split("/")[-1] or output_dir.resolve().name
    path = output_dir / CARD_NAME
    build_model_card(receipt, model_name=model_name, tags=tags).save(path)
    return path


def trainer_tags(trainer) -> list[str]:
    tags = list(getattr(trainer, "_tag_names", []))
    return tags + list(getattr(getattr(trainer, "model", None), "model_tags", None) or [])


def write_trainer_model_card(trainer, output_dir, *, model_name=None, tags=None) -> Path:
    """`DistillTrainer.create_model_card`: the card of the receipt this trainer wrote in `output_dir`, or a draft."""
    from .callbacks import heldout_results
    from .provenance import distill_stage
    from .receipt import FORMAT

    written = getattr(trainer, "_written_receipts", {}).get(str(Path(output_dir).resolve()))
    receipt = written or {"format": FORMAT, "stages": [distill_stage(trainer, heldout_results(trainer)[0])]}
    tags = trainer_tags(trainer) + ([tags] if isinstance(tags, str) else list(tags or []))
    return write_model_card(output_dir, receipt, model_name=model_name, tags=tags,
                            hub_model_id=getattr(trainer, "hub_model_id", None))  # fmt: skip


def push_offline_error(output_dir) -> Exception | None:
    """The error `push_to_hub` raises in offline mode (`HF_HUB_OFFLINE=1`), or None when the Hub may be reached."""
    from huggingface_hub import constants
    from huggingface_hub.errors import OfflineModeIsEnabled

    if not constants.is_offline_mode():
        return None
    return OfflineModeIsEnabled(
        f"`push_to_hub` needs the Hub, but offline mode is on (HF_HUB_OFFLINE=1). The model, its card and "
        f"distill_receipt.json are saved in {output_dir!r}: unset HF_HUB_OFFLINE (or point HF_ENDPOINT at a reachable "
        "Hub) and push again, or upload that directory later with `huggingface-cli upload`."
    )
