"""One compiled 1B forward step (one token, no cache) with fp32 or quantized weights: the in-model cost of
qlinear's formulation (docs/performance.md, "Quantized decode on CPU", follow-up).

    .venv/bin/python -m experiments.quant_step fp32 unrolled
    .venv/bin/python -m experiments.quant_step int8 unrolled      # or int4; "scan" for the scanned layout
"""

import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

import llama32_jax as lj
from llama32_jax.models.quantize import quantize_model

cfg = lj.configs.LLAMA_3_2_1B.replace(scan_layers=sys.argv[2] == "scan")
m = lj.init_model(cfg, param_dtype=jnp.float32)
if sys.argv[1] != "fp32":
    quantize_model(m, lj.QuantConfig(sys.argv[1], group_size=128))
gd, st = nnx.split(m)


@jax.jit
def step(st, tok):
    mm = nnx.merge(gd, st)
    return mm(tok, None, last_only=True)[0]


tok = jnp.zeros((1, 1), jnp.int32)
r = step(st, tok)
r.block_until_ready()
t = time.perf_counter()
for _ in range(5):
    r = step(st, tok)
r.block_until_ready()
print(sys.argv[1:], f"{(time.perf_counter() - t) / 5 * 1e3:.1f} ms / step (no cache)")
