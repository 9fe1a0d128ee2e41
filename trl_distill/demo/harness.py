"""Building blocks of the demo for benchmark scripts: the same data, teacher, budget and measurements, any trainer.

A quality benchmark (sequence-level KD, on-policy, ULD, feature KD, offline teacher...) compares students trained
with the demo's budget from the demo's initial weights, against the demo's cached teacher, measured on the demo's
held-out rows, so that its table lines up with `trl-distill demo`'s:

```python
from trl_distill.demo.harness import demo_session, measure, new_student, prepare_demo, student_args, train

with demo_session():  # one torch thread, quiet `datasets` bars
    setup = prepare_demo("runs/bench", seed=0)
    trainer = DistillTrainer(model=new_student(setup), teacher_model=setup.teacher,
                             args=DistillConfig(**student_args(setup, "kd")), train_dataset=setup.train_dataset,
                             processing_class=setup.tokenizer)
    seconds = train(trainer)
    print(measure(setup, {"kd": trainer.model}))
```
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

from .runner import (
    FULL_BUDGET,
    QUICK_BUDGET,
    DemoBudget,
    fit_trainer,
    load_or_train_teacher,
    measure_models,
    quiet_progress,
    torch_threads,
    training_kwargs,
)


@dataclass
class DemoSetup:
    """What every student of a benchmark shares: budget, seed, teacher (+ its tokenizer), train and test rows."""

    budget: DemoBudget
    seed: int
    output_dir: str
    teacher: Any
    tokenizer: Any
    train_dataset: Any
    test_dataset: Any
    teacher_cached: bool


@contextlib.contextmanager
def demo_session(*, verbose: bool = False, num_threads: int | None = 1):
    """The demo's process settings for a block: `num_threads` torch threads and quiet per-`map` progress bars."""
    with quiet_progress(verbose), torch_threads(num_threads):
        yield


def prepare_demo(output_dir: str, *, seed: int = 0, quick: bool = False, verbose: bool = False) -> DemoSetup:
    """Build the demo's data and load (or train and cache, as `trl-distill demo` does) its teacher under `output_dir`."""
    from .task import make_task_dataset

    budget = QUICK_BUDGET if quick else FULL_BUDGET
    output_dir = os.fspath(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    train_dataset = make_task_dataset(budget.n_train, seed=seed, split="train")
    test_dataset = make_task_dataset(budget.n_test, seed=seed, split="test")
    teacher_dir = os.path.join(output_dir, "teacher-quick" if quick else "teacher")
    teacher, tokenizer, cached = load_or_train_teacher(budget, seed, teacher_dir, train_dataset, verbose)
    return DemoSetup(budget, seed, output_dir, teacher, tokenizer, train_dataset, test_dataset, cached)


def new_student(setup: DemoSetup, tokenizer=None, **shape):
    """The demo's student, with the demo's initial weights (`shape` overrides `hidden_size`/`num_layers`/...)."""
    from .tiny import build_tiny_model

    shape = {
        "hidden_size": setup.budget.student_hidden_size,
        "num_layers": setup.budget.student_layers,
        "num_heads": 4,
        **shape,
    }
    return build_tiny_model(tokenizer or setup.tokenizer, seed=setup.seed + 1, **shape)


def student_args(setup: DemoSetup, name: str, *, verbose: bool = False, **overrides) -> dict[str, Any]:
    """Keyword arguments for an `SFTConfig`/`DistillConfig` with the demo's student budget, output in `<dir>/<name>`."""
    kwargs = training_kwargs(
        setup.budget, setup.seed, setup.budget.student_steps, os.path.join(setup.output_dir, name), verbose
    )
    kwargs.update(overrides)
    return kwargs


def train(trainer, *, verbose: bool = False) -> float:
    """Train and put the model in eval mode; return the seconds training took."""
    seconds = fit_trainer(trainer, verbose)
    trainer.model.eval()
    return seconds


def measure(setup: DemoSetup, students: dict[str, Any], tokenizer=None) -> dict[str, dict[str, float]]:
    """Held-out KL(teacher‖student), KL(student‖teacher), top-1 agreement, perplexity and greedy accuracy per student.

    `tokenizer` defaults to the teacher's; the returned `"teacher"` row has its accuracy and perplexity.
    """
    return measure_models(setup.budget, setup.teacher, students, tokenizer or setup.tokenizer, setup.test_dataset)
