"""Continuous batching under a sharding plan (8 simulated CPU devices): the slots are split over the data axes,
the slot cache lives where the plan says, and every request gets what the unsharded model gives it alone."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llama32_jax import dims, sharding
from llama32_jax.errors import InvalidInputError
from llama32_jax.inference import engine as engine_module
from llama32_jax.inference.engine import Engine, Request
from llama32_jax.inference.generate import generate_tokens
from llama32_jax.models.build import init_model, load_params
from llama32_jax.nn.cache import LAYER_AXES
from tests.sharding.test_sharding import TEXT

pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (simulated) devices: XLA_FLAGS in conftest")


@pytest.fixture(scope="module")
def params():
    model = init_model(TEXT, param_dtype=jnp.float32, seed=3)
    tree = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return jax.tree.map(lambda x: x * 5.0, tree)  # larger weights: tokens that depend on the prompt


def _requests(n=14, seed=0):
    rng = np.random.default_rng(seed)
    return [
        Request(
            rng.integers(0, TEXT.text.vocab_size, int(rng.integers(2, 30))).tolist(),
            max_new_tokens=int(rng.integers(1, 9)),
            temperature=0.0 if i % 2 else 0.8,
            seed=i,
            stop_ids=rng.integers(0, TEXT.text.vocab_size, 30).tolist() if i % 3 == 0 else [],
        )
        for i in range(n)
    ]


@pytest.mark.parametrize("plan_name", ["dp", "fsdp_tp"])
def test_slots_split_over_the_data_axes(params, plan_name, monkeypatch):
    plan = sharding.load_plan(plan_name)
    ref = load_params(TEXT, params, param_dtype=jnp.float32)
    model = sharding.shard_model(load_params(TEXT, params, param_dtype=jnp.float32), plan)
    requests = _requests()
    caches = []
    original = engine_module.decode_chunk

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        caches.append(out[0])
        return out

    monkeypatch.setattr(engine_module, "decode_chunk", spy)
    slots = plan.batch_shards  # one slot per data shard: requests queue and slots refill
    results = {r.index: r.output for r in Engine(model, slots=slots).run(requests)}
    for i, r in enumerate(requests):
        (alone,) = generate_tokens(
            ref, [r.tokens], max_new_tokens=r.max_new_tokens, temperature=r.temperature, seed=r.seed,
            stop_ids=[list(r.stop_ids)],
        )  # fmt: skip
        assert results[i].tokens == alone.tokens, f"request {i}"
    cache = caches[-1]
    for buf in cache.k:
        assert buf.sharding.spec == sharding.partition_spec(plan, LAYER_AXES, buf.shape, "cache")
    assert cache.start.sharding.spec == sharding.partition_spec(plan, (dims.BATCH,), cache.start.shape, "start")
    with pytest.raises(InvalidInputError, match="multiple of the plan's"):
        Engine(model, slots=plan.batch_shards + 1)
