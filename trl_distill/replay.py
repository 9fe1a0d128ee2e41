"""`trl-distill verify --replay`: reload teacher and student and recompute the receipt's held-out figures."""

from __future__ import annotations

import json
import math
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


def replay_problems(path: Path, receipt: dict, *, teacher: str | None, rtol: float, atol: float,
                    device: str | None) -> tuple[list[str], list[str]]:  # fmt: skip
    """Recompute the last stage's held-out figures; return (problems, passed checks)."""
    import torch
    from transformers import AutoModelForCausalLM

    from .evaluation import heldout_metrics
    from .provenance import state_dict_sha256

    stage = receipt["stages"][-1]
    results = stage.get("results") or {}
    recorded = results.get("heldout")
    if not recorded:
        return ["replay: the last stage recorded no held-out figures to recompute (train with an eval set)."], []
    rows_file = path / str(results.get("heldout_rows_file"))
    if not rows_file.is_file():
        return [f"replay: {rows_file.name}, the recorded held-out rows, is missing."], []
    rows = [json.loads(line) for line in rows_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    models = stage.get("models") or {}
    teacher_record, student_record = models.get("teacher") or {}, models.get("student") or {}
    source = teacher or teacher_record.get("name_or_path")
    if not source:
        return ["replay: the receipt names no teacher to load (it was built in memory); pass `--teacher PATH`."], []

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    student, tokenizer = _load_student(path, _dtype(student_record.get("dtype")), device)
    teacher_model = AutoModelForCausalLM.from_pretrained(
        source, revision=teacher_record.get("revision"), dtype=_dtype(teacher_record.get("dtype"))
    ).to(device)
    problems, passed = [], []
    digest = state_dict_sha256(teacher_model)
    if teacher_record.get("weights_sha256") and digest != teacher_record["weights_sha256"]:
        problems.append(
            f"replay: the teacher loaded from {source!r} has weights sha256 {digest[:12]}, the receipt says "
            f"{teacher_record['weights_sha256'][:12]}: not the teacher this student was distilled from."
        )
    figures = heldout_metrics(student, teacher_model, tokenizer, rows, vocab_size=results.get("heldout_vocab_size"))
    for key, value in sorted(recorded.items()):
        if key not in figures:
            continue
        if not _close(float(figures[key]), float(value), rtol, atol):
            problems.append(f"replay: held-out {key} is {figures[key]:.8g}, the receipt says {value:.8g}")
    if not problems:
        passed.append(f"replay: {len(recorded)} held-out figures recomputed on {len(rows)} rows match the receipt")
    return problems, passed
