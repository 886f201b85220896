"""Ahead-of-time compiles of the TPU kernels: one kernel call, on abstract arrays placed on a TPU chip, compiled
by the real XLA:TPU compiler (Mosaic included) from any host where libtpu is installed.

A :class:`Case` names a kernel (``flash_fwd``, ``flash_bwd``, ``decode``, ``cross_fwd``, ``cross_bwd``), a chip
generation, a dtype, the per-device head shape of a model (:data:`HEADS`, unsharded or under 8-way tensor
parallelism) and the lengths. :func:`compile_case` builds the call on ``jax.ShapeDtypeStruct`` arguments with a
``NamedSharding`` on a one-chip mesh, traces it under that mesh (so Pallas' ``tpu_info`` sees the chip's device
kind), lowers and compiles it, and returns a :class:`Compiled` record: the compiled program's optimized HLO, how
many Mosaic kernels (``tpu_custom_call``) it holds, XLA's memory and cost analysis, and our VMEM estimate of each
kernel configuration against the generation's scoped VMEM (:func:`vmem_estimates`).

The mesh comes from the caller (``llama32_jax.sharding.tpu`` builds it), so this module needs no TPU and no
sharding layer; nothing here executes.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from llama32_jax.errors import InvalidInputError
from llama32_jax.kernels import flash_attention as flash_pkg
from llama32_jax.kernels.cross_attention import cross_attention
from llama32_jax.kernels.cross_attention import pallas_tpu as cross_tpu
from llama32_jax.kernels.decode_attention import decode_attention
from llama32_jax.kernels.decode_attention import pallas_tpu as decode_tpu
from llama32_jax.kernels.flash_attention import flash_attention
from llama32_jax.kernels.flash_attention import pallas_tpu as flash_tpu

KERNELS = ("flash_fwd", "flash_bwd", "decode", "cross_fwd", "cross_bwd")
# Mosaic kernels in the compiled program: the backward is the forward (residuals) plus the dq and dk/dv kernels.
KERNEL_CALLS = {"flash_fwd": 1, "flash_bwd": 3, "decode": 1, "cross_fwd": 1, "cross_bwd": 3}

# Llama 3.2 attention heads (head dim, query heads, kv heads); "mha" is a GQA-group-1 shape (8 / 8 heads).
HEADS = {
    "1B": (64, 32, 8),
    "3B": (128, 24, 8),
    "11B": (128, 32, 8),
    "90B": (128, 64, 8),
    "mha": (128, 8, 8),
}
TENSOR_PARALLEL = 8
TOKENS_PER_TILE = 1601  # Llama 3.2 Vision: (448 / 14)^2 patches + the class token per tile
TILES = 4  # tiles per image


@dataclasses.dataclass(frozen=True)
class Case:
    """One kernel call to compile.

    ``queries`` is the text/query length ``T``; ``keys`` the key length ``S`` (flash: the cache or sequence,
    decode: the cache) and, for cross-attention, ignored in favour of ``images`` (``N_v = images * 4 * 1601``).
    ``sharded``: the per-device heads under 8-way tensor parallelism (query and kv heads / 8), else unsharded.
    """

    kernel: str
    generation: str
    dtype: str  # "bfloat16" | "float32"
    model: str  # a key of HEADS
    sharded: bool
    batch: int
    queries: int
    keys: int = 0
    images: int = 0
    block_q: int | None = None
    block_k: int | None = None

    def __post_init__(self):
        if self.kernel not in KERNELS:
            raise InvalidInputError(f"Case.kernel must be one of {KERNELS}, got {self.kernel!r}")
        if self.model not in HEADS:
            raise InvalidInputError(f"Case.model must be one of {tuple(HEADS)}, got {self.model!r}")
        if self.dtype not in ("bfloat16", "float32"):
            raise InvalidInputError(f"Case.dtype must be 'bfloat16' or 'float32', got {self.dtype!r}")
        if self.kernel.startswith("cross") and self.images < 1:
            raise InvalidInputError(f"a cross-attention Case needs images >= 1, got {self.images}")
        if not self.kernel.startswith("cross") and self.keys < 1:
            raise InvalidInputError(f"a {self.kernel} Case needs keys >= 1, got {self.keys}")

    @property
    def heads(self) -> tuple[int, int, int]:
        """``(H, N, K)`` per device."""
        h, n, k = HEADS[self.model]
        return (h, n // TENSOR_PARALLEL, k // TENSOR_PARALLEL) if self.sharded else (h, n, k)

    @property
    def groups(self) -> int:
        _, n, k = self.heads
        return n // k

    @property
    def key_length(self) -> int:
        return self.images * TILES * TOKENS_PER_TILE if self.kernel.startswith("cross") else self.keys

    @property
    def id(self) -> str:
        h, n, k = self.heads
        shape = f"{self.model}{'-tp8' if self.sharded else ''}-h{h}-n{n}k{k}-b{self.batch}-t{self.queries}"
        shape += f"-i{self.images}" if self.kernel.startswith("cross") else f"-s{self.keys}"
        blocks = "" if self.block_q is None and self.block_k is None else f"-bq{self.block_q}-bk{self.block_k}"
        dt = "bf16" if self.dtype == "bfloat16" else "f32"
        return f"{self.kernel}-{self.generation}-{dt}-{shape}{blocks}"


@dataclasses.dataclass
class Compiled:
    """What one compile gave: the program's text, its kernel count, XLA's analyses and our VMEM estimates."""

    case: Case
    seconds: float
    hlo: str
    custom_calls: int
    memory: dict  # XLA's memory analysis of one chip: argument / output / temp / generated code bytes
    cost: dict  # flops, bytes accessed (and optimal_seconds: unreliable for custom calls)
    vmem: dict  # kernel name -> estimated VMEM bytes (see vmem_estimates)


def _sds(mesh, shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, PartitionSpec()))


def build(case: Case, mesh):
    """``(fn, args)``: the kernel call of ``case`` as a function of abstract arrays on ``mesh``'s one device."""
    h, n, kv = case.heads
    b, t, s = case.batch, case.queries, case.key_length
    dt = jnp.dtype(case.dtype)
    q = _sds(mesh, (b, t, n, h), dt)
    kvs = _sds(mesh, (b, kv, s, h), dt)
    ints = _sds(mesh, (b,), jnp.int32)
    scalar = _sds(mesh, (), jnp.int32)
    pallas = dict(impl="pallas", backend="tpu", interpret=False)
    blocks = {name: getattr(case, name) for name in ("block_q", "block_k") if getattr(case, name) is not None}
    if case.kernel in ("flash_fwd", "flash_bwd"):
        op = functools.partial(flash_attention, causal=True, **pallas, **blocks)
        if case.kernel == "flash_fwd":  # a prefill chunk of T queries written at slot q_offset of an S-slot cache

            def fn(q, k, v, q_offset, kv_end):
                return op(q, k, v, q_offset=q_offset, kv_end=kv_end)

            return fn, (q, kvs, kvs, scalar, ints)

        def loss(q, k, v, kv_end):  # training: T = S, ragged per-sequence ends
            return op(q, k, v, kv_end=kv_end).astype(jnp.float32).sum()

        return jax.grad(loss, argnums=(0, 1, 2)), (q, kvs, kvs, ints)
    if case.kernel == "decode":
        op = functools.partial(decode_attention, **pallas, **{k: v for k, v in blocks.items() if k == "block_k"})

        def fn(q, k, v, q_offset, kv_end):
            return op(q, k, v, q_offset=q_offset, kv_end=kv_end)

        return fn, (q, kvs, kvs, scalar, ints)
    mask = _sds(mesh, (b, t, case.images, TILES), jnp.bool_)
    op = functools.partial(cross_attention, tokens_per_tile=TOKENS_PER_TILE, **pallas, **blocks)
    if case.kernel == "cross_fwd":
        return op, (q, kvs, kvs, mask)

    def cross_loss(q, k, v, mask):
        return op(q, k, v, mask).astype(jnp.float32).sum()

    return jax.grad(cross_loss, argnums=(0, 1, 2)), (q, kvs, kvs, mask)


