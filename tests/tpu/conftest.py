"""The TPU compile suite: kernels and sharded models compiled by the real XLA:TPU compiler (libtpu) for TPU slices,
on this CPU host, ahead of time (``llama32_jax.sharding.tpu``). Nothing executes: these tests check that Mosaic and
XLA:TPU accept the programs (a compile failure is a test failure), and what the compiled HLO and the compiler's
memory analysis say.

libtpu comes with the ``tpu-compile`` extra, which ``.ci/setup`` installs; without it these tests fail, unless
``LLAMA32_JAX_SKIP_MISSING_FIXTURES=1`` (a machine that cannot install extras) lets them skip.
"""

from __future__ import annotations

import numpy as np
import pytest
from jax.sharding import Mesh

from llama32_jax.sharding import tpu
from tests.conftest import require

GENERATIONS = tuple(tpu.CHIPS)  # ("v5e", "v5p", "v6e")


def chip_mesh(generation: str) -> Mesh:
    """A one-chip mesh (axis ``"x"``) of a ``generation`` slice, for compiling one kernel call."""
    require("libtpu")
    devices = tpu.topology_devices(tpu.CHIPS[generation].topologies[0])
    return Mesh(np.asarray(devices[:1], dtype=object), ("x",))


def plan_mesh(plan: str) -> Mesh:
    """The mesh of TPU plan ``plan`` over its topology's chips."""
    require("libtpu")
    return tpu.plan_mesh(plan)


@pytest.fixture(params=GENERATIONS)
def generation(request) -> str:
    return request.param
