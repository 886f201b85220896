"""bench_kernels' measuring machinery: the sweep's :class:`Config`, random inputs in either K/V layout, timing,
the ``--max_seconds`` budget, and :class:`Bench`, which runs every implementation on one shape, checks it against
our XLA reference and prints the section's table (``experiments/bench_kernels.py`` describes the conventions)."""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
import time
import traceback
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

_SAMPLE_S = 5e-3  # a timed sample lasts about this long (several back-to-back calls for fast kernels)
_MAX_INNER = 50


@dataclasses.dataclass
class Config:
    """The effective sweep: the flags, or the smoke shapes under ``--smoke``."""

    sections: list[str]
    impls: list[str]
    dtype: str
    seq_lens: list[int]
    head_dims: list[int]
    tokens: int
    model_dim: int
    gqa: list[int]
    causal: bool
    bwd_seq_lens: list[int]
    decode_lens: list[int]
    decode_batches: list[int]
    decode_models: list[str]
    decode_fills: list[str]
    cross_text: list[int]
    cross_images: list[int]
    cross_batches: list[int]
    tokens_per_tile: int
    tiles: int
    repeats: int
    block_q: int | None
    block_k: int | None
    num_splits: int | None


_HOST_RANDOM_MAX = 1 << 24  # up to this many elements in all, inputs are drawn by numpy (no compile per shape)


def _device_normals(seed: int, shapes: tuple, dtype: str, perms: tuple) -> tuple:
    """Standard normals generated on the device in ``dtype`` (no fp32 copy of a large cache), transposed in the
    same program (no second copy); XLA's RngBitGenerator compiles in a fraction of threefry's time."""
    key, out = jax.random.key(seed, impl="rbg"), []
    for i, (shape, perm) in enumerate(zip(shapes, perms, strict=True)):
        x = jax.random.normal(jax.random.fold_in(key, i), shape, jnp.dtype(dtype))
        out.append(x if perm is None else x.transpose(perm))
    return tuple(out)


_device_normals = jax.jit(_device_normals, static_argnums=(0, 1, 2, 3))
BSNH = (0, 2, 1, 3)  # [B, K, S, H] <-> [B, S, K, H]


def random_normals(seed: int, shapes: tuple, dtype: str, perms: tuple) -> tuple:
    """Arrays of ``shapes`` with standard normal values fixed by ``seed``, the i-th transposed by ``perms[i]`` if not
    None (the same values in either K/V layout)."""
    if sum(math.prod(shape) for shape in shapes) > _HOST_RANDOM_MAX:
        return _device_normals(seed, shapes, dtype, perms)
    rng = np.random.default_rng(seed)
    arrays = [rng.standard_normal(shape, np.float32).astype(jnp.dtype(dtype)) for shape in shapes]
    return tuple(jnp.asarray(x if perm is None else x.transpose(perm)) for x, perm in zip(arrays, perms, strict=True))


def _max_abs_err(out: tuple, ref: tuple, rows: np.ndarray | None = None) -> float:
    """Max abs difference (on the host, fp32; no compile per shape) over the arrays of ``out`` and ``ref``; with
    ``rows [B, T]``, of the first arrays ``[B, T, N, H]`` over the query rows where ``rows`` is True only."""
    if rows is not None:
        err = np.abs(np.asarray(out[0], np.float32) - np.asarray(ref[0], np.float32))
        return float(np.where(rows[:, :, None, None], err, 0.0).max())
    return max(
        float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())
        for a, b in zip(out, ref, strict=True)
    )


def as_tuple(x) -> tuple:
    return tuple(x) if isinstance(x, tuple | list) else (x,)


def error_text(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip().replace("\n", " ")
    return text[:400] + (" ..." if len(text) > 400 else "")


def time_call(fn: Callable, args: tuple, repeats: int) -> tuple[object, float, float, int]:
    """(first output, compile + first call s, median s per call, calls per sample) of jitted ``fn(*args)``."""
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))  # warm-up
    warm = time.perf_counter() - t0
    inner = max(1, min(_MAX_INNER, int(_SAMPLE_S / max(warm, 1e-7))))
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            last = fn(*args)
        jax.block_until_ready(last)
        samples.append((time.perf_counter() - t0) / inner)
        del last
    return out, compile_s, statistics.median(samples), inner


@dataclasses.dataclass
class Impl:
    """One implementation of a section: ``fn(*args)`` jitted, on inputs in ``layout``; ``post`` maps its output to
    the reference's layout (a tuple of arrays) for the check; ``error`` set = cannot run here (a row says why)."""

    name: str
    fn: Callable | None
    layout: str = "cache"  # "cache": K/V [B, K, S, H]; "bsnh": [B, S, K, H]
    post: Callable = as_tuple
    detail: str = ""
    error: str = ""


class Inputs:
    """A shape's inputs, made on demand for one layout at a time (the other's arrays are dropped first, so a large
    cache is never held twice)."""

    def __init__(self, make: dict[str, Callable[[], tuple]]):
        self.make, self.layout, self.args = make, None, None

    def get(self, layout: str) -> tuple:
        if layout != self.layout:
            self.args = None
            self.args, self.layout = self.make[layout](), layout
        return self.args

    def drop(self):
        self.args = self.layout = None


