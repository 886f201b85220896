"""Scaling study: model x sharding plan x batch x sequence length, for prefill, a decode step and a training step.

    # this CPU, simulated devices: compile time, XLA's memory and cost analysis per device (nothing allocated)
    .venv/bin/python -m experiments.scaling_study --models=Llama-3.2-1B,Llama-3.2-3B \\
        --plans=single,fsdp,tp,fsdp_tp,h100x8 --batches=1,8 --seq_lens=1024,4096 --phases=prefill,decode,train
    # a GPU / TPU host: the same rows, each step also run and timed (tokens/s, MFU, decode HBM bandwidth)
    python -m experiments.scaling_study --models=Llama-3.2-1B,Llama-3.2-3B --plans=single --batches=1,8,64 \\
        --seq_lens=2048,8192 --out_dir=$OUT/scaling
    .venv/bin/python -m experiments.scaling_study --models=tiny-text --plans=single,fsdp --measure=true  # CPU timing
    .venv/bin/python -m experiments.scaling_study --plot_only      # re-draw the plots from the CSV
    # XLA:TPU for each TPU plan's slice, ahead of time on this host: memory and the compiler's step-time estimates
    nice .venv/bin/python -m experiments.scaling_study --target=tpu --models=Llama-3.2-1B \\
        --plans=tpu-v5e-8,tpu-v5p-16,tpu-v6e-8,tpu-v5e-16 --batches=1,8 --seq_lens=2048,8192   # -> results/scaling_tpu/

Each row compiles one step ahead of time, ``jax.jit(step).lower(ShapeDtypeStruct(..., sharding=NamedSharding))``,
on the plan's mesh (on a CPU host ``plan.size`` simulated devices, configured here before JAX starts from the
largest plan asked for), with the parameters, caches and batch placed by the plan (``llama32_jax.sharding``):

- ``prefill``: ``model(tokens [B, T], cache, last_only=True)`` into an empty KV cache of ``T + --decode_slots``
  slots (generation's prefill: the head for the last row only); vision models also get ``--vision_images``
  4-tile images' cross-attention K/V (computed once per image, outside the step) and the tile mask;
- ``decode``: one step ``model(tokens [B, 1], cache, last_only=True)`` with a cache of ``T`` = seq_len slots, the
  new token in the last one (so it attends to all ``T``); the cache is donated, as in generation;
- ``train``: one optimiser step of ``llama32_jax.training.train`` (``make_train_step``; ``--train_mode``,
  ``--remat``) on ``{"inputs", "targets", "loss_mask"} [B, T]`` (vision models: text only, images 0); trainable
  parameters and optimiser state donated; the optimiser state sharded like the parameters it belongs to.

Per row and per device: XLA's ``memory_analysis()`` (arguments, outputs, aliased, temporaries; ``total`` =
arguments + outputs - aliased + temporaries, because XLA:CPU's ``peak_memory_in_bytes`` leaves the temporaries
out; on CPU also ``cpu_upcast_gb``, the f32 copies of bf16 weights that only XLA:CPU makes
(``memory_plan._cpu_weight_upcasts``), and ``peak_gb`` = total - upcast), our own sum of the weight shards
(``weights_gb``) and of the KV cache / optimiser state shards (``state_gb``), ``fits`` (peak within 90% of the
device's memory: the plan's device kind or ``--target_device`` on CPU), and XLA's ``cost_analysis()`` flops
and bytes accessed (``xla_flops``, ``xla_bytes``). XLA counts a loop body once, whatever its trip count: a
scanned layer stack counts one layer (one [self x k, cross] group for the vision models), and query blocks of
more than ``attention.Q_CHUNK`` = 1024 rows (a ``lax.map``) count one block. So ``xla_flops_fit`` /
``xla_bytes_fit`` extrapolate the *unrolled* model's counts linearly in depth from compiles of the same step at
1 and 2 layers (groups): ``c1 + (L - 1) * (c2 - c1)`` (``--depth_fit``); the query-block loop stays counted once.

FLOPs by MaxText's convention (``analytic_flops``, all devices together; see ``FLOP_CONVENTION``): per token and
self-attention layer ``2 * (D*(N+2K)*H + N*H*D + 3*D*F)`` for the matmuls plus ``4 * N * H * S_visible`` for
attention, where a causal T-token sequence counts half of T x T (``S_visible`` averages T/2); the head ``2*D*V``
per row it computes; training = 3x forward (``--train_mode=full``; MFU, not counting rematerialisation) or 2x
(``lora``: no weight gradients of frozen weights). With timings (a GPU/TPU, ``--measure=auto``; or
``--measure=true``, which also times a CPU run if the devices' memory fits in half the host's): ``step_s``
(median of ``--repeats`` after a warm-up), ``tokens_per_s``, ``mfu`` = analytic FLOPs / step_s / (devices x peak),
and for decode ``hbm_util`` = bytes a device must read per step (its shards of the weights the step uses, KV cache
and cross K/V: ``read_gb``) / step_s / bandwidth. Peaks by device kind (``PEAKS``; H100/H200 989 TFLOP/s, 3.35 /
4.8 TB/s; TPU v5e 197 / 0.819, v5p 459 / 2.77, v6e 918 / 1.64), else ``--peak_tflops`` / ``--bandwidth_tbs``.

Outputs (``--out_dir``, default ``experiments/results/scaling/``): ``scaling.csv``, appended and flushed row by
row, so an interrupted sweep loses at most the row in flight, and ``--resume`` (default) skips every row whose key
(``KEY``) is already there with status ``ok`` or ``skipped`` (a row that cannot run: too few devices, a batch the
plan's batch axes do not divide, a plan that cannot shard the model); ``error`` rows run again (a CPU row too big
to time under ``--max_host_gb`` is ``ok`` untimed, with the reason). ``scaling.json``: flags, machine, versions,
the commands that filled the CSV, conventions and every row.
``roofline.png``: arithmetic intensity (XLA flops / bytes per device) against FLOP/s per device under the
device's compute and bandwidth ceilings (achieved FLOP/s where timed, else XLA's estimate: the roofline bound
itself, labelled so), and ``throughput_vs_devices.png`` (tokens/s, or on CPU per-device memory and compile time,
against the device count, by plan). ``--max_seconds`` stops starting rows after that long (resume later).

``--target=tpu`` (``experiments.scaling_tpu`` has the details): every row compiled by XLA:TPU for its plan's TPU
slice (``sharding.tpu.plan_mesh``; platform ``tpu-aot``, attention ``--attention_impl``, default ``xla``), nothing
run; "fits" against the chip's HBM (``tpu.CHIPS``) less 10%, a step the compiler refuses for lack of HBM is
``does_not_fit``; the estimate columns (``est_step_s`` from ``optimal_seconds`` corrected for its -1 s
``ConcatBitcast`` sentinels and depth-fitted, else the roofline; ``estimate_source`` says which; ``est_tokens_per_s``,
``est_mfu``, decode ``hbm_read_s`` / ``est_hbm_util``) are compiler estimates, not measurements. Outputs go to
``experiments/results/scaling_tpu/`` (``est_roofline.png``, ``est_throughput.png``).

Modules: this one holds the flags, the sweep, running a row, the CSV and the JSON; ``scaling_steps`` the row key
(:class:`Case`), the analytic FLOPs and the steps built, compiled and timed; ``scaling_plots`` the CSV read back and
the plots.

Tests run this script as a subprocess (tests/sharding/test_scaling_study.py): some flag names (``--dtype``,
``--seq_lens``, ``--max_seconds``, ...) are also bench_kernels', and absl takes one definition per process.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import itertools
import json
import math
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib

DEFAULT_PLANS = ["single", "fsdp", "tp"]


def _plan_devices(argv: list[str]) -> int:
    """The most devices a ``--plans`` entry of ``argv`` needs (read from the TOML files, before JAX starts)."""
    plans = DEFAULT_PLANS
    for i, arg in enumerate(argv):
        if arg.startswith("--plans="):
            plans = arg.split("=", 1)[1].split(",")
        elif arg == "--plans" and i + 1 < len(argv):
            plans = argv[i + 1].split(",")
    most = 1
    for plan in plans:
        path = Path(plan) if plan.endswith(".toml") else Path(__file__).parent.parent / "sharding" / f"{plan}.toml"
        try:
            most = max(most, math.prod(tomllib.loads(path.read_text())["mesh"]["shape"]))
        except (OSError, KeyError, TypeError, tomllib.TOMLDecodeError):
            pass  # reported per row
    return most


if "jax" not in sys.modules and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    # Simulated CPU devices for the largest plan (harmless on a GPU/TPU host, where the plans use the real devices).
    # memory_plan (imported below) sets its own count only when jax is not imported yet: it is by then.
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={_plan_devices(sys.argv)}"
    )

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402

from experiments import cli, memory_plan, scaling_tpu  # noqa: E402
from experiments.results_io import PEAKS, RESULTS_DIR, machine, table_peaks  # noqa: E402
from experiments.scaling_plots import PHASES, number, plot, plot_tpu, read_rows  # noqa: E402
from experiments.scaling_steps import (  # noqa: E402
    FLOP_CONVENTION,
    Case,
    Skip,
    analytic_flops,
    at_depth,
    build,
    depth_units,
    time_step,
    xla_cost,
)
from llama32_jax import configs, sharding  # noqa: E402
from llama32_jax.sharding import tpu  # noqa: E402

GB = memory_plan.GB
_MODELS = flags.DEFINE_list(
    "models", ["Llama-3.2-1B"], f"names in llama32_jax.configs.CONFIGS: {list(configs.CONFIGS)}"
)
_PLANS = flags.DEFINE_list("plans", DEFAULT_PLANS, "sharding plans: names in sharding/ or .toml paths")
_BATCHES = flags.DEFINE_list("batches", ["1", "8"], "batch sizes (sequences)")
_SEQ_LENS = flags.DEFINE_list("seq_lens", ["1024", "4096"], "T: prompt tokens (prefill, train); cache slots (decode)")
_PHASES = flags.DEFINE_list("phases", list(PHASES), f"which of {PHASES}")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "parameters and KV cache")
_LAYOUTS = flags.DEFINE_list("layouts", ["scanned"], "scanned (compile time flat in depth) and/or unrolled")
_IMAGES = flags.DEFINE_integer("vision_images", 1, "vision models, prefill/decode: 4-tile images per sequence")
_DECODE_SLOTS = flags.DEFINE_integer("decode_slots", 128, "prefill: KV-cache slots beyond the prompt")
_TRAIN_MODE = flags.DEFINE_enum(
    "train_mode", "full", ["full", "lora"], "train: llama32_jax.training.train TrainConfig.mode"
)
_REMAT = flags.DEFINE_enum("remat", "full", ["none", "full", "dots"], "train: TrainConfig.remat")
_MEASURE = flags.DEFINE_enum("measure", "auto", ["auto", "true", "false"], "time steps (auto: on GPU/TPU only)")
_REPEATS = flags.DEFINE_integer("repeats", 5, "timed steps per row (median), after one warm-up")
_DEPTH_FIT = flags.DEFINE_bool("depth_fit", True, "XLA cost of the whole depth from 1- and 2-layer compiles")
_MAX_HOST_GB = flags.DEFINE_float("max_host_gb", 0.0, "skip measuring on CPU above this (0: half of MemAvailable)")
_PEAK_TFLOPS = flags.DEFINE_float("peak_tflops", 0.2, "dense TFLOP/s per device of a kind not in PEAKS (CPU)")
_BANDWIDTH = flags.DEFINE_float("bandwidth_tbs", 0.04, "memory TB/s per device of a kind not in PEAKS (CPU)")
_TARGET = flags.DEFINE_string("target_device", "H100", "CPU rows: device kind for the roofline and 'fits' budget")
_COMPILE_TARGET = memory_plan._TARGET  # --target: host (default) or tpu (compiled per plan's TPU slice, estimates)
_ATTENTION = memory_plan._ATTENTION  # --attention_impl: empty = auto on host, xla on --target=tpu
_OUT_DIR = flags.DEFINE_string(
    "out_dir", "", "CSV, JSON and plots go here (default experiments/results/scaling, or scaling_tpu for --target=tpu)"
)
_RESUME = flags.DEFINE_bool("resume", True, "skip rows already in the CSV (false: start a new CSV)")
_MAX_SECONDS = flags.DEFINE_float("max_seconds", 0.0, "start no row after this many seconds (0: no limit)")
_PLOT_ONLY = flags.DEFINE_bool("plot_only", False, "only re-draw the plots from the CSV in --out_dir")

KEY = ("platform", "model", "plan", "batch", "seq_len", "phase", "dtype", "layout", "images", "train_mode", "remat")
KEY_TPU = (*KEY, "attention_impl")  # --target=tpu rows (their own CSV) also differ by attention implementation
COLUMNS = (
    *KEY,
    *("devices", "mesh", "device_kind", "status", "reason", "tokens", "lower_s", "compile_s", "fit_compile_s"),
    *("target_device", "budget_gb", "fits"),
    *("weights_gb", "state_gb", "read_gb", "argument_gb", "output_gb", "alias_gb", "temp_gb", "total_gb"),
    *("cpu_upcast_gb", "peak_gb", "xla_flops", "xla_bytes", "xla_flops_fit", "xla_bytes_fit", "analytic_flops"),
    *("step_s", "tokens_per_s", "tflops_per_device", "mfu", "hbm_util", "peak_tflops", "bandwidth_tbs"),
)
COLUMNS_TPU = (*COLUMNS[: len(KEY)], "attention_impl", *COLUMNS[len(KEY) :], *scaling_tpu.COLUMNS)
XLA_CONVENTION = (
    "xla_flops / xla_bytes: compiled.cost_analysis() 'flops' / 'bytes accessed' of ONE device's SPMD program, every "
    "loop body counted once (a scanned layer stack = one layer or group; attention over more than 1024 queries = "
    "one query block). xla_*_fit: the unrolled model's counts extrapolated in depth, c1 + (L-1)*(c2-c1), from "
    "compiles at 1 and 2 layers (vision: groups); the query-block loop is still counted once."
)
MEMORY_CONVENTION = (
    "GB (1e9) per device from compiled.memory_analysis(): total = argument + output - alias + temp; cpu_upcast_gb = "
    "XLA:CPU's f32 copies of bf16 weights (memory_plan._cpu_weight_upcasts; none on GPU/TPU); peak = total - upcast. "
    "weights_gb / state_gb: our sums of the parameter shards / KV cache (+ cross K/V) or optimiser state shards. "
    "read_gb: what one device must read per step (shards of the weights the step multiplies by + KV cache + cross "
    "K/V); hbm_util (decode) = read_gb / step_s / bandwidth."
)


def peaks(device_kind: str) -> tuple[float, float]:
    """(TFLOP/s, TB/s) of one device of ``device_kind``; the flags for a kind not in :data:`PEAKS`."""
    found = table_peaks(device_kind)
    return found[1:] if found is not None else (_PEAK_TFLOPS.value, _BANDWIDTH.value)


# ------------------------------------------------------------------------------------------------ running a row


def _host_budget() -> float:
    if _MAX_HOST_GB.value:
        return _MAX_HOST_GB.value * GB
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))
    except (OSError, StopIteration):
        avail = 8 * GB
    return 0.5 * avail


def _budget(plan, device, peak_gb: float) -> dict:
    """Does one device's peak fit its memory less 10% (memory_plan's rule)? A CPU row is judged for the plan's
    device kind, else ``--target_device``; a GPU/TPU row for the device's own memory."""
    if device.platform == "cpu":
        kind = plan.devices or _TARGET.value
        capacity = memory_plan.DEVICE_MEMORY.get(kind)
    else:
        kind = device.device_kind
        capacity = (device.memory_stats() or {}).get("bytes_limit")
    if not capacity:
        return {"target_device": kind}
    budget = memory_plan.HEADROOM * capacity / GB
    return {"target_device": kind, "budget_gb": round(budget, 2), "fits": peak_gb <= budget}


