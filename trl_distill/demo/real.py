"""The real-model demo: distill SmolLM2-135M-Instruct into a depth-pruned copy of itself, KD against SFT.

`trl-distill demo` (and `make demo`) runs [`run_real_demo`]:

1. fetch SmolLM2-135M-Instruct ([`trl_distill.real_models`]; ~25 s the first time, cached afterwards);
2. build the student by depth pruning ("prune, then distill from the original"): score the teacher's layers on
   calibration text ([`trl_distill.pruning.score_layers`], ShortGPT's block influence) and keep the `num_keep` most
   useful ones, first and last always kept;
3. from that same pruned initialization, with the same rows, order, steps and optimizer, train one student with TRL's
   `SFTTrainer` (cross-entropy on the text) and one with `DistillTrainer` (forward KL to the teacher);
4. measure on held-out rows: KL(teacher‖student), perplexity, top-1 agreement, and print greedy continuations of a few
   held-out prompts by the teacher and both students side by side.

The text is the prose of the Python Language Reference that every CPython ships for `help()` (`pydoc_data.topics`):
real English, available offline on any machine that runs this package, and no licence question beyond Python's own
(PSF). Each paragraph becomes one prompt/completion row: its first words are the prompt, the next ones the completion.
Topics, not paragraphs, are split between train and test, so held-out rows come from sections never trained on. We do
not train on the teacher's own generations: generating them would take most of the CPU budget, and KD against SFT on
real text is the comparison users face (SFT can only fit the text; KD also gets the teacher's whole distribution).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import time
import zlib
from dataclasses import dataclass
from typing import Any


TEACHER = "SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class RealDemoBudget:
    """
    Sizes and step counts of the real-model demo (both students share all of them; only their loss differs).

    Args:
        num_keep (`int`): Decoder layers the pruned student keeps, of SmolLM2's 30.
        n_train, n_test (`int`): Train rows (each seen about `steps * batch_size / n_train` times) and held-out rows.
        steps, batch_size, learning_rate (`int`, `int`, `float`): AdamW budget (cosine schedule, 5% warm-up).
        prompt_words, completion_words (`int`): Words of a paragraph in the prompt and in the completion.
        max_length (`int`): Token cap per row (rows are shorter; the cap only guards against outliers).
        alpha, kd_temperature (`float`): The KD student's loss: `alpha` KD + `(1 - alpha)` CE, at this temperature.
        n_calibration (`int`): Train paragraphs the layers are scored on.
        n_generations, max_new_tokens (`int`): Held-out prompts continued greedily for the side-by-side print.
    """

    num_keep: int = 15
    n_train: int = 192
    n_test: int = 32
    steps: int = 32
    batch_size: int = 6
    learning_rate: float = 2e-4
    prompt_words: int = 12
    completion_words: int = 36
    max_length: int = 96
    alpha: float = 1.0
    kd_temperature: float = 1.0
    n_calibration: int = 32
    n_generations: int = 3
    max_new_tokens: int = 24


REAL_BUDGET = RealDemoBudget()


def reference_paragraphs() -> dict[str, list[str]]:
    """Prose paragraphs of the Python Language Reference shipped with CPython (`pydoc_data.topics`), per topic.

    Code examples, grammar snippets, short lines and repeated paragraphs are dropped; whitespace is collapsed.
    """
    from pydoc_data.topics import topics

    by_topic, seen = {}, set()
    for name in sorted(topics):
        paragraphs = []
        for block in re.split(r"\n\s*\n", topics[name]):
            text = " ".join(block.split())
            words = text.split()
            prose = sum(w.strip(".,;:()\"'").isalpha() for w in words) >= 0.7 * len(words)  # not a list of names
            code = "::" in text or "|" in text or text.startswith((">>>", "..."))
            keep = prose and len(text) >= 200 and not code
            if keep and text not in seen:  # some sections repeat others' paragraphs: each is kept once, so the
                seen.add(text)  # train/test split by topic never puts the same text on both sides
                paragraphs.append(text)
        if paragraphs:
            by_topic[name] = paragraphs
    return by_topic


def real_text_datasets(budget: RealDemoBudget = REAL_BUDGET, seed: int = 0):
    """Train and test `datasets.Dataset`s of prompt/completion rows from [`reference_paragraphs`], split by topic.

    Topics are ordered by a hash of their name and the seed; the first ones go to the test side until it has
    `budget.n_test` rows, the others to training. So no held-out row comes from a section trained on, and the split
    does not depend on the order of the topics in a given Python version.
    """
    import random

    from datasets import Dataset

    def rows_of(paragraphs):
        rows = []
        for text in paragraphs:
            words = text.split()
            if len(words) >= budget.prompt_words + 8:
                completion = words[budget.prompt_words : budget.prompt_words + budget.completion_words]
                prompt = " ".join(words[: budget.prompt_words])
                rows.append({"prompt": prompt, "completion": " " + " ".join(completion)})
        return rows

    by_topic = reference_paragraphs()
    split: dict[str, list[dict[str, str]]] = {"train": [], "test": []}
    for topic in sorted(by_topic, key=lambda name: (zlib.crc32(f"{seed}:{name}".encode()), name)):
        split["test" if len(split["test"]) < budget.n_test else "train"].extend(rows_of(by_topic[topic]))
    rng = random.Random(seed)
    for rows in split.values():
        rng.shuffle(rows)
    if len(split["train"]) < budget.n_train:
        raise ValueError(
            f"This Python's `pydoc_data.topics` gives {len(split['train'])} train rows once {len(split['test'])} are "
            f"held out; the budget needs `n_train={budget.n_train}`: lower `n_train` or `n_test`."
        )
    return Dataset.from_list(split["train"][: budget.n_train]), Dataset.from_list(split["test"][: budget.n_test])


def pruned_student(teacher, tokenizer, calibration_texts: list[str], num_keep: int, verbose: bool = True):
    """A deep copy of `teacher` keeping its `num_keep` most useful layers (ShortGPT scores): `(model, keep)`."""
    from tqdm.auto import tqdm

    from trl_distill.pruning import calibration_batches, depth_prune, score_layers, select_layers

    batches = calibration_batches(tokenizer, calibration_texts, batch_size=8, max_length=96)
    scores = score_layers(teacher, tqdm(batches, desc="scoring layers", disable=not verbose, leave=False))
    keep = select_layers(scores, num_keep)
    return depth_prune(copy.deepcopy(teacher), keep), keep


def training_kwargs(budget: RealDemoBudget, seed: int, output_dir: str, verbose: bool) -> dict[str, Any]:
    """The `TrainingArguments` fields both students share (and `benchmarks/prune_distill.py`'s SFT recovery)."""
    return dict(
        output_dir=output_dir,
        use_cpu=True,
        bf16=False,
        activation_checkpointing=False,
        max_steps=budget.steps,
        per_device_train_batch_size=budget.batch_size,
        learning_rate=budget.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=0.05,
        weight_decay=0.0,
        max_length=budget.max_length,
        logging_steps=max(1, budget.steps // 5),
        save_strategy="no",
        report_to="none",
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=0,
        disable_tqdm=not verbose,
    )


def format_real_table(results: dict[str, Any]) -> str:
    """The held-out comparison printed by [`run_real_demo`]."""
    header = f"{'model':<34}{'KL(teacher||student)':>22}{'perplexity':>12}{'top-1 agree':>13}{'train s':>9}"
    lines = [header, "-" * len(header)]
    labels = [
        ("teacher", f"teacher ({TEACHER})"),
        ("pruned", "pruned student, before training"),
        ("sft", "student, SFT only"),
        ("kd", "student, KD (DistillTrainer)"),
    ]
    for key, label in labels:
        row = results[key]
        kl = f"{row['kl_teacher_student']:.4f}" if "kl_teacher_student" in row else "-"
        agree = f"{row['top1_agreement']:.1%}" if "top1_agreement" in row else "-"
        seconds = results["timings"].get(f"{key}_s")
        seconds = f"{seconds:.0f}" if seconds is not None else "-"
        lines.append(f"{label:<34}{kl:>22}{row['perplexity']:>12.2f}{agree:>13}{seconds:>9}")
    return "\n".join(lines)


def format_generations(generations: list[dict[str, str]]) -> str:
    """Held-out prompts and each model's greedy continuation, one block per prompt."""
    blocks = []
    for item in generations:
        lines = [f"PROMPT   {item['prompt']}"]
        lines += [f"{name.upper():<8} ...{' '.join(item[name].split())}" for name in ("teacher", "sft", "kd")]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def run_real_demo(
    output_dir: str = "runs/demo",
    *,
    seed: int = 0,
    budget: RealDemoBudget = REAL_BUDGET,
    cache_dir: str | None = None,
    num_threads: int | None = None,
    verbose: bool = True,
) -> dict:
    """
    Distill SmolLM2-135M-Instruct into its depth-pruned copy on real text; compare with SFT on the same budget.

    Args:
        output_dir (`str`, *optional*, defaults to `"runs/demo"`):
            Where the students (`sft/`, `kd/`, loadable with `from_pretrained`; `kd/` carries the receipt that
            `trl-distill verify runs/demo/kd --replay` checks) and `results.json` are written.
        seed (`int`, *optional*, defaults to `0`): Seed of the split, the data order and the trainers.
        budget ([`RealDemoBudget`], *optional*): Sizes and steps (defaults to `REAL_BUDGET`).
        cache_dir (`str`, *optional*): Cache of the real models (see [`trl_distill.real_models.real_model_path`]).
        num_threads (`int`, *optional*): torch intra-op threads for the run (restored afterwards); `None` keeps
            torch's setting (all cores, which is what 135M-parameter models want).
        verbose (`bool`, *optional*, defaults to `True`): Progress bars and the final print.

    Returns:
        `dict` with `teacher`, `pruned`, `sft`, `kd` held-out metrics (`kl_teacher_student`, `perplexity`,
        `top1_agreement`, ...), `generations`, `kept_layers`, `timings`, `kd_beats_sft_on_kl`, `budget`, `table`.
    """
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from trl_distill import DistillConfig, DistillTrainer
    from trl_distill.callbacks import find_heldout_callback
    from trl_distill.evaluation import generate_completions, heldout_metrics
    from trl_distill.real_models import real_model_path

    from .runner import fit_trainer, quiet_progress, torch_threads

    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"`seed` must be an int, got {seed!r}.")
    log = print if verbose else (lambda *_: None)
    output_dir = os.fspath(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    timings: dict[str, float] = {}
    total_start = time.perf_counter()

    with quiet_progress(verbose), torch_threads(num_threads):
        start = time.perf_counter()
        log(f"[models] {TEACHER} (downloaded and converted once, then cached)")
        teacher_path = real_model_path(TEACHER, cache_dir=cache_dir, progress=verbose)
        tokenizer = AutoTokenizer.from_pretrained(teacher_path)
        teacher = AutoModelForCausalLM.from_pretrained(teacher_path, dtype=torch.float32).eval()
        train_dataset, test_dataset = real_text_datasets(budget, seed)
        timings["fetch_s"] = time.perf_counter() - start

        start = time.perf_counter()
        calibration = [row["prompt"] + row["completion"] for row in train_dataset.select(range(budget.n_calibration))]
        student_init, keep = pruned_student(teacher, tokenizer, calibration, budget.num_keep, verbose)
        timings["prune_s"] = time.perf_counter() - start
        log(f"[student] layers {keep} of 30 kept ({_millions(student_init)}M of {_millions(teacher)}M parameters)")

        def kwargs(name):
            return training_kwargs(budget, seed, os.path.join(output_dir, name), verbose)

        log(f"[student/sft] SFTTrainer, {budget.steps} steps of {budget.batch_size} rows")
        sft = SFTTrainer(
            model=copy.deepcopy(student_init),
            args=SFTConfig(**kwargs("sft")),
            train_dataset=train_dataset,
            processing_class=tokenizer,
        )
        timings["sft_s"] = fit_trainer(sft, verbose)
        sft.model.eval()
        sft.save_model(os.path.join(output_dir, "sft"))

        log(
            f"[student/kd] the same student, rows and steps, DistillTrainer (forward KL, T={budget.kd_temperature}, "
            f"alpha={budget.alpha})"
        )
        kd_args = DistillConfig(
            **kwargs("kd"),
            objective="forward_kl",
            kd_temperature=budget.kd_temperature,
            alpha=budget.alpha,
            kd_top_k=None,
        )
        kd = DistillTrainer(
            model=copy.deepcopy(student_init),
            teacher_model=teacher,
            args=kd_args,
            train_dataset=train_dataset,
            eval_dataset=test_dataset,
            processing_class=tokenizer,
        )
        seconds = fit_trainer(kd, verbose)
        heldout = find_heldout_callback(kd)  # its end-of-training measurement is evaluation, not training time
        timings["kd_s"] = seconds - (heldout.seconds if heldout is not None else 0.0)
        kd.model.eval()
        kd.save_model(os.path.join(output_dir, "kd"))

        start = time.perf_counter()
        results: dict[str, Any] = {}
        students = {"pruned": student_init, "sft": sft.model, "kd": kd.model}
        for name, model in tqdm(students.items(), desc="held-out metrics", disable=not verbose, leave=False):
            metrics = heldout_metrics(model, teacher, tokenizer, test_dataset)
            results["teacher"] = {"perplexity": metrics["teacher_perplexity"]}
            results[name] = {
                "kl_teacher_student": metrics["kl_teacher_student"],
                "kl_student_teacher": metrics["kl_student_teacher"],
                "top1_agreement": metrics["top1_agreement"],
                "perplexity": metrics["student_perplexity"],
                "num_tokens": metrics["num_tokens"],
            }
        prompts = test_dataset["prompt"][: budget.n_generations]
        generators = [("teacher", teacher), ("sft", sft.model), ("kd", kd.model)]
        continuations = {
            name: generate_completions(model, tokenizer, prompts, max_new_tokens=budget.max_new_tokens)
            for name, model in tqdm(generators, desc="generating", disable=not verbose, leave=False)
        }
        timings["eval_s"] = time.perf_counter() - start

    timings["total_s"] = time.perf_counter() - total_start
    results.update(
        generations=[
            {"prompt": p, **{name: texts[i] for name, texts in continuations.items()}} for i, p in enumerate(prompts)
        ],
        kept_layers=keep,
        timings=timings,
        kd_beats_sft_on_kl=results["kd"]["kl_teacher_student"] < results["sft"]["kl_teacher_student"],
        budget=dataclasses.asdict(budget),
        seed=seed,
        teacher_path=str(teacher_path),
    )
    results["table"] = format_real_table(results)
    with open(os.path.join(output_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)

    log("")
    log(
        f"Held-out comparison on {budget.n_test} paragraphs from Python Reference sections never trained on "
        f"({results['kd']['num_tokens']} completion tokens):"
    )
    log(results["table"])
    log("\nGreedy continuations of held-out prompts:\n")
    log(format_generations(results["generations"]))
    verdict = "lower" if results["kd_beats_sft_on_kl"] else "NOT lower"
    log(
        f"\nThe KD student's KL to the teacher is {verdict} than the SFT student's "
        f"({results['kd']['kl_teacher_student']:.4f} vs {results['sft']['kl_teacher_student']:.4f}). "
        f"Total {timings['total_s']:.0f} s; outputs in {output_dir} "
        f"(check: trl-distill verify {os.path.join(output_dir, 'kd')} --replay)"
    )
    return results


def _millions(model) -> str:
    return f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}"
