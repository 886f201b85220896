"""Ahead-of-time memory plans: compile prefill and decode at full size on a simulated mesh, read XLA's numbers.

    .venv/bin/python -m experiments.memory_plan --model=Llama-3.2-90B-Vision --plan=h100x8 --cache_len=131072
    .venv/bin/python -m experiments.memory_plan --all        # every model x named topology -> results/memory_plan.*
    .venv/bin/python -m experiments.memory_plan --target=tpu --all   # XLA:TPU, every model x TPU plan,
                                                       # plus a training step per plan -> results/memory_plan_tpu.*
    .venv/bin/python -m experiments.memory_plan --plan=h100x2 --quantize=none,int8,int4   # weight-only quantized
                                                       # (experiments.memory_plan_quant: the quantized table)

Nothing is allocated: the model is built with ``jax.ShapeDtypeStruct`` leaves (``abstract_model``) carrying the
plan's ``NamedSharding``s on ``plan.size`` simulated CPU devices, and ``jit(...).lower(...).compile()`` partitions
it (SPMD) exactly as on the real machine. ``compiled.memory_analysis()`` then gives one device's argument, output,
alias and temporary bytes. Per device we report the weights (the parameter shards, summed by us and checked
against XLA's argument bytes), the KV cache shard, XLA's temporaries, and the peak
``arguments + outputs - aliased + temporaries`` of the larger of the two steps (the decode step donates the cache,
so its outputs alias it). "fits" compares that peak with the device's memory less 10% headroom (72 GB on an
80 GB H100, docs/performance.md). The layout is the scanned one (compile time flat in depth); bf16 weights and cache.

Caveat: the compile is XLA:CPU's. Buffer assignment differs somewhat between backends (fusion decisions change
temporaries), while weights, cache and arguments are exact.

``--target=tpu``: the same steps compiled by XLA:TPU (libtpu) for the plan's TPU slice (``sharding.tpu.plan_mesh``;
plans ``tpu-*``), ahead of time on this host: one chip's numbers come from XLA:TPU's own buffer assignment, with
its layouts (tiled, padded), fusions and the Pallas attention kernels that ``attention_impl="auto"`` picks on a TPU
mesh. No upcast correction is applied: the rows report ``f32_weight_copies_gb`` (f32 buffers shaped like a bf16
weight shard in the optimized HLO; 0 on TPU). A program that does not fit is refused by the compiler
(``RESOURCE_EXHAUSTED``); the row then carries the compiler's message and "fits" is no. Budget: the chip's HBM
(``tpu.CHIPS``) less 10%. With ``--train`` (default with ``--target=tpu --all``) a full fine-tuning step
(``experiments.scaling_steps.build_train``: AdamW, full remat, ``--train_batch`` x ``--prompt_len`` tokens) is
compiled too.
"""

from __future__ import annotations

import os
import sys

if "jax" not in sys.modules:  # simulated devices must be configured before JAX starts
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=16"

import json
import math
import time

import jax
import jax.numpy as jnp
from absl import flags
from flax import nnx
from jax.sharding import NamedSharding

from experiments import cli
from experiments.results_io import RESULTS_DIR, machine, write_result
from llama32_jax import configs, dims, sharding
from llama32_jax.models.build import abstract_model
from llama32_jax.nn.attend import set_attention_impl
from llama32_jax.nn.cache import KVCache
from llama32_jax.quant.config import QuantConfig, resolve_quantize

if __name__ == "__main__":  # scaling_steps (the --train step) imports this module: one copy, one set of flags
    sys.modules.setdefault("experiments.memory_plan", sys.modules[__name__])