def vmem_estimates(case: Case) -> dict[str, int]:
    """Kernel name -> the estimated VMEM bytes of each Mosaic kernel ``case`` compiles (the blocks the op picks)."""
    h, _, kv = case.heads
    t, s, g, dt = case.queries, case.key_length, case.groups, jnp.dtype(case.dtype)
    if case.kernel.startswith("flash"):
        plan = flash_pkg.plan_blocks("tpu", rows=t * g, keys=s, block_q=case.block_q, block_k=case.block_k)
        (fq, fk), (bq, bk) = plan
        out = {"flash_attention_fwd_tpu": flash_tpu.vmem_bytes("forward", fq, fk, h, dt)}
        if case.kernel == "flash_bwd":
            out["flash_attention_dq_tpu"] = flash_tpu.vmem_bytes("dq", bq, bk, h, dt)
            out["flash_attention_dkv_tpu"] = flash_tpu.vmem_bytes("dkv", bq, bk, h, dt)
        return out
    if case.kernel == "decode":
        block_k, _ = decode_tpu.plan(
            batch=case.batch, kv_heads=kv, rows=t * g, seq_len=s, head_dim=h, dtype=dt,
            block_k=case.block_k, num_splits=None, interpret=False,
        )  # fmt: skip
        return {"decode_attention_tpu": decode_tpu.vmem_bytes(t * g, block_k, h, dt)}
    bq, bk = cross_tpu.choose_blocks(t * g, s, case.block_q, case.block_k)
    tiles = case.images * TILES
    out = {"cross_attention_fwd": cross_tpu.vmem_bytes("forward", bq, bk, h, tiles, dt)}
    if case.kernel == "cross_bwd":
        out["cross_attention_dq"] = cross_tpu.vmem_bytes("dq", bq, bk, h, tiles, dt)
        out["cross_attention_dkdv"] = cross_tpu.vmem_bytes("dkdv", bq, bk, h, tiles, dt)
    return out


