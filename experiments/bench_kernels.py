"""Attention kernels: ours (Pallas) against cuDNN, XLA and our XLA reference, in TFLOP/s and % of the device's peak.

    .venv/bin/python -m experiments.bench_kernels --smoke                 # tiny shapes on CPU, ~20 s (no timings)
    python -m experiments.bench_kernels                                   # full sweep on a GPU/TPU (minutes)
    python -m experiments.bench_kernels --sections=flash --head_dims=128 --seq_lens=8192 --repeats=20
    python -m experiments.bench_kernels --max_seconds=150 --out=$OUT/bench_kernels_gpu.json   # bounded (gpu_check.sh)

Sections (``--sections``):

- ``flash``: prefill attention forward, causal, ``--dtype`` (bf16). Total tokens are held constant, as in the
  FlashAttention papers: for each ``--seq_lens`` S and ``--head_dims`` H, batch = ``--tokens`` // S (at least 1),
  query heads N = ``--model_dim`` // H, kv heads N // g for each g in ``--gqa`` (4: Llama-like; 1: MHA).
- ``flash_bwd``: forward + backward, ``grad`` of ``sum(o * do)`` with respect to q, k and v, at ``--bwd_seq_lens``.
- ``decode``: one query per sequence against a KV cache of ``--decode_lens`` slots, half or fully used
  (``q_offset`` = S/2 - 1 or S - 1), batch ``--decode_batches``, Llama 3.2 1B (N=32, K=8, H=64) / 3B (N=24, K=8,
  H=128) heads. Also reports the GB/s of K/V read (the visible slots' keys and values) and % of HBM bandwidth.
- ``cross``: Mllama cross-attention (11B shapes: N=32, K=8, H=128): ``--cross_text`` text queries over
  ``--cross_images`` images x 4 tiles x 1601 vision tokens, with a realistic mask: image i (of I) has 4 - (b + i) % 4
  valid tiles; text rows before T/8 see nothing, rows from image i's position to the next image's see image i, the
  last image is seen to the end (a single-row call, T = 1, sees the last image).

Implementations (``--impls``):

- ``ours``: our Pallas kernel (``impl="pallas"``; the platform's flavour; interpreted on CPU);
- ``cudnn``: ``jax.nn.dot_product_attention(implementation="cudnn")`` (K/V transposed to its ``[B, S, K, H]`` layout
  outside the timed function; GQA native; decode uses ``key_value_seq_lengths``; cross gets the dense token mask
  as ``mask=``);
- ``jax_xla``: the same call with ``implementation="xla"`` (not in ``cross``);
- ``xla_ref``: our XLA reference, :mod:`llama32_jax.nn.attention` (the ops' ``impl="xla"``); cross builds the dense
  token mask from the tile mask inside the timed function, as the model does;
- ``tokamax``: ``tokamax.dot_product_attention`` (``flash`` only) where ``import tokamax`` works.

An implementation that cannot run (missing, unsupported on the platform, out of memory) gets a row with its error
string; the sweep goes on.

FLOP convention (MaxText's): attention forward = 4 * B * N * T * S_visible * H, where causal attention counts half
of T * S (S_visible = S / 2 when T = S); forward + backward = 3.5x forward (backward = 2.5x forward); decode and
cross-attention count only the keys each query row sees. TFLOP/s = that / the median time. The peak is the dense
bf16 peak of the device kind (H100/H200 989, TPU v5e 197, v5p 459, v6e 918 TFLOP/s; HBM 3.35 / 4.8 TB/s, 819 /
2770 / 1640 GB/s); a device not in the table uses ``--peak_tflops`` / ``--bandwidth_tbs`` (CPU defaults).

Timing: each implementation is jitted, called once (compile; ``compile_s``) and once more (warm-up); then
``--repeats`` samples, each of n back-to-back calls (n chosen so a sample lasts ~5 ms, at most 50) followed by
``block_until_ready``, and the median of sample / n. For microsecond kernels (small decode) the host's dispatch
time is a floor. Every implementation's output is compared once per shape with our XLA reference's (max abs error;
for cross also over the rows that see something, where implementations may differ on rows that see nothing), so a
fast wrong kernel is visible. Speed-ups are (the other's time) / (this time): > 1 means this row is faster.

Inputs are standard normal (drawn by numpy for small shapes, on the device with XLA's RngBitGenerator for large
ones), the same values in both K/V layouts; a shape's arrays exist in one layout at a time.

``--max_seconds`` bounds the sweep: each section gets a share of the time left (flash twice the others'; a
section's first shape runs while any time is left), and the shapes that do not start in time are listed under
``skipped``. The JSON (``write_result``; default
``experiments/results/bench_kernels_<device kind>.json``) is rewritten after each section, so a run stopped from
outside keeps the finished sections. On CPU ours runs in Pallas' interpreter: its times mean nothing there
(``--smoke`` is a correctness run of the whole script; flags given with it still override its shapes).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments import cli
from experiments.results_io import machine, table_peaks, write_result
from llama32_jax.nn import attention as reference

SECTIONS = ("flash", "flash_bwd", "decode", "cross")
IMPLS = ("ours", "cudnn", "jax_xla", "xla_ref", "tokamax")
SECTION_WEIGHT = {"flash": 2.0, "flash_bwd": 1.0, "decode": 1.0, "cross": 1.0}  # shares of --max_seconds
DECODE_MODELS = {"1B": (32, 8, 64), "3B": (24, 8, 128)}  # (query heads, kv heads, head_dim)

_SECTIONS = flags.DEFINE_list("sections", list(SECTIONS), f"which of {SECTIONS} to run")
_IMPLS = flags.DEFINE_list("impls", list(IMPLS), f"which of {IMPLS} to run (xla_ref always runs: the check)")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float16", "float32"], "q/k/v dtype")
_SEQ_LENS = flags.DEFINE_list("seq_lens", ["1024", "2048", "4096", "8192", "16384", "32768"], "flash: T = S")
_HEAD_DIMS = flags.DEFINE_list("head_dims", ["64", "128"], "flash, flash_bwd: head dims")
_TOKENS = flags.DEFINE_integer("tokens", 16384, "flash: batch = tokens // seq_len (at least 1)")
_MODEL_DIM = flags.DEFINE_integer("model_dim", 2048, "flash: query heads = model_dim // head_dim")
_GQA = flags.DEFINE_list("gqa", ["4"], "flash: query heads per kv head (1 = MHA); several values sweep")
_CAUSAL = flags.DEFINE_bool("causal", True, "flash, flash_bwd: causal mask")
_BLOCK_Q = flags.DEFINE_integer("block_q", 0, "ours (flash, cross): query block (0: the kernel's default)")
_BLOCK_K = flags.DEFINE_integer("block_k", 0, "ours: key block (0: the kernel's default)")
_BWD_SEQ_LENS = flags.DEFINE_list("bwd_seq_lens", ["2048", "8192"], "flash_bwd: T = S")
_DECODE_LENS = flags.DEFINE_list("decode_lens", ["4096", "16384", "32768", "131072"], "decode: cache slots")
_DECODE_BATCHES = flags.DEFINE_list("decode_batches", ["1", "8", "64"], "decode: batch sizes")
_DECODE_MODELS = flags.DEFINE_list("decode_models", list(DECODE_MODELS), f"decode: head shapes of {DECODE_MODELS}")
_DECODE_FILLS = flags.DEFINE_list("decode_fills", ["half", "full"], "decode: how much of the cache is used")
_NUM_SPLITS = flags.DEFINE_integer("num_splits", 0, "ours (decode): key-axis splits (0: the kernel's default)")
_CROSS_TEXT = flags.DEFINE_list("cross_text", ["1", "128", "2048"], "cross: text queries T")
_CROSS_IMAGES = flags.DEFINE_list("cross_images", ["1", "4"], "cross: images per sequence")
_CROSS_BATCHES = flags.DEFINE_list("cross_batches", ["1", "8"], "cross: batch sizes")
_TOKENS_PER_TILE = flags.DEFINE_integer("tokens_per_tile", 1601, "cross: vision tokens per tile P")
_TILES = flags.DEFINE_integer("tiles", 4, "cross: tiles per image R")
_REPEATS = flags.DEFINE_integer("repeats", 10, "timed samples per implementation and shape (median reported)")
_MAX_SECONDS = flags.DEFINE_float("max_seconds", 0.0, "time budget for the whole sweep (0: none)")
_PEAK_TFLOPS = flags.DEFINE_float("peak_tflops", 0.2, "peak TFLOP/s of a device not in the table (e.g. CPU)")
_BANDWIDTH = flags.DEFINE_float("bandwidth_tbs", 0.04, "memory bandwidth TB/s of a device not in the table")
_SMOKE = flags.DEFINE_bool("smoke", False, "tiny shapes, 1 repeat (flags given still win); CPU: seconds, no timings")
_OUT = flags.DEFINE_string("out", "", "JSON path (default experiments/results/bench_kernels_<device kind>.json)")

FLOP_CONVENTION = (
    "attention forward = 4*B*N*T*S_visible*H; causal counts half of T*S (MaxText); forward+backward = 3.5x forward "
    "(backward = 2.5x forward); decode and cross count only the keys each query sees; TFLOP/s = FLOPs / median time"
)
BYTES_CONVENTION = "K/V bytes read = keys + values of the slots (decode) / tiles (cross) visible to some query"


_SAMPLE_S = 5e-3  # a timed sample lasts about this long (several back-to-back calls for fast kernels)
_MAX_INNER = 50


# ------------------------------------------------------------------------------------------------ configuration


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


def _ints(values) -> list[int]:
    return [int(v) for v in values]


def config_from_flags() -> Config:
    cfg = Config(
        sections=list(_SECTIONS.value),
        impls=list(_IMPLS.value),
        dtype=_DTYPE.value,
        seq_lens=_ints(_SEQ_LENS.value),
        head_dims=_ints(_HEAD_DIMS.value),
        tokens=_TOKENS.value,
        model_dim=_MODEL_DIM.value,
        gqa=_ints(_GQA.value),
        causal=_CAUSAL.value,
        bwd_seq_lens=_ints(_BWD_SEQ_LENS.value),
        decode_lens=_ints(_DECODE_LENS.value),
        decode_batches=_ints(_DECODE_BATCHES.value),
        decode_models=list(_DECODE_MODELS.value),
        decode_fills=list(_DECODE_FILLS.value),
        cross_text=_ints(_CROSS_TEXT.value),
        cross_images=_ints(_CROSS_IMAGES.value),
        cross_batches=_ints(_CROSS_BATCHES.value),
        tokens_per_tile=_TOKENS_PER_TILE.value,
        tiles=_TILES.value,
        repeats=_REPEATS.value,
        block_q=_BLOCK_Q.value or None,
        block_k=_BLOCK_K.value or None,
        num_splits=_NUM_SPLITS.value or None,
    )
    if _SMOKE.value:  # tiny defaults; a flag given on the command line still wins
        smoke = dict(
            seq_lens=[128, 256],
            head_dims=[64],
            tokens=512,
            model_dim=512,  # 8 query heads, 2 kv heads at gqa 4
            bwd_seq_lens=[128],
            decode_lens=[512],
            decode_batches=[2],
            decode_models=["1B"],
            cross_text=[1, 128],
            cross_images=[2],
            cross_batches=[1],
            tokens_per_tile=17,
            repeats=1,
        )
        cfg = dataclasses.replace(cfg, **{k: v for k, v in smoke.items() if not flags.FLAGS[k].present})
    for name, values, allowed in (
        ("sections", cfg.sections, SECTIONS),
        ("impls", cfg.impls, IMPLS),
        ("decode_models", cfg.decode_models, tuple(DECODE_MODELS)),
        ("decode_fills", cfg.decode_fills, ("half", "full")),
    ):
        if set(values) - set(allowed):
            raise app.UsageError(f"--{name}: unknown {sorted(set(values) - set(allowed))}; choose from {allowed}")
    if "xla_ref" not in cfg.impls:
        cfg.impls.append("xla_ref")  # the correctness reference of every row
    return cfg


def device_peaks() -> tuple[float, float, str]:
    """(peak TFLOP/s, bandwidth TB/s, where from) for this process's first device."""
    kind = jax.devices()[0].device_kind
    found = table_peaks(kind)
    if found is not None:
        key, tflops, tbs = found
        return tflops, tbs, f"table ({key!r} in device kind {kind!r})"
    return _PEAK_TFLOPS.value, _BANDWIDTH.value, f"--peak_tflops / --bandwidth_tbs (device kind {kind!r} not in table)"