_MODEL = flags.DEFINE_string("model", "Llama-3.2-90B-Vision", "named config")
_PLAN = flags.DEFINE_string("plan", "h100x8", "plan name in sharding/ or a .toml path")
_BATCH = flags.DEFINE_integer("batch", 1, "sequences")
_CACHE = flags.DEFINE_integer("cache_len", 131072, "KV-cache slots per sequence")
_PROMPT = flags.DEFINE_integer("prompt_len", 2048, "tokens per prefill call (the prompt, or one chunk of it)")
_IMAGES = flags.DEFINE_integer("images", 1, "images per sequence (vision models; 4 tiles each)")
_ALL = flags.DEFINE_bool("all", False, "every model x named topology; writes results/memory_plan.{json,md}")
# --target and --attention_impl are shared with experiments.scaling_study (which imports this module; absl takes one
# definition of a name per process).
_TARGET = flags.DEFINE_enum(
    "target", "host", ["host", "tpu"],
    "host: XLA for this host's devices (memory_plan: simulated CPU devices; scaling_study: this host's devices); "
    "tpu: XLA:TPU (libtpu) for each plan's TPU slice, ahead of time on this host",
)  # fmt: skip
_ATTENTION = flags.DEFINE_enum(
    "attention_impl", "", ["", "auto", "xla", "pallas"],
    "attention kernels (nn.attend); empty: auto, except scaling_study --target=tpu: xla (XLA's cost model cannot "
    "see inside Pallas custom calls)",
)  # fmt: skip
_TRAIN = flags.DEFINE_bool("train", None, "also compile a full fine-tuning step (default: with --target=tpu --all)")
_TRAIN_BATCH = flags.DEFINE_integer("train_batch", 1, "sequences per training step (--train)")
_QUANTIZE = flags.DEFINE_list(
    "quantize",
    ["none"],
    "weights: none (bf16), int8, int4 or several (one row each); the quantized model is "
    "models.build.abstract_model(quant=...), the scales sharded by their logical axes",
)
_GROUP = flags.DEFINE_integer("group_size", 128, "int4 group size (--quantize=int4)")
_QUANT_SKIP = flags.DEFINE_list("quant_skip", [], "parts kept in bf16 when quantizing: vision, head")
_TRAIN_PLANS = flags.DEFINE_list(
    "train_plans", ["tpu-v5e-8", "tpu-v5p-16"], "--all --train: the plans that also compile the training step"
)

GB = 1e9
# Device memory (bytes) by device kind; "fits" leaves 10% headroom for the runtime and fragmentation.
DEVICE_MEMORY = {"H100": 80e9, "H200": 141e9, "TPU v5e": 16e9, "TPU v5p": 95e9, "TPU v6e": 32e9}
HEADROOM = 0.9
MODELS = ["Llama-3.2-1B", "Llama-3.2-3B", "Llama-3.2-11B-Vision", "Llama-3.2-90B-Vision"]
TOPOLOGIES = ["tpu-v5e-8", "tpu-v5p-16", "tpu-v6e-8", "h100x8", "h200x8", "h100x16-2host"]
TPU_PLANS = ["tpu-v5e-8", "tpu-v5p-16", "tpu-v6e-8", "tpu-v5e-16"]


def _abstract(tree, specs, mesh):
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, s)),
        tree,
        specs,
        is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec),
    )


