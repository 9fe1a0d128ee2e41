"""Every mode measured on real teacher/student pairs, with TRL's trainers as peers in the same run.

Teacher: SmolLM2-135M-Instruct (V = 49152; ChatML) or Gemma-3-270M (V = 262144). Student: the teacher depth-pruned
("prune, then distill from the original"): SmolLM2 keeps 23 of 30 layers, Gemma 14 of 18 (the first half, every other
one after it, and the last). Data: real English prose shipped with Python, the docstrings of the standard library's
modules, functions and classes, as question/answer chat rows ("What does `json.dumps` do in Python?" -> the docstring's
first paragraphs), rendered as prompt/completion strings with the student's chat template (Gemma has none: a Gemma-3
turn template is set on its tokenizer). The held-out rows are never trained on, and every table scores the same
completion tokens with `trl_distill.evaluation.heldout_metrics` (teacher-forced KL(teacher||student) and perplexity at
temperature 1 over the full vocabulary).

Tables (`--table`), each case in its own fresh process, run one after the other:

- `recipe`  (issue 12 item 1): SFT (TRL `SFTTrainer`), TRL `GKDTrainer` (lmbda=0, beta=0 = forward KL, T=1), ours with
  GKD's objective (forward KL, T=1, alpha=1) and ours with the default recipe (forward KL, T=2, alpha=0.9), at equal
  budget: held-out KL and perplexity, train tokens/s (median step) and the training process's peak RSS.
  `--pair gemma` repeats the speed/memory comparison at V = 262144.
- `profile`: where one step's time and memory go: teacher body, student body forward/backward, and the loss over the
  vocabulary (ours chunked vs GKD's full logits + `generalized_jsd_loss`), medians of 3 repeats.
- `topk`    (item 2): `kd_top_k` in {8, 64, 256} against the full vocabulary (default recipe otherwise).
- `feature` (item 5): logit KD alone vs + feature KD (`feature_loss` "mse" weight 1, the old README setting, and the
  scale-free "relative_mse"), with the size of each term at the first step.
- `onpolicy` (item 3): from the pruned (pretrained) student: lmbda in {0, 0.5, 1} with forward and reverse KL.
- `uld`     (item 4): Gemma-3-270M teacher -> pruned SmolLM2 student (different tokenizers): SFT, sequence-level KD,
  ULD; TRL's `GOLDTrainer` as a peer when it runs.

Run from the repository root (2 threads; a case loads both models, ~1-2 GB):

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/real_pairs.py --table recipe --steps 30 --out runs/real/recipe.json
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/real_pairs.py --table recipe --pair gemma --steps 10
    .venv/bin/python benchmarks/real_pairs.py --table topk --quick     # smoke run: 2 steps, 8 held-out rows

The models are read from ~/.cache/trl_distill/models (see FACTS.md "Real models offline"; `--models-dir`).
"""

from __future__ import annotations

import argparse
import ast
import copy
import importlib.util
import json
import os
import random
import sys
import time


try:
    from . import harness
except ImportError:
    import harness


os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
MODELS_DIR = os.path.expanduser("~/.cache/trl_distill/models")
PAIRS = {
    # name: (teacher dir, student derived from, kept-layer count)
    "smollm2": ("SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct", 23),
    "gemma": ("gemma-3-270m", "gemma-3-270m", 14),
    "gemma_to_smollm2": ("gemma-3-270m", "SmolLM2-135M-Instruct", 23),
}
# Gemma-3's turn format, starting with the BOS token as Gemma's own template does: TRL's GKD/GOLD collators render
# the template and tokenize with `add_special_tokens=False`, so a template without it trains them without a BOS.
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ m['content'] }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
DEFAULT_RECIPE = {"objective": "forward_kl", "kd_temperature": 2.0, "alpha": 0.9}  # DistillConfig's defaults
MATCHED_GKD = {"objective": "forward_kl", "kd_temperature": 1.0, "alpha": 1.0}  # GKD's loss at lmbda=0, beta=0, T=1


