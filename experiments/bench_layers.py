"""Decode-step speed of the two layer layouts (scanned stack vs unrolled per-layer parameters).

    .venv/bin/python -m experiments.bench_layers                          # 1B shape, fp32, batch 1 and 16
    .venv/bin/python -m experiments.bench_layers --model=tiny-text --batch=1 --steps=5

For each layout it compiles one single-token decode step against a KV cache, runs ``--warmup`` steps, then times
``--steps`` steps and reports ms/step, tokens/s, and the effective weight bandwidth (parameter bytes read per step
/ time), which at batch 1 is the number that decides decode speed. Writes JSON to --out.
"""

from __future__ import annotations

import gc
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx

import llama32_jax as lj
from experiments import cli
from experiments.results_io import machine, write_result
from llama32_jax.models.text import stack_layers

_MODEL = flags.DEFINE_string("model", "Llama-3.2-1B", "named config")
_BATCH = flags.DEFINE_list("batch", ["1", "16"], "batch sizes")
_STEPS = flags.DEFINE_integer("steps", 20, "timed decode steps")
_WARMUP = flags.DEFINE_integer("warmup", 3, "untimed decode steps after compiling")
_CACHE = flags.DEFINE_integer("cache_len", 256, "KV cache slots (the prompt fills half)")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "parameter dtype")
_OUT = flags.DEFINE_string("out", "", "JSON output path (default: experiments/results/bench_layers_<model>.json)")


def _time_decode(model, batch: int) -> dict:
    cfg = model.config
    dtype = jnp.dtype(_DTYPE.value)
    graphdef, state = nnx.split(model)

    @jax.jit
    def step(state, tokens, cache):
        return nnx.merge(graphdef, state)(tokens, cache)

    cache = lj.KVCache.init(cfg, batch, _CACHE.value, dtype=dtype)
    prompt = jnp.ones((batch, _CACHE.value // 2), jnp.int32)
    _, cache = step(state, prompt, cache)  # prefill (its own compile)
    jax.block_until_ready(cache)
    tok = jnp.ones((batch, 1), jnp.int32)
    t0 = time.perf_counter()
    logits, cache = step(state, tok, cache)
    logits.block_until_ready()
    compile_s = time.perf_counter() - t0
    for _ in range(_WARMUP.value):
        logits, cache = step(state, tok, cache)
    logits.block_until_ready()
    times = []
    for _ in range(_STEPS.value):
        t0 = time.perf_counter()
        logits, cache = step(state, tok, cache)
        logits.block_until_ready()
        times.append(time.perf_counter() - t0)
    ms = 1e3 * float(np.median(times))
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    return {
        "batch": batch,
        "ms_per_step_median": round(ms, 2),
        "ms_per_step_min": round(1e3 * min(times), 2),
        "tokens_per_s": round(batch * 1e3 / ms, 2),
        "weight_GB": round(weight_bytes / 1e9, 3),
        "effective_weight_GB_per_s": round(weight_bytes / 1e9 / (ms / 1e3), 1),
        "first_step_incl_compile_s": round(compile_s, 2),
    }


def main(argv):
    del argv
    cfg = lj.configs.get_config(_MODEL.value)
    dtype = jnp.dtype(_DTYPE.value)
    batches = [int(b) for b in _BATCH.value]
    results = {}
    t0 = time.perf_counter()
    model = lj.init_model(cfg.replace(scan_layers=False), param_dtype=dtype)
    print(f"{cfg.name} {dtype.name}: {lj.param_count(model) / 1e9:.3f} B params, init {time.perf_counter() - t0:.0f} s")
    results["unrolled"] = [_time_decode(model, b) for b in batches]
    print("unrolled", results["unrolled"])
    params = stack_layers(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    del model
    gc.collect()
    model = lj.load_params(cfg.replace(scan_layers=True), params, param_dtype=dtype, layout="stacked")
    del params
    gc.collect()
    results["scanned"] = [_time_decode(model, b) for b in batches]
    print("scanned ", results["scanned"])
    for u, s in zip(results["unrolled"], results["scanned"], strict=True):
        speedup = s["ms_per_step_median"] / u["ms_per_step_median"]
        print(
            f"batch {u['batch']:3d}: unrolled {u['ms_per_step_median']:8.1f} ms/step "
            f"({u['effective_weight_GB_per_s']:5.1f} GB/s)   scanned {s['ms_per_step_median']:8.1f} ms/step "
            f"({s['effective_weight_GB_per_s']:5.1f} GB/s)   unrolled speed-up {speedup:.2f}x"
        )
    record = {
        "benchmark": "bench_layers",
        "command": "python -m experiments.bench_layers "
        + " ".join(
            f"--{k}={v}"
            for k, v in [
                ("model", _MODEL.value),
                ("batch", ",".join(_BATCH.value)),
                ("steps", _STEPS.value),
                ("cache_len", _CACHE.value),
                ("dtype", _DTYPE.value),
            ]
        ),
        "machine": machine(),
        "jax": jax.__version__,
        "model": cfg.name,
        "dtype": dtype.name,
        "results": results,
    }
    write_result(record, f"bench_layers_{cfg.name}.json", _OUT.value)


if __name__ == "__main__":
    cli.run(main)
