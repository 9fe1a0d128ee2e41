"""The offline demo over several seeds: is the KD student's lead over SFT on held-out KL more than one lucky seed?

On demand, never a test. Each seed trains its own teacher (cached under OUTPUT_DIR/seed-N) and the two students, as
`trl-distill demo --seed N` does, and the script prints one row per seed.

    .venv/bin/python benchmarks/demo_seeds.py --seeds 0 1 2 --output-dir runs/demo_seeds   # ~3 min per seed on 2 cores
"""

from __future__ import annotations

import argparse
import os

from trl_distill.demo.runner import run_demo


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--output-dir", default="runs/demo_seeds")
    parser.add_argument("--quick", action="store_true", help="The test-sized budget (seconds per seed).")
    args = parser.parse_args(argv)

    rows = []
    for seed in args.seeds:
        results = run_demo(os.path.join(args.output_dir, f"seed-{seed}"), seed=seed, quick=args.quick, verbose=False)
        rows.append((seed, results))
        print(f"seed {seed} done", flush=True)

    print(
        "\n| seed | teacher acc | SFT KL(t‖s) | KD KL(t‖s) | SFT ppl | KD ppl | SFT acc | KD acc | KD beats SFT on KL |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for seed, r in rows:
        t, sft, kd = r["teacher"], r["sft"], r["kd"]
        print(
            f"| {seed} | {t['accuracy']:.1%} | {sft['kl_teacher_student']:.4f} | {kd['kl_teacher_student']:.4f} "
            f"| {sft['perplexity']:.3f} | {kd['perplexity']:.3f} | {sft['accuracy']:.1%} | {kd['accuracy']:.1%} "
            f"| {'yes' if r['kd_beats_sft_on_kl'] else 'no'} |"
        )
    return 0 if all(r["kd_beats_sft_on_kl"] for _, r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
