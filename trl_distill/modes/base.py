"""The mode registry: what is matched is chosen by name (`DistillConfig.distill_mode`), never by `if` chains."""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Callable

import torch


if TYPE_CHECKING:
    from ..trainer import DistillTrainer


_MODES: dict[str, type["DistillMode"]] = {}
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class DistillMode(ABC):
    """One way of turning a batch into a distillation loss.

    A mode is built once by the trainer (after the student, teacher and tokenizers are ready) and then asked for the
    loss of every batch. It holds the math wiring; the trainer holds none.

    Class attributes:
        requires_teacher (`bool`): whether a live teacher model must be given.
        requires_shared_vocab (`bool`): whether teacher and student must share a vocabulary (token-level logits are
            compared id by id). Modes that compare text or sorted distributions set it to `False`.
    """

    name: str = ""
    requires_teacher: bool = True
    requires_shared_vocab: bool = True

    def __init__(self, trainer: "DistillTrainer"):
        self.trainer = trainer

    @classmethod
    def prepare_train_dataset(cls, dataset, *, teacher, teacher_tokenizer, teacher_source, args):
        """Turn the raw training dataset into the one this mode trains on, before `SFTTrainer` tokenizes it.

        Called once from the trainer's `__init__` (the mode is not built yet); the default returns `dataset` as is.
        `teacher` is the loaded teacher or `None`, `teacher_tokenizer` its tokenizer (else the student's, else
        `None`), `teacher_source` the id/path it came from.
        """
        return dataset

    @abstractmethod
    def compute_loss(
        self, model: torch.nn.Module, inputs: dict, num_items_in_batch: torch.Tensor | int | None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return the scalar loss to optimize and detached per-batch metrics to log (name -> scalar tensor)."""


def register_mode(name: str) -> Callable[[type[DistillMode]], type[DistillMode]]:
    """Class decorator registering a [`DistillMode`] under `name` (lowercase letters, digits, `_`)."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"Mode names are lowercase identifiers like 'token' or 'uld', got {name!r}.")

    def decorator(cls: type[DistillMode]) -> type[DistillMode]:
        if not (isinstance(cls, type) and issubclass(cls, DistillMode)):
            raise TypeError(f"`register_mode({name!r})` decorates a DistillMode subclass, got {cls!r}.")
        if name in _MODES and _MODES[name] is not cls:
            raise ValueError(f"A distillation mode named {name!r} is already registered ({_MODES[name].__name__}).")
        cls.name = name
        _MODES[name] = cls
        return cls

    return decorator


def get_mode(name: str) -> type[DistillMode]:
    try:
        return _MODES[name]
    except KeyError:
        raise ValueError(f"Unknown `distill_mode` {name!r}; registered modes: {sorted(_MODES)}.") from None


def available_modes() -> tuple[str, ...]:
    return tuple(sorted(_MODES))
