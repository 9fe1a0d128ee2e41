"""Time and peak memory of the distillation loss over the vocabulary: ours vs TRL's two paths.

On demand, never a test. It prints a markdown table of forward+backward time and peak memory for
`N` positions x `V` vocabulary (hidden `H`, 75% of positions in the loss), for:

- `ours`: `trl_distill.losses.linear_distillation_loss` on hidden states and `lm_head` weights;
- `trl_materialized`: `trl.experimental.gkd.GKDTrainer.generalized_jsd_loss` on full logits
  `student_hidden @ W_s.T` and `teacher_hidden @ W_t.T` (teacher under `no_grad`), labels -100 where masked;
- `trl_chunked`: `trl.trainer.distillation_trainer._chunked_divergence_loss`, what `trl.DistillationTrainer` uses.

`forward_kl` is TRL's `beta=0` (KL(teacher||student)), `jsd` is `beta=0.5`. Each case (method x objective x V)
runs in its own fresh process, `--repeats` times (interleaved across cases so load drift on a shared machine hits every
method alike), and the table reports medians with ratios ours/theirs and whether the project's targets are met.

Run from the repository root:

    .venv/bin/python benchmarks/loss_memory.py --quick --check        # smoke run + loss/gradient agreement, ~1.5 min
    .venv/bin/python benchmarks/loss_memory.py --check-only           # agreement with TRL only, ~10 s
    .venv/bin/python benchmarks/loss_memory.py --out runs/loss_memory.json   # N=2048, V=32000 and 151936: ~15 min
    .venv/bin/python benchmarks/loss_memory.py --vocab 151936 --methods ours --chunk-sizes default 128 512
    .venv/bin/python benchmarks/loss_memory.py --device cuda --dtype bf16    # on a GPU (not yet run on one)

How peak memory is measured (see benchmarks/README.md):

- CPU: peak resident set size of the case's process during ONE forward+backward, minus the resident size just before
  it. The baseline is taken after the inputs are built and after a tiny warm-up call (N=16, V=64) that absorbs lazy
  imports and library initialisation; the peak high-water mark is reset right before the call (`/proc/self/clear_refs`,
  value 5). The reported number is the FIRST full-size call in the process: later calls can reuse pages glibc kept
  from the first one, which sit in the baseline and make the growth look smaller than the memory the loss needs. The
  second (timed) call's growth is kept in the JSON as `peak_steady_bytes` for comparison.
- CUDA: `torch.cuda.max_memory_allocated()` minus `torch.cuda.memory_allocated()` before the call.
- Both include the fresh `.grad` of `student_hidden` and `student_weight` (gradients are set to `None` before every
  call, as `zero_grad(set_to_none=True)` does), which every method allocates alike.

Time is the wall clock of forward+backward for one call after the full-size warm-up (the memory call), median over
processes. On a shared CPU, time ratios within about +-30% are noise.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass


# GKDTrainer lives in trl.experimental, whose import warning is noise here
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT_MARKER = "@@LOSS_MEMORY_RESULT "
BETA = {"forward_kl": 0.0, "jsd": 0.5}  # TRL's generalized-JSD `beta` for each objective
TRL_METHODS = ("trl_materialized", "trl_chunked")
MASK_FRACTION = 0.75
QUICK = {"n": 256, "vocab": [1000, 5000], "hidden": 64, "repeats": 1}
DEFAULTS = {"n": 2048, "vocab": [32000, 151936], "hidden": 256, "repeats": 3}
# Targets the project must meet, checked for every `ours` variant
TARGET_MEM_VS_MATERIALIZED = 0.15
TARGET_MEM_VS_CHUNKED = 1.0
TARGET_TIME_VS_CHUNKED = 1.0
TIME_NOISE = 0.30


def trl_scale(method: str, temperature: float) -> float:
    """Factor that puts a method's loss on TRL's scale: ours returns `T^2 * D` (Hinton et al.), TRL returns `D`."""
    return 1.0 / temperature**2 if method == "ours" else 1.0


@dataclass(frozen=True)
class Case:
    method: str  # "ours", "trl_materialized" or "trl_chunked"
    objective: str  # "forward_kl" or "jsd"
    n: int
    vocab: int
    hidden: int
    device: str
    dtype: str
    temperature: float
    chunk_size: int | None = None  # ours only; None = the function's default
    seed: int = 0

    @property
    def label(self) -> str:
        if self.method != "ours":
            return self.method
        return "ours" if self.chunk_size is None else f"ours[chunk_size={self.chunk_size}]"


# ---------------------------------------------------------------------------------------------------------------------
# Inputs and the three loss paths (imported lazily: each case process imports only what its method needs)
# ---------------------------------------------------------------------------------------------------------------------


def _torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def build_inputs(n: int, vocab: int, hidden: int, device: str, dtype: str, seed: int = 0) -> dict:
    """Student/teacher hidden states `[N, H]` and `lm_head` weights `[V, H]`, and a bool mask `[N]` (75% True).

    Built in place without full-size temporaries so that the memory baseline holds the inputs and nothing else. Logits
    come out with a standard deviation of about 2, like a trained LM's. Gradients flow to the student tensors only.
    """
    import torch

    dt = _torch_dtype(dtype)
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*shape, std=1.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float32).mul_(std).to(device=device, dtype=dt)

    w_std = 2.0 / math.sqrt(hidden)
    student_hidden = randn(n, hidden).requires_grad_(True)
    student_weight = randn(vocab, hidden, std=w_std).requires_grad_(True)
    teacher_hidden = randn(n, hidden)
    teacher_weight = randn(vocab, hidden, std=w_std)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=gen)[: round(MASK_FRACTION * n)]] = True
    return {
        "student_hidden": student_hidden,
        "student_weight": student_weight,
        "teacher_hidden": teacher_hidden,
        "teacher_weight": teacher_weight,
        "mask": mask.to(device),
    }


def _ours_fingerprint() -> str:
    """Short hash of `trl_distill/losses/*.py`: the driver warns when the code under test changed during a run."""
    import hashlib

    folder = os.path.join(REPO_ROOT, "trl_distill", "losses")
    digest = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        if name.endswith(".py"):
            with open(os.path.join(folder, name), "rb") as f:
                digest.update(name.encode() + b"\0" + f.read())
    return digest.hexdigest()[:12]


def _import_ours():
    """Return `(linear_distillation_loss, where_it_came_from)`, from this checkout even when it is not installed."""
    if REPO_ROOT not in sys.path:
        sys.path.insert(0, REPO_ROOT)
    fingerprint = _ours_fingerprint()  # of the source as imported right below
    from trl_distill.losses import linear_distillation_loss

    return linear_distillation_loss, f"trl_distill.losses@{fingerprint}"


def make_loss_fn(case: Case):
    """Return `(fn, impl)`: `fn(inputs) -> scalar loss` for the case's method and objective, and its origin."""
    beta = BETA[case.objective]
    temperature = case.temperature

    if case.method == "ours":
        linear_distillation_loss, impl = _import_ours()

        def fn(x):
            s_h, s_w, t_h, t_w = x["student_hidden"], x["student_weight"], x["teacher_hidden"], x["teacher_weight"]
            return linear_distillation_loss(
                s_h,
                s_w,
                t_h,
                t_w,
                mask=x["mask"],
                objective=case.objective,
                temperature=temperature,
                reduction="mean",
                chunk_size=case.chunk_size,
            )

        return fn, impl

    if case.method == "trl_materialized":
        import torch
        from trl.experimental.gkd import GKDTrainer

        def fn(x):
            # What GKDTrainer does: full logits from both lm_heads, the teacher's without autograd
            student_logits = (x["student_hidden"] @ x["student_weight"].T).unsqueeze(0)
            with torch.no_grad():
                teacher_logits = (x["teacher_hidden"] @ x["teacher_weight"].T).unsqueeze(0)
            labels = torch.where(x["mask"], 0, -100).unsqueeze(0)
            return GKDTrainer.generalized_jsd_loss(
                student_logits, teacher_logits, labels=labels, beta=beta, temperature=temperature
            )

        return fn, "trl.experimental.gkd.GKDTrainer.generalized_jsd_loss"

    if case.method == "trl_chunked":
        from trl.trainer.distillation_trainer import _chunked_divergence_loss

        def fn(x):
            loss, _entropy_sum, _n_valid = _chunked_divergence_loss(
                x["student_hidden"].unsqueeze(0),
                x["teacher_hidden"].unsqueeze(0),
                x["student_weight"],
                x["teacher_weight"],
                x["mask"].unsqueeze(0),
                beta,
                temperature=temperature,
            )
            return loss

        return fn, "trl.trainer.distillation_trainer._chunked_divergence_loss"

    raise ValueError(f"`method` must be one of 'ours', {TRL_METHODS}, got {case.method!r}.")


