"""Ahead-of-time memory plans: compile prefill and decode at full size on a simulated mesh, read XLA's numbers.

    .venv/bin/python -m experiments.memory_plan --model=Llama-3.2-90B-Vision --plan=h100x8 --cache_len=131072
    .venv/bin/python -m experiments.memory_plan --all        # every model x named topology -> results/memory_plan.*

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
from llama32_jax.nn.cache import KVCache

_MODEL = flags.DEFINE_string("model", "Llama-3.2-90B-Vision", "named config")
_PLAN = flags.DEFINE_string("plan", "h100x8", "plan name in sharding/ or a .toml path")
_BATCH = flags.DEFINE_integer("batch", 1, "sequences")
_CACHE = flags.DEFINE_integer("cache_len", 131072, "KV-cache slots per sequence")
_PROMPT = flags.DEFINE_integer("prompt_len", 2048, "tokens per prefill call (the prompt, or one chunk of it)")
_IMAGES = flags.DEFINE_integer("images", 1, "images per sequence (vision models; 4 tiles each)")
_ALL = flags.DEFINE_bool("all", False, "every model x named topology; writes results/memory_plan.{json,md}")

GB = 1e9
# Device memory (bytes) by device kind; "fits" leaves 10% headroom for the runtime and fragmentation.
DEVICE_MEMORY = {"H100": 80e9, "H200": 141e9, "TPU v5e": 16e9, "TPU v5p": 95e9, "TPU v6e": 32e9}
HEADROOM = 0.9
MODELS = ["Llama-3.2-1B", "Llama-3.2-3B", "Llama-3.2-11B-Vision", "Llama-3.2-90B-Vision"]
TOPOLOGIES = ["tpu-v5e-8", "tpu-v5p-16", "tpu-v6e-8", "h100x8", "h200x8", "h100x16-2host"]


def _abstract(tree, specs, mesh):
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, s)),
        tree,
        specs,
        is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec),
    )


def _shard_bytes(x) -> int:
    shape = x.sharding.shard_shape(x.shape)
    return math.prod(shape) * jnp.dtype(x.dtype).itemsize


def _cpu_weight_upcasts(hlo: str, params) -> int:
    """Bytes of the f32 copies of bf16 weights that XLA:CPU makes before its loops (its dot kernels are f32).

    They show up in the entry computation as ``wrapped_convert`` fusions whose f32 result has the shape of one
    device's shard of a bf16 weight. A GPU/TPU compile multiplies bf16 directly and has no such buffers, so they
    are reported apart from the temporaries the model itself needs.
    """
    import re

    shard_shapes = {
        tuple(x.sharding.shard_shape(x.shape))
        for x in jax.tree.leaves(params)
        if x.dtype == jnp.bfloat16 and x.ndim > 1
    }
    seen, total = set(), 0
    for m in re.finditer(r"^\s*(%wrapped_convert[\w.]*) = f32\[([\d,]+)\]\{[^}]*\} fusion\(", hlo, re.MULTILINE):
        shape = tuple(int(d) for d in m.group(2).split(","))
        if m.group(1) not in seen and shape in shard_shapes:
            seen.add(m.group(1))
            total += math.prod(shape) * 4
    return total


def plan_memory(model_name: str, plan_name: str, batch: int, cache_len: int, prompt_len: int, images: int) -> dict:
    config = configs.get_config(model_name).replace(scan_layers=True)
    plan = sharding.load_plan(plan_name)
    mesh = sharding.make_mesh(plan, jax.devices("cpu"))  # simulated CPU devices, also on a GPU/TPU host
    sharding.validate(config, plan)
    batch = -(-batch // plan.batch_shards) * plan.batch_shards  # a data-parallel plan needs a batch per replica
    model = abstract_model(config, param_dtype=jnp.bfloat16)
    placement = sharding.Placement(plan, mesh)
    model.placement = placement
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
    out.update(batch=batch, cache_len=cache_len, prompt_len=prompt_len, images=images if config.is_vision else 0)
    weights = sum(_shard_bytes(x) for x in jax.tree.leaves(params))
    kv_bytes = _shard_bytes(cache.k) + _shard_bytes(cache.v)
    cross_bytes = 0 if cross is None else 2 * _shard_bytes(cross.kv[0])
    out.update(weights_gb=weights / GB, kv_cache_gb=kv_bytes / GB, cross_kv_gb=cross_bytes / GB)
    for name, length in (("decode", 1), ("prefill", prompt_len)):
        tokens = jax.ShapeDtypeStruct((batch, length), jnp.int32, sharding=batch_sharding)
        t0 = time.perf_counter()
        compiled = jax.jit(step, donate_argnums=(2,)).lower(params, tokens, cache, cross).compile()
        mem = compiled.memory_analysis()
        raw = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
        raw += mem.temp_size_in_bytes
        upcast = _cpu_weight_upcasts(compiled.as_text(), params)
        out[name] = dict(
            compile_s=round(time.perf_counter() - t0, 1),
            argument_gb=mem.argument_size_in_bytes / GB,
            output_gb=mem.output_size_in_bytes / GB,
            alias_gb=mem.alias_size_in_bytes / GB,
            temp_gb=mem.temp_size_in_bytes / GB,
            xla_cpu_peak_gb=raw / GB,
            cpu_weight_upcast_gb=upcast / GB,
            temp_gb_without_upcast=(mem.temp_size_in_bytes - upcast) / GB,
            peak_gb=(raw - upcast) / GB,
        )
    out["peak_gb"] = max(out["decode"]["peak_gb"], out["prefill"]["peak_gb"])
    out["xla_cpu_peak_gb"] = max(out["decode"]["xla_cpu_peak_gb"], out["prefill"]["xla_cpu_peak_gb"])
    capacity = DEVICE_MEMORY.get(plan.devices or "")
    if capacity is not None:
        budget = HEADROOM * capacity
        out["budget_gb"] = budget / GB
        out["fits"] = out["peak_gb"] * GB <= budget
        if not out["fits"]:
            step = max(("decode", "prefill"), key=lambda s: out[s]["peak_gb"])
            temp = out[step]["temp_gb_without_upcast"]
            out["why"] = (
                f"{step} peak {out['peak_gb']:.1f} > {budget / GB:.1f} GB = weights {weights / GB:.1f} + KV cache "
                f"{kv_bytes / GB:.1f} + {step} temporaries {temp:.1f}"
                + (" (the weights alone exceed it)" if weights > budget else "")
            )
    return out


def _row(r: dict) -> str:
    fits = {True: "yes", False: f"**no** ({r.get('why', '')})", None: "—"}[r.get("fits")]
    return (
        f"| {r['model']} | `{r['plan']}` | {r['weights_gb']:.2f} | {r['kv_cache_gb']:.2f} | {r['cross_kv_gb']:.2f} | "
        f"{r['decode']['temp_gb_without_upcast']:.2f} | {r['prefill']['temp_gb_without_upcast']:.2f} | "
        f"{r['peak_gb']:.2f} | {r['xla_cpu_peak_gb']:.2f} | {r.get('budget_gb', float('nan')):.0f} | {fits} |"
    )


def main(argv):
    del argv
    runs = [(m, p) for m in MODELS for p in TOPOLOGIES] if _ALL.value else [(_MODEL.value, _PLAN.value)]
    rows = []
    for model_name, plan_name in runs:
        r = plan_memory(model_name, plan_name, _BATCH.value, _CACHE.value, _PROMPT.value, _IMAGES.value)
        print(_row(r), f"(compile {r['decode']['compile_s']} + {r['prefill']['compile_s']} s)", flush=True)
        rows.append(r)
    record = {
        "machine": machine(),
        "jax": jax.__version__,
        "command": "python -m experiments.memory_plan " + " ".join(sys.argv[1:]),
        "rows": rows,
    }
    name = "memory_plan.json" if _ALL.value else f"memory_plan_{_MODEL.value}_{os.path.basename(_PLAN.value)}.json"
    write_result(record, name)
    if _ALL.value:
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
