"""Where a decode step's time goes: the full step vs its parts, each jitted alone on the model's own modules.

    .venv/bin/python -m experiments.bench_decode_breakdown                    # 1B shape, fp32, batch 1 and 16

For batch B it times (median of --steps runs): the whole single-token decode step against a half-full cache; the
16 SwiGLU MLPs alone; the 16 attention projections (Wq, Wk, Wv, Wo) alone; the output head alone. Each part is
reported in ms, GB/s of weights read and GFLOP/s; "rest" is the step minus the parts (attention over the cache,
norms, RoPE, embedding, dispatch). Writes JSON.
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx

import llama32_jax as lj
from experiments import cli
from experiments.results_io import machine, write_result

_MODEL = flags.DEFINE_string("model", "Llama-3.2-1B", "named config (random weights)")
_BATCH = flags.DEFINE_list("batch", ["1", "16"], "batch sizes")
_STEPS = flags.DEFINE_integer("steps", 10, "timed runs per measurement")
_CACHE = flags.DEFINE_integer("cache_len", 256, "KV cache slots (half full)")
_OUT = flags.DEFINE_string("out", "", "JSON path (default experiments/results/bench_decode_breakdown_<model>.json)")


def _median_ms(fn, *args) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(_STEPS.value):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def main(argv):
    del argv
    cfg = lj.configs.get_config(_MODEL.value).replace(scan_layers=False)
    t = cfg.text
    model = lj.init_model(cfg, param_dtype=jnp.float32)
    graphdef, state = nnx.split(model)
    mlp_bytes = t.n_layers * 3 * t.dim * t.ffn_dim * 4
    proj_bytes = t.n_layers * 2 * t.dim * (t.n_heads + t.n_kv_heads) * t.head_dim * 4
    head_bytes = t.vocab_size * t.dim * 4

    @jax.jit
    def step(state, tok, cache):
        return nnx.merge(graphdef, state)(tok, cache, last_only=True)

    @jax.jit
    def mlps(state, x):
        m = nnx.merge(graphdef, state)
        return [layer.feed_forward(x) for layer in m.layers]

    @jax.jit
    def projections(state, x):
        m = nnx.merge(graphdef, state)
        outs = []
        for layer in m.layers:
            a = layer.attention
            outs += [a.wo(a.wq(x)), a.wk(x), a.wv(x)]
        return outs

    @jax.jit
    def head(state, x):
        return nnx.merge(graphdef, state).embed.attend(x)

    rows = []
    for b in [int(v) for v in _BATCH.value]:
        cache = lj.KVCache.init(cfg, b, _CACHE.value, dtype=jnp.float32)
        _, cache = step(state, jnp.ones((b, _CACHE.value // 2), jnp.int32), cache)
        tok = jnp.ones((b, 1), jnp.int32)
        x = jnp.ones((b, 1, t.dim), jnp.float32) * 0.1
        full = _median_ms(lambda s, k, c: step(s, k, c)[0], state, tok, cache)
        parts = {
            "mlp": (_median_ms(mlps, state, x), mlp_bytes),
            "attention_projections": (_median_ms(projections, state, x), proj_bytes),
            "head": (_median_ms(head, state, x), head_bytes),
        }
        row = {"batch": b, "step_ms": round(full, 1)}
        for name, (ms, nbytes) in parts.items():
            row[name] = {
                "ms": round(ms, 1),
                "share_of_step": round(ms / full, 3),
                "GB_per_s": round(nbytes / 1e9 / (ms / 1e3), 1),
                "GFLOP_per_s": round(2 * b * nbytes / 4 / 1e9 / (ms / 1e3), 1),
            }
        row["rest_ms"] = round(full - sum(ms for ms, _ in parts.values()), 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    record = {
        "benchmark": "bench_decode_breakdown",
        "command": f"python -m experiments.bench_decode_breakdown --model={_MODEL.value} "
        f"--batch={','.join(_BATCH.value)} --steps={_STEPS.value} --cache_len={_CACHE.value}",
        "machine": machine(),
        "jax": jax.__version__,
        "model": cfg.name,
        "dtype": "float32",
        "results": rows,
    }
    write_result(record, f"bench_decode_breakdown_{cfg.name}.json", _OUT.value)


if __name__ == "__main__":
    cli.run(main)