# ---------------------------------------------------------------------------------------------------------------------
# Measuring one case in this process
# ---------------------------------------------------------------------------------------------------------------------


def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


class PeakMemory:
    """Peak memory growth during a block: the RSS high-water mark on CPU, the caching allocator's peak on CUDA."""

    def __init__(self, device: str):
        import torch

        self.torch = torch
        self.cuda = device.startswith("cuda")
        self.how = "torch.cuda.max_memory_allocated" if self.cuda else "VmHWM after clear_refs"
        if not self.cuda and not os.access("/proc/self/clear_refs", os.W_OK):
            # ru_maxrss cannot be reset, so it would hide everything below the inputs' own peak
            raise SystemExit("CPU peak memory needs Linux's /proc/self/clear_refs to reset the RSS high-water mark.")

    def start(self):
        gc.collect()
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()
            self.base = self.torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            self.base = _proc_status_kib("VmRSS") * 1024

    def peak(self) -> int:
        if self.cuda:
            self.torch.cuda.synchronize()
            return self.torch.cuda.max_memory_allocated() - self.base
        return _proc_status_kib("VmHWM") * 1024 - self.base


def _step(fn, inputs, sync) -> tuple[float, float]:
    """One forward+backward from cleared gradients; return `(seconds, loss value)`."""
    for key in ("student_hidden", "student_weight"):
        inputs[key].grad = None
    sync()
    t0 = time.perf_counter()
    loss = fn(inputs)
    loss.backward()
    sync()
    seconds = time.perf_counter() - t0
    return seconds, float(loss.detach())