def _shard_bytes(x) -> int:
    """One device's bytes of ``x``, int4 packed two values per byte (as every XLA backend's ``memory_analysis``
    counts an ``s4`` argument)."""
    n = math.prod(x.sharding.shard_shape(x.shape))
    return -(-n // 2) if x.dtype == jnp.int4 else n * jnp.dtype(x.dtype).itemsize


def _weight_shard_shapes(params, kinds=(jnp.bfloat16, jnp.int8, jnp.int4)) -> set[tuple[int, ...]]:
    """Shard shapes of the matrices (``ndim > 1``) of dtype ``kinds``: bf16 weights and int8/int4 kernels."""
    return {tuple(x.sharding.shard_shape(x.shape)) for x in jax.tree.leaves(params) if x.dtype in kinds and x.ndim > 1}


def _cpu_weight_upcasts(hlo: str, params, to: str = "f32") -> int:
    """Bytes of the copies of weights that XLA:CPU makes before its loops: ``to="f32"``, f32 copies of bf16 weights
    (its dot kernels are f32); ``to="s8"``, one byte per value copies of int4 kernels (XLA:CPU unpacks ``s4``).

    They show up in the entry computation as ``wrapped_convert`` fusions whose ``to`` result has the shape of one
    device's shard of a weight. A GPU/TPU compile multiplies bf16 directly and has no such buffers, so they
    are reported apart from the temporaries the model itself needs.
    """
    import re

    shard_shapes = _weight_shard_shapes(params, (jnp.int4,) if to == "s8" else (jnp.bfloat16, jnp.int8, jnp.int4))
    size = {"f32": 4, "s8": 1}[to]
    seen, total = set(), 0
    for m in re.finditer(rf"^\s*(%wrapped_convert[\w.]*) = {to}\[([\d,]+)\]\{{[^}}]*\}} fusion\(", hlo, re.MULTILINE):
        shape = tuple(int(d) for d in m.group(2).split(","))
        if m.group(1) not in seen and shape in shard_shapes:
            seen.add(m.group(1))
            total += math.prod(shape) * size
    return total


def _f32_weight_copies(hlo: str, params) -> int:
    """Bytes of f32 buffers in the optimized HLO shaped like one device's shard of a bf16 weight (or of one layer's
    slice of a stacked one), outside fusions: XLA:CPU's upcasts (:func:`_cpu_weight_upcasts`) and anything like
    them on another backend. Layout suffixes (``{1,0:T(8,128)}``) are ignored."""
    import re

    shapes = set()
    for shard in _weight_shard_shapes(params):
        shapes.add(shard)
        if len(shard) > 2:
            shapes.add(shard[1:])
    seen, total, fused = set(), 0, False
    for line in hlo.splitlines():
        if line and not line.startswith(" "):  # a computation's header: skip the bodies of fusions
            fused = "fused" in line.split("(")[0] or line.lstrip("%").startswith("wrapped")
            continue
        m = None if fused else re.match(r"\s*(%[\w.\-]+) = f32\[([\d,]+)\]", line)
        if m and m.group(1) not in seen:
            shape = tuple(int(d) for d in m.group(2).split(","))
            if shape in shapes:
                seen.add(m.group(1))
                total += math.prod(shape) * 4
    return total


def _tpu_mesh(plan):
    return sharding.tpu.plan_mesh(plan)


def _chip_hbm(plan) -> float:
    return sharding.tpu.chip(plan.devices).hbm_bytes


def _is_oom(e: Exception) -> bool:
    return "RESOURCE_EXHAUSTED" in str(e) or "Ran out of memory" in str(e)


def _oom_text(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return " ".join(lines[:2])[:300]


def plan_memory(
    model_name: str | configs.ModelConfig,
    plan_name: str,
    batch: int,
    cache_len: int,
    prompt_len: int,
    images: int,
    target: str = "cpu",
    attention_impl: str = "auto",
    train: bool = False,
    train_batch: int = 1,
    quant: str | QuantConfig | None = None,
) -> dict:
    """One model x plan row: per-device weights, KV cache, the decode and prefill steps' memory analysis (and a
    training step's with ``train``), "fits". ``target``: ``"cpu"`` (XLA:CPU, simulated devices) or ``"tpu"``
    (XLA:TPU for the plan's TPU slice). ``quant`` (``"int8"``, ``"int4"``, a ``QuantConfig``): the weight-only
    quantized model; ``weights_gb`` counts int4 packed (two values per byte, as the compiled arguments hold it) and,
    on CPU, the step peaks leave out XLA:CPU's one-byte copies of the int4 kernels (``cpu_int4_unpack_gb``)."""
    qc = resolve_quantize(quant)
    if qc is not None and train:
        raise sharding.PlanError("memory plan: the training step is for float weights; quantized rows plan inference")
    if target not in ("cpu", "tpu"):
        raise sharding.PlanError(f"memory plan target {target!r}: valid are 'cpu' and 'tpu'")
    named = isinstance(model_name, str)  # or a ModelConfig (the tests' small models)
    config = (configs.get_config(model_name) if named else model_name).replace(scan_layers=True)
    model_name = model_name if named else config.name
    plan = sharding.load_plan(plan_name)
    if target == "tpu":
        mesh = _tpu_mesh(plan)  # the plan's TPU slice (PlanError for a plan without a topology)
    else:
        mesh = sharding.make_mesh(plan, jax.devices("cpu"))  # simulated CPU devices, also on a GPU/TPU host
    sharding.validate(config, plan)
    batch = -(-batch // plan.batch_shards) * plan.batch_shards  # a data-parallel plan needs a batch per replica
    model = abstract_model(config, param_dtype=jnp.bfloat16, quant=qc)
    placement = sharding.Placement(plan, mesh)
    if target == "tpu":  # as shard_model: the attention modules too, so that "auto" sees the TPU mesh (Pallas)
        for _, node in nnx.iter_graph(model):
            if isinstance(node, nnx.Module) and hasattr(node, "placement"):
                node.placement = placement
    else:
        model.placement = placement
    set_attention_impl(model, attention_impl)
    graphdef, state = nnx.split(model)
    pure = nnx.to_pure_dict(state)
    specs = nnx.to_pure_dict(sharding.param_specs(model, plan))
    params = _abstract(pure, specs, mesh)

    cache = jax.eval_shape(lambda: KVCache.init(config, batch, cache_len, dtype=jnp.bfloat16))
    axes = sharding.cache_axes(True)
    cache = KVCache(
        k=jax.ShapeDtypeStruct(cache.k.shape, cache.k.dtype, sharding=placement.sharding(axes, cache.k.shape, "k")),
        v=jax.ShapeDtypeStruct(cache.v.shape, cache.v.dtype, sharding=placement.sharding(axes, cache.v.shape, "v")),
        start=jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=placement.sharding((dims.BATCH,), (batch,), "start")),
        index=jax.ShapeDtypeStruct((), jnp.int32, sharding=placement.replicated()),
    )
    cross = None
    if config.is_vision and images:
        from llama32_jax.models.mllama import CrossInputs

        t, v = config.text, config.vision
        n_v = images * v.max_num_tiles * v.tokens_per_tile
        kv_shape = (t.n_cross_attention_layers, batch, t.n_kv_heads, n_v, t.head_dim)
        kv_axes = (dims.LAYERS, *sharding.CROSS_KV_AXES)
        kv = jax.ShapeDtypeStruct(kv_shape, jnp.bfloat16, sharding=placement.sharding(kv_axes, kv_shape, "cross K/V"))
        mask_shape = (batch, cache_len, images, v.max_num_tiles)
        mask_sharding = placement.sharding((dims.BATCH, None, None, None), mask_shape, "tile mask")
        cross = CrossInputs((kv, kv), jax.ShapeDtypeStruct(mask_shape, jnp.bool_, sharding=mask_sharding),
                            v.tokens_per_tile)  # fmt: skip

    def step(params, tokens, cache, cross):
        module = nnx.merge(graphdef, params)
        kw = {} if cross is None else {"cross": cross}
        return module(tokens, cache, last_only=True, **kw)

    batch_sharding = placement.sharding((dims.BATCH, None), (batch, 1), "tokens")
    out = {"model": model_name, "plan": plan.name, "devices": plan.devices, "mesh": plan.mesh_dict}
    if qc is not None:
        out["quant"] = qc.to_json()
    out.update(target=target, topology=plan.topology if target == "tpu" else None, attention_impl=attention_impl)
    out.update(batch=batch, cache_len=cache_len, prompt_len=prompt_len, images=images if config.is_vision else 0)
    weights = sum(_shard_bytes(x) for x in jax.tree.leaves(params))
    if qc is not None:
        by_dtype: dict[str, float] = {}
        for x in jax.tree.leaves(params):
            by_dtype[str(x.dtype)] = by_dtype.get(str(x.dtype), 0.0) + _shard_bytes(x) / GB
        out["weights_by_dtype_gb"] = by_dtype
    kv_bytes = _shard_bytes(cache.k) + _shard_bytes(cache.v)
    cross_bytes = 0 if cross is None else 2 * _shard_bytes(cross.kv[0])
    out.update(weights_gb=weights / GB, kv_cache_gb=kv_bytes / GB, cross_kv_gb=cross_bytes / GB)
    for name, length in (("decode", 1), ("prefill", prompt_len)):
        tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32, sharding=batch_sharding)
        t0 = time.perf_counter()
        try:
            compiled = jax.jit(step, donate_argnums=(2,)).lower(params, tokens, cache, cross).compile()
        except Exception as e:  # XLA:TPU refuses a program larger than the chip's HBM
            if target != "tpu" or not _is_oom(e):
                raise
            out[name] = dict(compile_s=round(time.perf_counter() - t0, 1), compiler_oom=_oom_text(e))
            continue
        out[name] = _memory(compiled, params, target, time.perf_counter() - t0)
    if train:
        out["train"] = _train_memory(model_name, config, plan, placement, train_batch, prompt_len)
    if target == "tpu":
        capacity = _chip_hbm(plan)
    else:
        capacity = DEVICE_MEMORY.get(plan.devices or "")
    steps = [s for s in ("decode", "prefill") if "peak_gb" in out[s]]
    oom = [s for s in ("decode", "prefill") if "compiler_oom" in out[s]]
    out["peak_gb"] = max((out[s]["peak_gb"] for s in steps), default=None)
    out["raw_peak_gb"] = max((out[s]["raw_peak_gb"] for s in steps), default=None)
    if capacity is not None:
        budget = HEADROOM * capacity
        out["budget_gb"] = budget / GB
        out["fits"] = not oom and out["peak_gb"] * GB <= budget
        if oom:
            out["why"] = f"{oom[0]}: XLA:TPU refuses: {out[oom[0]]['compiler_oom']}" + (
                f" (weights alone {weights / GB:.1f} GB > {budget / GB:.1f} GB)" if weights > budget else ""
            )
        elif not out["fits"]:
            step = max(steps, key=lambda s: out[s]["peak_gb"])
            temp = out[step]["temp_gb_without_upcast"]
            out["why"] = (
                f"{step} peak {out['peak_gb']:.1f} > {budget / GB:.1f} GB = weights {weights / GB:.1f} + KV cache "
                f"{kv_bytes / GB:.1f} + {step} temporaries {temp:.1f}"
                + (" (the weights alone exceed it)" if weights > budget else "")
            )
        if train and "peak_gb" in out["train"]:
            out["train"]["fits"] = out["train"]["peak_gb"] * GB <= budget
    if target == "cpu":  # the CPU table's column names (committed results/memory_plan.json)
        out["xla_cpu_peak_gb"] = out.pop("raw_peak_gb")
        for s in steps:
            out[s]["xla_cpu_peak_gb"] = out[s].pop("raw_peak_gb")
        for key in ("target", "topology", "attention_impl"):
            out.pop(key)
    return out


def _memory(compiled, params, target: str, seconds: float) -> dict:
    """One compiled step's per-device memory analysis, in GB; on CPU less XLA:CPU's f32 weight upcasts and its
    one-byte copies of int4 kernels."""
    mem = compiled.memory_analysis()
    raw = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
    raw += mem.temp_size_in_bytes
    hlo = compiled.as_text()
    upcast = _cpu_weight_upcasts(hlo, params) if target == "cpu" else 0
    unpack = _cpu_weight_upcasts(hlo, params, "s8") if target == "cpu" else 0
    out = dict(
        compile_s=round(seconds, 1),
        argument_gb=mem.argument_size_in_bytes / GB,
        output_gb=mem.output_size_in_bytes / GB,
        alias_gb=mem.alias_size_in_bytes / GB,
        temp_gb=mem.temp_size_in_bytes / GB,
        raw_peak_gb=raw / GB,
    )
    if target == "cpu":
        out["cpu_weight_upcast_gb"] = upcast / GB
        if unpack:
            out["cpu_int4_unpack_gb"] = unpack / GB
    else:
        out["f32_weight_copies_gb"] = _f32_weight_copies(hlo, params) / GB
    upcast += unpack
    out.update(temp_gb_without_upcast=(mem.temp_size_in_bytes - upcast) / GB, peak_gb=(raw - upcast) / GB)
    return out


def _train_memory(model_name: str, config, plan, placement, batch: int, seq_len: int) -> dict:
    """A full fine-tuning step (AdamW, full remat) on ``[batch, seq_len]`` tokens: memory analysis, or the
    compiler's refusal."""
    from experiments.scaling_steps import Case, build_train

    batch = -(-batch // plan.batch_shards) * plan.batch_shards
    case = Case(model_name, plan.name, batch, seq_len, "train", "bfloat16", "scanned", 0, "full", "full")
    step = build_train(config, case, placement, jnp.bfloat16)
    out = dict(batch=batch, seq_len=seq_len, mode="full", remat="full")
    out.update(weights_gb=step.weights / GB, optimizer_state_gb=step.state / GB)
    t0 = time.perf_counter()
    try:
        compiled = jax.jit(step.fn, donate_argnums=step.donate).lower(*step.args).compile()
    except Exception as e:
        if not _is_oom(e):
            raise
        out.update(compile_s=round(time.perf_counter() - t0, 1), compiler_oom=_oom_text(e))
        return out
    mem = compiled.memory_analysis()
    raw = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
    out.update(
        compile_s=round(time.perf_counter() - t0, 1),
        argument_gb=mem.argument_size_in_bytes / GB,
        temp_gb=mem.temp_size_in_bytes / GB,
        peak_gb=raw / GB,
    )
    return out


def _model_label(r: dict) -> str:
    """The model, with its weights' quantization when it has one (``Llama-3.2-1B int8``)."""
    return r["model"] + (f" {r['quant']['mode']}" if r.get("quant") else "")


def _row(r: dict) -> str:
    fits = {True: "yes", False: f"**no** ({r.get('why', '')})", None: "—"}[r.get("fits")]
    return (
        f"| {_model_label(r)} | `{r['plan']}` | {r['weights_gb']:.2f} | {r['kv_cache_gb']:.2f} | "
        f"{r['cross_kv_gb']:.2f} | "
        f"{r['decode']['temp_gb_without_upcast']:.2f} | {r['prefill']['temp_gb_without_upcast']:.2f} | "
        f"{r['peak_gb']:.2f} | {r['xla_cpu_peak_gb']:.2f} | {r.get('budget_gb', float('nan')):.0f} | {fits} |"
    )


def _gb(d: dict, key: str) -> str:
    return f"{d[key]:.2f}" if key in d else "refused"


def _row_tpu(r: dict) -> str:
    fits = {True: "yes", False: f"**no** ({r.get('why', '')})", None: "—"}[r.get("fits")]
    peak = "—" if r["peak_gb"] is None else f"{r['peak_gb']:.2f}"
    copies = [r[s]["f32_weight_copies_gb"] for s in ("decode", "prefill") if "f32_weight_copies_gb" in r[s]]
    f32 = f"{max(copies):.2f}" if copies else "—"
    train = r.get("train")
    if train is None:
        t = "—"
    elif "peak_gb" in train:
        t = f"{train['peak_gb']:.2f} ({'fits' if train['fits'] else '**no**'})"
    else:
        t = "**no** (refused: " + train["compiler_oom"].split("RESOURCE_EXHAUSTED: ")[-1][:120] + ")"
    return (
        f"| {_model_label(r)} | `{r['plan']}` | {r['weights_gb']:.2f} | {r['kv_cache_gb']:.2f} | "
        f"{r['cross_kv_gb']:.2f} | "
        f"{_gb(r['decode'], 'temp_gb')} | {_gb(r['prefill'], 'temp_gb')} | {peak} | {f32} | "
        f"{r.get('budget_gb', float('nan')):.1f} | {fits} | {t} |"
    )


def write_tpu_table(record: dict) -> str:
    """``results/memory_plan_tpu.md`` from the ``--target=tpu --all`` record (also re-drawn from its JSON alone)."""
    rows, first = record["rows"], record["rows"][0]
    header = (
        "| model | plan | weights GB | KV cache GB | cross K/V GB | decode temp GB | prefill temp GB | "
        "peak GB / chip | f32 weight copies GB | budget GB | fits | train step peak GB |\n" + "|---" * 12 + "|\n"
    )
    text = (
        f"# Memory plans on TPU (per chip, XLA:TPU, bf16, batch {first['batch']}, {first['cache_len']}-slot KV "
        f"cache, {first['prompt_len']}-token prefill, 1 image of 4 tiles for the vision models; batch rounded up "
        "to one sequence per data-parallel replica)\n\n"
        f"`{record['command']}` on {record['machine']}, jax {record['jax']}, libtpu {record['libtpu']}: "
        "compiled by XLA:TPU for each plan's TPU slice (`llama32_jax.sharding.tpu.plan_mesh`) ahead of time on "
        f"this host, `compiled.memory_analysis()` of one chip; attention `{record['attention_impl']}` (auto: the "
        'Pallas kernels on a TPU mesh). Budget: the chip\'s HBM (`tpu.CHIPS`) less 10%. "refused": XLA:TPU '
        "would not compile the step (RESOURCE_EXHAUSTED: it cannot fit the chip's HBM). f32 weight copies: f32 "
        "buffers shaped like a bf16 weight shard in the optimized HLO (XLA:CPU's upcasts; none on TPU). Train "
        f"step: full fine-tuning, AdamW, full remat, batch {record['train_batch']} (per data-parallel replica) x "
        f"{first['prompt_len']} tokens, on {', '.join(record['train_plans'])} (weights + optimiser state + "
        "temporaries). The CPU table is `memory_plan.md`; docs/performance.md compares them.\n\n"
        + header
        + "\n".join(_row_tpu(r) for r in rows)
        + "\n"
    )
    path = os.path.join(RESULTS_DIR, "memory_plan_tpu.md")
    with open(path, "w") as f:
        f.write(text)
    return path


def main(argv):
    del argv
    tpu = _TARGET.value == "tpu"
    attention_impl = _ATTENTION.value or "auto"
    plans = TPU_PLANS if tpu else TOPOLOGIES
    runs = [(m, p) for m in MODELS for p in plans] if _ALL.value else [(_MODEL.value, _PLAN.value)]
    train = _TRAIN.value if _TRAIN.value is not None else (tpu and _ALL.value)
    quants = [None if q == "none" else QuantConfig(q, _GROUP.value, tuple(_QUANT_SKIP.value)) for q in _QUANTIZE.value]
    if _ALL.value and quants != [None]:
        raise sharding.PlanError(
            "--all writes the bf16 tables; quantized plans: python -m experiments.memory_plan_quant"
        )
    rows = []
    for (model_name, plan_name), qc in ((run, q) for run in runs for q in quants):
        r = plan_memory(
            model_name, plan_name, _BATCH.value, _CACHE.value, _PROMPT.value, _IMAGES.value,
            target="tpu" if tpu else "cpu", attention_impl=attention_impl, train_batch=_TRAIN_BATCH.value,
            train=train and qc is None and (not _ALL.value or plan_name in _TRAIN_PLANS.value), quant=qc,
        )  # fmt: skip
        times = [str(r[s]["compile_s"]) for s in ("decode", "prefill", "train") if s in r]
        print((_row_tpu if tpu else _row)(r), f"(compile {' + '.join(times)} s)", flush=True)
        rows.append(r)
    record = {
        "machine": machine(),
        "jax": jax.__version__,
        "command": "python -m experiments.memory_plan " + " ".join(sys.argv[1:]),
        "rows": rows,
    }
    if tpu:
        record.update(target="XLA:TPU (libtpu) ahead of time for each plan's TPU slice")
        record.update(libtpu=sharding.tpu.libtpu_version())
        record.update(attention_impl=attention_impl, train_plans=_TRAIN_PLANS.value, train_batch=_TRAIN_BATCH.value)
    stem = "memory_plan_tpu" if tpu else "memory_plan"
    suffix = "" if quants == [None] else "_" + "-".join(_QUANTIZE.value)
    name = f"{stem}.json" if _ALL.value else f"{stem}_{_MODEL.value}_{os.path.basename(_PLAN.value)}{suffix}.json"
    write_result(record, name)
    if _ALL.value and tpu:
        print(json.dumps({"written": write_tpu_table(record)}))
    elif _ALL.value:
        header = (
            "| model | plan | weights GB | KV cache GB | cross K/V GB | decode temp GB | prefill temp GB | "
            "peak GB / device | XLA:CPU raw peak GB | budget GB | fits |\n" + "|---" * 11 + "|\n"
        )
        text = (
            f"# Memory plans (per device, bf16, batch {_BATCH.value}, {_CACHE.value}-slot KV cache, "
            f"{_PROMPT.value}-token prefill, {_IMAGES.value} image of 4 tiles for the vision models; batch "
            "rounded up to one sequence per data-parallel replica)\n\n"
            f"`{record['command']}` on {record['machine']}, jax {jax.__version__}; XLA:CPU SPMD compile on "
            "simulated devices, `compiled.memory_analysis()`.\n\n" + header + "\n".join(_row(r) for r in rows) + "\n"
        )
        with open(os.path.join(RESULTS_DIR, "memory_plan.md"), "w") as f:
            f.write(text)
        print(json.dumps({"written": "experiments/results/memory_plan.md"}))


if __name__ == "__main__":
    cli.run(main)
