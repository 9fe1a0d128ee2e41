"""The demo: tiny local models and a generated task on which a teacher is distilled into a student on CPU.

`trl_distill.demo.tiny` and `trl_distill.demo.task` are also the test-suite's fixtures. Importing this package is
cheap: `torch`, `transformers`, `datasets` and `trl` are imported inside the functions that need them.
"""

from .runner import FULL_BUDGET, QUICK_BUDGET, DemoBudget, run_demo
from .task import correct_answers, is_correct, make_task_dataset, task_corpus
from .tiny import build_tiny_model, build_tokenizer, load_pretrained_pair, save_pretrained_pair


__all__ = [
    "FULL_BUDGET",
    "QUICK_BUDGET",
    "DemoBudget",
    "build_tiny_model",
    "build_tokenizer",
    "correct_answers",
    "is_correct",
    "load_pretrained_pair",
    "make_task_dataset",
    "run_demo",
    "save_pretrained_pair",
    "task_corpus",
]
