"""`trl-distill verify --replay`: reload teacher and student, check the teacher's identity and recompute the figures.

Every failure is a `replay:` line naming what was found (a path that does not load, a teacher of another vocabulary
or weights, an edited offline store, a figure that differs), never a traceback.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path


__all__ = ["replay_problems"]


def _dtype(name: str | None):
    import torch

    value = getattr(torch, name, None) if name else None
    return value if isinstance(value, torch.dtype) else None


def _load_student(path: Path, dtype, device):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (path / "adapter_config.json").is_file():
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(path, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model.to(device), AutoTokenizer.from_pretrained(path)


def _close(a: float, b: float, rtol: float, atol: float) -> bool:
    return math.isfinite(a) and math.isfinite(b) and abs(a - b) <= atol + rtol * abs(b)


def _short(digest) -> str:
    return str(digest or "none")[:12]


def _check_store(teacher_record: dict, settings: dict) -> tuple[list[str], list[str], list[str]]:
    """The offline store a student was trained from, when still here: its manifest digest must be the recorded one."""
    from .teachers.store import read_manifest

    recorded = (teacher_record.get("store") or {}).get("manifest_sha256")
    location = settings.get("teacher_cache")
    if not recorded:
        return [], [], []
    if not location or not os.path.isdir(location):
        return [], [], [f"replay: the offline teacher store {location!r} is not here; its manifest was not re-checked"]
    try:
        manifest = read_manifest(location)
    except (OSError, ValueError) as error:
        return [f"replay: the offline teacher store: {error}"], [], []
    if manifest.get("manifest_sha256") != recorded:
        return (
            [
                f"replay: the offline teacher store at {location!r} has manifest sha256 "
                f"{_short(manifest.get('manifest_sha256'))}, the receipt says {_short(recorded)}: not the store this "
                "student was trained from."
            ],
            [],
            [],
        )
    return [], [f"replay: the offline teacher store's manifest matches the receipt ({_short(recorded)})"], []


def replay_problems(
    path: Path, receipt: dict, *, teacher: str | None, rtol: float, atol: float, device: str | None
) -> tuple[list[str], list[str], list[str]]:
    """Check the last stage's teacher and recompute its held-out figures; return (problems, passed, notes)."""
    stage = receipt["stages"][-1]
    results = stage.get("results") or {}
    models = stage.get("models") or {}
    teacher_record, student_record = models.get("teacher") or {}, models.get("student") or {}
    recorded = results.get("heldout")
    source = teacher or teacher_record.get("name_or_path")
    if not recorded and not teacher_record:
        return ["replay: the last stage recorded no held-out figures to recompute (train with an eval set)."], [], []
    if not source:
        problem = "replay: the receipt names no teacher to load (it was built in memory); pass `--teacher PATH`."
        return [problem], [], []
    problems, passed, notes = _check_store(teacher_record, stage.get("settings") or {})
    try:
        import torch
        from transformers import AutoModelForCausalLM

        from .digests import weights_sha256

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        teacher_model = AutoModelForCausalLM.from_pretrained(
            source, revision=teacher_record.get("revision"), dtype=_dtype(teacher_record.get("dtype"))
        ).to(device)
    except (OSError, ValueError, ImportError, RuntimeError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        problems.append(f"replay: cannot load the teacher from {source!r} ({first_line}); pass `--teacher PATH`.")
        return problems, passed, notes
    digest = weights_sha256(teacher_model)
    if teacher_record.get("weights_sha256") and digest != teacher_record["weights_sha256"]:
        problems.append(
            f"replay: the teacher loaded from {source!r} has weights sha256 {_short(digest)}, the receipt says "
            f"{_short(teacher_record['weights_sha256'])}: not the teacher this student was distilled from."
        )
    elif teacher_record.get("weights_sha256"):
        passed.append(f"replay: the teacher's weights hash as recorded ({_short(digest)})")
    if not recorded:
        notes.append("replay: the last stage recorded no held-out figures to recompute")
        return problems, passed, notes
    rows_file = path / str(results.get("heldout_rows_file"))
    if not rows_file.is_file():
        return problems + [f"replay: {rows_file.name}, the recorded held-out rows, is missing."], passed, notes
    try:
        rows = [json.loads(line) for line in rows_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (ValueError, UnicodeDecodeError) as error:
        return problems + [f"replay: {rows_file.name} is not JSON lines ({error})."], passed, notes
    vocab_size = results.get("heldout_vocab_size")
    teacher_rows = teacher_model.get_output_embeddings().weight.shape[0]
    if vocab_size is not None and teacher_rows < vocab_size:
        return (
            problems
            + [
                f"replay: the teacher loaded from {source!r} has a vocabulary of {teacher_rows} tokens, the figures were "
                f"measured over {vocab_size}: another tokenizer's model, not the teacher this student was distilled from."
            ],
            passed,
            notes,
        )
    try:
        student, tokenizer = _load_student(path, _dtype(student_record.get("dtype")), device)
        from .evaluation import heldout_metrics

        figures = heldout_metrics(student, teacher_model, tokenizer, rows, vocab_size=vocab_size)
    except (OSError, ValueError, RuntimeError, IndexError, KeyError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        cause = f"{type(error).__name__}: {first_line}"
        problems.append(f"replay: the held-out figures could not be recomputed ({cause}).")
        return problems, passed, notes
    figure_problems = []
    for key, value in sorted(recorded.items()):
        if key not in figures:
            continue
        if not _close(float(figures[key]), float(value), rtol, atol):
            figure_problems.append(f"replay: held-out {key} is {figures[key]:.8g}, the receipt says {value:.8g}")
    problems += figure_problems
    if not figure_problems:
        passed.append(f"replay: {len(recorded)} held-out figures recomputed on {len(rows)} rows match the receipt")
    return problems, passed, notes
