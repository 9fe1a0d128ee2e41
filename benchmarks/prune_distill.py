"""Prune, then distill from the original, on SmolLM2-135M-Instruct: quality after pruning, SFT and KD, and speed.

On demand, never a test. For each kept-layer count (default 20 and 15 of 30):

1. `trl-distill prune-distill` (in-process, `recipes/configs/smollm2-prune-distill.yaml` with the budget below): score
   the layers (ShortGPT cosine on 32 training rows), save the pruned copy, distill it from the unpruned model
   (forward KL, alpha 1); the recipe's stage record gives held-out KL / perplexity after pruning and after KD;
2. SFT recovery from the same pruned directory with TRL's `SFTTrainer`: same rows, order, steps, optimizer and
   schedule, cross-entropy on the text instead of KL to the teacher; measured on the same held-out rows;
3. greedy generation speed of the unpruned and each pruned model, batch 1 and batch 8, each (model, batch) in its own
   process; tokens/s is the median of timed repeats after a warm-up.

The text is the real demo's (`trl_distill.demo.real.real_text_datasets`: Python Language Reference prose, split by
topic so held-out rows come from sections never trained on).

    python benchmarks/prune_distill.py --out runs/prune-distill               # ~20 min on 2 shared CPU cores
    python benchmarks/prune_distill.py --quick --out runs/prune-distill-quick # plumbing check, ~3 min
    python benchmarks/prune_distill.py --write-data runs/prune-distill/data   # only the data the YAML points at
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time


ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIG = ROOT / "recipes" / "configs" / "smollm2-prune-distill.yaml"
TEACHER = "SmolLM2-135M-Instruct"


def budget_for(quick: bool, **overrides):
    """The real demo's budget (32 steps of 6 rows, 32 held-out rows), or a few steps with `quick`; `overrides` (the
    command line's `--steps`, `--batch-size`, `--n-test`) replace fields that are not `None`."""
    from trl_distill.demo.real import RealDemoBudget

    if quick:
        budget = RealDemoBudget(n_train=48, n_test=8, steps=4, batch_size=4, n_calibration=8)
    else:
        budget = RealDemoBudget(n_train=192, n_test=32, steps=32, batch_size=6, n_calibration=32)
    return dataclasses.replace(budget, **{k: v for k, v in overrides.items() if v is not None})


def write_data(directory: str, budget, seed: int) -> str:
    """The real demo's prompt/completion rows as `train.jsonl` / `test.jsonl` in `directory` (what the YAML reads)."""
    from trl_distill.demo.real import real_text_datasets

    train, test = real_text_datasets(budget, seed)
    os.makedirs(directory, exist_ok=True)
    train.to_json(os.path.join(directory, "train.jsonl"))
    test.to_json(os.path.join(directory, "test.jsonl"))
    return directory


def _training_flags(budget, seed: int) -> list[str]:
    return [
        "--max_steps",
        str(budget.steps),
        "--per_device_train_batch_size",
        str(budget.batch_size),
        "--learning_rate",
        str(budget.learning_rate),
        "--max_length",
        str(budget.max_length),
        "--seed",
        str(seed),
        "--data_seed",
        str(seed),
    ]


def prune_and_distill(keep: int, data_dir: str, out: str, budget, seed: int) -> tuple[dict, float]:
    """Run the recipe for one kept-layer count; return its stage record and the wall time."""
    from trl_distill.scripts import prune_distill

    argv = [
        "--config",
        str(CONFIG),
        "--dataset_name",
        data_dir,
        "--output_dir",
        os.path.join(out, f"keep{keep}-kd"),
        "--prune_num_keep",
        str(keep),
        "--heldout_max_rows",
        str(budget.n_test),
        "--calibration_rows",
        str(budget.n_calibration),
        "--disable_tqdm",
        "true",
        *_training_flags(budget, seed),
    ]
    start = time.perf_counter()
    record = prune_distill.main(argv)
    return record, time.perf_counter() - start


def sft_recovery(pruned_dir: str, output_dir: str, train, test_rows, teacher, tokenizer, budget, seed: int) -> dict:
    """SFTTrainer from the pruned directory with the recipe's budget; held-out metrics against the teacher."""
    import torch
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from trl_distill import heldout_metrics
    from trl_distill.demo.real import training_kwargs

    args = SFTConfig(**training_kwargs(budget, seed, output_dir, verbose=False))
    model = AutoModelForCausalLM.from_pretrained(pruned_dir, dtype=torch.float32)
    trainer = SFTTrainer(model=model, args=args, train_dataset=train, processing_class=tokenizer)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    metrics = heldout_metrics(trainer.model.eval(), teacher, tokenizer, test_rows)
    return {**metrics, "train_s": seconds}


