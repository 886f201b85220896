"""The shared kernel-test harness: which implementations every op suite runs, and the tolerances by dtype.

Every op's suite runs each case against every implementation listed by :func:`implementations`: the XLA
reference, both Pallas flavours in interpret mode (always, so CI on CPU covers them), and the real lowering of the
flavour this machine's accelerator can run. Expected values come from a float64 numpy oracle written in the
suite, not from any of the implementations.
"""

from __future__ import annotations

import jax.numpy as jnp
import pytest

from llama32_jax.kernels import platform

# (atol, rtol) of an op's output against the float64 oracle evaluated on the same (dtype-rounded) inputs. Never
# loosen an entry to make a kernel pass: find out why it differs.
FORWARD_TOL = {
    jnp.float32: (2e-5, 2e-5),
    jnp.bfloat16: (1.6e-2, 1.6e-2),  # bf16 output rounding (2^-8) + bf16 probabilities in the P.V product
}
# Gradients (flash_attention's custom_vjp) against jax.vjp of the float32 oracle.
GRAD_TOL = {
    jnp.float32: (5e-5, 5e-5),
    jnp.bfloat16: (5e-2, 5e-2),
}


def implementations() -> list[tuple[str, dict]]:
    """``(id, op keyword arguments)`` for every implementation this machine can run."""
    impls = [
        ("xla", dict(impl="xla")),
        ("gpu-interpret", dict(impl="pallas", backend="gpu", interpret=True)),
        ("tpu-interpret", dict(impl="pallas", backend="tpu", interpret=True)),
    ]
    if platform() in ("gpu", "tpu"):
        impls.append((platform(), dict(impl="pallas", backend=platform(), interpret=False)))
    return impls


IMPLEMENTATIONS = implementations()


@pytest.fixture(params=[kw for _, kw in IMPLEMENTATIONS], ids=[name for name, _ in IMPLEMENTATIONS])
def impl_kwargs(request) -> dict:
    return dict(request.param)


def tol(table: dict, dtype) -> dict:
    atol, rtol = table[jnp.dtype(dtype).type]
    return dict(atol=atol, rtol=rtol)
