"""Logit KD alone vs logit + feature (hidden-state) KD on the demo task, with the demo's budget.

On demand, never a test. For each seed: the demo's data and cached teacher (`trl_distill.demo.harness`), then students
from the demo's initial weights, the same data order and steps, and the demo's KD settings (forward KL, T=1,
alpha=0.9); they differ only in `feature_weight` / `feature_loss` (default layer map, learned 64 -> 128
projections). Prints a markdown table of held-out KL(teacher‖student), KL(student‖teacher), top-1 agreement,
perplexity, accuracy and training seconds per student and seed, then the mean over seeds.

    .venv/bin/python benchmarks/feature_quality.py --seeds 0 1 2 --output-dir runs/feature_quality
    .venv/bin/python benchmarks/feature_quality.py --quick --seeds 0          # seconds-long smoke run
    .venv/bin/python benchmarks/feature_quality.py --variants mse:0.1 cosine:1.0  # other feature settings

The teacher is trained once per seed (~1.5 min on 2 cores) and cached under OUTPUT_DIR/seed-N; each student takes
~30 s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

from trl_distill import DistillConfig, DistillTrainer
from trl_distill.demo.harness import demo_session, measure, new_student, prepare_demo, student_args, train


COLUMNS = [
    ("kl_teacher_student", "KL(t‖s)", "{:.4f}"),
    ("kl_student_teacher", "KL(s‖t)", "{:.4f}"),
    ("top1_agreement", "top-1 agree", "{:.1%}"),
    ("perplexity", "ppl", "{:.3f}"),
    ("accuracy", "accuracy", "{:.1%}"),
    ("train_s", "train s", "{:.0f}"),
]


def parse_variant(text: str) -> tuple[str, float]:
    loss, _, weight = text.partition(":")
    if loss not in ("mse", "cosine") or not weight:
        raise argparse.ArgumentTypeError(
            f"a variant is LOSS:WEIGHT with LOSS mse or cosine, e.g. mse:1.0; got {text!r}"
        )
    return loss, float(weight)


def run_seed(output_dir: str, seed: int, variants: list[tuple[str, float]], quick: bool) -> dict[str, dict]:
    setup = prepare_demo(output_dir, seed=seed, quick=quick)
    students, seconds = {}, {}
    for loss, weight in [("mse", 0.0), *variants]:
        name = "logit KD" if weight == 0 else f"logit + feature KD ({loss}, w={weight:g})"
        kwargs = dict(objective="forward_kl", kd_temperature=1.0, alpha=0.9, feature_weight=weight, feature_loss=loss)
        trainer = DistillTrainer(
            model=new_student(setup),
            teacher_model=setup.teacher,
            args=DistillConfig(**student_args(setup, f"{loss}-{weight:g}"), **kwargs),
            train_dataset=setup.train_dataset,
            processing_class=setup.tokenizer,
            teacher_processing_class=setup.tokenizer,
        )
        seconds[name] = train(trainer)
        students[name] = trainer.model
        print(f"seed {seed}: {name} trained in {seconds[name]:.0f} s", flush=True)
    results = measure(setup, students)
    for name in students:
        results[name]["train_s"] = seconds[name]
    return results


def table(per_seed: dict[int, dict[str, dict]]) -> str:
    names = [name for name in next(iter(per_seed.values())) if name != "teacher"]
    header = "| seed | student | " + " | ".join(label for _, label, _ in COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 2)]
    for seed, results in per_seed.items():
        for name in names:
            cells = " | ".join(fmt.format(results[name][key]) for key, _, fmt in COLUMNS)
            lines.append(f"| {seed} | {name} | {cells} |")
    if len(per_seed) > 1:
        for name in names:
            means = {key: statistics.fmean(r[name][key] for r in per_seed.values()) for key, _, _ in COLUMNS}
            cells = " | ".join(fmt.format(means[key]) for key, _, fmt in COLUMNS)
            lines.append(f"| mean | {name} | {cells} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--output-dir", default="runs/feature_quality")
    parser.add_argument(
        "--variants",
        type=parse_variant,
        nargs="+",
        default=[("mse", 0.1), ("mse", 1.0), ("cosine", 0.1)],
        help="Feature-KD students as LOSS:WEIGHT (default: mse:0.1 mse:1.0 cosine:0.1); logit KD alone always runs.",
    )
    parser.add_argument("--quick", action="store_true", help="The test-sized demo budget (seconds per seed).")
    args = parser.parse_args(argv)

    per_seed = {}
    with demo_session():
        for seed in args.seeds:
            seed_dir = os.path.join(args.output_dir, f"seed-{seed}")
            per_seed[seed] = run_seed(seed_dir, seed, args.variants, args.quick)
            # Each seed's rows as soon as they exist: a long run that is stopped keeps what it measured.
            with open(os.path.join(seed_dir, "feature_quality.json"), "w", encoding="utf-8") as f:
                json.dump(per_seed[seed], f, indent=2)
            print(table({seed: per_seed[seed]}), flush=True)
    with open(os.path.join(args.output_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(per_seed, f, indent=2)
    print()
    print(table(per_seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
