"""Dependency direction and public API (house style): an AST scan that fails when a layer reaches upward.

Every `import` counts: module-level, inside functions, and under `if TYPE_CHECKING:` (a cycle hidden there is still a
cycle for a reader and for the next refactor).
"""

import ast
import pathlib
import sys

import pytest

import trl_distill


PACKAGE = pathlib.Path(trl_distill.__file__).parent
ROOT = PACKAGE.parent


def _modules(package: pathlib.Path) -> dict[str, pathlib.Path]:
    """Dotted module name -> file, for every module of `package` (a directory named `trl_distill`)."""
    modules = {}
    for path in package.rglob("*.py"):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


MODULES = _modules(PACKAGE)


def _imported_names(name: str, modules=MODULES) -> set[str]:
    """Absolute names of everything `name` imports (a `from pkg import sub` also names `pkg.sub`)."""
    path = modules[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names if f"{module}.{alias.name}" in modules)
    return found


def _package_edges(name: str, modules=MODULES) -> set[str]:
    """Modules of the package that importing `name` runs: each import's target and the packages above it.

    The root `trl_distill/__init__.py` is left out: it is the lazy public facade (its `TYPE_CHECKING` block names every
    public module for type checkers) and runs nothing at import time.
    """
    edges = set()
    for target in _imported_names(name, modules):
        parts = target.split(".")
        if parts[0] != "trl_distill":
            continue
        for end in range(2, len(parts) + 1):
            ancestor = ".".join(parts[:end])
            if ancestor in modules and ancestor != name and not name.startswith(ancestor + "."):
                edges.add(ancestor)
    return edges


def _cycles(names, modules=MODULES) -> list[list[str]]:
    """Strongly connected components (more than one module) of the import graph restricted to `names`."""
    graph = {name: _package_edges(name, modules) & set(names) for name in names}
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                other = stack.pop()
                on_stack.discard(other)
                component.append(other)
                if other == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return components


def _stdlib(name):
    return name.split(".")[0] in sys.stdlib_module_names or name == "__future__"


def _in(name: str, *packages: str) -> bool:
    return any(name == f"trl_distill.{p}" or name.startswith(f"trl_distill.{p}.") for p in packages)


def _layer(layer: str) -> list[str]:
    return sorted(name for name in MODULES if _in(name, layer))


# ------------------------------------------------------------------------------------------------ dependency direction
# layer -> third-party top-level packages it may import (besides the standard library and itself)
THIRD_PARTY = {
    "losses": {"torch"},
    "alignment": {"torch", "transformers", "tokenizers"},
    "batch": set(),
    "cache_home": set(),
    "conversation": set(),
    "digests": {"torch", "tqdm"},
    "inference": {"torch"},
    "terms.layer_map": set(),
    "gate": set(),
    "field_types": set(),
}
# layer -> the package's own layers it may import (besides itself)
INTERNAL = {
    "losses": set(),
    "alignment": set(),
    "batch": set(),
    "cache_home": set(),
    "conversation": set(),
    "digests": set(),
    "inference": set(),
    "terms.layer_map": set(),
    "gate": set(),  # the release gate's pure logic (issue 16), read by config, callbacks, artifact and verify
    "field_types": set(),  # the config fields' type check: a stdlib-only leaf
    "terms": {"losses", "inference"},
    "teachers": {
        "losses",
        "alignment",
        "batch",
        "cache_home",
        "conversation",
        "digests",
        "inference",
        "config",
    },  # config: the CLI parser
    "sources": {"teachers", "inference", "batch", "conversation", "losses"},
    # sources: MiniLLM samples from the teacher-mixed policy itself (sources/mixture.py); sources never import modes.
    "modes": {"losses", "alignment", "teachers", "batch", "conversation", "inference", "terms", "sources"},
    # terms.layer_map, gate and field_types: stdlib-only leaves (the terms package's init comes along)
    "config": {"losses", "modes", "terms", "gate", "field_types"},
}


@pytest.mark.parametrize("layer", sorted(THIRD_PARTY))
def test_low_layers_import_only_their_libraries(layer):
    for name in _layer(layer):
        for module in _imported_names(name):
            top = module.split(".")[0]
            assert _stdlib(module) or top in THIRD_PARTY[layer] or _in(module, layer), f"{name} imports {module}"