# ------------------------------------------------------------------------------------------------------------ data
def _docstrings(max_chars: int) -> list[tuple[str, str]]:
    """(name, first paragraphs of the docstring) of stdlib modules and their public functions/classes, from source."""
    out = []
    for module in sorted(sys.stdlib_module_names):
        if module.startswith("_") or module in ("this", "antigravity"):
            continue
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            continue
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            continue
        try:
            with open(spec.origin, encoding="utf-8") as f:
                tree = ast.parse(f.read())
        except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
            continue
        nodes = [(module, tree)] + [
            (f"{module}.{n.name}", n)
            for n in tree.body
            if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and not n.name.startswith("_")
        ]
        for name, node in nodes:
            doc = ast.get_docstring(node)
            text = _clean(doc, max_chars) if doc else None
            if text:
                out.append((name, text))
    return out


def _clean(doc: str, max_chars: int) -> str | None:
    """First prose paragraphs of a docstring, joined to one line, cut at a sentence end under `max_chars`."""
    paragraphs = []
    for para in doc.strip().split("\n\n"):
        line = " ".join(para.split())
        if not line or line.startswith((">>>", "Usage", "Example", ":", "-", "*", "Copyright")) or "::" in line:
            break
        paragraphs.append(line)
    text = " ".join(paragraphs)
    if len(text) < 80 or sum(ch.isalpha() for ch in text) < 0.7 * len(text):
        return None  # too short to be prose, or mostly code/tables
    if len(text) > max_chars:
        cut = text[:max_chars]
        end = cut.rfind(". ")
        if end < 60:
            return None
        text = cut[: end + 1]
    return text


def chat_rows(seed: int, n_train: int, n_eval: int, max_chars: int = 200) -> tuple[list[dict], list[dict]]:
    """`(train, held_out)` rows with `messages` (user question, assistant answer): shuffled with `seed`, disjoint."""
    docs = _docstrings(max_chars)
    random.Random(seed).shuffle(docs)
    kind = {True: "module", False: "function or class"}
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"What does the Python {kind['.' not in name]} `{name}` do?"},
                {"role": "assistant", "content": text},
            ]
        }
        for name, text in docs
    ]
    if len(rows) < n_train + n_eval:
        raise SystemExit(f"only {len(rows)} docstring rows, need {n_train + n_eval}")
    return rows[n_eval : n_eval + n_train], rows[:n_eval]


def prompt_completion(tokenizer, rows: list[dict]) -> list[dict]:
    """The chat rows rendered with `tokenizer`'s chat template as prompt/completion strings (the EOS is added by TRL).

    A BOS the template writes is dropped from the text: `tokenizer(text=prompt)` adds it again (one BOS, not two).
    """
    out = []
    adds_bos = tokenizer.bos_token_id is not None and tokenizer(text="x")["input_ids"][:1] == [tokenizer.bos_token_id]
    bos = tokenizer.bos_token if adds_bos else None
    for row in rows:
        prompt = tokenizer.apply_chat_template(row["messages"][:-1], tokenize=False, add_generation_prompt=True)
        if bos and prompt.startswith(bos):
            prompt = prompt[len(bos) :]
        out.append({"prompt": prompt, "completion": row["messages"][-1]["content"]})
    return out


