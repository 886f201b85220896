"""The README's main job (until generation lands): a forward pass of a built-in model, with a logits summary.

    .venv/bin/python -m experiments.demo                       # tiny random model, both layer layouts
    .venv/bin/python -m experiments.demo --model=Llama-3.2-1B --length=32 --dtype=float32

It runs the prompt through the full forward, then again as prefill + token-by-token decode through the KV cache,
in the unrolled and the scanned parameter layout, and checks that all four agree.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

import llama32_jax as lj

_MODEL = flags.DEFINE_string("model", "tiny-text", f"a named config: {', '.join(lj.configs.CONFIGS)}")
_BATCH = flags.DEFINE_integer("batch", 2, "sequences in the batch")
_LENGTH = flags.DEFINE_integer("length", 48, "tokens per sequence")
_PREFILL = flags.DEFINE_integer("prefill", 40, "tokens prefilled before decoding one at a time")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "parameter dtype")
_SEED = flags.DEFINE_integer("seed", 0, "seed for weights and tokens")


def main(argv: list[str]) -> None:
    del argv
    cfg = lj.configs.get_config(_MODEL.value)
    if not 0 < _PREFILL.value <= _LENGTH.value:
        raise app.UsageError(f"--prefill must be in [1, --length={_LENGTH.value}], got {_PREFILL.value}")
    dtype = jnp.dtype(_DTYPE.value)
    t0 = time.perf_counter()
    model = lj.init_model(cfg, param_dtype=dtype, seed=_SEED.value)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    print(
        f"{cfg.name}: {lj.param_count(model) / 1e6:.2f} M parameters ({dtype.name}), "
        f"built in {time.perf_counter() - t0:.1f} s on {jax.devices()[0].platform}"
    )
    rng = np.random.default_rng(_SEED.value)
    tokens = jnp.asarray(rng.integers(0, cfg.text.vocab_size, size=(_BATCH.value, _LENGTH.value)), jnp.int32)

    results = {}
    for scan in (False, True):
        layout = "scanned" if scan else "unrolled"
        m = lj.load_params(cfg.replace(scan_layers=scan), params, param_dtype=dtype)
        t0 = time.perf_counter()
        full, _ = lj.forward(m, tokens)
        full.block_until_ready()
        t_full = time.perf_counter() - t0
        cache = lj.KVCache.init(m.config, _BATCH.value, _LENGTH.value, dtype=dtype)
        steps, cache = lj.forward(m, tokens[:, : _PREFILL.value], cache)
        steps = [steps]
        for i in range(_PREFILL.value, _LENGTH.value):
            logits, cache = lj.forward(m, tokens[:, i : i + 1], cache)
            steps.append(logits)
        results[layout] = (np.asarray(full), np.concatenate([np.asarray(s) for s in steps], axis=1))
        print(f"  {layout:9s} forward [{_BATCH.value}x{_LENGTH.value}] in {t_full:.2f} s (incl. compile)")

    full = results["unrolled"][0]
    print(
        f"logits {full.shape} {full.dtype}: mean {full.mean():+.4f}  std {full.std():.4f}  "
        f"min {full.min():+.3f}  max {full.max():+.3f}"
    )
    print(f"argmax of the last position per sequence: {full[:, -1].argmax(-1).tolist()}")
    tol = 1e-4 if dtype == jnp.float32 else 5e-2
    worst = max(float(np.max(np.abs(a - full))) for pair in results.values() for a in pair)
    print(f"max |Δlogit| across full/incremental x unrolled/scanned: {worst:.2e} (tolerance {tol:g})")
    if worst > tol:
        raise SystemExit("FAILED: the four ways of computing the logits disagree")
    print("OK")


if __name__ == "__main__":
    app.run(main)