@pytest.mark.parametrize("layer", sorted(INTERNAL))
def test_layers_import_only_lower_layers(layer):
    allowed = INTERNAL[layer] | {layer}
    for name in _layer(layer):
        for target in _package_edges(name):
            assert any(_in(target, other) for other in allowed), f"{name} imports {target}; allowed: {sorted(allowed)}"


def test_config_reads_the_layer_map_from_the_leaf():
    direct = {t for t in _imported_names("trl_distill.config") if t.startswith("trl_distill.terms")}
    assert direct == {"trl_distill.terms.layer_map"}, direct


def test_modes_never_see_the_trainer():
    """A mode gets a `ModeContext`; not even a `TYPE_CHECKING` import of the trainer (or the config, which imports
    the modes) is allowed under `modes/`."""
    for name in _layer("modes"):
        for target in _imported_names(name):
            assert not _in(target, "trainer", "config", "callbacks", "provenance"), f"{name} imports {target}"


def test_the_library_never_imports_the_demo():
    for name in MODULES:
        if _in(name, "demo", "cli"):
            continue
        for target in _imported_names(name):
            assert not _in(target, "demo"), f"{name} imports {target}: the library must not depend on the demo"


def test_no_private_names_cross_modules():
    """A name imported from another module is public there (`_x` stays inside its module)."""
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("trl_distill")):
                private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                assert not private, f"{name} imports private {private} from {node.module}"


# ----------------------------------------------------------------------------------------------------------- no cycles
ARTIFACT_MODULES = {f"trl_distill.{m}" for m in ("receipt", "provenance", "model_card", "verify", "replay")}


def test_no_import_cycle():
    cycles = _cycles(MODULES.keys() - {"trl_distill"})
    assert not cycles, f"import cycles (counting TYPE_CHECKING and function-level imports): {cycles}"


def test_receipt_provenance_and_model_card_are_leaves():
    assert not _cycles(sorted(ARTIFACT_MODULES & MODULES.keys()))


def test_cycle_check_can_fail(tmp_path):
    """The scan sees a cycle hidden behind `TYPE_CHECKING` and a function-level import (the seed's trainer cycle)."""
    files = {
        "__init__.py": "",
        "config.py": "def check():\n    from .modes import get_mode\n",
        "trainer.py": "from .config import check\n",
        "modes/__init__.py": "from .base import get_mode\n",
        "modes/base.py": "import typing\nif typing.TYPE_CHECKING:\n    from ..trainer import DistillTrainer\n",
        "modes/token.py": "from .base import get_mode\n",
    }
    for relative, text in files.items():
        (tmp_path / "trl_distill" / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "trl_distill" / relative).write_text(text)
    modules = _modules(tmp_path / "trl_distill")
    cycles = _cycles(modules.keys() - {"trl_distill"}, modules)
    expected = ["trl_distill.config", "trl_distill.modes", "trl_distill.modes.base", "trl_distill.trainer"]
    assert cycles == [expected]
    (tmp_path / "trl_distill" / "modes" / "base.py").write_text("")  # break it: no cycle left
    assert _cycles(modules.keys() - {"trl_distill"}, modules) == []


# ------------------------------------------------------------------------------------------------------------ the rest
def test_trainer_holds_no_math():
    source = (PACKAGE / "trainer.py").read_text()
    for word in ("log_softmax", "logsumexp", "kl_div", "distill_mode ==", "objective =="):
        assert word not in source, word


def test_public_api_is_explicit():
    expected = {"DistillConfig", "DistillTrainer", "DistillMode", "register_mode", "distillation_loss"}
    assert set(trl_distill.__all__) >= expected
    for name in trl_distill.__all__:
        assert hasattr(trl_distill, name), name


def test_recipes_use_only_top_level_names():
    """`recipes/*.py` are thin entry points over the installed `trl_distill.scripts`; nothing else below the top."""
    for path in (ROOT / "recipes").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                module = node.module or ""
                assert module == "trl_distill.scripts" or not module.startswith("trl_distill."), (
                    f"{path.name} imports {module}; use `from trl_distill import` (or `from trl_distill.scripts import`)"
                )
