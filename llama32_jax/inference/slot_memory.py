"""How many slots a continuous-batching run gets: the bytes of one slot's KV cache against the free memory."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from flax import nnx

from llama32_jax.errors import InvalidInputError

# Slots chosen from memory are capped here: beyond it a CPU step is compute-bound and only latency grows;
# accelerators batch far more before that.
MAX_AUTO_SLOTS = {"cpu": 32, "gpu": 256, "tpu": 256}
# Share of free device memory the slot caches may take (the rest: prefill temporaries, the decode step's own).
CACHE_MEMORY_FRACTION = 0.5


def free_memory(devices) -> int | None:
    """Free bytes over ``devices`` (accelerators: their allocator's limit less what is in use; the CPU: the host's
    available memory), or None when unknown."""
    total = 0
    for d in devices:
        stats = d.memory_stats() if hasattr(d, "memory_stats") else None
        if not stats or "bytes_limit" not in stats:
            return _host_available() if d.platform == "cpu" else None
        total += int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    return total


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
    if cap < 1:
        raise InvalidInputError(
            f"one slot of {per_slot / 2**30:.2f} GiB (max_len={max_len}) does not fit in half the free device memory "
            f"({(free or 0) / 2**30:.2f} GiB); lower max_len or pass slots= explicitly"
        )
    n = min(cap, n_requests)
    return max(shards, -(-n // shards) * shards if n >= shards else shards)
