"""Local files for the tiny recipe configs (`recipes/configs/tiny*.yaml`): a teacher, a student and the task's data.

The recipes load models and data by path, as they would load Hub ids, so the tiny configs need them on disk.
`trl-distill recipe-assets` writes them (by default under `runs/recipes/tiny`, the paths the tiny configs name):

```
runs/recipes/tiny/
  teacher-quick/     the demo's quick teacher (trained once, ~15 s, then cached like `trl-distill demo --quick`)
  student-init/      the demo's quick student with its initial weights, and the shared tokenizer
  data/train.jsonl   prompt/completion rows of the demo task (`trl_distill.demo.task`)
  data/test.jsonl    held-out rows (disjoint prompts); `load_dataset("runs/recipes/tiny/data")` gives both splits
```
"""

from __future__ import annotations

import os


def write_recipe_assets(
    output_dir: str | os.PathLike = "runs/recipes/tiny",
    *,
    seed: int = 0,
    train_teacher: bool = True,
    n_train: int | None = None,
    n_test: int | None = None,
) -> dict[str, str]:
    """
    Write the teacher, student and data directories the tiny recipe configs point at.

    Args:
        output_dir (`str` or `os.PathLike`, *optional*, defaults to `"runs/recipes/tiny"`):
            Where to write; the tiny configs use the default, relative to the directory the recipe runs from.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the data, tokenizer and weights (the demo's meaning).
        train_teacher (`bool`, *optional*, defaults to `True`):
            Train the demo's quick teacher (cached: a second call reuses it). `False` saves an untrained teacher of the
            same shape in a second, for tests that check plumbing rather than quality.
        n_train, n_test (`int`, *optional*):
            Rows per split; default to the demo's quick budget (1000 and 64).

    Returns:
        `dict[str, str]` with the paths `teacher`, `student`, `data`.
    """
    from .harness import demo_session, new_student, prepare_demo
    from .runner import QUICK_BUDGET
    from .task import make_task_dataset, task_corpus
    from .tiny import build_tiny_model, build_tokenizer, save_pretrained_pair

    output_dir = os.fspath(output_dir)
    paths = {
        name: os.path.join(output_dir, sub)
        for name, sub in (("teacher", "teacher-quick"), ("student", "student-init"), ("data", "data"))
    }
    budget = QUICK_BUDGET
    with demo_session():
        if train_teacher:
            setup = prepare_demo(output_dir, seed=seed, quick=True)
            tokenizer = setup.tokenizer
            student = new_student(setup)
        else:
            tokenizer = build_tokenizer(task_corpus(seed), vocab_size=budget.vocab_size)
            teacher = build_tiny_model(
                tokenizer,
                hidden_size=budget.teacher_hidden_size,
                num_layers=budget.teacher_layers,
                num_heads=4,
                seed=seed,
            )
            save_pretrained_pair(teacher, tokenizer, paths["teacher"])
            student = build_tiny_model(
                tokenizer,
                hidden_size=budget.student_hidden_size,
                num_layers=budget.student_layers,
                num_heads=4,
                seed=seed + 1,
            )
        save_pretrained_pair(student, tokenizer, paths["student"])
        os.makedirs(paths["data"], exist_ok=True)
        for split, n in (("train", n_train or budget.n_train), ("test", n_test or budget.n_test)):
            make_task_dataset(n, seed=seed, split=split).to_json(os.path.join(paths["data"], f"{split}.jsonl"))
    return paths
