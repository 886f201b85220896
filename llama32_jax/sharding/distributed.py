"""Multi-host (multi-controller) execution: every process runs the same program on its own devices.

    from llama32_jax.sharding import distributed
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

from llama32_jax.errors import InvalidInputError


def _check_args(coordinator_address, num_processes, process_id) -> None:
    def is_int(x):
        return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))

    if coordinator_address is not None:
        text = coordinator_address if isinstance(coordinator_address, str) else ""
        host, sep, port = text.rpartition(":")
        if not (sep and host and port.isdigit() and 0 < int(port) < 65536):
            raise InvalidInputError(
                f"coordinator_address must be a 'host:port' string (e.g. '10.0.0.1:1234'), got {coordinator_address!r}"
            )
    if num_processes is not None and (not is_int(num_processes) or num_processes < 1):
        raise InvalidInputError(f"num_processes must be an int >= 1, got {num_processes!r}")
    if process_id is not None:
        limit = f"in [0, num_processes={num_processes})" if num_processes is not None else ">= 0"
        if not is_int(process_id) or process_id < 0 or (num_processes is not None and process_id >= num_processes):
            raise InvalidInputError(f"process_id must be an int {limit}, got {process_id!r}")


def initialize(coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None):
    """``jax.distributed.initialize`` with cross-process CPU collectives (gloo) enabled; call before any JAX op.

    Raises :class:`~llama32_jax.errors.InvalidInputError` for a malformed address or process count / id."""
    _check_args(coordinator_address, num_processes, process_id)
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
