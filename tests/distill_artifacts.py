"""Helpers shared by the callback, receipt and model-card tests: tiny training arguments and a saved artifact."""

from __future__ import annotations

import os
from pathlib import Path

from tests.test_trainer import config
from trl_distill import DistillConfig, DistillTrainer
from trl_distill.demo.tiny import build_tiny_model, save_pretrained_pair


def tiny_args(output_dir, **kwargs) -> DistillConfig:
    """`tests/test_trainer.py`'s tiny CPU settings, writing to `output_dir`, quiet, two steps by default."""
    defaults = dict(output_dir=os.fspath(output_dir), max_steps=2, per_device_eval_batch_size=4, disable_tqdm=True)
    return config(Path(output_dir), **{**defaults, **kwargs})


def saved_teacher(tokenizer, path, seed: int = 2) -> str:
    """A tiny teacher saved in `path` (so receipts name a loadable teacher and `--replay` can reload it)."""
    teacher = build_tiny_model(tokenizer, hidden_size=64, num_layers=2, num_heads=4, seed=seed)
    return save_pretrained_pair(teacher, tokenizer, path)


def train_and_save(tokenizer, output_dir, teacher, train_dataset, eval_dataset, **kwargs) -> DistillTrainer:
    """Train a tiny student against `teacher` for a few steps and `save_model()` it into `output_dir`."""
    student = build_tiny_model(tokenizer, hidden_size=32, num_layers=2, num_heads=2, seed=1)
    if isinstance(teacher, str):
        kwargs = {"teacher_model_init_kwargs": {"dtype": "float32"}, **kwargs}
    trainer = DistillTrainer(
        model=student,
        teacher_model=teacher,
        args=tiny_args(output_dir, **kwargs),
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        teacher_processing_class=None if isinstance(teacher, str) else tokenizer,  # an in-memory teacher: no files
    )
    trainer.train()
    trainer.save_model()
    return trainer
