"""What the receipt and the held-out callback cost: hashing a teacher's weights, hashing and verifying an artifact,
and one held-out measurement, for a few model sizes (CPU, fp32, one process, medians of `--repeats`).

```bash
.venv/bin/python benchmarks/receipt_overhead.py 2>/dev/null           # the README table, ~3 min
.venv/bin/python benchmarks/receipt_overhead.py --sizes 256x4 --rows 64 --repeats 5
```
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["128x2", "512x4", "1024x8"], help="teacher HIDDENxLAYERS")
    parser.add_argument("--rows", type=int, default=32, help="held-out rows measured")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch

    from trl_distill.demo.task import make_task_dataset, task_corpus
    from trl_distill.demo.tiny import build_tiny_model, build_tokenizer, save_pretrained_pair
    from trl_distill.digests import weights_sha256
    from trl_distill.evaluation import heldout_metrics
    from trl_distill.receipt import hash_artifacts, new_receipt, write_receipt
    from trl_distill.verify import verify_artifact

    torch.set_num_threads(args.threads)
    tokenizer = build_tokenizer(task_corpus(seed=0, n=1500), vocab_size=1000)
    rows = make_task_dataset(args.rows, seed=0, split="test")
    student = build_tiny_model(tokenizer, hidden_size=64, num_layers=2, num_heads=4, seed=1)
    header = (
        "| teacher (hidden x layers) | weights MiB | teacher sha256 s | artifact sha256 s | verify s "
        f"| held-out measurement s ({args.rows} rows) |"
    )
    print(header + "\n" + "|---" * 6 + "|")
    for size in args.sizes:
        hidden, layers = map(int, size.split("x"))
        teacher = build_tiny_model(tokenizer, hidden_size=hidden, num_layers=layers, num_heads=4, seed=2)
        mib = sum(t.numel() * t.element_size() for t in teacher.state_dict().values()) / 2**20
        with tempfile.TemporaryDirectory() as out:
            save_pretrained_pair(teacher, tokenizer, out)  # the artifact: the teacher-sized model's files
            write_receipt(out, new_receipt(out, [{"name": "bench", "method": "none"}]))
            cells = [
                _median_seconds(lambda: weights_sha256(teacher), args.repeats),
                _median_seconds(lambda: hash_artifacts(out), args.repeats),
                _median_seconds(lambda: verify_artifact(out), args.repeats),
                _median_seconds(lambda: heldout_metrics(student, teacher, tokenizer, rows), args.repeats),
            ]
        print(f"| {hidden} x {layers} | {mib:,.1f} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
    print(f"\nCPU threads: {args.threads}; {os.cpu_count()} cores on this machine; medians of {args.repeats} runs.")


if __name__ == "__main__":
    main()