class Budget:
    """Deadlines from ``--max_seconds``: each section gets its share of the time left by ``weights``, and its first
    shape runs even when an earlier section overran that share (only the overall limit stops it)."""

    def __init__(self, seconds: float, weights: dict[str, float]):
        self.end = time.perf_counter() + seconds if seconds > 0 else None
        self.section_end, self.started, self.weights = None, 0, weights

    def start_section(self, name: str, remaining: list[str]):
        self.started = 0
        if self.end is not None:
            left = max(self.end - time.perf_counter(), 0.0)
            share = self.weights[name] / sum(self.weights[s] for s in remaining)
            self.section_end = time.perf_counter() + left * share

    def next_shape(self) -> bool:
        """Whether the next shape may start (counted if so)."""
        now = time.perf_counter()
        if self.end is not None and (now > self.end or (self.started and now > self.section_end)):
            return False
        self.started += 1
        return True


class Bench:
    """Runs shape groups (every implementation on one shape), collects rows, prints one table per section."""

    def __init__(self, cfg: Config, record: dict, budget: Budget, peak_tflops: float, bandwidth_tbs: float):
        self.cfg, self.record, self.budget = cfg, record, budget
        self.peak_tflops, self.bandwidth_tbs = peak_tflops, bandwidth_tbs

    def group(
        self,
        section: str,
        shape: dict,
        impls: list[Impl],
        inputs: Inputs,
        *,
        flops: float,
        kv_bytes: float | None = None,
        rows_seen: np.ndarray | None = None,
    ) -> None:
        label = _shape_label(shape)
        if not self.budget.next_shape():
            self.record["skipped"].append(dict(section=section, **shape))
            print(f"  {label}: skipped (--max_seconds)", flush=True)
            return
        order = sorted(impls, key=lambda i: (i.name != "xla_ref", i.layout != "cache"))  # the reference first
        ref, rows = None, {}
        for impl in order:
            row = dict(section=section, impl=impl.name, **shape, flops=flops)
            if kv_bytes is not None:
                row["kv_bytes"] = kv_bytes
            if impl.detail:
                row["detail"] = impl.detail
            if impl.error:
                row["error"] = impl.error
            else:
                args = out = None
                try:
                    args = inputs.get(impl.layout)
                    out, compile_s, sec, inner = time_call(impl.fn, args, self.cfg.repeats)
                    args = None
                    out = impl.post(out)
                    row.update(ms=1e3 * sec, compile_s=round(compile_s, 3), calls_per_sample=inner)
                    row["tflops"] = flops / sec / 1e12
                    row["pct_peak"] = 100 * row["tflops"] / self.peak_tflops
                    if kv_bytes is not None:
                        row["kv_gbs"] = kv_bytes / sec / 1e9
                        row["pct_bandwidth"] = 100 * row["kv_gbs"] / (1e3 * self.bandwidth_tbs)
                    if impl.name == "xla_ref":
                        ref = out
                    elif ref is not None:
                        row["max_abs_err"] = _max_abs_err(out, ref)
                        if rows_seen is not None:
                            row["max_abs_err_seen_rows"] = _max_abs_err(out, ref, rows_seen)
                except Exception as e:  # unsupported here, out of memory, ...: record it and go on
                    row["error"] = error_text(e)
                    if os.environ.get("BENCH_KERNELS_TRACEBACK"):
                        traceback.print_exc()
                finally:
                    args = out = None  # nothing of this implementation stays alive (a failed call's arrays too)
            rows[impl.name] = row
        inputs.drop()
        del ref
        for name in ("cudnn", "xla_ref"):
            base = rows.get(name, {}).get("ms")
            for row in rows.values():
                if base and "ms" in row and row["impl"] != name:
                    row[f"speedup_vs_{name}"] = base / row["ms"]
        ordered = [rows[i.name] for i in impls]  # the order asked for
        self.record["rows"].extend(ordered)
        _print_rows(label, ordered, kv_bytes is not None)


def _shape_label(shape: dict) -> str:
    keys = dict(batch="B", q_len="T", kv_len="S", n_heads="N", kv_heads="K", head_dim="H", images="I", fill="fill")
    return " ".join(f"{short}={shape[k]}" for k, short in keys.items() if k in shape)


def _fmt(row: dict, key: str, spec: str, width: int) -> str:
    return format(row[key], spec).rjust(width) if key in row else "-".rjust(width)


def print_header(section: str, bandwidth: bool) -> None:
    cols = f"{'impl':9s} {'ms':>10s} {'TFLOP/s':>9s} {'%peak':>6s}"
    if bandwidth:
        cols += f" {'KV GB/s':>9s} {'%BW':>6s}"
    cols += f" {'x cuDNN':>8s} {'x ref':>7s} {'max err':>9s}  note"
    print(f"\n== {section}\n  {cols}", flush=True)


def _print_rows(label: str, rows: list[dict], bandwidth: bool) -> None:
    print(f"  {label}", flush=True)
    for r in rows:
        line = (
            f"  {r['impl']:9s} {_fmt(r, 'ms', '.4f', 10)} {_fmt(r, 'tflops', '.2f', 9)} {_fmt(r, 'pct_peak', '.1f', 6)}"
        )
        if bandwidth:
            line += f" {_fmt(r, 'kv_gbs', '.1f', 9)} {_fmt(r, 'pct_bandwidth', '.1f', 6)}"
        line += f" {_fmt(r, 'speedup_vs_cudnn', '.2f', 8)} {_fmt(r, 'speedup_vs_xla_ref', '.2f', 7)}"
        line += f" {_fmt(r, 'max_abs_err', '.2e', 9)}"
        note = r.get("error", "")
        if "max_abs_err_seen_rows" in r:
            note = f"seen rows {r['max_abs_err_seen_rows']:.2e} " + note
        print(line + "  " + note[:160], flush=True)