def run_case(case: Case) -> dict:
    import torch

    sync = torch.cuda.synchronize if case.device.startswith("cuda") else (lambda: None)
    fn, impl = make_loss_fn(case)
    # Tiny call first: lazy imports, thread pools and kernel caches must not count as the loss's memory
    tiny = build_inputs(16, 64, 8, case.device, case.dtype, seed=case.seed + 1)
    _step(fn, tiny, sync)
    del tiny

    inputs = build_inputs(case.n, case.vocab, case.hidden, case.device, case.dtype, seed=case.seed)
    meter = PeakMemory(case.device)
    meter.start()
    baseline_rss = meter.base
    cold_seconds, loss = _step(fn, inputs, sync)
    peak_first = meter.peak()

    meter.start()
    seconds, _ = _step(fn, inputs, sync)  # timed call, after the full-size warm-up above
    peak_steady = meter.peak()
    grad_norm = float(inputs["student_hidden"].grad.float().norm())
    resolved_chunk_size = case.chunk_size
    if case.method == "ours":
        import trl_distill.losses as ours

        if resolved_chunk_size is None and hasattr(ours, "default_chunk_size"):
            resolved_chunk_size = ours.default_chunk_size(case.vocab)
    return {
        "case": asdict(case),
        "label": case.label,
        "impl": impl,
        "resolved_chunk_size": resolved_chunk_size,
        "loss": loss,
        "loss_trl_scale": loss * trl_scale(case.method, case.temperature),
        "student_hidden_grad_norm": grad_norm,
        "seconds": seconds,
        "cold_seconds": cold_seconds,
        "peak_bytes": peak_first,
        "peak_steady_bytes": peak_steady,
        "baseline_bytes": baseline_rss,
        "memory_measure": meter.how,
        "torch_threads": torch.get_num_threads(),
    }


