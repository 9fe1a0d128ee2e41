"""The prepared GPU check (benchmarks/gpu_check.py): its CPU smoke mode runs every part at tiny sizes, and without
CUDA the full mode exits cleanly with a message."""

import importlib.util
import pathlib

import pytest
import torch


SCRIPT = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_smoke_runs_every_part_and_passes(gpu_check, capsys):
    assert gpu_check.main(["--cpu-smoke"]) == 0
    table = capsys.readouterr().out
    assert "### GPU check on CPU smoke" in table and "| check | measured | target | status |" in table
    for row in (
        "forward_kl float32 vs float64",
        "jsd bfloat16 vs float64",
        "bare GEMMs",
        "TRL chunked divergence",
        "loss ours vs TRL forward_kl",
        "DistillTrainer 2 steps",
    ):
        assert row in table, row
    assert "FAIL" not in table and table.count("PASS") == 9


def test_a_wrong_loss_fails_the_check(gpu_check, monkeypatch, capsys):
    """Negative control: a loss off by 1% is caught in fp32 (the check can fail)."""
    from trl_distill import losses

    real = losses.linear_distillation_loss
    monkeypatch.setattr(losses, "linear_distillation_loss", lambda *a, **k: real(*a, **k) * 1.01)
    assert gpu_check.check_correctness(torch.device("cpu"), 16, 8, 50, rows := []) is False
    assert any(row[-1] == "FAIL" and "float32" in row[0] for row in rows)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_without_cuda_it_exits_cleanly(gpu_check, capsys):
    assert gpu_check.main([]) == 0
    assert "no CUDA device" in capsys.readouterr().out
