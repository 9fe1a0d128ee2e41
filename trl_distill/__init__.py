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
    "MetricsSink": "trl_distill.modes",
    "ModeContext": "trl_distill.modes",
    "available_modes": "trl_distill.modes",
    "register_mode": "trl_distill.modes",
    "distillation_loss": "trl_distill.losses",
    "feature_distillation_loss": "trl_distill.losses",
    "linear_distillation_loss": "trl_distill.losses",
    # held-out measurement, receipt and verification (issue 7)
    "HeldOutKLCallback": "trl_distill.callbacks",
    "append_stage": "trl_distill.artifact",
    "save_artifact": "trl_distill.artifact",
    "verify_artifact": "trl_distill.verify",
    # offline teacher store (issue 6)
    "linear_top_k_distillation_loss": "trl_distill.losses",
    "TeacherStore": "trl_distill.teachers.store",
    "cache_teacher": "trl_distill.teachers.cache",
    "CacheTeacherArguments": "trl_distill.scripts.cache_teacher",
    "cache_teacher_parser": "trl_distill.scripts.cache_teacher",
    "run_cache_teacher": "trl_distill.scripts.cache_teacher",
    # a served teacher (issue 16): the store filled by a vLLM server
    "ServedTeacher": "trl_distill.teachers.served",
    "cache_teacher_served": "trl_distill.teachers.served",
    # stages after distillation (recipes/): held-out KL, DPO pairs ranked by the teacher, quantization-aware recovery
    "heldout_metrics": "trl_distill.evaluation",
    "teacher_ranked_pairs": "trl_distill.preference",
    "disable_bnb_cpu_repack": "trl_distill.quantization",
    "qat_prepare": "trl_distill.quantization",
    "qat_convert": "trl_distill.quantization",
    "unwrap_fake_quantized": "trl_distill.quantization",
    "generate_teacher_completions": "trl_distill.teachers.generation",
    # conversational rows (issue 12): `messages` split at the final assistant turn, in every mode
    "as_prompt_completion": "trl_distill.conversation",
    "expand_assistant_turns": "trl_distill.conversation",
    # real models offline and students cut from them (issue 12)
    "real_model_path": "trl_distill.real_models",
    "depth_prune": "trl_distill.pruning",
    "score_layers": "trl_distill.pruning",
    "select_layers": "trl_distill.pruning",
}

__all__ = ["__version__", *sorted(_EXPORTS)]

if TYPE_CHECKING:
    from .artifact import append_stage, save_artifact
    from .callbacks import HeldOutKLCallback
    from .config import DistillConfig
    from .conversation import as_prompt_completion, expand_assistant_turns
    from .evaluation import heldout_metrics
    from .losses import (
        distillation_loss,
        feature_distillation_loss,
        linear_distillation_loss,
        linear_top_k_distillation_loss,
    )
    from .modes import DistillMode, MetricsSink, ModeContext, available_modes, register_mode
    from .preference import teacher_ranked_pairs
    from .pruning import depth_prune, score_layers, select_layers
    from .quantization import disable_bnb_cpu_repack, qat_convert, qat_prepare, unwrap_fake_quantized
    from .real_models import real_model_path
    from .scripts.cache_teacher import CacheTeacherArguments, cache_teacher_parser, run_cache_teacher
    from .teachers.cache import cache_teacher
    from .teachers.generation import generate_teacher_completions
    from .teachers.served import ServedTeacher, cache_teacher_served
    from .teachers.store import TeacherStore
    from .trainer import DistillTrainer
    from .verify import verify_artifact


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'trl_distill' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