# ---------------------------------------------------------------------------------------------------------------------
# Agreement check (--check): same inputs, loss values and gradients vs TRL's materialized path
# ---------------------------------------------------------------------------------------------------------------------


def check_agreement(args) -> bool:
    n, hidden = QUICK["n"], QUICK["hidden"]
    ok = True
    print(f"## Agreement check (N={n}, H={hidden}, {args.dtype}, T={args.temperature}), vs trl_materialized in fp32\n")
    print(
        "| objective | V | method | loss | loss abs diff | max abs diff grad hidden | max abs diff grad weight | ok |"
    )
    print("|---|---|---|---|---|---|---|---|")
    tol = 1e-4 if args.dtype == "fp32" else 2e-2
    for vocab in QUICK["vocab"]:
        for objective in args.objectives:
            results = {}
            variants = [("trl_materialized", None), *[("ours", cs) for cs in args.chunk_sizes], ("trl_chunked", None)]
            for method, cs in variants:
                # The reference runs in fp32 on the same (rounded) inputs: TRL's materialized softmax in bf16 is the
                # least accurate of the three and would not be a reference
                dtype = "fp32" if method == "trl_materialized" else args.dtype
                case = Case(method, objective, n, vocab, hidden, args.device, dtype, args.temperature, cs)
                fn, _ = make_loss_fn(case)
                x = build_inputs(n, vocab, hidden, args.device, args.dtype)
                if dtype != args.dtype:
                    x = {
                        k: v.detach().float().requires_grad_(v.requires_grad) if v.is_floating_point() else v
                        for k, v in x.items()
                    }
                loss = fn(x)
                loss.backward()
                k = trl_scale(method, args.temperature)
                results[case.label] = (
                    loss.detach().double() * k,
                    x["student_hidden"].grad.double() * k,
                    x["student_weight"].grad.double() * k,
                )
            ref_loss, ref_gh, ref_gw = results["trl_materialized"]
            scale = max(ref_gh.abs().max().item(), ref_gw.abs().max().item(), 1e-12)
            for label, (loss, gh, gw) in results.items():
                d_loss = (loss - ref_loss).abs().item()
                d_gh = (gh - ref_gh).abs().max().item()
                d_gw = (gw - ref_gw).abs().max().item()
                good = d_loss <= tol * max(1.0, ref_loss.abs().item()) and max(d_gh, d_gw) <= tol * scale
                ok &= good
                print(
                    f"| {objective} | {vocab} | {label} | {loss.item():.6f} | {d_loss:.2e} | {d_gh:.2e} | {d_gw:.2e} "
                    f"| {'yes' if good else 'NO'} |"
                )
    if args.temperature != 1.0:
        print("\nours is divided by T^2 here: it returns T^2 * D, TRL returns D.")
    print(f"\nTolerance: {tol:g}, relative to the loss and to the largest reference gradient entry of the case.")
    print("Agreement: OK\n" if ok else "Agreement: MISMATCH (the benchmark would compare different computations)\n")
    return ok


# ---------------------------------------------------------------------------------------------------------------------
# Driver: one fresh process per (case, repeat), then the table
# ---------------------------------------------------------------------------------------------------------------------


def _mem_available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def estimated_peak_bytes(case: Case) -> int:
    """Rough peak of a case (from peaks measured on our 2-core CPU machine), to skip cases that would exhaust RAM."""
    elem = 4 if case.dtype == "fp32" else 2
    nv = case.n * case.vocab
    if case.method == "trl_materialized":
        # measured on our 2-core CPU machine: ~9x one [N, V] tensor for forward KL, ~17x for JSD
        return (9 if case.objective == "forward_kl" else 17) * nv * elem + case.vocab * case.hidden * 4
    if case.method == "trl_chunked":
        tile = min(case.n, 4096) * min(case.vocab, 32768) * 4
        return 10 * tile + 2 * case.vocab * case.hidden * 4
    return 0  # ours: unknown by design; a failure is reported, not predicted