# ---------------------------------------------------------------------------------------------------------- models
def load_tokenizer(models_dir: str, name: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(os.path.join(models_dir, name))
    if tokenizer.chat_template is None:
        tokenizer.chat_template = GEMMA_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(models_dir: str, name: str):
    import torch
    from transformers import AutoModelForCausalLM

    path = os.path.join(models_dir, name)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise SystemExit(f"{path} is missing: fetch the real models first (FACTS.md 'Real models offline').")
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def kept_layers(num_layers: int, keep: int) -> list[int]:
    """The first half, then every other layer, then the last: SmolLM2 30 -> 23 gives 0-14, 16, 18, ..., 28, 29.

    (Keeping 15, 17, ..., 27, 29 instead, the pair 28-29 broken, gives held-out KL ~10 instead of ~3.8.)
    """
    half = num_layers // 2
    chosen = list(range(half)) + list(range(half + 1, num_layers - 1, 2)) + [num_layers - 1]
    if len(chosen) > keep:
        chosen = chosen[: keep - 1] + [num_layers - 1]
    return sorted(set(chosen))


def depth_prune(model, keep: int) -> tuple[object, list[int]]:
    """Keep `keep` decoder layers of `model` (in place); return it and the kept teacher-layer indices.

    A minimal local version (the `models` branch adds `trl_distill.pruning`): cut `model.model.layers`, renumber the
    attention layers' cache index, and cut `num_hidden_layers` and (Gemma-3) `layer_types` in the config.
    """
    from torch import nn

    layers = model.model.layers
    keep_idx = kept_layers(len(layers), keep)
    model.model.layers = nn.ModuleList(layers[i] for i in keep_idx)
    for new, layer in enumerate(model.model.layers):
        if hasattr(layer, "self_attn") and hasattr(layer.self_attn, "layer_idx"):
            layer.self_attn.layer_idx = new
        if hasattr(layer, "layer_idx"):
            layer.layer_idx = new
    model.config.num_hidden_layers = len(keep_idx)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in keep_idx]
    return model, keep_idx


# ------------------------------------------------------------------------------------------------------------ one case
class _StepTimer:
    """Wall time of every optimizer step (a TrainerCallback built lazily, so this module imports without TRL)."""

    def __new__(cls):
        from transformers import TrainerCallback

        class Timer(TrainerCallback):
            def __init__(self):
                self.times, self._t0 = [], None

            def on_step_begin(self, args, state, control, **kwargs):
                self._t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                self.times.append(time.perf_counter() - self._t0)

        return Timer()


def _common_args(case: dict, output_dir: str) -> dict:
    return dict(
        output_dir=output_dir,
        max_steps=case["steps"],
        per_device_train_batch_size=case["batch"],
        learning_rate=case["lr"],
        lr_scheduler_type="constant",
        warmup_steps=0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        seed=case["seed"],
        data_seed=case["seed"],
        gradient_checkpointing=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
        max_length=512,
    )


def build_trainer(case: dict, teacher, student, student_tok, teacher_tok, train_rows, output_dir: str):
    from datasets import Dataset

    kind = case["trainer"]
    common = _common_args(case, output_dir)
    pc_rows = Dataset.from_list(prompt_completion(student_tok, train_rows))
    if kind == "sft":
        from trl import SFTConfig, SFTTrainer

        return SFTTrainer(model=student, args=SFTConfig(**common), train_dataset=pc_rows, processing_class=student_tok)
    if kind == "gkd":
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        # lmbda=0 (dataset completions only), beta=0 (forward KL, TRL's convention: gkd_trainer.py `beta == 0` ->
        # kl_div(student, teacher) = KL(teacher||student)), temperature=1 (its loss temperature)
        args = GKDConfig(
            **common,
            lmbda=case["config"].get("lmbda", 0.0),
            beta=case["config"].get("beta", 0.0),
            temperature=1.0,
            seq_kd=False,
            max_new_tokens=64,
        )
        return GKDTrainer(
            model=student,
            teacher_model=teacher,
            args=args,
            train_dataset=Dataset.from_list(train_rows),
            processing_class=student_tok,
        )
    if kind == "gold":
        from trl.experimental.gold import GOLDConfig, GOLDTrainer

        args = GOLDConfig(
            **common,
            lmbda=0.0,
            beta=0.0,
            temperature=1.0,
            use_uld_loss=True,
            teacher_tokenizer_name_or_path=case["teacher_dir"],
            max_completion_length=64,
        )
        return GOLDTrainer(
            model=student,
            teacher_model=teacher,
            args=args,
            train_dataset=Dataset.from_list(train_rows),
            processing_class=student_tok,
        )
    from trl_distill import DistillConfig, DistillTrainer

    args = DistillConfig(**common, heldout_eval=False, **case["config"])
    return DistillTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=pc_rows,
        processing_class=student_tok,
        teacher_processing_class=teacher_tok if teacher_tok is not student_tok else None,
    )


