"""Quantization-aware recovery on the tiny configs: held-out KL before quantization, after it, and after recovery.

On demand, never a test. Runs the recipes as a user would, in a workspace directory: `trl-distill recipe-assets`, then
`recipes/distill.py --config recipes/configs/tiny.yaml` (the distilled student), then `recipes/distill_qat.py` with
`tiny_qlora.yaml` (bitsandbytes 4-bit + LoRA) and `tiny_qat.yaml` (torchao fake quantization), and prints one row per
recovery path from the stage records the recipes write. A path whose package is not installed is skipped with a note.

    .venv/bin/python benchmarks/quantization_recovery.py --workspace runs/quantization_recovery   # ~3 min on 2 cores
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import subprocess
import sys


ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "recipes" / "configs"
PATHS = {  # label -> (config, the package it needs)
    "QLoRA (bnb NF4 + LoRA r=16)": ("tiny_qlora.yaml", "bitsandbytes"),
    "QAT (torchao int8 act. + int4 weights, groups of 32)": ("tiny_qat.yaml", "torchao"),
}


def _run(command: list[str], workspace: pathlib.Path) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    result = subprocess.run(command, cwd=workspace, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")


def _stage(workspace: pathlib.Path, config: str) -> dict:
    output_dir = next(
        line.split(":", 1)[1].strip()
        for line in (CONFIGS / config).read_text().splitlines()
        if line.startswith("output_dir:")
    )
    return json.loads((workspace / output_dir / "stage.json").read_text())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", default="runs/quantization_recovery", help="Where assets and outputs go.")
    args = parser.parse_args(argv)
    workspace = pathlib.Path(args.workspace).resolve()
    workspace.mkdir(parents=True, exist_ok=True)

    cli = [sys.executable, "-m", "trl_distill"]
    _run([*cli, "recipe-assets", "--output-dir", "runs/recipes/tiny"], workspace)
    _run([sys.executable, str(ROOT / "recipes/distill.py"), "--config", str(CONFIGS / "tiny.yaml")], workspace)
    rows, notes = [], []
    for label, (config, package) in PATHS.items():
        if importlib.util.find_spec(package) is None:
            notes.append(f"{label}: skipped, `{package}` is not installed (pip install trl_distill[quant])")
            continue
        _run([sys.executable, str(ROOT / "recipes/distill_qat.py"), "--config", str(CONFIGS / config)], workspace)
        rows.append((label, _stage(workspace, config)["results"]))

    print(
        "| path | KL(fp‖quantized) after quantization | after recovery | KL(teacher‖student) before quantization "
        "| after quantization | after recovery |"
    )
    print("|---|---|---|---|---|---|")
    for label, r in rows:
        print(
            f"| {label} | {r['after_quant_kl_to_fp']:.3g} | {r['after_recovery_kl_to_fp']:.3g} "
            f"| {r['before_quant_kl_to_reference']:.4g} | {r['after_quant_kl_to_reference']:.4g} "
            f"| {r['after_recovery_kl_to_reference']:.4g} |"
        )
    for note in notes:
        print(note)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