def run_in_subprocess(case: Case, timeout: float) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--case", json.dumps(asdict(case))]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT)
    except subprocess.TimeoutExpired:
        return {"label": case.label, "case": asdict(case), "error": f"timed out after {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER) :])
    why = f"killed by signal {-proc.returncode} (out of memory?)" if proc.returncode < 0 else f"exit {proc.returncode}"
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"label": case.label, "case": asdict(case), "error": why + ": " + " | ".join(tail)}


def build_cases(args) -> list[Case]:
    cases = []
    for vocab in args.vocab:
        for objective in args.objectives:
            common = dict(
                objective=objective,
                n=args.n,
                vocab=vocab,
                hidden=args.hidden,
                device=args.device,
                dtype=args.dtype,
                temperature=args.temperature,
            )
            if "ours" in args.methods:
                cases += [Case(method="ours", chunk_size=cs, **common) for cs in args.chunk_sizes]
            cases += [Case(method=m, **common) for m in args.methods if m != "ours"]
    return cases


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(runs: list[dict]) -> dict:
    """Group runs by (objective, vocab, label); medians of time and peak; errors kept."""
    groups: dict[tuple, dict] = {}
    for r in runs:
        c = r["case"]
        g = groups.setdefault((c["objective"], c["vocab"], r["label"]), {"runs": [], "errors": [], "skipped": None})
        if "skipped" in r:
            g["skipped"] = r["skipped"]
            g["estimated_peak_bytes"] = r.get("estimated_peak_bytes")
        elif "error" in r:
            g["errors"].append(r["error"])
        else:
            g["runs"].append(r)
    for g in groups.values():
        ok = g["runs"]
        g["seconds"] = _median([r["seconds"] for r in ok])
        g["peak_bytes"] = _median([r["peak_bytes"] for r in ok])
        g["peak_steady_bytes"] = _median([r["peak_steady_bytes"] for r in ok])
        g["loss"] = _median([r["loss_trl_scale"] for r in ok])
        g["impl"] = ok[0]["impl"] if ok else None
        g["resolved_chunk_size"] = sorted({r.get("resolved_chunk_size") or 0 for r in ok})
        times = [r["seconds"] for r in ok]
        g["time_spread"] = (max(times) - min(times)) / g["seconds"] if len(times) > 1 and g["seconds"] else None
    return groups


def _fmt_ratio(a, b) -> str:
    return f"{a / b:.2f}x" if a is not None and b else "n/a"


def _mib(b) -> str:
    return f"{b / 2**20:,.0f}" if b is not None else "n/a"


