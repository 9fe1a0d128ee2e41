"""MiniLLM vs token-level forward KL, GKD-style on-policy reverse KL and SFT, on the real SmolLM2 pair.

On demand, never a test. Teacher: SmolLM2-135M-Instruct (30 layers). Student: the same model depth-pruned to
`--keep-layers` evenly spaced layers (first and last kept), then a shared short SFT warm-up on the training rows
(`--warmup-steps`, 0 = start from the pruned weights), so every method starts from the same weights. Data: chat
prompts built offline from Python standard-library docstrings ("What does `json.dumps` do? ..."), completions = the
teacher's greedy answers (generated once and cached under `~/.cache/trl_distill/minillm_bench/`).

Rows (same optimizer steps, batch, learning rate and seed):

- `sft`: `distill_mode="token"`, `alpha=0` (cross-entropy on the teacher's answers only);
- `forward_kl`: the default recipe (`objective="forward_kl"`, `kd_temperature=2`, `alpha=0.9`);
- `gkd_reverse_kl`: on-policy GKD (`lmbda=1`, `objective="reverse_kl"`, `kd_temperature=1`, `alpha=1`);
- `minillm`: `distill_mode="minillm"` with the defaults (teacher mix 0.2, clip 0.2, length normalization).

Measured on held-out prompts: KL(teacher‖student) and KL(student‖teacher) on the teacher's answers (teacher-forced,
per completion token), the student's perplexity on them, and two judge-free generation proxies on the student's own
greedy answers: the teacher's mean log-probability per token, and the fraction ending with EOS before the cap.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/minillm_quality.py --quick --seed 0 --out runs/minillm_quality.json
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import os
import time


MODEL_DIR = os.path.expanduser("~/.cache/trl_distill/models/SmolLM2-135M-Instruct")
CACHE_DIR = os.path.expanduser("~/.cache/trl_distill/minillm_bench")
MODULES = ("json", "os.path", "re", "collections", "itertools", "functools", "math", "string", "textwrap", "shutil",
           "random", "statistics", "heapq", "bisect", "difflib", "fnmatch", "glob", "base64", "html", "csv",
           "operator", "copy", "calendar", "zlib", "hashlib", "urllib.parse", "pathlib", "uuid")  # fmt: skip


def _budget(quick: bool, smoke: bool = False) -> dict:
    if smoke:  # checks that the script runs end to end on the real pair; its numbers mean nothing
        return {"train_rows": 8, "test_rows": 4, "steps": 2, "warmup_steps": 0, "cap": 16, "batch": 4, "lr": 5e-5}
    if quick:
        return {"train_rows": 32, "test_rows": 8, "steps": 8, "warmup_steps": 8, "cap": 32, "batch": 4, "lr": 5e-5}
    return {"train_rows": 64, "test_rows": 16, "steps": 24, "warmup_steps": 16, "cap": 48, "batch": 4, "lr": 5e-5}


def _methods(cap: int) -> dict[str, dict]:
    return {
        "sft": {"alpha": 0.0},
        "forward_kl": {"objective": "forward_kl"},
        "gkd_reverse_kl": {
            "objective": "reverse_kl",
            "lmbda": 1.0,
            "kd_temperature": 1.0,
            "alpha": 1.0,
            "max_completion_length": cap,
        },
        "minillm": {"distill_mode": "minillm", "max_completion_length": cap},
    }


def docstring_prompts(n: int, seed: int) -> list[str]:
    """`n` questions about standard-library functions, each with the first lines of the docstring as context."""
    import importlib
    import random

    items = []
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        for name, value in sorted(vars(module).items()):
            if name.startswith("_") or not callable(value) or not inspect.getdoc(value):
                continue
            doc = " ".join(inspect.getdoc(value).split("\n\n")[0].split())[:240]
            if len(doc) > 40:
                items.append(f"Here is the documentation of the Python function `{module_name}.{name}`:\n{doc}\n\n"
                             "Explain in one or two sentences what it does.")  # fmt: skip
    random.Random(seed).shuffle(items)
    return items[:n]


def _chat_ids(tokenizer, prompt: str) -> list[int]:
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=True, return_dict=False)  # fmt: skip


def _greedy(model, tokenizer, prompts: list[str], cap: int, batch: int = 8) -> tuple[list[list[int]], list[bool]]:
    from trl_distill.inference import eval_mode
    from trl_distill.teachers.generation import generate_completion_ids

    completions, ended = [], []
    with eval_mode(model):
        for start in range(0, len(prompts), batch):
            ids = [_chat_ids(tokenizer, p) for p in prompts[start : start + batch]]
            c, e = generate_completion_ids(
                model, ids, pad_token_id=tokenizer.pad_token_id, eos_ids={tokenizer.eos_token_id},
                generation_kwargs={"max_new_tokens": cap, "do_sample": False},
            )  # fmt: skip
            completions += c
            ended += e
    return completions, ended


def teacher_rows(teacher, tokenizer, n_train: int, n_test: int, cap: int, seed: int):
    """Conversational prompt/completion rows (teacher greedy answers of up to `2 * cap` tokens, so that most end with
    EOS, while the students are sampled and judged at `cap`), cached on disk by settings."""
    path = os.path.join(CACHE_DIR, f"rows-{n_train}-{n_test}-{2 * cap}-{seed}.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    prompts = docstring_prompts(n_train + n_test, seed)
    completions, _ = _greedy(teacher, tokenizer, prompts, 2 * cap)
    rows = []
    for prompt, ids in zip(prompts, completions):
        answer = tokenizer.decode(ids, skip_special_tokens=True).strip()
        rows.append({"prompt": [{"role": "user", "content": prompt}],
                     "completion": [{"role": "assistant", "content": answer}]})  # fmt: skip
    data = {"train": rows[:n_train], "test": rows[n_train:]}
    os.makedirs(CACHE_DIR, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f)
    return data


def pruned_student(teacher, keep: int):
    """A copy of `teacher` with `keep` decoder layers: the first half of them contiguous from layer 0, the last layer,
    and the rest evenly spaced in between (early layers hurt most when dropped; a fixed rule, not ShortGPT scores)."""
    import torch

    total = teacher.config.num_hidden_layers
    head = (keep + 1) // 2
    middle = keep - head - 1
    kept = list(range(head)) + [head + round((i + 1) * (total - 1 - head) / (middle + 1)) - 1 for i in range(middle)]
    kept = sorted(set(kept + [total - 1]))
    student = copy.deepcopy(teacher)
    student.model.layers = torch.nn.ModuleList([student.model.layers[i] for i in kept])
    for index, layer in enumerate(student.model.layers):
        layer.self_attn.layer_idx = index
    student.config.num_hidden_layers = len(kept)
    if getattr(student.config, "layer_types", None):
        student.config.layer_types = [student.config.layer_types[i] for i in kept]
    return student, kept


def generation_proxy(student, teacher, tokenizer, rows, cap: int) -> dict:
    """Teacher's mean log-prob per token of the student's greedy answers, and the fraction ending with EOS."""
    import torch

    prompts = [row["prompt"][0]["content"] for row in rows]
    completions, ended = _greedy(student, tokenizer, prompts, cap)
    total, count = 0.0, 0
    with torch.no_grad():
        for prompt, completion in zip(prompts, completions):
            ids = _chat_ids(tokenizer, prompt)
            if not completion:
                continue
            logits = teacher(torch.tensor([ids + completion])).logits[0, len(ids) - 1 : -1].float()
            logp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion)[:, None])
            total += float(logp.sum())
            count += len(completion)
    return {"teacher_logprob_per_token": total / max(count, 1), "eos_fraction": sum(ended) / len(ended),
            "mean_answer_tokens": count / len(completions)}  # fmt: skip


def measure(student, teacher, tokenizer, test_rows, cap: int) -> dict:
    from datasets import Dataset

    from trl_distill.evaluation import heldout_metrics

    metrics = heldout_metrics(student, teacher, tokenizer, Dataset.from_list(test_rows), batch_size=8)
    keep = ("kl_teacher_student", "kl_student_teacher", "student_perplexity", "teacher_perplexity")
    return {**{k: metrics[k] for k in keep}, **generation_proxy(student, teacher, tokenizer, test_rows, cap)}


def train(student, teacher, tokenizer, train_rows, settings: dict, budget: dict, steps: int, seed: int, out: str):
    from datasets import Dataset

    from trl_distill import DistillConfig, DistillTrainer

    args = DistillConfig(
        output_dir=out, use_cpu=True, bf16=False, max_steps=steps, per_device_train_batch_size=budget["batch"],
        learning_rate=budget["lr"], lr_scheduler_type="constant", logging_steps=1, save_strategy="no",
        report_to="none", seed=seed, dataloader_num_workers=0, heldout_eval=False, **settings,
    )  # fmt: skip
    trainer = DistillTrainer(model=student, teacher_model=teacher, args=args, train_dataset=Dataset.from_list(train_rows),
                             processing_class=tokenizer, teacher_processing_class=tokenizer)  # fmt: skip
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    logs = [log for log in trainer.state.log_history if "loss" in log]
    return trainer.model, {"train_s": seconds, "s_per_step": seconds / max(trainer.state.global_step, 1),
                           "last_logs": logs[-1] if logs else {}}  # fmt: skip


def main(argv=None) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="A smaller budget (minutes on a shared 2-core CPU).")
    parser.add_argument("--smoke", action="store_true", help="2 steps on 8 rows: a run check, not a measurement.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/minillm_quality.json")
    parser.add_argument("--keep-layers", type=int, default=20)
    parser.add_argument("--warmup-steps", type=int, default=None, help="Shared SFT steps before the methods.")
    parser.add_argument("--only", nargs="*", help="Train only these methods.")
    args = parser.parse_args(argv)
    budget = _budget(args.quick, args.smoke)
    if args.warmup_steps is not None:
        budget["warmup_steps"] = args.warmup_steps
    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    teacher = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()
    data = teacher_rows(teacher, tokenizer, budget["train_rows"], budget["test_rows"], budget["cap"], args.seed)
    student, kept = pruned_student(teacher, args.keep_layers)
    results = {"budget": budget, "seed": args.seed, "kept_layers": kept, "rows": {}}
    scratch = os.path.join(os.path.dirname(os.path.abspath(args.out)), "minillm_quality_runs")

    def report(name, metrics):
        results["rows"][name] = metrics
        print(f"{name}: {json.dumps({k: v for k, v in metrics.items() if k != 'last_logs'})}", flush=True)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2, default=float)

    report("pruned", measure(student, teacher, tokenizer, data["test"], budget["cap"]))
    if budget["warmup_steps"]:
        student, timing = train(student, teacher, tokenizer, data["train"], {"alpha": 0.0}, budget,
                                budget["warmup_steps"], args.seed, os.path.join(scratch, "warmup"))  # fmt: skip
        report("start (pruned + SFT warm-up)", {**measure(student, teacher, tokenizer, data["test"], budget["cap"]),
                                                **timing})  # fmt: skip
    start_state = copy.deepcopy(student.state_dict())
    for name, settings in _methods(budget["cap"]).items():
        if args.only and name not in args.only:
            continue
        student.load_state_dict(start_state)
        torch.manual_seed(args.seed)
        model, timing = train(student, teacher, tokenizer, data["train"], settings, budget, budget["steps"],
                              args.seed, os.path.join(scratch, name))  # fmt: skip
        report(name, {**measure(model, teacher, tokenizer, data["test"], budget["cap"]), **timing})

    print(f"\nbudget {budget}, seed {args.seed}, student layers {kept}\n")
    print("| student | KL(teacher‖student) | KL(student‖teacher) | perplexity | teacher log-prob / token of greedy "
          "answers | ends with EOS | s / step |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for name, row in results["rows"].items():
        step = f"{row['s_per_step']:.1f}" if "s_per_step" in row else "-"
        print(f"| {name} | {row['kl_teacher_student']:.3f} | {row['kl_student_teacher']:.3f} | "
              f"{row['student_perplexity']:.2f} | {row['teacher_logprob_per_token']:.3f} | {row['eos_fraction']:.0%} "
              f"| {step} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