AOT = "tpu-aot"  # the platform of --target=tpu rows: compiled for a TPU slice from this host, never run


def _devices(plan) -> list:
    """The devices a row compiles for: the plan's TPU slice (``--target=tpu``), else this host's."""
    if _COMPILE_TARGET.value == "tpu":
        if plan.topology is None:
            raise Skip(f"plan {plan.name!r} names no TPU topology; TPU plans: {', '.join(tpu.tpu_plans())}")
        return list(tpu.plan_mesh(plan).devices.flat)
    return jax.devices()


def _compile(step):
    t0 = time.perf_counter()
    lowered = jax.jit(step.fn, donate_argnums=step.donate).lower(*step.args)
    t1 = time.perf_counter()
    return lowered.compile(), round(t1 - t0, 3), round(time.perf_counter() - t1, 3)


def run_case(case: Case, platform_name: str, measure: bool, dtype, attention_impl: str = "auto") -> dict:
    """Compile (and maybe time) one row; raises :class:`Skip` when it cannot run here."""
    config = configs.get_config(case.model).replace(scan_layers=case.layout == "scanned")
    plan = sharding.load_plan(case.plan)
    aot = platform_name == AOT
    devices = _devices(plan)
    if len(devices) < plan.size:
        raise Skip(f"plan needs {plan.size} devices, {len(devices)} available")
    if case.batch % plan.batch_shards:
        raise Skip(f"batch {case.batch} is not a multiple of the plan's {plan.batch_shards} batch shards")
    try:
        sharding.validate(config, plan)
    except sharding.PlanError as e:
        raise Skip(str(e)) from None
    mesh = tpu.plan_mesh(plan) if aot else sharding.make_mesh(plan, devices)
    placement = sharding.Placement(plan, mesh)
    kind = devices[0].device_kind
    row: dict[str, Any] = dict(devices=plan.size, mesh=json.dumps(plan.mesh_dict), device_kind=kind)
    tokens = case.batch * (1 if case.phase == "decode" else case.seq_len)
    flops = analytic_flops(config, case.phase, case.batch, case.seq_len, case.images, case.train_mode)
    row.update(tokens=tokens, analytic_flops=flops)
    step = build(config, case, placement, dtype, _DECODE_SLOTS.value, attention_impl)
    row.update(weights_gb=step.weights / GB, state_gb=step.state / GB, read_gb=step.read / GB)
    if aot:
        chip = tpu.chip(plan.devices or kind)
        row.update(topology=plan.topology, peak_tflops=chip.peak_bf16_flops / 1e12)
        row.update(bandwidth_tbs=chip.hbm_bandwidth / 1e12)
        row.update(target_device=chip.plan_devices, budget_gb=round(memory_plan.HEADROOM * chip.hbm_bytes / GB, 2))
    try:
        compiled, row["lower_s"], row["compile_s"] = _compile(step)
    except Exception as e:
        if not (aot and scaling_tpu.is_out_of_memory(e)):
            raise
        row.update(fits=False, reason="XLA:TPU: " + scaling_tpu.oom_summary(e), estimate_source="none: does not fit")
        return row
    mem = compiled.memory_analysis()
    total = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
    upcast = memory_plan._cpu_weight_upcasts(compiled.as_text(), step.params) if platform_name == "cpu" else 0
    row.update(
        argument_gb=mem.argument_size_in_bytes / GB, output_gb=mem.output_size_in_bytes / GB,
        alias_gb=mem.alias_size_in_bytes / GB, temp_gb=mem.temp_size_in_bytes / GB, total_gb=total / GB,
        cpu_upcast_gb=upcast / GB, peak_gb=(total - upcast) / GB,
    )  # fmt: skip
    if aot:
        row["fits"] = row["peak_gb"] <= row["budget_gb"]
    else:
        row.update(_budget(plan, devices[0], row["peak_gb"]))
    full = scaling_tpu.cost(compiled) if aot else None
    row["xla_flops"], row["xla_bytes"] = xla_cost(compiled)
    fits = None
    if _DEPTH_FIT.value and (not aot or row["fits"]):
        t2 = time.perf_counter()
        costs, fits, blocked = [], [], not aot
        for units in (1, 2):
            small = build(at_depth(config, units), case, placement, dtype, _DECODE_SLOTS.value, attention_impl)
            try:
                with contextlib.nullcontext() if blocked else scaling_tpu.unblocked_queries():
                    small_compiled = _compile(small)[0]
            except Exception as e:  # unblocked attention's [B, N, T, T] scores can exceed the chip's HBM
                if blocked or not scaling_tpu.is_out_of_memory(e):
                    raise
                blocked, costs, fits = True, [], []
                small_compiled = _compile(small)[0]
                if units == 2:
                    one = build(at_depth(config, 1), case, placement, dtype, _DECODE_SLOTS.value, attention_impl)
                    one_compiled = _compile(one)[0]
                    costs.append(xla_cost(one_compiled))
                    fits.append(scaling_tpu.cost(one_compiled))
            costs.append(xla_cost(small_compiled))
            if aot:
                fits.append(scaling_tpu.cost(small_compiled))
        (f1, b1), (f2, b2) = costs
        n = depth_units(config)
        row.update(xla_flops_fit=f1 + (n - 1) * (f2 - f1), xla_bytes_fit=b1 + (n - 1) * (b2 - b1))
        row["fit_compile_s"] = round(time.perf_counter() - t2, 3)
    if aot:
        if not row["fits"]:
            row.update(estimate_source="none: does not fit", reason=f"peak {row['peak_gb']:.2f} GB > budget")
            return row
        row.update(scaling_tpu.estimate(full, fits or None, depth_units(config), chip))
        if fits and blocked:
            row["estimate_source"] += "; query blocks counted once (the unblocked fit compile ran out of HBM)"
        est = row["est_step_s"]
        row.update(est_tokens_per_s=tokens / est, est_mfu=flops / est / (plan.size * chip.peak_bf16_flops))
        if case.phase == "decode":
            row["hbm_read_s"] = step.read / chip.hbm_bandwidth
            row["est_hbm_util"] = row["hbm_read_s"] / est
        return row
    if measure:
        if platform_name == "cpu" and total * plan.size > _host_budget():
            row["reason"] = f"not timed: {total / GB * plan.size:.1f} GB over the devices > host budget"
        else:
            peak, bandwidth = peaks(kind)
            step_s = time_step(compiled, step, config.text.vocab_size, _REPEATS.value)
            row.update(step_s=step_s, tokens_per_s=tokens / step_s, peak_tflops=peak, bandwidth_tbs=bandwidth)
            row["tflops_per_device"] = row["analytic_flops"] / step_s / plan.size / 1e12
            row["mfu"] = row["tflops_per_device"] / peak
            if case.phase == "decode":
                row["hbm_util"] = step.read / step_s / (bandwidth * 1e12)
    return row


