"""Dependency direction and public API (house style): a small AST scan that fails when a layer reaches upward."""

import ast
import pathlib

import pytest

import trl_distill


PACKAGE = pathlib.Path(trl_distill.__file__).parent
ROOT = PACKAGE.parent

# layer -> top-level modules it may import (besides the standard library and its own package)
ALLOWED = {
    "losses": {"torch"},
    "alignment": {"torch", "transformers", "tokenizers"},
}
FORBIDDEN_INSIDE_PACKAGE = {
    "losses": {"trl_distill"},  # no relative imports out of losses either (checked below)
    "alignment": {"modes", "trainer", "teachers", "config", "demo"},
}


def _imports(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield 0, alias.name
        elif isinstance(node, ast.ImportFrom):
            yield node.level, node.module or ""


def _stdlib(name):
    import sys

    return name.split(".")[0] in sys.stdlib_module_names or name == "__future__"


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layer_imports_stay_low(layer):
    for path in (PACKAGE / layer).glob("*.py"):
        for level, module in _imports(path):
            if level == 0:
                top = module.split(".")[0]
                assert _stdlib(module) or top in ALLOWED[layer], f"{path.name} imports {module}"
            else:
                # relative: level 1 stays inside the layer; level 2 reaches the package root
                if level >= 2:
                    target = module.split(".")[0]
                    assert layer != "losses", f"{path.name} reaches out of losses: {'.' * level}{module}"
                    assert target not in FORBIDDEN_INSIDE_PACKAGE[layer], f"{path.name} imports {target}"


def test_trainer_holds_no_math():
    source = (PACKAGE / "trainer.py").read_text()
    for word in ("log_softmax", "logsumexp", "kl_div", "distill_mode ==", 'objective =='):
        assert word not in source, word


def test_public_api_is_explicit():
    assert set(trl_distill.__all__) >= {"DistillConfig", "DistillTrainer", "distillation_loss", "linear_distillation_loss"}
    for name in trl_distill.__all__:
        assert hasattr(trl_distill, name), name


def test_recipes_use_only_top_level_names():
    """`recipes/*.py` are thin entry points over the installed `trl_distill.scripts`; nothing else below the top."""
    for path in (ROOT / "recipes").glob("*.py"):
        for level, module in _imports(path):
            assert module == "trl_distill.scripts" or not module.startswith("trl_distill."), (
                f"{path.name} imports {module}; use `from trl_distill import` (or `from trl_distill.scripts import`)"
            )
