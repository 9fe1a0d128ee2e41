"""What a mode may read: [`ModeContext`], built by the trainer once everything a mode needs is ready.

A mode never holds the trainer. It gets this frozen record instead, so what it depends on is visible here and a mode
can be built (and tested) without a trainer: pass a `ModeContext` by hand.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


__all__ = ["MetricsSink", "ModeContext"]


class MetricsSink:
    """Where per-step values go to be logged: `sink.log({"name": value}, split="train")`.

    The trainer hands one to modes and completion sources; each value is a plain float already reduced across
    processes, and the trainer averages each name over its logging interval and logs it (`report_to`,
    `trainer.state.log_history`). Modes' per-batch metrics returned by `compute_loss` go through the trainer, which
    gathers them; use the sink for values logged outside `compute_loss`.

    Args:
        store (`MutableMapping[str, MutableMapping[str, list[float]]]`, *optional*): split -> name -> values. The
            trainer passes its own buffer; by default a fresh one (e.g. in tests), read back with [`values`].
    """

    def __init__(self, store: MutableMapping[str, MutableMapping[str, list[float]]] | None = None):
        self._store = store if store is not None else {"train": defaultdict(list), "eval": defaultdict(list)}

    def log(self, values: Mapping[str, float], *, split: str = "train") -> None:
        if split not in ("train", "eval"):
            raise ValueError(f"`split` must be 'train' or 'eval', got {split!r}.")
        for name, value in values.items():
            self._store[split][name].append(float(value))

    def values(self, split: str = "train") -> dict[str, list[float]]:
        """What was logged under `split` and not yet consumed by the trainer's logging."""
        return {name: list(values) for name, values in self._store[split].items()}


@dataclass(frozen=True)
class ModeContext:
    """Everything a [`~trl_distill.modes.DistillMode`] may read, and nothing else.

    Built by `DistillTrainer.__init__` after `SFTTrainer.__init__` (datasets tokenized, student placed), after the
    teacher is placed and after the extra terms are built; the mode is built from it right away.

    Attributes:
        args (`DistillConfig`): The run's configuration (read-only by convention).
        student (`nn.Module`): The student as `SFTTrainer` prepared it (a `PeftModel` under LoRA), not the DDP /
            DeepSpeed wrapper: `compute_loss` receives the model to run forward on.
        teacher (`nn.Module` or `None`): The live teacher, placed like the student, in eval mode, frozen; `None` when
            the mode needs none (`requires_teacher = False`) or the teacher is an offline store (`teacher_cache`).
        tokenizer (`PreTrainedTokenizerBase`): The student's text tokenizer (the one inside a processor).
        teacher_tokenizer (`PreTrainedTokenizerBase`): The teacher's text tokenizer; the student's when they share one
            or the teacher has none to load.
        vocab_size (`int`): Leading logits compared: the shared vocabulary (`requires_shared_vocab = True`) or the
            student's own (`len(tokenizer)`). Padded `lm_head` rows beyond it are never in a loss.
        train_dataset, eval_dataset: The datasets as `SFTTrainer` tokenized them (`eval_dataset` may be a dict or
            `None`).
        tokenization (`Mapping[str, Any]`): The settings `SFTTrainer` resolved that decide the rows' tokens and labels
            (`max_length`, `completion_only_loss`, `padding_free`, ...), e.g. to check an offline store against.
        metrics ([`MetricsSink`]): Where to log values outside `compute_loss`.
        feature_term ([`~trl_distill.terms.FeatureTerm`] or `None`): The feature-KD term when `feature_weight > 0`,
            for modes with `supports_feature_term = True` to add to their loss.
    """

    args: Any
    student: nn.Module
    teacher: nn.Module | None
    tokenizer: Any
    teacher_tokenizer: Any
    vocab_size: int
    train_dataset: Any = None
    eval_dataset: Any = None
    tokenization: Mapping[str, Any] = field(default_factory=dict)
    metrics: MetricsSink = field(default_factory=MetricsSink)
    feature_term: Any = None

    def prepared_datasets(self):
        """`(name, dataset)` for the training set and each evaluation set, as named in error messages."""
        yield "training", self.train_dataset
        evals = self.eval_dataset
        if isinstance(evals, dict):
            yield from ((f"evaluation ({name})", dataset) for name, dataset in evals.items())
        elif evals is not None:
            yield "evaluation", evals

    @property
    def device(self) -> torch.device:
        """The student's device (where losses and targets go)."""
        return next(self.student.parameters()).device
