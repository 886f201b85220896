"""Properties of the TPU kernels that the real TPU compiler needs and the interpreter does not check (found by
compiling them with XLA:TPU, tests/tpu/test_kernels_compile.py; this suite pins them on any CPU machine).

- Every matmul inside a TPU kernel carries an explicit precision: ``DEFAULT`` on 16-bit operands, ``HIGHEST`` on
  fp32 only when the session asks for full fp32 matmuls. A dot with no precision takes the session default;
  under ``jax_default_matmul_precision="highest"`` (as these tests run) Mosaic then got an fp32 contraction of
  bf16 operands and refused every bf16 kernel ("Bad lhs type"), while the interpreter ran them.
- The VMEM estimates (``vmem_bytes`` beside each kernel) count Mosaic's padded layout and the double buffers,
  and the default blocks of every kernel fit the smallest default scoped VMEM (16 MiB: v5e, v5p) at the head
  shapes of the Llama 3.2 models.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import pytest

from llama32_jax.kernels import aot, mxu_precision, vmem_array_bytes
from llama32_jax.kernels.cross_attention import cross_attention
from llama32_jax.kernels.decode_attention import decode_attention
from llama32_jax.kernels.flash_attention import flash_attention

MIB = 1 << 20
TPU = dict(impl="pallas", backend="tpu", interpret=False)  # traced only: nothing here lowers or runs


def _kernel_dots(closed) -> dict[str, list]:
    """``pallas_call`` name -> the ``dot_general`` equations of its kernel body (``pl.when`` branches included)."""
    found: dict[str, list] = {}

    def walk(jaxpr, into):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call":
                name = str(eqn.params.get("name_and_src_info", eqn.params.get("name", "kernel"))).split()[0]
                walk(eqn.params["jaxpr"], found.setdefault(name, []))
                continue
            if eqn.primitive.name == "dot_general" and into is not None:
                into.append(eqn)
            for value in eqn.params.values():
                for sub in value if isinstance(value, (list, tuple)) else (value,):
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        walk(inner, into)

    walk(closed.jaxpr, None)
    return found


def _sds(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype)


def _all_kernels(dtype):
    """The jaxprs of every TPU kernel (flash forward + backward, decode, cross forward + backward) on ``dtype``."""
    b, t, n, kv, h = 1, 64, 4, 2, 128
    q, k = _sds((b, t, n, h), dtype), _sds((b, kv, t, h), dtype)
    flash = partial(flash_attention, **TPU)
    cross = partial(cross_attention, tokens_per_tile=16, **TPU)
    mask, vk = _sds((b, t, 1, 4), jnp.bool_), _sds((b, kv, 64, h), dtype)

    def grads(op, *args):
        return jax.grad(lambda q, k, v: op(q, k, v, *args).astype(jnp.float32).sum(), argnums=(0, 1, 2))

    return [
        jax.make_jaxpr(grads(flash))(q, k, k),
        jax.make_jaxpr(partial(decode_attention, q_offset=63, **TPU))(_sds((b, 1, n, h), dtype), k, k),
        jax.make_jaxpr(grads(cross, mask))(q, vk, vk),
    ]


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
def test_every_tpu_kernel_matmul_has_an_explicit_precision_mosaic_accepts(dtype):
    assert str(jax.config.jax_default_matmul_precision) == "highest"  # tests/conftest.py: the hard case
    want = jax.lax.Precision.HIGHEST if dtype == jnp.float32 else jax.lax.Precision.DEFAULT
    names = []
    for closed in _all_kernels(dtype):
        for name, dots in _kernel_dots(closed).items():
            names.append(name)
            assert dots, name
            for eqn in dots:
                assert eqn.params["precision"] == (want, want), (name, eqn.params["precision"])
    assert len(names) == 7  # flash fwd, dq, dkv; decode; cross fwd, dq, dkdv


def test_mxu_precision_follows_the_session_only_for_fp32():
    with jax.default_matmul_precision("highest"):
        assert mxu_precision(jnp.float32) == jax.lax.Precision.HIGHEST
        assert mxu_precision(jnp.bfloat16) == jax.lax.Precision.DEFAULT
    with jax.default_matmul_precision("bfloat16"):
        assert mxu_precision(jnp.float32) == jax.lax.Precision.DEFAULT


def test_vmem_layout_padding():
    assert vmem_array_bytes((256, 1), jnp.float32) == 256 * 128 * 4  # a column takes a full lane tile
    assert vmem_array_bytes((8, 64), jnp.float32) == 8 * 128 * 4
    assert vmem_array_bytes((17, 128), jnp.bfloat16) == 32 * 128 * 2  # bf16 sublane tile: 16 rows
    assert vmem_array_bytes((3, 16, 256), jnp.bfloat16) == 3 * 16 * 256 * 2


CASES = [
    aot.Case(kernel, "v5e", dtype, model, sharded, 8 if kernel == "decode" else 1, t, keys=s, images=i)
    for kernel, t, s, i in [
        ("flash_fwd", 8192, 131072, 0), ("flash_bwd", 8192, 8192, 0), ("decode", 1, 131072, 0),
        ("decode", 64, 131072, 0), ("cross_fwd", 8192, 0, 4), ("cross_bwd", 8192, 0, 4),
    ]
    for model in ("1B", "90B", "mha")
    for sharded in (True, False)
    for dtype in ("bfloat16", "float32")
    if not (kernel.startswith("cross") and model == "1B")
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_default_blocks_fit_the_smallest_scoped_vmem(case):
    estimates = aot.vmem_estimates(case)
    assert len(estimates) == aot.KERNEL_CALLS[case.kernel]
    for name, need in estimates.items():
        assert 256 * 1024 < need <= 16 * MIB, (name, need)


def test_vmem_estimate_grows_with_the_key_block_and_counts_double_buffers():
    from llama32_jax.kernels.flash_attention import pallas_tpu

    small = pallas_tpu.vmem_bytes("forward", 256, 512, 128, jnp.float32)
    big = pallas_tpu.vmem_bytes("forward", 256, 8192, 128, jnp.float32)
    # K and V blocks (8192 x 128 fp32 = 4 MiB each), twice each, alone exceed v5e's 16 MiB scoped VMEM.
    assert big - small >= 2 * 2 * (8192 - 512) * 128 * 4
    assert big > 16 * MIB > small