def print_table(args, groups: dict) -> list[dict]:
    """Print the markdown table and the target verdicts; return the verdicts."""
    print(
        f"## Loss forward+backward, N={args.n}, H={args.hidden}, {args.dtype}, {args.device}, "
        f"{int(MASK_FRACTION * 100)}% positions in the loss, T={args.temperature}, "
        f"medians of {args.repeats} process(es)\n"
    )
    print(
        "| objective | V | method | time (s) | time spread | peak (MiB) | time / materialized | peak / materialized "
        "| time / TRL chunked | peak / TRL chunked | loss |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    verdicts = []
    keys = sorted({(o, v) for (o, v, _l) in groups}, key=lambda k: (k[1], args.objectives.index(k[0])))
    for objective, vocab in keys:
        labels = [l for (o, v, l) in groups if (o, v) == (objective, vocab)]
        mat = groups.get((objective, vocab, "trl_materialized"), {})
        chk = groups.get((objective, vocab, "trl_chunked"), {})
        for label in labels:
            g = groups[(objective, vocab, label)]
            if g["skipped"] or not g["runs"]:
                why = g["skipped"] or "; ".join(sorted(set(g["errors"])))
                print(f"| {objective} | {vocab} | {label} | {why} | | | | | | | |")
                continue
            spread = f"{100 * g['time_spread']:.0f}%" if g["time_spread"] is not None else "-"
            shown = label
            if label == "ours" and g["resolved_chunk_size"] and g["resolved_chunk_size"] != [0]:
                shown = f"ours (default chunk_size={'/'.join(map(str, g['resolved_chunk_size']))})"
            ratios = " | ".join(
                _fmt_ratio(g[key], ref.get(key)) for ref in (mat, chk) for key in ("seconds", "peak_bytes")
            )
            print(
                f"| {objective} | {vocab} | {shown} | {g['seconds']:.3f} | {spread} | {_mib(g['peak_bytes'])} "
                f"| {ratios} | {g['loss']:.5f} |"
            )
            if label.startswith("ours"):
                verdicts.append(_verdict(objective, vocab, shown, g, mat, chk))
    losses_agree(groups, keys)
    print(
        f"\n### Targets (MET / NOT MET; time ratios within +-{int(TIME_NOISE * 100)}% of a target are noise on a "
        "shared machine)\n"
    )
    print(
        f"| objective | V | method | peak / materialized <= {TARGET_MEM_VS_MATERIALIZED:g}x "
        f"| peak / TRL chunked <= {TARGET_MEM_VS_CHUNKED:g}x | time / TRL chunked <= {TARGET_TIME_VS_CHUNKED:g}x |"
    )
    print("|---|---|---|---|---|---|")
    for v in verdicts:
        cells = " | ".join(v[name] for name in ("peak_vs_materialized", "peak_vs_chunked", "time_vs_chunked"))
        print(f"| {v['objective']} | {v['vocab']} | {v['label']} | {cells} |")
    return verdicts


def _verdict(objective, vocab, label, g, mat, chk) -> dict:
    """One row of the targets table: each ratio with MET / NOT MET (n/a when the reference is missing)."""

    def cell(value, reference, target, note=""):
        if value is None or not reference:
            return "n/a"
        ratio = value / reference
        return f"{ratio:.3f}x {'MET' if ratio <= target else 'NOT MET'}{note}"

    mat_peak, note = mat.get("peak_bytes"), ""
    if mat_peak is None and mat.get("estimated_peak_bytes"):
        # The materialized case was skipped to spare the machine's RAM: compare with its estimate, and say so
        mat_peak, note = mat["estimated_peak_bytes"], " (vs ESTIMATE, case skipped)"
    return {
        "objective": objective,
        "vocab": vocab,
        "label": label,
        "peak_vs_materialized": cell(g["peak_bytes"], mat_peak, TARGET_MEM_VS_MATERIALIZED, note),
        "peak_vs_chunked": cell(g["peak_bytes"], chk.get("peak_bytes"), TARGET_MEM_VS_CHUNKED),
        "time_vs_chunked": cell(g["seconds"], chk.get("seconds"), TARGET_TIME_VS_CHUNKED),
    }


def losses_agree(groups, keys):
    """The methods run on the same seeded inputs, so their losses must agree: a cheap guard on every full-size case."""
    worst = 0.0
    for objective, vocab in keys:
        values = [g["loss"] for (o, v, _), g in groups.items() if (o, v) == (objective, vocab)]
        values = [x for x in values if x is not None]
        if len(values) > 1:
            worst = max(worst, (max(values) - min(values)) / max(abs(statistics.median(values)), 1e-12))
    print(f"\nLoss values across methods on the same inputs: largest relative difference {worst:.2e}", end="")
    print(" (OK)" if worst < 1e-3 else " (CHECK: the methods may not compute the same thing)")


def environment(args) -> dict:
    import torch
    import trl

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "trl": trl.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "mem_available_bytes": _mem_available_bytes(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    if args.device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(args.device)
    return env


def _chunk_size(text: str) -> int | None:
    if text == "default":
        return None
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"`--chunk-sizes` takes 'default' or positive integers, got {text!r}")
    return int(text)


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=None, help=f"positions N (default {DEFAULTS['n']}, quick {QUICK['n']})")
    p.add_argument(
        "--vocab", type=int, nargs="+", default=None, help=f"vocabulary sizes (default {DEFAULTS['vocab']})"
    )
    p.add_argument("--hidden", type=int, default=None, help=f"hidden size H (default {DEFAULTS['hidden']})")
    p.add_argument("--repeats", type=int, default=None, help="fresh processes per case, medians reported (default 3)")
    p.add_argument("--objectives", nargs="+", default=list(BETA), choices=list(BETA))
    p.add_argument("--methods", nargs="+", default=["ours", *TRL_METHODS], choices=["ours", *TRL_METHODS])
    p.add_argument(
        "--chunk-sizes",
        nargs="+",
        type=_chunk_size,
        default=[None],
        help="`chunk_size` values for ours, each its own row: 'default' (the function's own choice) or integers",
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--quick", action="store_true", help="small N, V, H and one repeat: a smoke run")
    p.add_argument("--check", action="store_true", help="first compare losses and gradients with TRL's (small sizes)")
    p.add_argument("--check-only", action="store_true", help="run the agreement check and stop")
    p.add_argument("--out", default=None, help="write raw results and the environment to this JSON file")
    p.add_argument("--no-memory-guard", action="store_true", help="run cases estimated to exceed MemAvailable")
    p.add_argument("--case-timeout", type=float, default=1800.0, help="seconds per case process")
    p.add_argument("--case", default=None, help=argparse.SUPPRESS)  # internal: run one case, print its JSON
    return p


def _resolve(args):
    preset = QUICK if args.quick else DEFAULTS
    for key in ("n", "vocab", "hidden", "repeats"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def run_all(args, cases: list[Case]) -> list[dict]:
    """Every case `--repeats` times, each in a fresh process; interleaved (every case once per round) so that load
    from other users of the machine spreads over all methods."""
    runs, total, t_start = [], len(cases) * args.repeats, time.time()
    for _round in range(args.repeats):
        for case in cases:
            available, need = _mem_available_bytes(), estimated_peak_bytes(case)
            if not args.no_memory_guard and available is not None and need > 0.85 * available:
                why = f"skipped: needs ~{need / 2**30:.1f} GiB, {available / 2**30:.1f} GiB available"
                r = {"label": case.label, "case": asdict(case), "skipped": why, "estimated_peak_bytes": need}
            else:
                r = run_in_subprocess(case, args.case_timeout)
            runs.append(r)
            status = r.get("skipped") or r.get("error")
            status = status or f"{r['seconds']:.3f} s, {r['peak_bytes'] / 2**20:,.0f} MiB, {r['impl']}"
            elapsed = time.time() - t_start
            print(
                f"[{len(runs)}/{total}, {elapsed:.0f} s] {case.label} {case.objective} V={case.vocab}: {status}",
                file=sys.stderr,
                flush=True,
            )
    return runs


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    if args.case is not None:
        result = run_case(Case(**json.loads(args.case)))
        print(RESULT_MARKER + json.dumps(result), flush=True)
        return 0

    args = _resolve(args)
    env = environment(args)
    print(f"Environment: {json.dumps(env)}\n")
    if (args.check or args.check_only) and not check_agreement(args):
        return 1
    if args.check_only:
        return 0

    runs = run_all(args, build_cases(args))
    groups = summarize(runs)
    fingerprints = sorted({r["impl"] for r in runs if r.get("impl", "").startswith("trl_distill")})
    if len(fingerprints) > 1:
        changed = ", ".join(fingerprints)
        print(f"**WARNING: trl_distill.losses changed during the run ({changed}); rerun for clean numbers.**\n")
    if args.quick:
        print("**Smoke run (`--quick`): at these sizes the process's own overhead dominates; ignore the targets.**\n")
    verdicts = print_table(args, groups)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "environment": env, "runs": runs, "verdicts": verdicts}, f, indent=1)
        print(f"\nRaw results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