# ---------------------------------------------------------------------------------------------------------- speed
def speed_worker(path: str, batch: int, new_tokens: int, repeats: int, prompts: list[str]) -> dict:
    """In this process: greedy `generate` of exactly `new_tokens` tokens for `batch` prompts; tokens/s per repeat."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    encoded = tokenizer(prompts[:batch], return_tensors="pt", padding=True)
    kwargs = {
        "max_new_tokens": new_tokens,
        "min_new_tokens": new_tokens,
        "do_sample": False,
        "pad_token_id": tokenizer.pad_token_id,
    }
    rates = []
    with torch.no_grad():
        model.generate(**encoded, **{**kwargs, "max_new_tokens": 8, "min_new_tokens": 8})  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            output = model.generate(**encoded, **kwargs)
            seconds = time.perf_counter() - start
            generated = output.shape[1] - encoded["input_ids"].shape[1]
            rates.append(batch * generated / seconds)
    return {"tokens_per_s": rates, "median": statistics.median(rates), "layers": model.config.num_hidden_layers}


def measure_speed(paths: dict[str, str], prompts: list[str], new_tokens: int, repeats: int) -> dict:
    """Each (model, batch) in its own process, so no run inherits another's caches or allocator state."""
    results: dict[str, dict] = {}
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    for batch in (1, 8):
        for name, path in paths.items():
            command = [
                sys.executable,
                __file__,
                "--speed-worker",
                path,
                "--batch",
                str(batch),
                "--new-tokens",
                str(new_tokens),
                "--repeats",
                str(repeats),
                "--prompts",
                json.dumps(prompts),
            ]
            done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise SystemExit(f"speed worker failed for {name} batch {batch}:\n{done.stderr[-3000:]}")
            results.setdefault(name, {})[f"batch{batch}"] = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"[speed] {name} batch {batch}: {results[name][f'batch{batch}']['median']:.1f} tokens/s", flush=True)
    return results


# ---------------------------------------------------------------------------------------------------------- table
def format_tables(results: dict) -> str:
    teacher_ppl = results.get("teacher_perplexity", float("nan"))
    lines = [
        f"| student (layers kept of 30) | stage | KL(teacher‖student) | perplexity (teacher {teacher_ppl:.2f}) | "
        + "top-1 agree | train s |",
        "|---|---|---|---|---|---|",
    ]
    for keep, row in results["runs"].items():
        for stage, label in (("pruned", "after pruning"), ("sft", "SFT recovery"), ("kd", "KD recovery")):
            if stage not in row:  # a partial run (e.g. `--speed-only` on a run that is still training)
                continue
            m = row[stage]
            seconds = f"{m['train_s']:.0f}" if "train_s" in m else "-"
            lines.append(
                f"| {keep} | {label} | {m['kl_teacher_student']:.3f} | {m['student_perplexity']:.2f} "
                f"| {m['top1_agreement']:.1%} | {seconds} |"
            )
    if results.get("speed"):
        lines += [
            "",
            "| model | layers | batch 1 tokens/s | batch 8 tokens/s | speed-up b1 | speed-up b8 |",
            "|---|---|---|---|---|---|",
        ]
        base = results["speed"]["unpruned"]
        for name, row in results["speed"].items():
            b1, b8 = row["batch1"]["median"], row["batch8"]["median"]
            gain1, gain8 = b1 / base["batch1"]["median"], b8 / base["batch8"]["median"]
            lines.append(f"| {name} | {row['batch1']['layers']} | {b1:.1f} | {b8:.1f} | {gain1:.2f}x | {gain8:.2f}x |")
    return "\n".join(lines)