def ours_detail() -> str:
    from llama32_jax.kernels import resolve_backend, resolve_interpret

    backend = resolve_backend(None)
    return f"pallas, {backend} flavour" + (", interpreted" if resolve_interpret(None, backend) else "")


# ------------------------------------------------------------------------------------------------ measuring


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
_BSNH = (0, 2, 1, 3)  # [B, K, S, H] <-> [B, S, K, H]


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


def _tuple(x) -> tuple:
    return tuple(x) if isinstance(x, tuple | list) else (x,)


def _error_text(e: BaseException) -> str:
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
    post: Callable = _tuple
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
    """Deadlines from ``--max_seconds``: each section gets its weight's share of the time left, and its first shape
    runs even when an earlier section overran that share (only the overall limit stops it)."""

    def __init__(self, seconds: float):
        self.end = time.perf_counter() + seconds if seconds > 0 else None
        self.section_end, self.started = None, 0

    def start_section(self, name: str, remaining: list[str]):
        self.started = 0
        if self.end is not None:
            left = max(self.end - time.perf_counter(), 0.0)
            share = SECTION_WEIGHT[name] / sum(SECTION_WEIGHT[s] for s in remaining)
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

    def __init__(self, cfg: Config, record: dict, budget: Budget):
        self.cfg, self.record, self.budget = cfg, record, budget
        self.peak_tflops, self.bandwidth_tbs, _ = device_peaks()

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
                    row["error"] = _error_text(e)
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