def run_case(case: dict) -> dict:
    import tempfile

    import torch
    from transformers import set_seed

    from trl_distill.evaluation import heldout_metrics

    torch.manual_seed(case["seed"])
    set_seed(case["seed"])
    teacher_name, student_name, keep = PAIRS[case["pair"]]
    models_dir = case["models_dir"]
    case["teacher_dir"] = os.path.join(models_dir, teacher_name)
    teacher_tok = load_tokenizer(models_dir, teacher_name)
    student_tok = teacher_tok if student_name == teacher_name else load_tokenizer(models_dir, student_name)
    teacher = load_model(models_dir, teacher_name).eval()
    student, keep_idx = depth_prune(load_model(models_dir, student_name), keep)
    train_rows, eval_rows = chat_rows(case["data_seed"], case["steps"] * case["batch"], case["n_eval"])
    eval_pc = prompt_completion(student_tok, eval_rows)
    same_vocab = teacher_name == student_name
    vocab = len(student_tok)

    def measure():
        if same_vocab:
            return heldout_metrics(student, teacher, student_tok, eval_pc, batch_size=4, vocab_size=vocab)
        return heldout_metrics(student, None, student_tok, eval_pc, batch_size=4)

    result = {"case": case["name"], "pair": case["pair"], "kept_layers": keep_idx}
    if case.get("measure_before"):
        result["before"] = measure()
    if case["trainer"] == "feature_probe":
        return {**result, **feature_probe(case, teacher, student, student_tok, train_rows, keep_idx)}
    if case["trainer"] == "profile":
        return {**result, **profile_step(case, teacher, student, student_tok, train_rows)}
    if "feature_layer_map" in case["config"] and case["config"]["feature_layer_map"] == "pruned":
        case["config"]["feature_layer_map"] = feature_pairs(keep_idx)
    train_tokens = sum(
        len(student_tok(text=r["prompt"] + r["completion"])["input_ids"]) + 1
        for r in prompt_completion(student_tok, train_rows)
    )
    with tempfile.TemporaryDirectory() as out_dir:
        trainer = build_trainer(case, teacher, student, student_tok, teacher_tok, train_rows, out_dir)
        timer = _StepTimer()
        trainer.add_callback(timer)
        meter = harness.PeakMemory("cpu")
        meter.start()
        t0 = time.perf_counter()
        trainer.train()
        train_seconds = time.perf_counter() - t0
        peak_growth, peak_rss = meter.peak(), meter.rss_peak()
        logs = [h for h in trainer.state.log_history if "loss" in h]
    student.eval()
    step = harness.median(timer.times[1:] or timer.times)
    result.update(
        after=measure(),
        train_seconds=train_seconds,
        step_seconds=step,
        step_times=timer.times,
        tokens_per_step=train_tokens / case["steps"],
        tokens_per_second=train_tokens / case["steps"] / step,
        peak_growth_bytes=peak_growth,
        peak_rss_bytes=peak_rss,
        first_log=logs[0] if logs else None,
        last_log=logs[-1] if logs else None,
        torch_threads=torch.get_num_threads(),
    )
    return result


def feature_pairs(keep_idx: list[int]) -> list[list[int]]:
    """Student layer -> the teacher layer it was copied from, for the layers after the cut (earlier ones are equal)."""
    first_cut = next(i for i, t in enumerate(keep_idx) if t != i)
    return [[s, keep_idx[s]] for s in range(first_cut, len(keep_idx), 2)] + [[len(keep_idx) - 1, keep_idx[-1]]]


