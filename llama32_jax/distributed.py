"""Multi-host (multi-controller) execution: every process runs the same program on its own devices.

    from llama32_jax import distributed
    distributed.initialize("10.0.0.1:1234", num_processes=2, process_id=int(os.environ["RANK"]))
    model = lj.load("ckpt/90b", mesh="h100x16-2host")      # each process restores only its own shards
    outs = model.generate(prompts)                          # every process gets the full result ...
    if distributed.is_primary():                            # ... and one of them reports it
        print(outs)

On GPU/TPU clusters ``jax.distributed.initialize()`` usually finds the coordinator itself; the arguments are for
CPU processes (tests, two processes on localhost) and hand-made clusters. CPU collectives across processes use
gloo.
"""

from __future__ import annotations

import jax
import numpy as np


def initialize(coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None):
    """``jax.distributed.initialize`` with cross-process CPU collectives (gloo) enabled; call before any JAX op."""
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except (AttributeError, ValueError):  # a JAX without the option: its default applies
        pass
    jax.distributed.initialize(
        coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
    )


def is_primary() -> bool:
    """True on the process that should report results (process 0)."""
    return jax.process_index() == 0


def to_host(x) -> np.ndarray:
    """A global array as numpy on every process (gathered across processes when it spans several)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
