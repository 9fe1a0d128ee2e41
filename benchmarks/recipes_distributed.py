"""`recipes/distill.py` on the tiny config under each launcher that runs on CPU: 1 process, DDP, DeepSpeed ZeRO-2/3.

On demand, never a test (DeepSpeed compiles an extension on first use, ~30 s, and each run takes tens of seconds on a
shared 2-core machine). Each row launches the recipe as a user would, with `recipes/accelerate_configs/*.yaml` and
2 processes (CPU: `--mixed_precision no`, the recipe's `use_cpu: true`), and reads the stage record it wrote. The
2-process rows see the same batches (same seed, 2 x 8 rows a step), so their losses and held-out KL should agree.

    .venv/bin/python benchmarks/recipes_distributed.py --steps 20 --out runs/recipes_distributed.json

FSDP2 is not in the table: through accelerate/Trainer it needs GPUs (see recipes/accelerate_configs/fsdp2.yaml).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import subprocess
import sys
import time


ROOT = pathlib.Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "distill.py"
CONFIG = ROOT / "recipes" / "configs" / "tiny.yaml"
LAUNCHERS = {
    "1 process": [],
    "DDP, 2 processes": ["ddp_cpu.yaml"],
    "ZeRO-2, 2 processes": ["zero2.yaml"],
    "ZeRO-3, 2 processes": ["zero3.yaml"],
}


def _command(name: str, steps: int, output_dir: str, port: int) -> list[str]:
    recipe = [
        str(RECIPE),
        "--config",
        str(CONFIG),
        "--max_steps",
        str(steps),
        "--output_dir",
        output_dir,
        "--per_device_train_batch_size",
        "8",
    ]
    if not LAUNCHERS[name]:
        return [sys.executable, *recipe]
    config = ROOT / "recipes" / "accelerate_configs" / LAUNCHERS[name][0]
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(config),
        "--num_processes",
        "2",
        "--mixed_precision",
        "no",
        "--main_process_port",
        str(port),
        *recipe,
    ]


def _failure(output: str) -> str:
    """The ranks' error lines (the launcher's own traceback only says that a rank failed), else the output's tail."""
    lines = [line for line in output.splitlines() if re.match(r"\[rank\d+\]: \w*(Error|Exception)\b", line)]
    return "\n".join(dict.fromkeys(lines)) or output[-4000:]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--workspace", default="runs/recipes_distributed", help="Assets and outputs go here.")
    parser.add_argument("--launchers", nargs="+", default=list(LAUNCHERS), choices=list(LAUNCHERS))
    parser.add_argument("--out", default=None, help="Also write the rows as JSON.")
    args = parser.parse_args(argv)

    from trl_distill.demo.assets import write_recipe_assets

    workspace = pathlib.Path(args.workspace).resolve()
    write_recipe_assets(workspace / "runs/recipes/tiny")
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    rows = []
    for index, name in enumerate(args.launchers):
        output_dir = f"runs/bench-{index}"
        start = time.perf_counter()
        done = subprocess.run(
            _command(name, args.steps, output_dir, 29600 + index),
            cwd=workspace,
            env=env,
            capture_output=True,
            text=True,
        )
        seconds = time.perf_counter() - start
        row = {"launcher": name, "returncode": done.returncode, "wall_s": seconds}
        if done.returncode == 0:
            results = json.loads((workspace / output_dir / "stage.json").read_text())["results"]
            row.update(
                train_loss=results["train_loss"],
                heldout_kl=results.get("heldout_kl_teacher_student"),
                digests=results.get("rank_weight_digests"),
            )
        else:
            row["error"] = _failure(done.stdout + done.stderr)
        rows.append(row)
        print(f"{name}: exit {done.returncode} in {seconds:.0f} s", flush=True)

    print(
        f"\n| launcher | exit | wall s ({args.steps} steps, with ~7 s of imports) | train loss | held-out KL(t‖s) "
        "| ranks agree |"
    )
    print("|---|---|---|---|---|---|")
    for row in rows:
        kl = f"{row['heldout_kl']:.4f}" if row.get("heldout_kl") is not None else "not measured"
        agree = "n/a" if not row.get("digests") else ("yes" if len(set(row["digests"])) == 1 else "NO")
        loss = f"{row['train_loss']:.4f}" if "train_loss" in row else "-"
        print(f"| {row['launcher']} | {row['returncode']} | {row['wall_s']:.0f} | {loss} | {kl} | {agree} |")
    if args.out:
        pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(args.out).write_text(json.dumps(rows, indent=2))
    return 0 if all(row["returncode"] == 0 for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