def feature_probe(case, teacher, student, tokenizer, rows, keep_idx) -> dict:
    """Size of the feature term vs the KD term on one batch, for each `feature_loss`, and where the big values are."""
    import torch

    from trl_distill.evaluation import tokenize_prompt_completion
    from trl_distill.losses import FEATURE_LOSSES, distillation_loss, feature_distillation_loss

    batch = [
        tokenize_prompt_completion(tokenizer, r["prompt"], r["completion"])
        for r in prompt_completion(tokenizer, rows[: case["batch"]])
    ]
    width = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), width), tokenizer.pad_token_id)
    attn = torch.zeros_like(ids)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for i, (row, m) in enumerate(batch):
        ids[i, : len(row)], attn[i, : len(row)] = torch.tensor(row), 1
        mask[i, : len(row)] = torch.tensor(m, dtype=torch.bool)
    pairs = feature_pairs(keep_idx)
    with torch.no_grad():
        s_out = student(input_ids=ids, attention_mask=attn, output_hidden_states=True)
        t_out = teacher(input_ids=ids, attention_mask=attn, output_hidden_states=True)
    s_feats = [s_out.hidden_states[s + 1] for s, _ in pairs]
    t_feats = [t_out.hidden_states[t + 1] for _, t in pairs]
    # Shifted: position i predicts token i + 1; the KD mask is the next token's completion flag
    kd_mask = mask[:, 1:]
    kd = distillation_loss(s_out.logits[:, :-1], t_out.logits[:, :-1], mask=kd_mask, temperature=2.0)
    out = {"pairs": pairs, "kd_loss_T2": float(kd)}
    for name in FEATURE_LOSSES:
        out[f"feature_{name}_masked"] = float(feature_distillation_loss(s_feats, t_feats, mask=mask, loss=name))
        out[f"feature_{name}_all_positions"] = float(
            feature_distillation_loss(s_feats, t_feats, mask=attn.bool(), loss=name)
        )
    # The default map (`feature_layer_map=None`: evenly spaced pairs ending at both last layers), which pairs layers
    # the pruning did not copy from each other
    from trl_distill.features import default_layer_map

    default = [list(p) for p in default_layer_map(len(keep_idx), len(t_out.hidden_states) - 1)]
    s_def = [s_out.hidden_states[s + 1] for s, _ in default]
    t_def = [t_out.hidden_states[t + 1] for _, t in default]
    out["default_pairs"] = default
    for name in FEATURE_LOSSES:
        for where, sel in (("masked", mask), ("all_positions", attn.bool())):
            out[f"default_map_feature_{name}_{where}"] = float(
                feature_distillation_loss(s_def, t_def, mask=sel, loss=name)
            )
    hidden = torch.stack([h.abs().amax(-1) for h in t_out.hidden_states[1:-1]]).amax(0)  # [B, T] largest |h|
    out["teacher_max_abs_hidden"] = float(hidden.max())
    out["teacher_max_abs_hidden_position"] = int(hidden.amax(0).argmax())
    out["teacher_max_abs_hidden_in_completion"] = float(hidden[mask].max())
    return out