def _print_header(section: str, bandwidth: bool) -> None:
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


# ------------------------------------------------------------------------------------------------ implementations


def _ours(op_name: str) -> tuple[Callable | None, str]:
    """Our op from ``llama32_jax.kernels.<op_name>``, or None and why not."""
    try:
        module = __import__(f"llama32_jax.kernels.{op_name}", fromlist=[op_name])
        return getattr(module, op_name), ""
    except Exception as e:
        return None, f"unavailable: {_error_text(e)}"


def _tokamax() -> tuple[Callable | None, str]:
    """tokamax's attention entry point (found by introspection), or None and why not."""
    try:
        import tokamax
    except Exception as e:
        return None, f"unavailable: {_error_text(e)}"
    for name in ("dot_product_attention", "attention", "flash_attention"):
        fn = getattr(tokamax, name, None)
        if callable(fn):
            return fn, f"tokamax.{name} {getattr(tokamax, '__version__', '')}".strip()
    names = [n for n in dir(tokamax) if "attention" in n.lower()]
    return None, f"unavailable: no attention entry point in tokamax (attention names: {names})"


def _jax_nn(implementation: str, **kwargs) -> Callable:
    def fn(q, k, v, *extra):
        return jax.nn.dot_product_attention(q, k, v, implementation=implementation, **kwargs)

    return fn


