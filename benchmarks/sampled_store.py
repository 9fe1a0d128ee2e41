"""Sampled vs top-k offline teacher store at equal bytes per position, against the full vocabulary (issue 16).

On demand, never a test. Teacher SmolLM2-135M-Instruct, student the same model depth-pruned to 16 of its 30 layers
(evenly spaced, first and last kept). Chat rows: "Explain `name` in Python." -> the first paragraph of that standard
library object's docstring (read from the Python sources shipped with the interpreter, so nothing is downloaded).
Three students train for the same steps from the same pruned start with pure forward-KL KD (`alpha=1`,
`kd_temperature=1`):

- `full`: live teacher, full vocabulary (`kd_top_k=None`), the target the two stores approximate;
- `topk`: an offline store of the teacher's top-k (`teacher_cache_kind="topk"`, `kd_top_k=k`);
- `sampled`: an offline store of K draws from the teacher (`teacher_cache_kind="sampled"`), K = k, so both stores
  hold `4 * (k + 1)` bytes per response position.

Each is then measured on held-out rows with `trl_distill.evaluation.heldout_metrics` (full-vocabulary KL(teacher ||
student) at T = 1 and the student's perplexity on the reference answers).

    .venv/bin/python benchmarks/sampled_store.py --parallel --seed 0 --out runs/sampled_store_seed0.json  # ~15 min
    .venv/bin/python benchmarks/sampled_store.py --quick                                                 # smoke run
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import os
import random
import sys
import sysconfig
import tempfile
import time

import torch


MODELS = os.path.expanduser("~/.cache/trl_distill/models")
TEACHER = "SmolLM2-135M-Instruct"
MODULES = (
    "json",
    "textwrap",
    "string",
    "functools",
    "itertools",
    "collections",
    "heapq",
    "bisect",
    "shutil",
    "pathlib",
    "os",
    "posixpath",
    "random",
    "statistics",
    "fractions",
    "decimal",
    "difflib",
    "csv",
    "base64",
    "hashlib",
    "tempfile",
    "glob",
    "fnmatch",
    "argparse",
    "logging",
    "enum",
    "dataclasses",
    "typing",
    "copy",
    "pprint",
    "calendar",
    "datetime",
    "zipfile",
    "tarfile",
    "gzip",
    "queue",
    "threading",
    "subprocess",
    "socket",
    "urllib.parse",
    "email.utils",
    "html",
    "uuid",
    "secrets",
    "contextlib",
    "abc",
    "numbers",
    "operator",
    "weakref",
    "inspect",
)


def docstring_rows(seed: int, n_train: int, n_eval: int, max_chars: int = 240) -> tuple[list[dict], list[dict]]:
    """`messages` rows from public stdlib functions/classes with a docstring, shuffled by `seed`, train/eval split."""
    stdlib = sysconfig.get_paths()["stdlib"]
    pairs = []
    for module in MODULES:
        path = os.path.join(stdlib, *module.split(".")) + ".py"
        if not os.path.isfile(path):
            path = os.path.join(stdlib, *module.split("."), "__init__.py")
        if not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8") as handle:
            tree = ast.parse(handle.read())
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
                text = _first_paragraph(ast.get_docstring(node) or "", max_chars)
                if text:
                    pairs.append((f"{module}.{node.name}", text))
    random.Random(seed).shuffle(pairs)
    if len(pairs) < n_train + n_eval:
        raise SystemExit(f"only {len(pairs)} docstrings found, need {n_train + n_eval}")
    rows = [
        {
            "messages": [
                {"role": "system", "content": "You are a helpful assistant."},  # shorter than the default one
                {"role": "user", "content": f"Explain `{name}` in Python."},
                {"role": "assistant", "content": text},
            ]
        }
        for name, text in pairs[: n_train + n_eval]
    ]
    return rows[:n_train], rows[n_train:]


def _first_paragraph(doc: str, max_chars: int) -> str | None:
    paragraph = " ".join(doc.strip().split("\n\n")[0].split())
    if len(paragraph) < 40 or ">>>" in paragraph:
        return None
    if len(paragraph) > max_chars:
        cut = paragraph[:max_chars].rfind(". ")
        paragraph = paragraph[: cut + 1] if cut > 40 else None
    return paragraph


def load_pair(num_keep: int):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = os.path.join(MODELS, TEACHER)
    if not os.path.isdir(path):
        raise SystemExit(f"{path} is missing (see README, 'Real models').")
    tokenizer = AutoTokenizer.from_pretrained(path)
    teacher = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    student = copy.deepcopy(teacher)
    layers = student.model.layers
    keep = sorted({round(i * (len(layers) - 1) / (num_keep - 1)) for i in range(num_keep)})
    for new_index, index in enumerate(keep):  # renumber: attention caches index their states by layer_idx
        for module in layers[index].modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    student.model.layers = torch.nn.ModuleList(layers[i] for i in keep)
    student.config.num_hidden_layers = len(keep)
    for param in teacher.parameters():
        param.requires_grad_(False)
    return tokenizer, teacher, student, keep


def config(output_dir: str, args, **kwargs):
    from trl_distill import DistillConfig

    return DistillConfig(
        output_dir=output_dir,
        use_cpu=True,
        bf16=False,
        activation_checkpointing=False,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        max_length=args.max_length,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        logging_steps=max(args.steps // 5, 1),
        seed=args.seed,
        dataloader_num_workers=0,
        alpha=1.0,
        kd_temperature=1.0,
        objective="forward_kl",
        heldout_eval=False,
        **kwargs,
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: few rows and steps")
    parser.add_argument("--seed", type=int, default=0, help="data shuffle, training and store-sampling seed")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--k", type=int, default=12, help="top-k entries = samples per position (equal bytes)")
    parser.add_argument("--keep", type=int, default=16, help="student layers kept of the teacher's 30")
    parser.add_argument("--train_rows", type=int, default=48)
    parser.add_argument("--eval_rows", type=int, default=16)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--max_length", type=int, default=128)
    parser.add_argument("--cases", default="full,topk,sampled")
    parser.add_argument(
        "--parallel",
        action="store_true",
        help="run each case in its own process at once (one thread each), then merge",
    )
    parser.add_argument("--no_start", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.train_rows, args.eval_rows, args.steps, args.max_length = 8, 4, 2, 96
    if args.parallel:
        return run_parallel(args, argv if argv is not None else sys.argv[1:])
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))

    from trl_distill import DistillTrainer, cache_teacher
    from trl_distill.evaluation import heldout_metrics

    train_rows, eval_rows = docstring_rows(args.seed, args.train_rows, args.eval_rows)
    from datasets import Dataset

    train = Dataset.from_list(train_rows)
    tokenizer, teacher, pruned, keep = load_pair(args.keep)
    vocab = len(tokenizer)
    results = {"settings": {**vars(args), "teacher": TEACHER, "student_layers": keep, "vocab_size": vocab}}

    def measure(student):
        start = time.perf_counter()
        metrics = heldout_metrics(student, teacher, tokenizer, eval_rows, batch_size=8, vocab_size=vocab)
        return {
            "heldout_kl": metrics["kl_teacher_student"],
            "student_perplexity": metrics["student_perplexity"],
            "teacher_perplexity": metrics["teacher_perplexity"],
            "top1_agreement": metrics["top1_agreement"],
            "num_tokens": metrics["num_tokens"],
            "measure_s": time.perf_counter() - start,
        }

    if not args.no_start:
        results["start"] = measure(pruned)
        print(f"pruned start: {results['start']}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases.split(","):
            store_kwargs, stats = {}, {}
            if case in ("topk", "sampled"):
                if case == "topk":
                    store_kwargs = dict(teacher_cache=os.path.join(tmp, case), kd_top_k=args.k)
                else:
                    store_kwargs = dict(
                        teacher_cache=os.path.join(tmp, case),
                        teacher_cache_kind="sampled",
                        teacher_cache_num_samples=args.k,
                        teacher_cache_seed=args.seed,
                    )
                start = time.perf_counter()
                manifest = cache_teacher(
                    teacher,
                    train,
                    args=config(os.path.join(tmp, "w"), args, **store_kwargs),
                    processing_class=tokenizer,
                    batch_size=8,
                    progress=False,
                )
                positions = manifest["splits"]["train"]["positions"]
                stats = {
                    "store_bytes_per_position": manifest["encoding"]["bytes_per_position"],
                    "store_file_bytes_per_position": manifest["total_bytes"] / positions,
                    "store_positions": positions,
                    "store_write_s": time.perf_counter() - start,
                }
            student = copy.deepcopy(pruned)
            for param in student.parameters():
                param.requires_grad_(True)
            trainer = DistillTrainer(
                model=student,
                teacher_model=None if store_kwargs else teacher,
                args=config(os.path.join(tmp, f"out-{case}"), args, **store_kwargs),
                train_dataset=train,
                processing_class=tokenizer,
            )
            start = time.perf_counter()
            trainer.train()
            train_s = time.perf_counter() - start
            losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
            results[case] = {**measure(trainer.model.eval()), **stats, "train_s": train_s, "train_losses": losses}
            print(f"{case}: {results[case]}", flush=True)
            del trainer, student

    print(table(results))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as handle:
            json.dump(results, handle, indent=1)
    return 0


def run_parallel(args, argv: list[str]) -> int:
    """Each case in its own process (one thread each, the start measured by the first), then one merged table."""
    import subprocess

    cases = args.cases.split(",")
    base = [a for a in argv if a != "--parallel"]
    base = [a for i, a in enumerate(base) if a != "--out" and (i == 0 or base[i - 1] != "--out")]
    base = [a for i, a in enumerate(base) if not a.startswith("--cases") and (i == 0 or base[i - 1] != "--cases")]
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for index, case in enumerate(cases):
            cmd = [sys.executable, __file__, *base, "--cases", case, "--out", os.path.join(tmp, f"{case}.json")]
            if index:
                cmd.append("--no_start")
            log = open(os.path.join(tmp, f"{case}.log"), "w")
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            procs.append((case, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log))
        failed = []
        for case, proc, log in procs:
            if proc.wait() != 0:
                failed.append(case)
            log.close()
        for case in failed:
            print(f"--- {case} failed:\n" + open(os.path.join(tmp, f"{case}.log")).read()[-3000:])
        results = {}
        for case in cases:
            path = os.path.join(tmp, f"{case}.json")
            if os.path.isfile(path):
                with open(path) as handle:
                    results.update(json.load(handle))
    results["settings"]["cases"] = args.cases
    print(table(results))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as handle:
            json.dump(results, handle, indent=1)
    return 1 if failed else 0


def table(results: dict) -> str:
    s = results["settings"]
    lines = [
        f"teacher {s['teacher']}, student {len(s['student_layers'])} of its 30 layers; {s['train_rows']} train / "
        f"{s['eval_rows']} held-out rows, {s['steps']} steps x {s['batch_size']} rows, lr {s['lr']}, seed {s['seed']}",
        "",
        "| teacher target | bytes / position | held-out KL(teacher‖student) | student perplexity | top-1 agreement |",
        "|---|---|---|---|---|",
    ]
    if "start" in results:
        r = results["start"]
        lines.append(
            f"| (pruned start, untrained) | - | {r['heldout_kl']:.3f} | {r['student_perplexity']:.2f} | "
            f"{r['top1_agreement']:.3f} |"
        )
    names = {
        "full": "full vocabulary (live teacher)",
        "topk": f"top-{s['k']} store",
        "sampled": f"sampled store, K={s['k']}",
    }
    for case, name in names.items():
        if case in results:
            r = results[case]
            size = r.get("store_bytes_per_position", 4 * s["vocab_size"])
            lines.append(
                f"| {name} | {size} | {r['heldout_kl']:.3f} | {r['student_perplexity']:.2f} | "
                f"{r['top1_agreement']:.3f} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