def profile_step(case, teacher, student, tokenizer, rows) -> dict:
    """One training step taken apart: teacher body, student body forward and backward, loss over the vocabulary."""
    import torch

    from trl_distill.evaluation import tokenize_prompt_completion
    from trl_distill.losses import linear_distillation_loss

    torch.set_grad_enabled(True)
    from trl.experimental.gkd import GKDTrainer

    batch = [
        tokenize_prompt_completion(tokenizer, r["prompt"], r["completion"])
        for r in prompt_completion(tokenizer, rows[: case["batch"]])
    ]
    width = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), width), tokenizer.pad_token_id)
    attn = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (row, m) in enumerate(batch):
        ids[i, : len(row)], attn[i, : len(row)] = torch.tensor(row), 1
        labels[i, : len(row)] = torch.where(torch.tensor(m, dtype=torch.bool), torch.tensor(row), -100)
    shift = labels[:, 1:]
    mask = shift != -100
    w_s, w_t = student.get_output_embeddings().weight, teacher.get_output_embeddings().weight
    timings: dict[str, list[float]] = {}
    peaks: dict[str, list[int]] = {}
    meter = harness.PeakMemory("cpu")

    def timed(name, fn):
        meter.start()
        t0 = time.perf_counter()
        value = fn()
        timings.setdefault(name, []).append(time.perf_counter() - t0)
        peaks.setdefault(name, []).append(meter.peak())
        return value

    def one_step():
        student.zero_grad(set_to_none=True)
        with torch.no_grad():
            t_h = timed(
                "teacher body forward (no grad)",
                lambda: teacher.model(input_ids=ids, attention_mask=attn).last_hidden_state[:, :-1],
            )
            timed("teacher full logits (GKD only)", lambda: teacher.lm_head(t_h))
        s_h = timed(
            "student body forward", lambda: student.model(input_ids=ids, attention_mask=attn).last_hidden_state[:, :-1]
        )
        h = s_h.detach().requires_grad_(True)

        def ours():
            loss = linear_distillation_loss(h[mask], w_s, t_h[mask], w_t, objective="forward_kl", temperature=1.0)
            loss.backward()
            return loss

        def gkd():
            student_logits = student.lm_head(h)
            with torch.no_grad():
                teacher_logits = teacher.lm_head(t_h)
            loss = GKDTrainer.generalized_jsd_loss(
                student_logits, teacher_logits, labels=shift, beta=0.0, temperature=1.0
            )
            loss.backward()
            return loss

        loss_ours = timed("loss fwd+bwd, ours (chunked)", ours)
        grad_ours = h.grad.clone()
        h.grad = None
        loss_gkd = timed("loss fwd+bwd, GKD (full logits of both)", gkd)
        timed("student body backward", lambda: s_h.backward(grad_ours))
        return loss_ours, loss_gkd, float((grad_ours - h.grad).abs().max())

    for _ in range(case.get("repeats", 3)):
        loss_ours, loss_gkd, grad_diff = one_step()
    table = {
        name: {"seconds": harness.median(v), "peak_growth_bytes": harness.median(peaks[name])}
        for name, v in timings.items()
    }
    return {
        "profile": table,
        "positions": int(ids.numel()),
        "loss_positions": int(mask.sum()),
        "loss_ours": float(loss_ours),
        "loss_gkd": float(loss_gkd),
        "max_abs_grad_diff": grad_diff,
    }