# ------------------------------------------------------------------------------------------------ CSV, JSON


def _tpu() -> bool:
    return _COMPILE_TARGET.value == "tpu"


def _key(row: dict) -> tuple[str, ...]:
    return tuple(str(row.get(k, "")) for k in (KEY_TPU if _tpu() else KEY))


def _append(path: str, row: dict) -> None:
    """Append one row and flush it to disk (a new or differently-headed file gets the header first)."""
    columns = COLUMNS_TPU if _tpu() else COLUMNS
    existing = read_rows(path)
    if existing and list(existing[0]) != list(columns):  # an older layout: rewrite it in this one
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, columns, extrasaction="ignore")
            w.writeheader()
            w.writerows(existing)
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, columns, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerow({k: ("" if v is None else v) for k, v in row.items()})
        f.flush()
        os.fsync(f.fileno())


def _repair(path: str) -> None:
    """Cut a partial last line (a process killed while writing it), so appending goes on cleanly."""
    if os.path.exists(path):
        with open(path, "rb+") as f:
            data = f.read()
            if data and not data.endswith(b"\n"):
                f.truncate(data.rfind(b"\n") + 1)


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for name in ("jax", "jaxlib", "flax", "optax", "numpy", "matplotlib"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            pass
    return out


def cases() -> list[Case]:
    """The sweep, in order: model x plan x batch x seq_len x phase x layout (the flags)."""
    out = []
    grid = itertools.product(
        _MODELS.value, _PLANS.value, _BATCHES.value, _SEQ_LENS.value, _PHASES.value, _LAYOUTS.value
    )
    for model, plan, batch, seq_len, phase, layout in grid:
        train = phase == "train"
        images = _IMAGES.value if configs.get_config(model).is_vision and not train else 0
        mode, remat = (_TRAIN_MODE.value, _REMAT.value) if train else ("", "")
        out.append(Case(model, plan, int(batch), int(seq_len), phase, _DTYPE.value, layout, images, mode, remat))
    return out


def sweep(out_dir: str) -> list[dict]:
    """Run every case not already in ``out_dir/scaling.csv``; returns the rows computed by this call."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "scaling.csv")
    if not _RESUME.value:  # a new sweep: the old CSV and its JSON (with its command history) go
        for name in (path, os.path.join(out_dir, "scaling.json")):
            if os.path.exists(name):
                os.remove(name)
    _repair(path)
    done = {_key(r): r["status"] for r in read_rows(path)}
    attention_impl = _ATTENTION.value or ("xla" if _tpu() else "auto")
    if _tpu():
        platform_name, measure = AOT, False  # nothing can run on an ahead-of-time TPU topology
        if _MEASURE.value == "true":
            raise app.UsageError("--measure=true with --target=tpu: nothing runs on a compile-only TPU topology")
        known = tpu.tpu_plans()
        for plan in _PLANS.value:
            if sharding.load_plan(plan).topology is None:
                raise sharding.PlanError(f"--plans: {plan!r} names no TPU topology; with --target=tpu use {known}")
    else:
        platform_name = jax.devices()[0].platform
        measure = {"auto": platform_name != "cpu", "true": True, "false": False}[_MEASURE.value]
    dtype = jnp.dtype(_DTYPE.value)
    for phase in _PHASES.value:
        if phase not in PHASES:
            raise app.UsageError(f"--phases: unknown phase {phase!r}; valid: {PHASES}")
    for layout in _LAYOUTS.value:
        if layout not in ("scanned", "unrolled"):
            raise app.UsageError(f"--layouts: unknown layout {layout!r}; valid: scanned, unrolled")
    t_start, computed = time.perf_counter(), []
    todo = cases()
    for i, case in enumerate(todo):
        row = {"platform": platform_name, **dataclasses.asdict(case)}
        if _tpu() or _ATTENTION.value:  # the host CSV's rows from before the flag have no attention_impl
            row["attention_impl"] = attention_impl
        if done.get(_key(row)) in ("ok", "skipped", "does_not_fit"):
            continue
        if _MAX_SECONDS.value and time.perf_counter() - t_start > _MAX_SECONDS.value:
            print(f"--max_seconds reached: {len(todo) - i} rows left for a resumed run", flush=True)
            break
        t0 = time.perf_counter()
        try:
            row.update(run_case(case, platform_name, measure, dtype, attention_impl), status="ok")
            if row.get("fits") is False and platform_name == AOT:
                row["status"] = "does_not_fit"
        except Skip as e:
            row.update(status="skipped", reason=" ".join(str(e).split()))
        except Exception as e:  # recorded; a resumed run tries it again
            traceback.print_exc()
            row.update(status="error", reason=" ".join(f"{type(e).__name__}: {e}".split())[:500])
        jax.clear_caches()
        _append(path, row)
        computed.append(row)
        what = (
            f"peak {row['peak_gb']:.2f} GB/device, compile {row['compile_s']} s"
            if row["status"] == "ok"
            else row["reason"]
        )
        if row.get("est_step_s"):
            what += f", est. {row['est_step_s'] * 1e3:.2f} ms ({row['estimate_source'].split(' ')[0]})"
        where = f"[{i + 1}/{len(todo)} {time.perf_counter() - t0:.1f} s]"
        print(where, *dataclasses.astuple(case), f"{row['status']} ({what})", flush=True)
    return computed


def write_json(out_dir: str) -> str:
    rows = [
        {k: number(v) if v != "" else None for k, v in r.items()}
        for r in read_rows(os.path.join(out_dir, "scaling.csv"))
    ]
    flag_names = [f.name for f in flags.FLAGS.get_key_flags_for_module(sys.modules[__name__])]
    flag_names += ["target", "attention_impl"]  # defined in memory_plan, shared
    path = os.path.join(out_dir, "scaling.json")
    command = "python -m experiments.scaling_study " + " ".join(sys.argv[1:])
    commands = []  # every run that added rows to this CSV (a resumed or extended sweep), oldest first
    if os.path.exists(path):
        with open(path) as f:
            commands = json.load(f).get("commands", [])
    if not commands or commands[-1] != command:
        commands.append(command)
    record = {
        "machine": machine(),
        "versions": _versions(),
        "command": command,
        "commands": commands,
        "flags": {name: flags.FLAGS[name].value for name in flag_names},
        "conventions": {
            "flops": FLOP_CONVENTION,
            "xla": XLA_CONVENTION,
            "memory": MEMORY_CONVENTION,
            **({"tpu": scaling_tpu.CONVENTION} if _tpu() else {}),
        },
        **({"libtpu": tpu.libtpu_version(), "label": scaling_tpu.LABEL} if _tpu() else {}),
        "peaks": {key: {"tflops": tf, "tbs": tbs} for key, tf, tbs in PEAKS},
        "rows": rows,
    }
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
    return path


def main(argv):
    del argv
    out_dir = _OUT_DIR.value or os.path.join(RESULTS_DIR, "scaling_tpu" if _tpu() else "scaling")
    if not _PLOT_ONLY.value:
        computed = sweep(out_dir)
        print(f"{len(computed)} rows computed; wrote", write_json(out_dir), flush=True)
    if _tpu():
        print("wrote", *plot_tpu(out_dir))
    else:
        print("wrote", *plot(out_dir, _TARGET.value, fallback_peaks=(_PEAK_TFLOPS.value, _BANDWIDTH.value)))


if __name__ == "__main__":
    cli.run(main)
