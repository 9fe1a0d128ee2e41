"""Distillation modes, one module each, registered by name."""

from .base import DistillMode, available_modes, get_mode, register_mode
from .sequence import SequenceMode
from .token import TokenMode


__all__ = ["DistillMode", "SequenceMode", "TokenMode", "available_modes", "get_mode", "register_mode"]
