"""Where should a student's training completions come from? Gold data, the teacher's text, or the student's samples.

On demand, never a test. On the demo task (`trl_distill.demo.harness`: the demo's cached teacher, data, student
budget and held-out measurements), students trained from the same initial weights with the same step budget:

- `sft`: `SFTTrainer` on the gold completions;
- `sequence`: `distill_mode="sequence"`, CE on the teacher's greedy completions (Kim & Rush 2016);
- `token fwd λ=0`, `token rev λ=0`: token-level KD on the gold completions (off-policy), forward / reverse KL;
- `token rev λ=0.5`, `token rev λ=1`: on-policy GKD (Agarwal et al. 2024), reverse KL on the student's own samples
  half of the steps / every step; `token fwd λ=0.5`, `token fwd λ=1`: the same with forward KL, to separate the
  effect of the samples from the effect of the objective.

Token-level rows use `kd_temperature=1.0` and `alpha=1.0` (no CE term, which on on-policy steps would fit the
student's own samples), so they differ only in `objective` and `lmbda`. Each student size (`--student-hidden-sizes`)
gets its own block of rows; the teacher is 128 wide.

    .venv/bin/python benchmarks/onpolicy_quality.py --student-hidden-sizes 64 32   # ~25 min on 2 shared cores
"""

from __future__ import annotations

import argparse
import json
import os
import time


def _students():
    """name -> (DistillConfig overrides, or None for plain SFT)."""
    token = dict(kd_temperature=1.0, alpha=1.0, max_completion_length=8)
    return {
        "sft": None,
        "sequence": dict(distill_mode="sequence", max_completion_length=8, teacher_generation_batch_size=64),
        "token fwd λ=0": dict(token, objective="forward_kl", lmbda=0.0),
        "token rev λ=0": dict(token, objective="reverse_kl", lmbda=0.0),
        "token rev λ=0.5": dict(token, objective="reverse_kl", lmbda=0.5),
        "token rev λ=1": dict(token, objective="reverse_kl", lmbda=1.0),
        "token fwd λ=0.5": dict(token, objective="forward_kl", lmbda=0.5),
        "token fwd λ=1": dict(token, objective="forward_kl", lmbda=1.0),
    }


def _train_one(setup, name, overrides, hidden_size, cache_dir):
    from trl import SFTConfig, SFTTrainer

    from trl_distill import DistillConfig, DistillTrainer
    from trl_distill.demo.harness import new_student, student_args, train

    folder = f"h{hidden_size}-" + "".join(c if c.isalnum() else "_" for c in name)
    kwargs = student_args(setup, folder)
    student = new_student(setup, hidden_size=hidden_size)
    start = time.perf_counter()
    if overrides is None:
        trainer = SFTTrainer(
            model=student,
            args=SFTConfig(**kwargs),
            train_dataset=setup.train_dataset,
            processing_class=setup.tokenizer,
        )
    else:
        trainer = DistillTrainer(
            model=student,
            teacher_model=setup.teacher,
            args=DistillConfig(**kwargs, teacher_generation_cache_dir=cache_dir, **overrides),
            train_dataset=setup.train_dataset,
            processing_class=setup.tokenizer,
            teacher_processing_class=setup.tokenizer,
        )
    setup_seconds = time.perf_counter() - start  # includes the teacher's generations for `sequence` (cached after)
    seconds = train(trainer)
    return trainer.model, {
        "train_s": seconds,
        "s_per_step": seconds / trainer.state.global_step,
        "setup_s": setup_seconds,
    }


def main(argv=None) -> int:
    from trl_distill.demo.harness import demo_session, measure, prepare_demo

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="runs/onpolicy_quality")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--student-hidden-sizes", type=int, nargs="+", default=[64])
    parser.add_argument(
        "--only",
        nargs="*",
        help="Train only these rows (names as printed); the table shows them "
        "with the rows already in OUTPUT_DIR/results.json.",
    )
    parser.add_argument("--quick", action="store_true", help="The test-sized budget (a smoke run).")
    args = parser.parse_args(argv)

    results_path = os.path.join(args.output_dir, "results.json")
    results = {}
    if os.path.isfile(results_path):  # rows of earlier runs in this directory (same teacher and budget) stay
        with open(results_path, encoding="utf-8") as f:
            results = json.load(f)
    with demo_session():
        setup = prepare_demo(args.output_dir, seed=args.seed, quick=args.quick)
        cache_dir = os.path.join(args.output_dir, "teacher_generations")
        print(
            f"teacher {'cached' if setup.teacher_cached else 'trained'}; {setup.budget.student_steps} steps per "
            f"student, batch {setup.budget.batch_size}; {setup.budget.n_test} held-out prompts",
            flush=True,
        )
        for hidden_size in args.student_hidden_sizes:
            for name, overrides in _students().items():
                if args.only and name not in args.only:
                    continue
                model, timing = _train_one(setup, name, overrides, hidden_size, cache_dir)
                metrics = measure(setup, {name: model})
                results[f"{hidden_size}/{name}"] = {**metrics[name], **timing, "hidden_size": hidden_size}
                results["teacher"] = metrics["teacher"]
                print(f"h={hidden_size} {name}: {json.dumps(results[f'{hidden_size}/{name}'])}", flush=True)

    with open(results_path, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    teacher = results["teacher"]
    shape = f"{setup.budget.teacher_hidden_size}x{setup.budget.teacher_layers}"
    print(f"\nteacher ({shape}): perplexity {teacher['perplexity']:.3f}, accuracy {teacher['accuracy']:.1%}\n")
    print(
        "| student width | training data | KL(teacher‖student) | KL(student‖teacher) | perplexity | accuracy | s / step |"
    )
    print("|---|---|---|---|---|---|---|")
    order = list(_students())
    keys = sorted(
        (k for k in results if k != "teacher"), key=lambda k: (-int(k.split("/")[0]), order.index(k.split("/", 1)[1]))
    )
    for key in keys:
        row, name = results[key], key.split("/", 1)[1]
        print(
            f"| {row['hidden_size']} | {name} | {row['kl_teacher_student']:.4f} | {row['kl_student_teacher']:.4f} "
            f"| {row['perplexity']:.3f} | {row['accuracy']:.1%} | {row['s_per_step']:.3f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