# ------------------------------------------------------------------------------------------------------------ tables
def cases_for(args) -> list[dict]:
    base = dict(
        pair=args.pair,
        steps=args.steps,
        batch=args.batch,
        lr=args.lr,
        seed=args.seed,
        data_seed=args.seed,
        n_eval=args.n_eval,
        models_dir=args.models_dir,
        config={},
    )

    def case(name, trainer, **kw):
        return {**copy.deepcopy(base), "name": name, "trainer": trainer, **kw}

    if args.table == "recipe":
        return [
            case("SFT (TRL SFTTrainer)", "sft", measure_before=True),
            case("GKD (TRL GKDTrainer, lmbda=0, beta=0, T=1)", "gkd"),
            case("ours, GKD's objective (forward KL, T=1, alpha=1)", "ours", config=dict(MATCHED_GKD)),
            case("ours, default recipe (forward KL, T=2, alpha=0.9)", "ours", config=dict(DEFAULT_RECIPE)),
        ]
    if args.table == "lr":
        return [
            case(f"{name}, lr={lr:g}", trainer, lr=lr, config=dict(cfg))
            for lr in args.lrs
            for name, trainer, cfg in (
                ("SFT", "sft", {}),
                ("ours, T=1 alpha=1", "ours", MATCHED_GKD),
                ("ours, default recipe", "ours", DEFAULT_RECIPE),
            )
        ]
    if args.table == "recipe_knobs":
        return [
            case(
                f"ours, forward KL, T={t:g}, alpha={a:g}",
                "ours",
                config={"objective": "forward_kl", "kd_temperature": t, "alpha": a},
            )
            for t, a in ((1.0, 0.9), (2.0, 1.0), (1.0, 0.5))
        ]
    if args.table == "profile":
        return [case("profile", "profile", repeats=3)]
    if args.table == "topk":
        return [
            case(f"ours, kd_top_k={k}", "ours", config={**DEFAULT_RECIPE, "kd_top_k": k}) for k in (8, 64, 256)
        ] + [case("ours, full vocabulary", "ours", config=dict(DEFAULT_RECIPE))]
    if args.table == "feature":
        feat = {**DEFAULT_RECIPE, "feature_layer_map": "pruned"}
        return [
            case("feature probe (one batch, before training)", "feature_probe"),
            case("logit KD only (default recipe)", "ours", config=dict(DEFAULT_RECIPE)),
            case("+ feature KD, mse, weight 1", "ours", config={**feat, "feature_loss": "mse", "feature_weight": 1.0}),
            case(
                "+ feature KD, relative_mse, weight 1",
                "ours",
                config={**feat, "feature_loss": "relative_mse", "feature_weight": 1.0},
            ),
        ]
    if args.table == "onpolicy":
        gen = {"max_completion_length": 64, "temperature": 1.0}
        rows = []
        for objective in ("forward_kl", "reverse_kl"):
            for lmbda in (0.0, 0.5, 1.0):
                cfg = {"objective": objective, "kd_temperature": 1.0, "alpha": 1.0, "lmbda": lmbda, **gen}
                rows.append(case(f"{objective}, lmbda={lmbda:g}", "ours", config=cfg))
        return rows
    if args.table == "uld":
        common = dict(pair="gemma_to_smollm2")
        return [
            case("SFT on the gold text", "sft", measure_before=True, **common),
            case(
                "sequence-level KD (teacher's greedy completions)",
                "ours",
                config={"distill_mode": "sequence", "max_completion_length": 64},
                **common,
            ),
            case(
                "ULD (wasserstein, alpha=0.5, T=1)",
                "ours",
                config={"distill_mode": "uld", "alpha": 0.5, "kd_temperature": 1.0},
                **common,
            ),
            case("TRL GOLDTrainer (ULD loss, lmbda=0)", "gold", **common),
        ]
    raise ValueError(f"`--table` {args.table!r}")


def _f(x, digits=3):
    return "n/a" if x is None else f"{x:.{digits}f}"


