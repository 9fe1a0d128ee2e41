"""trl_distill: distill a large teacher LLM into a small student, as a drop-in TRL extension.

```python
from trl_distill import DistillConfig, DistillTrainer

trainer = DistillTrainer(model=student, teacher_model=teacher, args=DistillConfig(output_dir="out"), train_dataset=ds)
trainer.train()
```

The names below are the public API. Those that need TRL are imported on first use, so `import trl_distill.losses`
and `trl-distill --help` do not pay TRL's import time (~6 s).
"""

from importlib import import_module
from typing import TYPE_CHECKING


__version__ = "0.1.0.dev0"

# public name -> module that defines it
_EXPORTS = {
    "DistillConfig": "trl_distill.config",
    "DistillTrainer": "trl_distill.trainer",
    "DistillMode": "trl_distill.modes",
    "available_modes": "trl_distill.modes",
    "register_mode": "trl_distill.modes",
    "distillation_loss": "trl_distill.losses",
    "linear_distillation_loss": "trl_distill.losses",
    "generate_teacher_completions": "trl_distill.teachers.generation",
}

__all__ = ["__version__", *sorted(_EXPORTS)]

if TYPE_CHECKING:
    from .config import DistillConfig
    from .losses import distillation_loss, linear_distillation_loss
    from .modes import DistillMode, available_modes, register_mode
    from .teachers.generation import generate_teacher_completions
    from .trainer import DistillTrainer


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'trl_distill' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
