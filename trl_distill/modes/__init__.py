"""Distillation modes, one module each, registered by name."""

from .base import DistillMode, available_modes, get_mode, register_mode
from .sequence import SequenceMode
from .token import TokenMode
from .uld import ULDMode


__all__ = ["DistillMode", "SequenceMode", "TokenMode", "ULDMode", "available_modes", "get_mode", "register_mode"]
