"""Shared by the benchmarks: name the machine, and write a result record under experiments/results/."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from collections.abc import Callable

import jax

RESULTS_DIR = os.path.join(os.path.dirname(__file__), "results")

# Per device: (device kind contains, lower case; dense bf16 TFLOP/s; HBM TB/s), docs/performance.md's limits.
# The first match wins ("v5 lite" is how JAX names a v5e).
PEAKS = (
    ("h100", 989.0, 3.35),
    ("h200", 989.0, 4.8),
    ("v5 lite", 197.0, 0.819),
    ("v5e", 197.0, 0.819),
    ("v5p", 459.0, 2.77),
    ("tpu v5", 459.0, 2.77),
    ("v6", 918.0, 1.64),
)


def table_peaks(device_kind: str) -> tuple[str, float, float] | None:
    """``(matched key, TFLOP/s, TB/s)`` of one device of ``device_kind`` from :data:`PEAKS`, or None."""
    for key, tflops, tbs in PEAKS:
        if key in device_kind.lower():
            return key, tflops, tbs
    return None


def machine() -> str:
    """e.g. ``"x86_64, 2 cores, cpu"`` (the JAX device kind names the accelerator when there is one)."""
    return f"{platform.machine()}, {os.cpu_count()} cores, {jax.devices()[0].device_kind}"


def git_commit() -> str:
    """HEAD's short hash, marked when the library's sources (``llama32_jax/``) differ from it: the measured code."""

    def run(*args: str) -> str:
        cwd = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=cwd).stdout.strip()

    try:
        head, dirty = run("rev-parse", "--short", "HEAD"), run("status", "--porcelain", "--", "llama32_jax")
    except OSError:
        return "unknown"
    return head + (" (llama32_jax/ modified)" if dirty else "")


def best_time(fn: Callable[[], object], repeats: int) -> float:
    """The shortest of ``repeats`` wall-clock timings of ``fn()``, in seconds."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def write_result(record: dict, default_name: str, out: str = "") -> str:
    """Write ``record`` as JSON to ``out``, or to ``experiments/results/<default_name>``; returns the path."""
    path = out or os.path.join(RESULTS_DIR, default_name)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
    print("wrote", path)
    return path
