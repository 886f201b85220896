"""A non-finite step under a sharding plan (FSDP x TP, 8 simulated devices) is skipped like on one device: the
trained parameters and the optimizer state come back bit-identical and keep their plan layout, and the next good
step trains normally."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama32_jax import configs, sharding
from llama32_jax.models.build import init_model
from llama32_jax.training.train import TrainConfig, Trainer

pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (simulated) devices: XLA_FLAGS in conftest")

TEXT = configs.TINY_TEXT.replace(
    name="tiny-text-shardable",
    text=dataclasses.replace(configs.TINY_TEXT.text, n_heads=16, n_kv_heads=8, head_dim=8, ffn_dim=128),
)


def _batch(seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, TEXT.text.vocab_size, (8, 9))
    return {"inputs": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": np.ones((8, 8), np.float32)}


def _leaves(trainer):
    return jax.tree.leaves((trainer.trainable, trainer.opt_state))


def test_sharded_non_finite_step_is_skipped_in_place():
    model = sharding.shard_model(init_model(TEXT, param_dtype=jnp.float32, seed=1), "fsdp_tp")
    trainer = Trainer(model, TrainConfig(mode="lora", learning_rate=1e-2, total_steps=4, accum_steps=2))
    assert trainer.step(_batch(0))["skipped"] == 0.0
    before = [(np.array(x), x.sharding) for x in _leaves(trainer)]
    good = trainer.frozen
    trainer.frozen = jax.tree.map(lambda x: jnp.where(True, jnp.nan, x) if x.dtype == jnp.float32 else x, good)
    metrics = trainer.step(_batch(1))
    assert metrics["skipped"] == 1.0 and metrics["skipped_total"] == 1.0
    after = _leaves(trainer)
    for (want, want_sharding), got in zip(before, after, strict=True):
        np.testing.assert_array_equal(np.asarray(got), want)
        assert got.sharding.is_equivalent_to(want_sharding, got.ndim)
    trainer.frozen = good
    metrics = trainer.step(_batch(1))
    assert metrics["skipped"] == 0.0 and np.isfinite(metrics["loss"])
    assert any(not np.array_equal(np.asarray(x), w) for x, (w, _) in zip(_leaves(trainer), before, strict=True))
