"""Helpers the test modules share (fixtures live in `conftest.py`): tiny CPU training settings, parameter snapshots,
a saved tiny artifact, a `generate` counter, and the repository root."""

from __future__ import annotations

import os
import pathlib
from pathlib import Path

import torch

from trl_distill import DistillConfig, DistillTrainer
from trl_distill.demo.tiny import build_tiny_model, save_pretrained_pair


REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


def config(tmp_path, **kwargs):
    defaults = dict(
        output_dir=str(tmp_path / "out"),
        use_cpu=True,
        bf16=False,
        activation_checkpointing=False,
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=0,
        dataloader_num_workers=0,
    )
    return DistillConfig(**{**defaults, **kwargs})


def snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_trained(trainer, student_before, teacher_before):
    for name, param in trainer.model.named_parameters():
        if param.requires_grad:
            assert not torch.equal(param.detach(), student_before[name]), f"trainable parameter {name} did not change"
    for name, param in trainer.teacher_model.named_parameters():
        assert torch.equal(param.detach(), teacher_before[name]), f"teacher parameter {name} changed"
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert losses and all(torch.isfinite(torch.tensor(losses))), losses


def count_generate(model, fail_after=None):
    """Wrap `model.generate` to count calls (and raise on call number `fail_after + 1`, an interruption)."""
    original, calls = model.generate, []

    def generate(*args, **kwargs):
        if fail_after is not None and len(calls) >= fail_after:
            raise KeyboardInterrupt("interrupted")
        calls.append(kwargs["input_ids"].shape[0])
        return original(*args, **kwargs)

    model.generate = generate
    return calls


def tiny_args(output_dir, **kwargs) -> DistillConfig:
    """`config`'s tiny CPU settings, writing to `output_dir`, quiet, two steps by default."""
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


def tiny_gemma3(num_layers=4, seed=0, vocab_size=101):
    """A random Gemma-3 text model (sliding and full attention layers alternating), in eval mode."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    config = Gemma3TextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        sliding_window=4,
        max_position_embeddings=64,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        layer_types=["sliding_attention", "full_attention"] * (num_layers // 2),
    )
    return Gemma3ForCausalLM(config).eval()