def print_table(args, results: list[dict]) -> None:
    print(
        f"\n## {args.table}: pair {args.pair}, {args.steps} steps x {args.batch} rows, lr {args.lr:g} (constant), "
        f"seed {args.seed}, {args.n_eval} held-out rows, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}\n"
    )
    if args.table == "profile":
        for r in results:
            if "error" in r:
                print(f"error: {r['error']}")
                continue
            print(
                f"{r['positions']} positions, {r['loss_positions']} in the loss; loss ours {r['loss_ours']:.5f} vs "
                f"GKD {r['loss_gkd']:.5f}\n"
            )
            rows = [(k, _f(v["seconds"]), f"{v['peak_growth_bytes'] / 2**20:,.0f}") for k, v in r["profile"].items()]
            print(harness.markdown_table(["part of one step", "seconds (median of 3)", "peak growth (MiB)"], rows))
        return
    if args.table == "feature" and results and "kd_loss_T2" in results[0]:
        probe = results.pop(0)
        print("Feature probe on one batch of the pruned student (before training):\n```")
        print(json.dumps({k: v for k, v in probe.items() if k != "case"}, indent=1))
        print("```\n")
    if not results:
        return
    first = next((r for r in results if "before" in r), None)
    if first:
        b = first["before"]
        print(
            f"Pruned student before training: KL(t||s) {_f(b.get('kl_teacher_student'))}, perplexity "
            f"{_f(b.get('student_perplexity'))}; teacher perplexity {_f(b.get('teacher_perplexity'))}\n"
        )
    ref = next((r for r in results if "after" in r), None)
    rows = []
    for r in results:
        if "error" in r:
            rows.append((r["case"], "failed: " + r["error"].split(" | ")[-1][:240], "", "", "", "", "", "", "", ""))
            continue
        a = r["after"]
        kl = a.get("kl_teacher_student")
        rows.append(
            (
                r["case"],
                _f(kl, 4),
                _f(a.get("kl_student_teacher"), 4),
                _f(a.get("student_perplexity"), 3),
                f"{kl / ref['after']['kl_teacher_student']:.3f}x"
                if kl is not None and ref["after"].get("kl_teacher_student")
                else "n/a",
                f"{r['tokens_per_second']:.0f}",
                f"{r['step_seconds']:.2f}",
                f"{r['train_seconds'] / len(r['step_times']):.2f}",
                f"{r['peak_growth_bytes'] / 2**20:,.0f}",
                f"{r['peak_rss_bytes'] / 2**20:,.0f}",
            )
        )
    headers = [
        "case",
        "held-out KL(t‖s)",
        "KL(s‖t)",
        "perplexity",
        "KL / first row",
        "train tok/s",
        "step s (median)",
        "s/step incl. generation",
        "train peak growth MiB",
        "peak RSS MiB",
    ]
    print(harness.markdown_table(headers, rows))
    print(
        "\n`step s (median)` is the optimizer step alone; on-policy (`lmbda > 0`) and `seq_kd` samples are generated "
        "before it (`get_batch_samples`), so `s/step incl. generation` (`trainer.train()`'s wall time / steps) is the "
        "cost of a step there. Ratios of times are comparable only within one quiet run."
    )


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--table",
        default="recipe",
        choices=["recipe", "lr", "recipe_knobs", "profile", "topk", "feature", "onpolicy", "uld"],
    )
    p.add_argument("--pair", default="smollm2", choices=list(PAIRS), help="teacher/student pair (default smollm2)")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per case (default 20; quick 2)")
    p.add_argument("--batch", type=int, default=4, help="rows per step (default 4)")
    p.add_argument("--lr", type=float, default=5e-5, help="learning rate, constant, the same for every case")
    p.add_argument("--lrs", type=float, nargs="+", default=[2e-5, 1e-4], help="`--table lr`: learning rates")
    p.add_argument("--n-eval", type=int, default=24, help="held-out rows (default 24; quick 8)")
    p.add_argument("--only", nargs="+", default=None, help="run only the cases whose name starts with one of these")
    p.add_argument("--models-dir", default=MODELS_DIR)
    p.add_argument("--case-timeout", type=float, default=3600.0)
    p.add_argument(
        "--from-json",
        nargs="+",
        default=None,
        metavar="FILE",
        help="print one table from the results of earlier runs' --out files (in this order), run nothing",
    )
    harness.add_common_args(p, seed=0)
    return p


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    if args.case is not None:
        harness.emit_result(run_case(json.loads(args.case)))
        return 0
    if args.from_json:
        results = []
        for path in args.from_json:
            with open(path) as f:
                saved = json.load(f)
            results += saved["results"]
            for key in ("pair", "steps", "batch", "lr", "seed", "n_eval"):
                setattr(args, key, saved["args"][key])
        print_table(args, results)
        return 0
    if args.quick:
        args.steps, args.n_eval = 2, 8
    env = harness.environment()
    print(f"Environment: {json.dumps(env)}")
    results = []
    for case in cases_for(args):
        if args.only and not any(case["name"].startswith(o) for o in args.only):
            continue
        t0 = time.time()
        r = harness.run_child(__file__, case, timeout=args.case_timeout)
        r.setdefault("case", case["name"])
        results.append(r)
        summary = r.get("error") or json.dumps({k: r.get(k) for k in ("after", "tokens_per_second", "step_seconds")})
        print(f"[{time.time() - t0:.0f} s] {case['name']}: {summary}", file=sys.stderr, flush=True)
    print_table(args, results)
    harness.write_json(args.out, {"args": vars(args), "environment": env, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
