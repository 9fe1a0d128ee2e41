"""What every benchmark script shares: one child process per case, medians, the environment, a markdown table.

Not a test and not part of the package. A script imports it as

    try:
        from . import harness  # imported as benchmarks.<script> (e.g. from a test)
    except ImportError:
        import harness  # run as `python benchmarks/<script>.py`

and uses:

- `add_common_args(parser)`: the flags every script takes (`--quick`, `--seed`, `--out`);
- `run_child(script, payload)`: runs `python script --case JSON` in a fresh process and returns the dict the child
  printed with `emit_result` (or `{"error": ...}`): one case's memory and lazy imports never leak into another's;
- `median`, `spread`: the statistics quoted in the tables (medians; spread = (max - min) / median);
- `PeakMemory`: peak resident memory growth of a block (CPU: `VmHWM` after `/proc/self/clear_refs`; CUDA: the caching
  allocator's peak);
- `environment()`: versions, threads, cores, load average, memory, recorded with every result file;
- `markdown_table(headers, rows)` and `write_json(path, obj)`.

On a shared machine time ratios within about +-30% are noise: run cases one after the other, repeat, quote medians.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Iterable, Sequence


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT_MARKER = "@@BENCH_RESULT "
TIME_NOISE = 0.30  # time ratios within +-30% are noise on a shared machine


# ------------------------------------------------------------------------------------------------------------- flags
def add_common_args(parser: argparse.ArgumentParser, *, seed: int = 0, out: str | None = None) -> None:
    """Add the flags every benchmark script takes: `--quick`, `--seed`, `--out` (and the internal `--case`)."""
    parser.add_argument("--quick", action="store_true", help="smoke-run budget (seconds to a few minutes)")
    parser.add_argument("--seed", type=int, default=seed, help=f"random seed of data, models and training ({seed})")
    parser.add_argument("--out", default=out, help=f"write raw results and the environment as JSON here ({out})")
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)  # internal: run one case, print its JSON


# ----------------------------------------------------------------------------------------------------- child process
def emit_result(result: dict) -> None:
    """Print a case's result for `run_child` (the child side)."""
    print(RESULT_MARKER + json.dumps(result), flush=True)


def run_child(
    script: str, payload: dict, *, timeout: float = 3600.0, env: dict | None = None, echo_stderr: bool = False
) -> dict:
    """Run `python script --case JSON(payload)` in a fresh process; return the dict it emitted, or `{"error": ...}`.

    `env` entries are added to this process's environment (e.g. `{"OMP_NUM_THREADS": "2"}`); the repository root is put
    on `PYTHONPATH` so the child imports this checkout's `trl_distill`.
    """
    child_env = dict(os.environ)
    child_env["PYTHONPATH"] = REPO_ROOT + os.pathsep + child_env.get("PYTHONPATH", "")
    child_env.update({k: str(v) for k, v in (env or {}).items()})
    cmd = [sys.executable, os.path.abspath(script), "--case", json.dumps(payload)]
    try:
        proc = subprocess.run(
            cmd,
            stdout=subprocess.PIPE,
            stderr=None if echo_stderr else subprocess.PIPE,
            text=True,
            timeout=timeout,
            cwd=REPO_ROOT,
            env=child_env,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER) :])
    why = f"killed by signal {-proc.returncode} (out of memory?)" if proc.returncode < 0 else f"exit {proc.returncode}"
    tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-3:]
    return {"error": why + ": " + " | ".join(tail)}


# --------------------------------------------------------------------------------------------------------- statistics
def median(values: Iterable[float | None]) -> float | None:
    """Median of the values that are not `None` (`None` when there are none)."""
    kept = [v for v in values if v is not None]
    return statistics.median(kept) if kept else None


def spread(values: Sequence[float]) -> float | None:
    """(max - min) / median: how far apart the repeats were (`None` for fewer than two)."""
    kept = [v for v in values if v is not None]
    if len(kept) < 2 or not statistics.median(kept):
        return None
    return (max(kept) - min(kept)) / statistics.median(kept)


# ------------------------------------------------------------------------------------------------------------ memory
def proc_status_kib(key: str) -> int:
    """A field of `/proc/self/status` in KiB (e.g. `VmRSS`, `VmHWM`)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def mem_available_bytes() -> int | None:
    """`MemAvailable` from `/proc/meminfo`, or `None` where there is none."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak memory growth during a block: the RSS high-water mark on CPU, the caching allocator's peak on CUDA.

    `start()` resets the mark (CPU: writes 5 to `/proc/self/clear_refs`, so `VmHWM` restarts at the current RSS) and
    records the baseline; `peak()` returns the growth since then in bytes; `rss_peak()` the absolute high-water mark.
    """

    def __init__(self, device: str = "cpu"):
        import torch

        self.torch = torch
        self.cuda = device.startswith("cuda")
        self.how = "torch.cuda.max_memory_allocated" if self.cuda else "VmHWM after clear_refs"
        if not self.cuda and not os.access("/proc/self/clear_refs", os.W_OK):
            # ru_maxrss cannot be reset, so it would hide everything below the inputs' own peak
            raise SystemExit("CPU peak memory needs Linux's /proc/self/clear_refs to reset the RSS high-water mark.")
        self.base = 0

    def start(self) -> None:
        gc.collect()
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()
            self.base = self.torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.base = proc_status_kib("VmRSS") * 1024

    def peak(self) -> int:
        if self.cuda:
            self.torch.cuda.synchronize()
            return self.torch.cuda.max_memory_allocated() - self.base
        return proc_status_kib("VmHWM") * 1024 - self.base

    def rss_peak(self) -> int:
        if self.cuda:
            return self.torch.cuda.max_memory_allocated()
        return proc_status_kib("VmHWM") * 1024


# ------------------------------------------------------------------------------------------------------- environment
def environment(device: str = "cpu") -> dict:
    """Versions, threads, cores, load and memory: written beside every result."""
    import torch

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "mem_available_bytes": mem_available_bytes(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    for name in ("trl", "transformers"):
        try:
            env[name] = __import__(name).__version__
        except ImportError:
            env[name] = None
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


# ----------------------------------------------------------------------------------------------------------- output
def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A markdown table; cells are written with `str` (format numbers before)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: str | None, obj: dict) -> None:
    """Write `obj` as JSON to `path` (directories created); nothing when `path` is `None`."""
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
    print(f"\nRaw results: {path}")
