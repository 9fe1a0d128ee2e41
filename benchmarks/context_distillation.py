"""Context distillation on SmolLM2-135M-Instruct: bake "answer in French" into LoRA adapters (issue 15).

The teacher is the model itself *with* an instruction as its system message (the base weights: the LoRA student's
adapters disabled), the student is the same model *without* it. After training we compare, on held-out questions:

- held-out KL(teacher with the context || student without it), teacher-forced on the teacher's own greedy answers
  (and the reverse KL), before and after training;
- how often greedy answers are in French (a programmatic check: the share of common French function words), for the
  student without the context before / after, and for the teacher with it.

Two training runs of the same budget: `kd` (the teacher's greedy answers to the training questions as completions,
forward KL: Snell et al. 2022's offline variant) and `on_policy` (`lmbda=1`, `objective="reverse_kl"`: the student
samples answers without the context, the teacher scores them with it: the seed's loop).

    python benchmarks/context_distillation.py --out runs/context_distillation.json            # ~5 min on a quiet CPU
    python benchmarks/context_distillation.py --quick --out runs/context_distillation_quick.json   # smoke run

Prints a Markdown table (README "Context distillation") and writes the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
import time


MODEL = os.path.expanduser("~/.cache/trl_distill/models/SmolLM2-135M-Instruct")
CONTEXT = "You are a French assistant. You only speak French: always reply in French, never in English."
FRENCH_WORDS = set(
    "le la les est de des un une et du en que qui pour dans sont avec au aux ce cette il elle nous vous je ne pas "
    "plus par sur".split()
)
SUBJECTS = [
    "the sun", "the moon", "a tree", "a river", "a cat", "a dog", "bread", "coffee", "rain", "snow", "a mountain",
    "the ocean", "a bicycle", "a library", "a garden", "music", "a computer", "a city", "winter", "summer", "a bird",
    "an apple", "a train", "a school", "the wind", "a candle", "a bridge", "a forest", "cheese", "a clock",
]  # fmt: skip
TEMPLATES = ["What is {}?", "Describe {} in a few words.", "Why do people like {}?", "Tell me one fact about {}."]


def questions(seed: int, train_subjects: int, heldout_subjects: int) -> tuple[list[str], list[str]]:
    """Every template about each subject, subjects drawn by `seed`; held-out subjects never appear in training."""
    import random

    subjects = list(SUBJECTS)
    random.Random(seed).shuffle(subjects)
    held_out, train = subjects[:heldout_subjects], subjects[heldout_subjects : heldout_subjects + train_subjects]
    return [t.format(s) for s in train for t in TEMPLATES], [t.format(s) for s in held_out for t in TEMPLATES]


def is_french(text: str) -> bool:
    words = re.findall(r"[a-zàâçéèêëîïôûùüÿœ']+", text.lower())
    return bool(words) and sum(w in FRENCH_WORDS for w in words) / len(words) > 0.15


def chat(question: str, context: str | None = None) -> list[dict]:
    from trl_distill.conversation import with_teacher_context

    prompt = [{"role": "user", "content": question}]
    return with_teacher_context(prompt, context) if context else prompt


def greedy(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int, batch_size: int = 10) -> list[str]:
    import torch

    answers = []
    tokenizer.padding_side = "left"
    for start in range(0, len(prompts), batch_size):
        texts = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False)
                 for p in prompts[start : start + batch_size]]  # fmt: skip
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        answers += tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    tokenizer.padding_side = "right"
    return answers


def heldout_kl(student, teacher_ctx, tokenizer, questions_, answers) -> dict[str, float]:
    """Teacher-forced KL on the teacher's greedy answers: teacher reads context + question, student the question.

    `student` and `teacher_ctx` are callables returning a context manager that yields the model to run.

    Written from the definition (full logits, float64), independently of the trainer's aligned loss.
    """
    import torch

    forward = reverse = 0.0
    tokens = 0
    for question, answer in zip(questions_, answers):
        completion = tokenizer(text=answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
        sides = []
        for model, context in ((teacher_ctx, CONTEXT), (student, None)):
            prompt = tokenizer.apply_chat_template(chat(question, context), add_generation_prompt=True,
                                                   tokenize=True, return_dict=True)["input_ids"]  # fmt: skip
            with torch.no_grad(), model() as m:
                logits = m(input_ids=torch.tensor([prompt + completion])).logits[0].double()
            sides.append(torch.log_softmax(logits[len(prompt) - 1 : len(prompt) + len(completion) - 1], -1))
        t, s = sides
        forward += float((t.exp() * (t - s)).sum())
        reverse += float((s.exp() * (s - t)).sum())
        tokens += len(completion)
    return {"kl_teacher_student": forward / tokens, "kl_student_teacher": reverse / tokens, "tokens": tokens}


def adapters_off(model):
    """The PEFT model with its adapters disabled (the base: the self-teacher), as a context manager yielding it."""
    import contextlib

    @contextlib.contextmanager
    def manager():
        with model.disable_adapter():
            yield model

    return manager()


def run(args) -> dict:
    import contextlib

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_distill import DistillConfig, DistillTrainer

    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    train_q, test_q = questions(args.seed, args.train_subjects, args.heldout_subjects)
    if args.quick:
        train_q, test_q = train_q[:8], test_q[:6]
    max_new = 16 if args.quick else args.max_new_tokens
    base = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()

    t0 = time.time()
    teacher_train = greedy(base, tokenizer, [chat(q, CONTEXT) for q in train_q], max_new)
    teacher_test = greedy(base, tokenizer, [chat(q, CONTEXT) for q in test_q], max_new)
    student_before = greedy(base, tokenizer, [chat(q) for q in test_q], max_new)
    plain = contextlib.nullcontext
    before = heldout_kl(lambda: plain(base), lambda: plain(base), tokenizer, test_q, teacher_test)
    setup_s = time.time() - t0
    result = {
        "model": "SmolLM2-135M-Instruct",
        "context": CONTEXT,
        "seed": args.seed,
        "train_questions": len(train_q),
        "heldout_questions": len(test_q),
        "max_new_tokens": max_new,
        "setup_seconds": round(setup_s, 1),
        "teacher_french_rate": sum(map(is_french, teacher_test)) / len(test_q),
        "teacher_train_french_rate": sum(map(is_french, teacher_train)) / len(train_q),
        "before": {**before, "student_french_rate": sum(map(is_french, student_before)) / len(test_q)},
        "examples": {"question": test_q[:3], "teacher": teacher_test[:3], "student_before": student_before[:3]},
        "runs": {},
    }
    print(json.dumps({k: v for k, v in result.items() if k != "examples"}, indent=1), flush=True)

    rows = Dataset.from_list([{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                              for q, a in zip(train_q, teacher_train)])  # fmt: skip
    variants = {
        "kd": dict(objective="forward_kl", lmbda=0.0),
        "on_policy": dict(objective="reverse_kl", lmbda=1.0, max_completion_length=max_new),
    }
    for name in args.variants:
        student = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
        with tempfile.TemporaryDirectory() as out:
            config = DistillConfig(
                output_dir=out, distill_mode="context", teacher_context=CONTEXT, self_distillation=True,
                kd_temperature=1.0, alpha=1.0, max_steps=2 if args.quick else args.steps,
                per_device_train_batch_size=4, learning_rate=args.lr, lr_scheduler_type="constant", logging_steps=5,
                save_strategy="no", report_to="none", use_cpu=True, bf16=False, seed=args.seed, max_length=256,
                activation_checkpointing=False,
                **variants[name],
            )  # fmt: skip
            trainer = DistillTrainer(
                model=student, args=config, train_dataset=rows, processing_class=tokenizer,
                peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"),
            )  # fmt: skip
            start = time.time()
            trainer.train()
            train_s = time.time() - start
        model = trainer.model.eval()
        after_answers = greedy(model, tokenizer, [chat(q) for q in test_q], max_new)
        after = heldout_kl(lambda m=model: plain(m), lambda m=model: adapters_off(m), tokenizer, test_q, teacher_test)
        losses = [log["kd_loss"] for log in trainer.state.log_history if "kd_loss" in log]
        result["runs"][name] = {
            **after, "student_french_rate": sum(map(is_french, after_answers)) / len(test_q),
            "train_seconds": round(train_s, 1), "steps": trainer.state.global_step, "kd_loss_first": losses[0],
            "kd_loss_last": losses[-1], "examples": after_answers[:3], **variants[name],
        }  # fmt: skip
        print(name, json.dumps(result["runs"][name], indent=1), flush=True)
    return result


def table(result: dict) -> str:
    before = result["before"]
    lines = [
        "| student (no context) | KL(teacher+ctx ‖ student) | KL(student ‖ teacher+ctx) | answers in French |",
        "|---|---|---|---|",
        f"| before training | {before['kl_teacher_student']:.3f} | {before['kl_student_teacher']:.3f} | "
        f"{before['student_french_rate']:.0%} |",
    ]
    for name, run_ in result["runs"].items():
        label = {"kd": "after: teacher's answers, forward KL", "on_policy": "after: own samples, reverse KL (lmbda=1)"}
        lines.append(f"| {label.get(name, name)} ({run_['steps']} steps, {run_['train_seconds']:.0f} s) | "
                     f"{run_['kl_teacher_student']:.3f} | {run_['kl_student_teacher']:.3f} | "
                     f"{run_['student_french_rate']:.0%} |")  # fmt: skip
    lines.append(f"| teacher (the base model, with the context) | 0 | 0 | {result['teacher_french_rate']:.0%} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="8 training / 6 held-out questions, 2 steps, 16 tokens")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="where to write the JSON figures")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--train-subjects", type=int, default=6, help="x4 questions each (of 30 subjects)")
    parser.add_argument("--heldout-subjects", type=int, default=4, help="x4 questions each, never trained on")
    parser.add_argument("--variants", nargs="+", default=["kd", "on_policy"], choices=["kd", "on_policy"])
    args = parser.parse_args(argv)
    if not os.path.isdir(MODEL):
        raise SystemExit(f"{MODEL} is missing: convert SmolLM2-135M-Instruct there first (see the README).")
    result = run(args)
    print(table(result))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
