"""Where teacher distributions come from: a live teacher model, or an offline store of its top-k (`store`, `cache`)."""

from .generation import generate_teacher_completions
from .live import lm_head_and_backbone, load_teacher, teacher_tokenizer_source


__all__ = ["generate_teacher_completions", "lm_head_and_backbone", "load_teacher", "teacher_tokenizer_source"]
