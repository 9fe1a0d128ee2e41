"""trl_distill: distill a large teacher LLM into a small student, as a drop-in TRL extension.

```python
from trl_distill import DistillConfig, DistillTrainer

trainer = DistillTrainer(model=student, teacher_model=teacher, args=DistillConfig(output_dir="out"), train_dataset=ds)
trainer.train()
```
"""

from .config import DistillConfig
from .losses import distillation_loss, linear_distillation_loss
from .modes import DistillMode, available_modes, register_mode
from .trainer import DistillTrainer


__version__ = "0.1.0.dev0"

__all__ = [
    "DistillConfig",
    "DistillMode",
    "DistillTrainer",
    "__version__",
    "available_modes",
    "distillation_loss",
    "linear_distillation_loss",
    "register_mode",
]