def row_vector_bytes(case: Case) -> int:
    """HBM bytes of one per-row fp32 vector (logsumexp, ``delta``) of the flash / cross kernels, ``[B, K, R, 1]``:
    TPU's (8, 128) tiling pads its unit last dim to 128 lanes, so it takes ``B * K * R * 512`` bytes (128x its
    data). The backward holds up to four of them as XLA temporaries; 0 for decode (no such vector)."""
    _, _, kv = case.heads
    rows, s = case.queries * case.groups, case.key_length
    if case.kernel.startswith("flash"):
        (fq, _), (bq, _) = flash_pkg.plan_blocks("tpu", rows=rows, keys=s, block_q=case.block_q, block_k=case.block_k)
        block = max(fq, bq)
    elif case.kernel.startswith("cross"):
        block = cross_tpu.choose_blocks(rows, s, case.block_q, case.block_k)[0]
    else:
        return 0
    return case.batch * kv * (-(-rows // block) * block) * 128 * 4


def compile_case(case: Case, mesh) -> Compiled:
    """Trace (under ``mesh``), lower and compile ``case`` for the mesh's TPU chip; errors propagate."""
    fn, args = build(case, mesh)
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        compiled = jax.jit(fn).trace(*args).lower().compile()
    seconds = time.perf_counter() - start
    hlo = compiled.as_text()
    mem = compiled.memory_analysis()
    memory = {
        name: int(getattr(mem, f"{name}_size_in_bytes"))
        for name in ("argument", "output", "temp", "alias", "generated_code")
        if hasattr(mem, f"{name}_size_in_bytes")
    }
    cost = compiled.cost_analysis() or {}
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    cost = {k: float(cost[k]) for k in ("flops", "bytes accessed", "transcendentals", "optimal_seconds") if k in cost}
    return Compiled(
        case=case,
        seconds=seconds,
        hlo=hlo,
        custom_calls=hlo.count('custom_call_target="tpu_custom_call"'),
        memory=memory,
        cost=cost,
        vmem=vmem_estimates(case),
    )
