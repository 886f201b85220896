"""The real (non-interpreted) lowerings of the flash and cross-attention kernels, checked without an accelerator.

Interpret mode runs a kernel's semantics but not its lowering: a primitive the Triton or Mosaic lowering does not
support, a block shape Mosaic refuses, or a scalar read Triton cannot express only shows up when the kernel is
lowered for the real platform. ``jax.jit(...).trace(...).lower(lowering_platforms=(...,))`` runs Pallas' Triton
and Mosaic lowerings on this CPU machine. The GPU compiler itself (ptxas) still needs the hardware; the TPU one
does not: ``tests/tpu/test_kernels_compile.py`` compiles every TPU kernel with libtpu's XLA:TPU and Mosaic, which
is where bf16 kernels were first refused (docs/tpu-kernels.md). ``decode_attention`` has the same lowering checks
in its own suite.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import pytest

from llama32_jax.kernels.cross_attention import cross_attention
from llama32_jax.kernels.flash_attention import flash_attention

PLATFORMS = {"gpu": ("cuda", "__gpu$xla.gpu.triton"), "tpu": ("tpu", "tpu_custom_call")}
CASES = [(128, 4, jnp.bfloat16), (64, 1, jnp.float32)]  # (head dim, GQA ratio, dtype)
IDS = ["d128-g4-bf16", "d64-g1-f32"]


@pytest.fixture(params=["gpu", "tpu"])
def flavour(request, monkeypatch):
    if request.param == "tpu":  # Mosaic asks which chip it compiles for: name one through Pallas' private tpu_info
        tpu_info = pytest.importorskip("jax._src.pallas.mosaic.tpu_info")
        if not all(hasattr(tpu_info, n) for n in ("get_device_kind", "get_num_device_cores")):
            pytest.skip("this jax names the TPU chip differently")
        monkeypatch.setattr(tpu_info, "get_device_kind", lambda: "TPU v5e")
        monkeypatch.setattr(tpu_info, "get_num_device_cores", lambda: 1)
    return request.param


def _lowered(fn, flavour: str, *args, **kwargs) -> str:
    platform, marker = PLATFORMS[flavour]
    text = jax.jit(fn).trace(*args, **kwargs).lower(lowering_platforms=(platform,)).as_text()
    assert marker in text
    return text


def _sds(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype)


@pytest.mark.parametrize(("h", "g", "dtype"), CASES, ids=IDS)
def test_flash_forward_and_backward_lower(flavour, h, g, dtype):
    b, t, kv_heads, s = 2, 1000, 2, 1000  # not a multiple of any block: the ragged-tail paths lower too
    q, kv = _sds((b, t, kv_heads * g, h), dtype), _sds((b, kv_heads, s, h), dtype)
    ints = dict(kv_start=_sds((b,), jnp.int32), kv_end=_sds((b,), jnp.int32))
    op = partial(flash_attention, impl="pallas", backend=flavour, interpret=False)
    _lowered(lambda q, k, v, **kw: op(q, k, v, **kw), flavour, q, kv, kv, **ints)

    def loss(q, k, v, **kw):
        return op(q, k, v, **kw).astype(jnp.float32).sum()

    text = _lowered(jax.grad(loss, argnums=(0, 1, 2)), flavour, q, kv, kv, **ints)
    assert text.count(PLATFORMS[flavour][1]) >= 3  # forward (recomputed residuals), dq and dk/dv kernels


@pytest.mark.parametrize("t", [1, 300], ids=["decode", "prefill"])
@pytest.mark.parametrize(("h", "g", "dtype"), CASES, ids=IDS)
def test_cross_attention_lowers(flavour, t, h, g, dtype):
    b, kv_heads, images, tiles, per_tile = 2, 2, 2, 4, 1601  # the real tokens per tile: blocks straddle tiles
    q = _sds((b, t, kv_heads * g, h), dtype)
    kv = _sds((b, kv_heads, images * tiles * per_tile, h), dtype)
    mask = _sds((b, t, images, tiles), jnp.bool_)
    op = partial(cross_attention, tokens_per_tile=per_tile, impl="pallas", backend=flavour, interpret=False)
    _lowered(op, flavour, q, kv, kv, mask)
