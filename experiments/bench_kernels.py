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

Modules: this one holds the flags, the effective :class:`Config` and the JSON record; ``bench_kernels_ops`` the
implementations and sections; ``bench_kernels_measure`` the inputs, timing, budget and the per-shape runner.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import time

import jax
from absl import app, flags

from experiments import cli
from experiments.bench_kernels_measure import Bench, Budget, Config
from experiments.bench_kernels_ops import (  # noqa: F401  (cross_tile_mask: the tests read it from here)
    DECODE_MODELS,
    bench_cross,
    bench_decode,
    bench_flash,
    cross_tile_mask,
    ours_detail,
)
from experiments.results_io import git_commit, machine, table_peaks, write_result

SECTIONS = ("flash", "flash_bwd", "decode", "cross")
IMPLS = ("ours", "cudnn", "jax_xla", "xla_ref", "tokamax")
SECTION_WEIGHT = {"flash": 2.0, "flash_bwd": 1.0, "decode": 1.0, "cross": 1.0}  # shares of --max_seconds

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


# ------------------------------------------------------------------------------------------------ configuration


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


# ------------------------------------------------------------------------------------------------ main


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
        "git": git_commit(),
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
    budget = Budget(_MAX_SECONDS.value, SECTION_WEIGHT)
    bench = Bench(cfg, record, budget, peak, bandwidth)
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
