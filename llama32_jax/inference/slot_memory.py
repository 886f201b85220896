"""How many slots a continuous-batching run gets: the bytes of one slot's KV cache against the free memory."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from llama32_jax.errors import InvalidInputError

# Slots chosen from memory are capped here: beyond it a CPU step is compute-bound and only latency grows;
# accelerators batch far more before that.
MAX_AUTO_SLOTS = {"cpu": 32, "gpu": 256, "tpu": 256}
# Share of free device memory the slot caches may take (the rest: prefill temporaries, the decode step's own).
CACHE_MEMORY_FRACTION = 0.5


def free_memory(devices) -> int | None:
    """Free bytes over ``devices`` (accelerators: the smallest allocator headroom among this process's devices,
    times their number, since a sharded cache splits evenly; the CPU: the host's available memory per process), or
    None when unknown."""
    local = [d for d in devices if d.process_index == jax.process_index()] or list(devices)
    processes = len({d.process_index for d in devices})
    if local[0].platform == "cpu":
        host = _host_available()
        return None if host is None else host * processes
    frees = []
    for d in local:
        stats = d.memory_stats()
        if not stats or "bytes_limit" not in stats:
            return None
        frees.append(int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0)))
    return min(frees) * len(devices)


def _host_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def cache_bytes_per_slot(model: nnx.Module, max_len: int) -> int:
    """Bytes of one slot's self-attention K and V over every layer."""
    t = model.config.text
    itemsize = jnp.dtype(model.embed.embedding.dtype).itemsize
    return 2 * t.n_layers * t.n_kv_heads * max_len * t.head_dim * itemsize


def choose_slots(model: nnx.Module, max_len: int, n_requests: int, extra_bytes_per_slot: int = 0) -> int:
    """Slots for a run: what :data:`CACHE_MEMORY_FRACTION` of the free memory holds, capped by
    :data:`MAX_AUTO_SLOTS` and by the requests, as a multiple of the plan's data shards."""
    placement = getattr(model, "placement", None)
    devices = list(placement.mesh.devices.flat) if placement is not None else jax.devices()[:1]
    shards = placement.plan.batch_shards if placement is not None else 1
    per_slot = cache_bytes_per_slot(model, max_len) + extra_bytes_per_slot
    cap = MAX_AUTO_SLOTS.get(devices[0].platform, MAX_AUTO_SLOTS["gpu"])
    free = free_memory(devices)
    if free is not None:
        cap = min(cap, int(free * CACHE_MEMORY_FRACTION) // per_slot)
    if jax.process_count() > 1:  # every process must run the same schedule: agree on the smallest estimate
        cap = int(np.min(multihost_utils.process_allgather(np.asarray(cap, np.int64))))
    wanted = -(-n_requests // shards) * shards  # enough for every request, whole slots per data shard
    slots = min(cap, wanted) // shards * shards
    if slots < 1:
        raise InvalidInputError(
            f"{shards} slot(s) of {per_slot / 2**30:.2f} GiB (max_len={max_len}; one per data shard) do not fit in "
            f"{CACHE_MEMORY_FRACTION:.0%} of the free device memory ({(free or 0) / 2**30:.2f} GiB); lower max_len or "
            "pass slots= explicitly"
        )
    return slots