def speed_only(out: str, merge, new_tokens: int) -> int:
    """Speed for the runs of `<out>/results.json` plus those of each `merge` directory; rewrite the tables."""
    from trl_distill.real_models import real_model_path

    with open(os.path.join(out, "results.json"), encoding="utf-8") as f:
        results = json.load(f)
    for directory in merge:
        with open(os.path.join(directory, "results.json"), encoding="utf-8") as f:
            results["runs"].update(json.load(f)["runs"])
    with open(os.path.join(out, "data", "test.jsonl"), encoding="utf-8") as f:
        prompts = [json.loads(line)["prompt"] for line in f][:8]
    paths = {
        "unpruned": str(real_model_path(TEACHER)),
        **{f"keep {k}": run["pruned_dir"] for k, run in results["runs"].items()},
    }
    results["speed"] = measure_speed(paths, prompts, new_tokens=new_tokens, repeats=3)
    results["table"] = format_tables(results)
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    print(results["table"])
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/prune-distill", help="Where data, models and results.json go.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="A few steps on a few rows, one prune ratio.")
    parser.add_argument("--keep", type=int, nargs="+", default=None, help="Layers kept (default 20 15; quick: 20).")
    parser.add_argument("--steps", type=int, default=None, help="Training steps (default 32; quick: 4).")
    parser.add_argument("--batch-size", type=int, default=None, help="Rows per step (default 6; quick: 4).")
    parser.add_argument("--n-test", type=int, default=None, help="Held-out rows (default 32; quick: 8).")
    parser.add_argument("--new-tokens-speed", type=int, default=None, help="Tokens generated per speed run (48).")
    parser.add_argument(
        "--speed-only",
        action="store_true",
        help="Only measure speed, for the pruned models of `<out>/results.json` (and `--merge`).",
    )
    parser.add_argument(
        "--merge",
        nargs="+",
        default=(),
        metavar="DIR",
        help="With --speed-only: add the runs of DIR/results.json (e.g. one --keep per process).",
    )
    parser.add_argument(
        "--sft-from",
        metavar="DIR",
        default=None,
        help="Only the SFT recovery, from this pruned directory (with one --keep, for the label).",
    )
    parser.add_argument("--no-speed", action="store_true", help="Skip the generation-speed measurement.")
    parser.add_argument("--write-data", metavar="DIR", default=None, help="Only write the data the YAML reads.")
    parser.add_argument("--speed-worker", metavar="PATH", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--new-tokens", type=int, default=64, help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=3, help=argparse.SUPPRESS)
    parser.add_argument("--prompts", default="[]", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.speed_worker:
        print(
            json.dumps(
                speed_worker(args.speed_worker, args.batch, args.new_tokens, args.repeats, json.loads(args.prompts))
            )
        )
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    budget = budget_for(args.quick, steps=args.steps, batch_size=args.batch_size, n_test=args.n_test)
    if args.write_data:
        write_data(args.write_data, budget_for(False), args.seed)
        print(f"wrote {args.write_data}/train.jsonl and test.jsonl")
        return 0
    if args.speed_only:
        return speed_only(os.path.abspath(args.out), args.merge, args.new_tokens_speed or 48)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_distill import heldout_metrics
    from trl_distill.demo.real import real_text_datasets
    from trl_distill.real_models import real_model_path

    keeps = args.keep or ([20] if args.quick else [20, 15])
    out = os.path.abspath(args.out)
    teacher_path = str(real_model_path(TEACHER))
    data_dir = write_data(os.path.join(out, "data"), budget, args.seed)
    train, test = real_text_datasets(budget, args.seed)
    test_rows = list(test)
    tokenizer = AutoTokenizer.from_pretrained(teacher_path)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_path, dtype=torch.float32).eval()
    results = {
        "budget": dataclasses.asdict(budget),
        "seed": args.seed,
        "teacher": teacher_path,
        "runs": {},
        "torch_threads": torch.get_num_threads(),
    }
    if args.sft_from:  # the SFT baseline alone, e.g. in parallel with the recipe's run of the same --keep
        row = {
            "sft": sft_recovery(
                args.sft_from,
                os.path.join(out, f"keep{keeps[0]}-sft"),
                train,
                test_rows,
                teacher,
                tokenizer,
                budget,
                args.seed,
            ),
            "pruned_dir": args.sft_from,
        }
        results["runs"][str(keeps[0])] = row
        with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
        print(json.dumps(row))
        return 0
    for keep in keeps:
        record, seconds = prune_and_distill(keep, data_dir, out, budget, args.seed)
        r = record["results"]
        pruned_dir = record["models"]["student"]["initial"]
        row = {
            "pruned": {k[len("pruned_") :]: v for k, v in r.items() if k.startswith("pruned_")},
            "kd": {
                **{k[len("heldout_") :]: v for k, v in r.items() if k.startswith("heldout_")},
                "recipe_s": seconds,
                **({"train_s": r["train_runtime_s"]} if r.get("train_runtime_s") else {}),
            },
            "kept_layers": r["kept_layers"],
            "removed_layers": r["removed_layers"],
            "pruned_dir": pruned_dir,
        }
        print(f"[keep {keep}] sft recovery", flush=True)
        row["sft"] = sft_recovery(
            pruned_dir, os.path.join(out, f"keep{keep}-sft"), train, test_rows, teacher, tokenizer, budget, args.seed
        )
        results["runs"][str(keep)] = row
        results["teacher_perplexity"] = row["pruned"]["teacher_perplexity"]
        with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    check = heldout_metrics(teacher, teacher, tokenizer, test_rows[:2])["kl_teacher_student"]
    results["teacher_self_kl"] = check  # 0 up to float error: the measurement's floor
    if not args.no_speed:
        del teacher
        paths = {"unpruned": teacher_path, **{f"keep {k}": results["runs"][str(k)]["pruned_dir"] for k in keeps}}
        prompts = [row["prompt"] for row in test_rows[:8]]
        new_tokens = args.new_tokens_speed or (16 if args.quick else 48)
        results["speed"] = measure_speed(paths, prompts, new_tokens=new_tokens, repeats=2 if args.quick else 3)
    results["table"] = format_tables(results)
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    print(results["table"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
