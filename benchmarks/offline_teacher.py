"""Offline teacher store (issue 6): bytes per position, loss error, and training speed from the store vs online.

On demand, never a test. Three tables:

1. Bytes per response position for k = 16, 64, 256: our encoding (measured from stores written on the demo data,
   files included) against fp32/bf16 full logits and a plain (int32 id, fp32 log-prob) top-k.
2. Relative error of the loss from the encoded store vs the online `kd_top_k=k` loss, at V = 1000 and V = 151936.
3. Training steps per second on the demo's data and student (hidden 64, 2 layers), online with a live teacher about
   4x the student vs from the store of that teacher; each case in its own process, repeated, medians.

    .venv/bin/python benchmarks/offline_teacher.py                  # ~5 min on 2 shared cores
    .venv/bin/python benchmarks/offline_teacher.py --quick          # seconds: a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch


STUDENT = dict(hidden_size=64, num_layers=2, num_heads=4)  # the demo's student
TEACHER = dict(hidden_size=128, num_layers=3, num_heads=4)  # 4.1x its parameters
TOP_KS = (16, 64, 256)


def _setup(n_rows: int):
    from trl_distill.demo.task import make_task_dataset, task_corpus
    from trl_distill.demo.tiny import build_tiny_model, build_tokenizer

    tokenizer = build_tokenizer(task_corpus(0), vocab_size=1000)
    dataset = make_task_dataset(n_rows, seed=0, split="train")
    teacher = build_tiny_model(tokenizer, seed=2, **TEACHER)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(8.0)  # a peaked teacher, like a trained one
    return tokenizer, dataset, teacher


def _args(output_dir: str, steps: int, **kwargs):
    from trl_distill import DistillConfig

    return DistillConfig(
        output_dir=output_dir,
        use_cpu=True,
        bf16=False,
        activation_checkpointing=False,
        max_steps=steps,
        per_device_train_batch_size=32,
        learning_rate=2e-3,
        max_length=64,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        logging_steps=max(steps, 1),
        kd_temperature=2.0,
        seed=0,
        dataloader_num_workers=0,
        **kwargs,
    )


def write_store(directory: str, top_k: int, n_rows: int) -> dict:
    from trl_distill import cache_teacher

    tokenizer, dataset, teacher = _setup(n_rows)
    start = time.perf_counter()
    manifest = cache_teacher(
        teacher,
        dataset,
        args=_args(directory, 1, teacher_cache=directory, kd_top_k=top_k),
        processing_class=tokenizer,
        batch_size=64,
        progress=False,
    )
    seconds = time.perf_counter() - start
    positions = manifest["splits"]["train"]["positions"]
    return {"seconds": seconds, "positions": positions, "file_bytes": manifest["total_bytes"], "rows": n_rows}


def bytes_table(stores: dict[int, dict]) -> None:
    print("\n## Bytes per response position\n")
    print("| storage | k | bytes/position | at V=151936 vs fp32 logits |")
    print("|---|---|---|---|")
    fp32 = 4 * 151936
    print(f"| fp32 logits, V=151936 | all | {fp32:,} | 1x |")
    print(f"| bf16 logits, V=151936 | all | {2 * 151936:,} | {2 * 151936 / fp32:.3f}x |")
    for k in TOP_KS:
        plain = 8 * k + 4
        ours = 4 * (k + 1)
        measured = stores[k]["file_bytes"] / stores[k]["positions"]
        print(f"| top-k as int32 id + fp32 log-prob + fp32 bucket | {k} | {plain:,} | {plain / fp32:.5f}x |")
        print(f"| ours: 32-bit id+log-prob words + 32-bit bucket/scale | {k} | {ours:,} | {ours / fp32:.5f}x |")
        per_row = stores[k]["positions"] / stores[k]["rows"]
        label = f"ours, whole shard files (keys, offsets, headers; demo rows ~{per_row:.1f} positions)"
        print(f"| {label} | {k} | {measured:,.1f} | {measured / fp32:.5f}x |")
    print(
        "\nDistillKit's figure of ~300 bytes/position at k=128 is quoted from issue 6, not measured here; at k=128 ours "
        f"is {4 * 129} bytes."
    )


def error_table(n_positions: int) -> None:
    from trl_distill.losses import linear_distillation_loss, linear_top_k_distillation_loss, teacher_top_k_targets
    from trl_distill.teachers import codec

    print(f"\n## Relative loss error, store vs online top-k ({n_positions} positions, T=2, peaked random logits)\n")
    print("| V | k | id bits | log-prob bits | forward_kl | reverse_kl | jsd |")
    print("|---|---|---|---|---|---|---|")
    for V in (1000, 151936):
        g = torch.Generator().manual_seed(0)
        H = 32
        w_t = torch.randn(V, H, generator=g) * 6 / H**0.5
        h_t = torch.randn(n_positions, H, generator=g)
        h_s, w_s = h_t + 0.5 * torch.randn(n_positions, H, generator=g), w_t + 0.5 * torch.randn(V, H, generator=g)
        for k in TOP_KS:
            stored = codec.decode(codec.encode(teacher_top_k_targets(h_t, w_t, top_k=k, temperature=2.0), V), V)
            errors = []
            for objective in ("forward_kl", "reverse_kl", "jsd"):
                online = linear_distillation_loss(h_s, w_s, h_t, w_t, top_k=k, temperature=2.0, objective=objective)
                offline = linear_top_k_distillation_loss(h_s, w_s, *stored, temperature=2.0, objective=objective)
                errors.append(f"{abs(float(offline / online) - 1):.1e}")
            print(f"| {V} | {k} | {codec.id_bits(V)} | {codec.log_prob_bits(V)} | {' | '.join(errors)} |")


def time_training(mode: str, store: str, steps: int, n_rows: int) -> float:
    """One process: build the trainer, train `steps` steps, return steps per second (after one warm-up step)."""
    from trl_distill import DistillTrainer
    from trl_distill.demo.tiny import build_tiny_model

    torch.set_num_threads(1)
    tokenizer, dataset, teacher = _setup(n_rows)
    student = build_tiny_model(tokenizer, seed=1, **STUDENT)
    with tempfile.TemporaryDirectory() as out:
        if mode == "online":
            args = _args(out, steps + 1, kd_top_k=64)
            trainer = DistillTrainer(
                model=student, teacher_model=teacher, args=args, train_dataset=dataset, processing_class=tokenizer
            )
        else:
            del teacher
            args = _args(out, steps + 1, kd_top_k=64, teacher_cache=store)
            trainer = DistillTrainer(model=student, args=args, train_dataset=dataset, processing_class=tokenizer)
        times = []

        from transformers import TrainerCallback

        class Clock(TrainerCallback):
            def on_step_begin(self, *a, **k):
                times.append(time.perf_counter())

            def on_train_end(self, *a, **k):
                times.append(time.perf_counter())

        trainer.add_callback(Clock())
        trainer.train()
    return steps / (times[-1] - times[1])  # from the start of step 2 to the end: the first step is a warm-up


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Tiny sizes, one repeat: a smoke run.")
    parser.add_argument("--repeats", type=int, default=3, help="Processes per training case (interleaved).")
    parser.add_argument("--steps", type=int, default=30, help="Timed training steps per process.")
    parser.add_argument("--time-case", nargs=3, metavar=("MODE", "STORE", "ROWS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.time_case:
        mode, store, rows = args.time_case
        print(json.dumps({"steps_per_s": time_training(mode, store, args.steps, int(rows))}))
        return 0

    from trl_distill.demo.runner import quiet_progress

    torch.set_num_threads(1)  # as in the timed processes and the demo: the machine is shared
    repeats, steps = (1, 3) if args.quick else (args.repeats, args.steps)
    n_rows = 32 * (steps + 1)
    work = tempfile.mkdtemp(prefix="offline_teacher_")
    with quiet_progress(False):
        write_store(os.path.join(work, "warm-up"), 16, 8)  # imports and first calls, kept out of the write time
        stores = {k: write_store(os.path.join(work, f"k{k}"), k, n_rows) for k in TOP_KS}
        tokenizer, _, teacher = _setup(8)
        from trl_distill.demo.tiny import build_tiny_model

        ratio = _count(teacher) / _count(build_tiny_model(tokenizer, seed=1, **STUDENT))
    bytes_table(stores)
    error_table(64 if args.quick else 512)

    results = {"online": [], "store": []}
    for _ in range(repeats):
        for mode in results:
            store = os.path.join(work, "k64")
            command = [sys.executable, __file__, "--steps", str(steps), "--time-case", mode, store, str(n_rows)]
            line = subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            results[mode].append(json.loads(line)["steps_per_s"])
    online, offline = statistics.median(results["online"]), statistics.median(results["store"])
    print(
        f"\n## Training speed, demo student ({STUDENT['hidden_size']}x{STUDENT['num_layers']}) with a teacher of "
        f"{ratio:.1f}x its parameters ({TEACHER['hidden_size']}x{TEACHER['num_layers']}), k=64, batch 32, "
        f"{steps} steps, {repeats} processes each, 1 thread\n"
    )
    print("| teacher | steps/s (median) | runs | speed-up |")
    print("|---|---|---|---|")
    print(f"| online (live teacher) | {online:.2f} | {', '.join(f'{v:.2f}' for v in results['online'])} | 1.00x |")
    print(
        f"| from the store | {offline:.2f} | {', '.join(f'{v:.2f}' for v in results['store'])} | {offline / online:.2f}x |"
    )
    cache = stores[64]
    print(
        f"\nWriting the k=64 store: {cache['seconds']:.1f} s for {cache['rows']} rows ({cache['positions']} positions), "
        "a one-off cost shared by every later run on the same data."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
