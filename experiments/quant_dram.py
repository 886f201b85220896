"""The int8 one-row product with its weights streaming from DRAM, not from this CPU's 260 MiB L3 (docs/performance.md,
"Quantized decode on CPU", follow-up): 40 distinct int8 weights vs 12 distinct fp32 ones, 1B MLP shape.

    .venv/bin/python -m experiments.quant_dram
"""

import time

import jax
import jax.numpy as jnp
import numpy as np

O, I, N = 8192, 2048, 40
rng = np.random.default_rng(0)
qs = [jnp.asarray(rng.integers(-100, 100, (O, I)).astype(np.int8)) for _ in range(N)]
ws = [q.astype(jnp.float32) for q in qs[:12]]  # 12 x 64 MiB = 768 MiB fp32
s = jnp.ones((O,), jnp.float32)
x = jnp.asarray(rng.standard_normal((1, I), dtype=np.float32))
f8 = jax.jit(lambda x, q, s: (x @ q.astype(jnp.float32).T) * s)
f32 = jax.jit(lambda x, w: x @ w.T)
for name, f, arrs in (
    ("int8 fused, 1 weight (L3-hot)", lambda a: f8(x, a, s), qs[:1] * N),
    ("int8 fused, 40 weights 640 MiB", lambda a: f8(x, a, s), qs),
    ("fp32, 1 weight (L3-hot)", lambda a: f32(x, a), ws[:1] * 12),
    ("fp32, 12 weights 768 MiB", lambda a: f32(x, a), ws),
):
    f(arrs[0]).block_until_ready()
    for a in arrs:
        f(a).block_until_ready()
    t = time.perf_counter()
    for a in arrs:
        r = f(a)
    r.block_until_ready()
    print(f"{name:34s} {(time.perf_counter() - t) / len(arrs) * 1e3:7.2f} ms per product", flush=True)
