"""The README's Python examples run as written on a CPU machine.

Every ```python block of README.md is executed, in order, in one namespace. The block marked
`<!-- readme-test: setup ... -->` (Hub ids and a Hub dataset) is the only one not run: this test binds the names it
defines instead, explicitly: `student_path` and `teacher_path` are tiny local model directories (with their shared
tokenizer), `tokenizer` that tokenizer, `ds` a small prompt/completion dataset. A block marked
`<!-- readme-test: skip (reason) -->` is skipped and must say why.
"""

import re
import warnings
from pathlib import Path

import torch

from trl_distill.demo.task import make_task_dataset
from trl_distill.demo.tiny import save_pretrained_pair


README = Path(__file__).resolve().parent.parent / "README.md"
_BLOCK = re.compile(r"(?:^(<!-- readme-test: (\w+)[^\n]*-->)\n)?^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


def readme_blocks(text: str) -> list[tuple[str | None, int, str]]:
    """`(marker, line, code)` per Python block: `line` is its first code line, `marker` `setup`, `skip` or `None`."""
    return [(m.group(2), text[: m.start(3)].count("\n") + 1, m.group(3)) for m in _BLOCK.finditer(text)]


def test_the_block_parser_sees_markers():
    text = "a\n<!-- readme-test: setup (x) -->\n```python\nx = 1\n```\n\n```python\ny = 2\n```\n```bash\nz\n```\n"
    assert readme_blocks(text) == [("setup", 4, "x = 1\n"), (None, 8, "y = 2\n")]  # line of the first code line


def test_readme_python_examples_run(tmp_path, monkeypatch, tokenizer, make_student, make_teacher):
    blocks = readme_blocks(README.read_text())
    assert [marker for marker, _, _ in blocks].count("setup") == 1, "README must have exactly one setup block"
    assert {marker for marker, _, _ in blocks} <= {None, "setup", "skip"}
    setup = next(code for marker, _, code in blocks if marker == "setup")
    names = {"student_path", "teacher_path", "tokenizer", "ds"}
    assert all(re.search(rf"\b{name}\b", setup) for name in names), "the setup block must define the names bound here"

    monkeypatch.chdir(tmp_path)  # the examples write `out/` and `runs/` relative to the working directory
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # teacher generations of sequence-level KD
    namespace = {
        "student_path": save_pretrained_pair(make_student(), tokenizer, tmp_path / "student"),
        "teacher_path": save_pretrained_pair(make_teacher(), tokenizer, tmp_path / "teacher"),
        "tokenizer": tokenizer,
        "ds": make_task_dataset(8, seed=0, split="train"),
    }
    from trl_distill.modes import base

    registered = set(base._MODES)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ran = 0
        for marker, line, code in blocks:
            if marker is not None:
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # library deprecation notices are not the examples' concern
                try:
                    exec(compile(code, f"README.md:{line}", "exec"), namespace)  # noqa: S102 (the README, on purpose)
                except Exception as error:  # name the block in the failure
                    raise AssertionError(f"README.md block at line {line} failed: {error!r}\n{code}") from error
            ran += 1
        assert ran >= 8
    finally:
        torch.set_num_threads(previous)
        for name in set(base._MODES) - registered:  # the README registers an example mode
            del base._MODES[name]
    assert (tmp_path / "runs" / "teacher-top64").is_dir() and (tmp_path / "out").is_dir()
    assert namespace["trainer"].state.global_step > 0