def _from_bsnh(out) -> tuple:
    """Gradients (dq [B, T, N, H], dk / dv [B, S, K, H]) -> the reference's layout."""
    dq, dk, dv = out
    return dq, dk.transpose(_BSNH), dv.transpose(_BSNH)


def flash_impls(cfg: Config, *, backward: bool) -> list[Impl]:
    causal = cfg.causal
    impls = []
    op, why = _ours("flash_attention")

    def ours(q, k, v):
        return op(q, k, v, causal=causal, impl="pallas", block_q=cfg.block_q, block_k=cfg.block_k)

    def ref(q, k, v):
        return reference.self_attention(q, k, v, causal=causal)

    cands = {
        "ours": Impl("ours", ours if op else None, detail=ours_detail(), error=why),
        "cudnn": Impl("cudnn", _jax_nn("cudnn", is_causal=causal), layout="bsnh"),
        "jax_xla": Impl("jax_xla", _jax_nn("xla", is_causal=causal), layout="bsnh"),
        "xla_ref": Impl("xla_ref", ref, detail="llama32_jax.nn.attention.self_attention"),
    }
    if not backward:
        fn, detail = _tokamax()
        cands["tokamax"] = Impl(
            "tokamax",
            (lambda q, k, v: fn(q, k, v, is_causal=causal)) if fn else None,
            layout="bsnh",
            detail=detail if fn else "",
            error="" if fn else detail,
        )
    for name in cfg.impls:
        if name not in cands:
            continue
        impl = cands[name]
        if backward and impl.fn is not None:
            impl.fn = _fwd_bwd(impl.fn)
            impl.post = _from_bsnh if impl.layout == "bsnh" else _tuple
        impl.fn = jax.jit(impl.fn) if impl.fn is not None else None
        impls.append(impl)
    return impls


