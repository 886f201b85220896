"""Shared by the benchmarks: name the machine, and write a result record under experiments/results/."""

from __future__ import annotations

import json
import os
import platform

import jax

RESULTS_DIR = os.path.join(os.path.dirname(__file__), "results")


def machine() -> str:
    """e.g. ``"x86_64, 2 cores, cpu"`` (the JAX device kind names the accelerator when there is one)."""
    return f"{platform.machine()}, {os.cpu_count()} cores, {jax.devices()[0].device_kind}"


def write_result(record: dict, default_name: str, out: str = "") -> str:
    """Write ``record`` as JSON to ``out``, or to ``experiments/results/<default_name>``; returns the path."""
    path = out or os.path.join(RESULTS_DIR, default_name)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
    print("wrote", path)
    return path
