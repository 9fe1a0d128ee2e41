"""The prepared GPU check (issue 16): one script, under ~8 minutes on one GPU, printing one markdown table.

1. **Correctness on CUDA**: `trl_distill.losses.linear_distillation_loss` in fp32 and bf16, forward KL, reverse KL
   and JSD: the loss and the gradients of the student's hidden states and `lm_head` weight against the float64
   reference of `tests/reference.py` (written from the formula), evaluated on the same (rounded) inputs.
2. **Speed and memory at N=8192, H=2048, V=151936 (bf16)**: forward+backward of our fused loss and of TRL's chunked
   divergence (`trl.trainer.distillation_trainer._chunked_divergence_loss`, what `trl.DistillationTrainer` runs,
   with its Triton kernels on CUDA), against the bare GEMM floor (4 GEMMs of that size: teacher and student
   projections, the hidden-state gradient and the `lm_head` weight gradient), and their loss values against each
   other.
3. **One real-model training step**: `DistillTrainer` on SmolLM2-135M-Instruct (teacher and student from the local
   directory, bf16), two steps: loss finite, time per step, peak memory.

Run from the repository root:

    python benchmarks/gpu_check.py                      # on a machine with CUDA; exits with a message without one
    python benchmarks/gpu_check.py --cpu-smoke          # every part at tiny sizes on CPU (what the tests run)
    python benchmarks/gpu_check.py --model-dir DIR      # another local model directory for part 3

The exit status is 1 when a correctness check fails.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import tempfile
import time


ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `tests.reference` and this checkout's `trl_distill`

import torch


DEFAULT_MODEL = pathlib.Path("~/.cache/trl_distill/models/SmolLM2-135M-Instruct").expanduser()
OBJECTIVES = {"forward_kl": 0.0, "reverse_kl": 1.0, "jsd": 0.5}  # ours -> TRL's beta
# Relative error (loss; gradient norm of the difference over the reference's) tolerated per dtype: fp32 only rounds the
# GEMM and the fp32 softmax; bf16 rounds the logits (8 bits of mantissa) before the fp32 softmax.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def sizes(smoke: bool) -> dict:
    if smoke:
        return {"check": (96, 32, 500), "speed": (128, 64, 1000), "repeats": 1}
    return {"check": (2048, 1024, 32000), "speed": (8192, 2048, 151936), "repeats": 5}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def inputs(n, h, v, dtype, device, seed=0):
    generator = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to(device=device, dtype=dtype)

    return {
        "student_hidden": randn(n, h).requires_grad_(True),
        "student_weight": randn(v, h, scale=h**-0.5 * 2).requires_grad_(True),
        "teacher_hidden": randn(n, h),
        "teacher_weight": randn(v, h, scale=h**-0.5 * 3),
    }


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def check_correctness(device, n, h, v, rows) -> bool:
    from tests.reference import reference_loss
    from trl_distill.losses import linear_distillation_loss

    ok = True
    for dtype in (torch.float32, torch.bfloat16):
        for objective in OBJECTIVES:
            x = inputs(n, h, v, dtype, device, seed=1)
            loss = linear_distillation_loss(
                x["student_hidden"], x["student_weight"], x["teacher_hidden"], x["teacher_weight"], objective=objective
            )
            loss.backward()
            # The reference sees the same rounded inputs, in float64, with autograd through the projection.
            sh = x["student_hidden"].detach().double().requires_grad_(True)
            sw = x["student_weight"].detach().double().requires_grad_(True)
            logits_t = x["teacher_hidden"].double() @ x["teacher_weight"].double().T
            mask = torch.ones(n, dtype=torch.bool, device=device)
            ref = reference_loss(sh @ sw.T, logits_t, mask=mask, objective=objective)
            ref.backward()
            errors = {
                "loss": abs(loss.item() - ref.item()) / max(abs(ref.item()), 1e-30),
                "grad hidden": rel(x["student_hidden"].grad, sh.grad),
                "grad weight": rel(x["student_weight"].grad, sw.grad),
            }
            tolerance = TOLERANCE[dtype]
            passed = all(error <= tolerance for error in errors.values())
            ok &= passed
            name = str(dtype).replace("torch.", "")
            rows.append(
                (
                    f"{objective} {name} vs float64 (N={n}, H={h}, V={v})",
                    ", ".join(f"{k} {e:.1e}" for k, e in errors.items()),
                    f"<= {tolerance:.0e}",
                    "PASS" if passed else "FAIL",
                )
            )
            del x, sh, sw, logits_t, ref, loss
    return ok


def timed(fn, device, repeats) -> tuple[float, float, float]:
    """Median seconds of `fn()` (after one warm-up), the peak extra memory of the warm-up (GiB), its last value."""
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    value = fn()
    synchronize(device)
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**30 if device.type == "cuda" else float("nan")
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        value = fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), peak, value


def gemm_floor(sh, sw, th, tw, device, repeats) -> float:
    """Seconds of the 4 GEMMs any fused loss needs: 2 forward projections, d(hidden) and d(weight)."""
    grad_logits = torch.randn(sh.shape[0], sw.shape[0], device=device, dtype=sh.dtype) * 1e-3

    def gemms():
        with torch.no_grad():
            torch.mm(th, tw.T)
            torch.mm(sh, sw.T)
            torch.mm(grad_logits, sw)
            torch.mm(grad_logits.T, sh)

    return timed(gemms, device, repeats)[0]


def check_speed(device, n, h, v, repeats, rows) -> bool:
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    from trl_distill.losses import linear_distillation_loss

    dtype = torch.bfloat16
    x = inputs(n, h, v, dtype, device, seed=2)
    sh, sw, th, tw = x["student_hidden"], x["student_weight"], x["teacher_hidden"], x["teacher_weight"]
    floor = gemm_floor(sh.detach(), sw.detach(), th, tw, device, repeats)
    rows.append((f"bare GEMMs x4 bf16 (N={n}, H={h}, V={v})", f"{floor * 1e3:.1f} ms", "floor", "-"))
    ok, values = True, {}
    for objective, beta in (("forward_kl", 0.0), ("jsd", 0.5)):

        def ours(objective=objective):
            sh.grad = sw.grad = None
            loss = linear_distillation_loss(sh, sw, th, tw, objective=objective)
            loss.backward()
            return loss.item()

        def trl(beta=beta):
            sh.grad = sw.grad = None
            loss, _, _ = _chunked_divergence_loss(
                sh[None], th[None], sw, tw, torch.ones(1, n, device=device), beta=beta
            )
            loss.backward()
            return loss.item()

        for name, fn in (("ours (fused, chunked)", ours), ("TRL chunked divergence", trl)):
            seconds, peak, value = timed(fn, device, repeats)
            values[name] = value
            memory = "n/a on CPU" if device.type == "cpu" else f"+{peak:.2f} GiB"
            measured = f"{seconds * 1e3:.1f} ms ({seconds / floor:.2f}x the floor), peak {memory}"
            rows.append((f"{name} {objective} fwd+bwd", measured, "-", "-"))
        mine, theirs = values["ours (fused, chunked)"], values["TRL chunked divergence"]
        gap = abs(mine - theirs) / abs(theirs)
        passed = gap <= 2e-2
        ok &= passed
        rows.append(
            (
                f"loss ours vs TRL {objective}",
                f"{mine:.6f} vs {theirs:.6f} (rel {gap:.1e})",
                "<= 2e-02",
                "PASS" if passed else "FAIL",
            )
        )
    return ok


def check_training_step(device, model_dir, smoke, rows) -> bool:
    from trl_distill import DistillConfig, DistillTrainer
    from trl_distill.demo.task import make_task_dataset

    if smoke:
        from trl_distill.demo.task import task_corpus
        from trl_distill.demo.tiny import build_tiny_model, build_tokenizer

        tokenizer = build_tokenizer(task_corpus(seed=0, n=300), vocab_size=300)
        student, teacher = build_tiny_model(tokenizer, hidden_size=32, seed=1), build_tiny_model(tokenizer, seed=2)
        label = "tiny demo models (CPU smoke)"
    else:
        if not (model_dir / "config.json").is_file():
            rows.append(
                ("real-model training step", f"skipped: no model directory at {model_dir}", "pass --model-dir", "SKIP")
            )
            return True
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        student = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
        teacher = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
        label = f"{model_dir.name} bf16"
    with tempfile.TemporaryDirectory() as out:
        args = DistillConfig(
            output_dir=out,
            use_cpu=device.type == "cpu",
            bf16=device.type == "cuda",
            max_steps=2,
            per_device_train_batch_size=4,
            max_length=256,
            learning_rate=1e-5,
            alpha=0.5,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            activation_checkpointing=False,
        )
        trainer = DistillTrainer(
            model=student,
            teacher_model=teacher,
            args=args,
            processing_class=tokenizer,
            train_dataset=make_task_dataset(16, seed=0, split="train"),
        )
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        result = trainer.train()
        seconds = (time.perf_counter() - start) / args.max_steps
    peak = f", peak {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB" if device.type == "cuda" else ""
    passed = bool(torch.isfinite(torch.tensor(result.training_loss)))
    rows.append(
        (
            f"DistillTrainer 2 steps, {label}",
            f"loss {result.training_loss:.4f}, {seconds:.2f} s/step{peak}",
            "finite loss",
            "PASS" if passed else "FAIL",
        )
    )
    return passed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="every part at tiny sizes on CPU (the tests run it)")
    parser.add_argument("--model-dir", type=pathlib.Path, default=DEFAULT_MODEL, help="local model for part 3")
    args = parser.parse_args(argv)
    if not args.cpu_smoke and not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA device here; nothing to measure. Run it on a machine with a GPU, or pass "
            "--cpu-smoke to run every part at tiny sizes on CPU."
        )
        return 0
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 in the correctness rows
        name = f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    else:
        name = f"CPU smoke ({os.cpu_count()} cores)"
    import transformers
    import trl
    from transformers.utils import is_triton_available

    config = sizes(args.cpu_smoke)
    rows: list[tuple[str, str, str, str]] = []
    started = time.perf_counter()
    ok = check_correctness(device, *config["check"], rows)
    ok &= check_speed(device, *config["speed"], config["repeats"], rows)
    ok &= check_training_step(device, args.model_dir, args.cpu_smoke, rows)
    print(f"\n### GPU check on {name}\n")
    triton = "available" if is_triton_available() else "not available"
    versions = f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}"
    print(f"{versions}, triton {triton}; {time.perf_counter() - started:.0f} s\n")
    print("| check | measured | target | status |\n|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