def _fwd_bwd(attn: Callable) -> Callable:
    def loss(q, k, v, do):
        return jnp.sum(attn(q, k, v).astype(jnp.float32) * do.astype(jnp.float32))

    return jax.grad(loss, argnums=(0, 1, 2))


def attention_inputs(seed: int, shapes: tuple, dtype: str, extra: Callable[[str], tuple] = lambda layout: ()) -> Inputs:
    """Random ``(q, k, v, *rest)`` of ``shapes`` (``k``, ``v`` given as ``[B, K, S, H]``, transposed in the "bsnh"
    layout), then ``extra(layout)``."""

    def make(layout):
        perm = _BSNH if layout == "bsnh" else None
        perms = tuple(perm if i in (1, 2) else None for i in range(len(shapes)))
        return lambda: (*random_normals(seed, shapes, dtype, perms), *extra(layout))

    return Inputs({"cache": make("cache"), "bsnh": make("bsnh")})


# ------------------------------------------------------------------------------------------------ sections


def bench_flash(bench: Bench, *, backward: bool) -> None:
    cfg = bench.cfg
    section = "flash_bwd" if backward else "flash"
    impls = flash_impls(cfg, backward=backward)
    seqs = cfg.bwd_seq_lens if backward else cfg.seq_lens
    _print_header(f"{section}: {'forward + backward' if backward else 'forward'}, {cfg.dtype}, causal={cfg.causal}",
                  bandwidth=False)  # fmt: skip
    for g in cfg.gqa:
        for h in cfg.head_dims:
            for s in seqs:
                n = cfg.model_dim // h
                b = max(1, cfg.tokens // s)
                if n % g:
                    print(f"  skip: {n} query heads not a multiple of gqa {g}")
                    continue
                shape = dict(batch=b, q_len=s, kv_len=s, n_heads=n, kv_heads=n // g, head_dim=h)
                shape.update(causal=cfg.causal, dtype=cfg.dtype)
                flops = 4 * b * n * s * s * h * (0.5 if cfg.causal else 1.0) * (3.5 if backward else 1.0)
                shapes = ((b, s, n, h), (b, n // g, s, h), (b, n // g, s, h)) + (((b, s, n, h),) if backward else ())
                inputs = attention_inputs(s, shapes, cfg.dtype)
                bench.group(section, shape, impls, inputs, flops=flops)


def bench_decode(bench: Bench) -> None:
    cfg = bench.cfg
    op, why = _ours("decode_attention")
    num_splits, block_k = cfg.num_splits, cfg.block_k

    def ours(q, k, v, q_offset):
        return op(q, k, v, q_offset=q_offset, impl="pallas", block_k=block_k, num_splits=num_splits)

    def ref(q, k, v, q_offset):
        return reference.self_attention(q, k, v, q_offset=q_offset, causal=True)

    def jax_nn(implementation):
        def fn(q, k, v, q_offset):
            lengths = jnp.full((q.shape[0],), q_offset + 1, jnp.int32)
            return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths, implementation=implementation)

        return fn

    cands = {
        "ours": Impl("ours", ours if op else None, detail=ours_detail(), error=why),
        "cudnn": Impl("cudnn", jax_nn("cudnn"), layout="bsnh", detail="key_value_seq_lengths = q_offset + 1"),
        "jax_xla": Impl("jax_xla", jax_nn("xla"), layout="bsnh", detail="key_value_seq_lengths = q_offset + 1"),
        "xla_ref": Impl("xla_ref", ref, detail="llama32_jax.nn.attention.self_attention"),
    }
    impls = [cands[n] for n in cfg.impls if n in cands]
    for impl in impls:
        impl.fn = jax.jit(impl.fn) if impl.fn is not None else None
    _print_header(f"decode: 1 query per sequence, {cfg.dtype}", bandwidth=True)
    itemsize = jnp.dtype(cfg.dtype).itemsize
    for model in cfg.decode_models:
        n, kv, h = DECODE_MODELS[model]
        for b in cfg.decode_batches:
            for s in cfg.decode_lens:
                for fill in cfg.decode_fills:
                    q_offset = s // 2 - 1 if fill == "half" else s - 1
                    visible = q_offset + 1
                    shape = dict(model=model, batch=b, q_len=1, kv_len=s, n_heads=n, kv_heads=kv, head_dim=h)
                    shape.update(fill=fill, q_offset=q_offset, dtype=cfg.dtype)
                    bench.group(
                        "decode",
                        shape,
                        impls,
                        attention_inputs(
                            s,  # the seed: the same cache for both fills
                            ((b, 1, n, h), (b, kv, s, h), (b, kv, s, h)),
                            cfg.dtype,
                            lambda layout, q_offset=q_offset: (jnp.int32(q_offset),),
                        ),
                        flops=4 * b * n * visible * h,
                        kv_bytes=2 * b * kv * visible * h * itemsize,
                    )


def cross_tile_mask(b: int, t: int, images: int, tiles: int) -> np.ndarray:
    """The realistic Mllama mask ``[B, T, I, R]``: image i of sequence b has ``tiles - (b + i) % tiles`` valid tiles;
    rows before T/8 see nothing; rows from image i's position to the next image's see image i, and the last image
    is seen to the end (so a one-row call sees the last image)."""
    mask = np.zeros((b, t, images, tiles), bool)
    starts = [int(t * (0.125 + 0.875 * i / images)) for i in range(images)] + [t]
    for bi in range(b):
        for i in range(images):
            valid = tiles - (bi + i) % tiles
            mask[bi, starts[i] : starts[i + 1], i, :valid] = True  # empty if the next image starts on the same row
    return mask


def bench_cross(bench: Bench) -> None:
    cfg = bench.cfg
    n, kv, h = 32, 8, 128  # Llama 3.2 11B-Vision's text attention
    p, r = cfg.tokens_per_tile, cfg.tiles
    op, why = _ours("cross_attention")
    block_q, block_k = cfg.block_q, cfg.block_k

    def ours(q, k, v, tile_mask, token_mask):
        return op(q, k, v, tile_mask, tokens_per_tile=p, impl="pallas", block_q=block_q, block_k=block_k)

    def ref(q, k, v, tile_mask, token_mask):
        return reference.cross_attention(q, k, v, tile_mask, tokens_per_tile=p)

    def cudnn(q, k, v, tile_mask, token_mask):
        return jax.nn.dot_product_attention(q, k, v, mask=token_mask[:, None], implementation="cudnn")

    cands = {
        "ours": Impl("ours", ours if op else None, detail=ours_detail(), error=why),
        "cudnn": Impl("cudnn", cudnn, layout="bsnh", detail="dense token mask [B, 1, T, N_v] as mask="),
        "xla_ref": Impl("xla_ref", ref, detail="llama32_jax.nn.attention.cross_attention (builds the token mask)"),
    }
    impls = [cands[name] for name in cfg.impls if name in cands]
    for impl in impls:
        impl.fn = jax.jit(impl.fn) if impl.fn is not None else None
    _print_header(f"cross: Mllama text over images x {r} tiles x {p} tokens, {cfg.dtype}", bandwidth=True)
    itemsize = jnp.dtype(cfg.dtype).itemsize
    for b in cfg.cross_batches:
        for images in cfg.cross_images:
            for t in cfg.cross_text:
                nv = images * r * p
                tile_mask = cross_tile_mask(b, t, images, r)
                token_mask = np.repeat(tile_mask.reshape(b, t, images * r), p, axis=-1)  # [B, T, N_v]
                seen_tokens = int(tile_mask.sum()) * p  # over (b, t) rows
                read_tokens = int(tile_mask.any(axis=1).sum()) * p  # tiles some row of the sequence sees

                shape = dict(batch=b, q_len=t, kv_len=nv, n_heads=n, kv_heads=kv, head_dim=h, images=images)
                shape.update(tiles=r, tokens_per_tile=p, visible_fraction=round(seen_tokens / (b * t * nv), 4))
                shape["dtype"] = cfg.dtype
                bench.group(
                    "cross",
                    shape,
                    impls,
                    attention_inputs(
                        t,  # the seed
                        ((b, t, n, h), (b, kv, nv, h), (b, kv, nv, h)),
                        cfg.dtype,
                        lambda layout, tm=tile_mask, dense=token_mask: (
                            jnp.asarray(tm),
                            jnp.asarray(dense) if layout == "bsnh" else None,  # only cuDNN takes the dense mask
                        ),
                    ),
                    flops=4 * n * h * seen_tokens,
                    kv_bytes=2 * kv * read_tokens * h * itemsize,
                    rows_seen=tile_mask.any(axis=(2, 3)),
                )


# ------------------------------------------------------------------------------------------------ main


def _git() -> str:
    run = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True, cwd=os.path.dirname(__file__))  # noqa: E731
    try:
        head = run("rev-parse", "--short", "HEAD").stdout.strip()
        dirty = run("status", "--porcelain", "llama32_jax").stdout.strip()
    except OSError:
        return "unknown"
    return head + (" (llama32_jax/ modified)" if dirty else "")


def _versions() -> dict:
    versions = {"jax": jax.__version__}
    for name in ("jaxlib", "flax", "tokamax"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:
            pass
    try:
        versions["platform_version"] = str(jax.devices()[0].client.platform_version)
    except Exception:
        pass
    return versions


def main(argv):
    del argv
    cfg = config_from_flags()
    kind = jax.devices()[0].device_kind
    peak, bandwidth, peak_source = device_peaks()
    out_path = _OUT.value or os.path.join(
        os.path.dirname(os.path.abspath(__file__)),
        "results",
        f"bench_kernels_{re.sub(r'[^A-Za-z0-9]+', '_', kind).strip('_')}.json",
    )
    record = {
        "benchmark": "bench_kernels",
        "argv": list(sys.argv),
        "command": "python -m experiments.bench_kernels " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "jax_device": kind,
        "platform": jax.default_backend(),
        "versions": _versions(),
        "git": _git(),
        "config": dataclasses.asdict(cfg),
        "smoke": _SMOKE.value,
        "max_seconds": _MAX_SECONDS.value,
        "peak_tflops": peak,
        "bandwidth_tbs": bandwidth,
        "peak_source": peak_source,
        "ours": ours_detail(),
        "flop_convention": FLOP_CONVENTION,
        "bytes_convention": BYTES_CONVENTION,
        "timing": "jit, compile + warm-up, then the median over --repeats samples of back-to-back calls "
        "(block_until_ready); speedup_vs_X = X's ms / this row's ms",
        "loadavg_1_5_15_at_start": [round(x, 2) for x in os.getloadavg()],
        "rows": [],
        "skipped": [],
        "complete": False,
    }
    print(f"device {kind} ({record['platform']}), peak {peak} TFLOP/s, {bandwidth} TB/s [{peak_source}]")
    print(f"ours: {record['ours']}; FLOPs: {FLOP_CONVENTION}")
    if jax.default_backend() == "cpu":
        print("CPU: ours runs in the Pallas interpreter and cuDNN is absent; the times below mean nothing here, "
              "only the errors do.")  # fmt: skip
    budget = Budget(_MAX_SECONDS.value)
    bench = Bench(cfg, record, budget)
    t_all = time.perf_counter()
    todo = [s for s in SECTIONS if s in cfg.sections]
    for i, section in enumerate(todo):
        budget.start_section(section, todo[i:])
        t0 = time.perf_counter()
        if section in ("flash", "flash_bwd"):
            bench_flash(bench, backward=section == "flash_bwd")
        elif section == "decode":
            bench_decode(bench)
        else:
            bench_cross(bench)
        record.setdefault("section_s", {})[section] = round(time.perf_counter() - t0, 1)
        record["total_s"] = round(time.perf_counter() - t_all, 1)
        record["complete"] = i == len(todo) - 1
        if record["complete"]:
            record["loadavg_1_5_15_at_end"] = [round(x, 2) for x in os.getloadavg()]
        write_result(record, os.path.basename(out_path), out_path)  # after each section: a stopped run keeps them
    if record["skipped"]:
        print(f"{len(record['skipped'])} shapes skipped: --max_seconds={_MAX_SECONDS.value} ran out")
    errors = sum("error" in r for r in record["rows"])
    print(f"{len(record['rows'])} rows ({errors} could not run: see their error), {record['total_s']} s")


if __name__ == "__main__":
    cli.run(main)
