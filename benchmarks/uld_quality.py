"""Cross-tokenizer distillation on the demo task: ULD vs SFT on gold vs sequence-level KD, same step budget.

On demand, never a test. The teacher is the demo's (byte-level BPE, ~950 tokens; trained and cached under
OUTPUT_DIR/teacher like `trl-distill demo`). Every student uses *another* tokenizer: a byte-level BPE of 600 tokens
trained on a different sample of the task's text, so ids, vocabulary size and segmentation all differ from the
teacher's and token-level KD is refused. From the demo student's initial weights, with the demo's budget (steps,
batch, learning rate, data order), the script trains:

- `sft`: TRL's `SFTTrainer` on the gold answers;
- `seq_kd`: sequence-level KD, implemented here directly: the teacher's greedy answers to the training prompts
  (`trl_distill.evaluation.generate_completions`) replace the gold ones, then SFT (issue 3's `distill_mode="sequence"`
  does the same inside `DistillTrainer`);
- `uld`, `uld_kl`, `uld_exact`: `DistillTrainer(distill_mode="uld")` with `uld_distance="wasserstein"`, `"kl"`, and
  Wasserstein with `uld_exact_match=True` (T = 1, `alpha=0.5`: the sorted matching says how peaked the next-token
  distribution is, not which token, so the CE keeps a real weight, as in the ULD paper's CE + ULD).

Held-out metrics, each student with its own tokenizer: perplexity of the gold completion tokens (comparable between
students, who share the tokenizer, not with the teacher's) and greedy task accuracy.

    .venv/bin/python benchmarks/uld_quality.py --output-dir runs/uld_quality   # ~20 min on our shared 2-core machine
"""

from __future__ import annotations

import argparse

from trl_distill.demo.harness import demo_session, new_student, prepare_demo, student_args, train


MAX_NEW_TOKENS = 8  # the student's tokenizer splits answers into more tokens than the teacher's
ULD_VARIANTS = {
    "uld": dict(uld_distance="wasserstein"),
    "uld_kl": dict(uld_distance="kl"),
    "uld_exact": dict(uld_distance="wasserstein", uld_exact_match=True),
}


def _student_tokenizer(seed: int):
    from trl_distill.demo.task import task_corpus
    from trl_distill.demo.tiny import build_tokenizer

    return build_tokenizer(task_corpus(seed=seed + 100, n=1500), vocab_size=600)


def _sft(setup, tokenizer, name, dataset, verbose):
    from trl import SFTConfig, SFTTrainer

    trainer = SFTTrainer(
        model=new_student(setup, tokenizer),
        args=SFTConfig(**student_args(setup, name, verbose=verbose)),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    return trainer, train(trainer, verbose=verbose)


def _teacher_answers(setup):
    from trl_distill.evaluation import generate_completions

    prompts = list(setup.train_dataset["prompt"])
    answers = generate_completions(setup.teacher, setup.tokenizer, prompts, max_new_tokens=MAX_NEW_TOKENS)
    return setup.train_dataset.remove_columns("completion").add_column("completion", answers)


def _uld(setup, tokenizer, name, settings, verbose):
    from trl_distill import DistillConfig, DistillTrainer

    args = DistillConfig(
        **student_args(setup, name, verbose=verbose), distill_mode="uld", kd_temperature=1.0, alpha=0.5, **settings
    )
    trainer = DistillTrainer(
        model=new_student(setup, tokenizer),
        teacher_model=setup.teacher,
        args=args,
        train_dataset=setup.train_dataset,
        processing_class=tokenizer,
        teacher_processing_class=setup.tokenizer,
    )
    return trainer, train(trainer, verbose=verbose)


def _measure(setup, model, tokenizer):
    from trl_distill.demo.task import is_correct
    from trl_distill.evaluation import heldout_metrics, task_accuracy

    perplexity = heldout_metrics(model, None, tokenizer, setup.test_dataset)["student_perplexity"]
    accuracy = task_accuracy(
        model, tokenizer, setup.test_dataset, max_new_tokens=MAX_NEW_TOKENS, is_correct=is_correct
    )
    return {"perplexity": perplexity, "accuracy": accuracy}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="runs/uld_quality")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="The test-sized budget (seconds).")
    parser.add_argument("--students", nargs="+", default=["sft", "seq_kd", *ULD_VARIANTS])
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)

    results = {}
    with demo_session(verbose=args.verbose):
        setup = prepare_demo(args.output_dir, seed=args.seed, quick=args.quick, verbose=args.verbose)
        tokenizer = _student_tokenizer(args.seed)
        teacher_accuracy = _measure(setup, setup.teacher, setup.tokenizer)["accuracy"]
        for name in args.students:
            if name == "sft":
                trainer, seconds = _sft(setup, tokenizer, name, setup.train_dataset, args.verbose)
            elif name == "seq_kd":
                trainer, seconds = _sft(setup, tokenizer, name, _teacher_answers(setup), args.verbose)
            elif name in ULD_VARIANTS:
                trainer, seconds = _uld(setup, tokenizer, name, ULD_VARIANTS[name], args.verbose)
            else:
                raise ValueError(
                    f"`--students`: unknown {name!r}; choose from sft, seq_kd, {', '.join(ULD_VARIANTS)}."
                )
            results[name] = {**_measure(setup, trainer.model, tokenizer), "seconds": seconds}
            print(f"{name} done in {seconds:.0f} s", flush=True)

    print(
        f"\nteacher: {len(setup.tokenizer)}-token BPE, held-out accuracy {teacher_accuracy:.1%}; students: "
        f"{len(tokenizer)}-token BPE; {setup.budget.student_steps} steps x {setup.budget.batch_size} rows; "
        f"{len(setup.test_dataset)} held-out rows; seed {args.seed}\n"
    )
    print("| student | perplexity (student tokens) | accuracy | train s |")
    print("|---|---|---|---|")
    for name, row in results.items():
        print(f"| {name} | {row['perplexity']:.3f} | {row['accuracy']:.1%} | {row['seconds']:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
