"""Distillation modes, one module each, registered by name."""

from .base import DistillMode, available_modes, get_mode, register_mode
from .token import TokenMode
from .uld import ULDMode


__all__ = ["DistillMode", "TokenMode", "ULDMode", "available_modes", "get_mode", "register_mode"]
