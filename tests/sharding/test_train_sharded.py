"""A training step under a sharding plan equals the single-device step (fp32, 8 simulated devices).

Full fine-tuning under FSDP (parameters and optimizer state sharded over 8 devices, the batch split over them) and
LoRA under FSDP x TP: after two AdamW steps the losses and every trained parameter equal the unsharded run's, and
the trained parameters and optimizer moments stay laid out as the plan says.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

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
    ids = rng.integers(0, TEXT.text.vocab_size, (8, 17))
    mask = np.ones((8, 16), np.float32)
    mask[:, :5] = 0.0
    return {"inputs": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": mask}


def test_sharded_gradients_equal_single_device():
    """The loss gradients themselves (before any optimizer) under FSDP x TP equal the unsharded ones."""
    from llama32_jax.training.train import lm_loss

    batch = {k: jnp.asarray(v) for k, v in _batch(0).items()}
    grads = []
    for plan in (None, "fsdp_tp"):
        model = init_model(TEXT, param_dtype=jnp.float32, seed=1)
        if plan is not None:
            sharding.shard_model(model, plan)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def loss(params, rest=rest, graphdef=graphdef):
            total, count = lm_loss(nnx.merge(graphdef, params, rest), batch)
            return total / count

        grads.append(dict(jax.tree_util.tree_leaves_with_path(jax.jit(jax.grad(loss))(params))))
    for path, want in grads[0].items():
        np.testing.assert_allclose(np.asarray(grads[1][path]), np.asarray(want), atol=1e-7, rtol=1e-5)


def _run(cfg, plan=None):
    model = init_model(TEXT, param_dtype=jnp.float32, seed=1)
    if plan is not None:
        sharding.shard_model(model, plan)
    trainer = Trainer(model, cfg)
    losses = [trainer.step(_batch(seed))["loss"] for seed in (0, 1)]
    return trainer, losses


# The gradients agree to float summation order (test above). Adam then divides each entry by its own running
# magnitude, m / (sqrt(v) + eps): an entry whose sum cancels to nearly zero (and LoRA's A right after B left zero)
# turns that order-level noise into up to ~1e-3 of a step. So the parameters are compared to 0.5% of the largest
# possible move, learning_rate per step (Adam's normalised update), and the losses to 1e-6.
@pytest.mark.parametrize(
    ("plan", "cfg"),
    [
        ("fsdp", TrainConfig(mode="full", learning_rate=1e-3, weight_decay=0.1, total_steps=4, eps=1e-6)),
        (
            "fsdp_tp",
            TrainConfig(mode="lora", learning_rate=1e-2, total_steps=4, accum_steps=2, remat="full", eps=1e-6),
        ),
    ],
    ids=["full-fsdp", "lora-fsdp_tp"],
)
def test_sharded_step_equals_single_device(plan, cfg):
    single, want_losses = _run(cfg)
    sharded, got_losses = _run(cfg, plan)
    np.testing.assert_allclose(got_losses, want_losses, rtol=1e-6)
    want = jax.tree_util.tree_leaves_with_path(single.trainable)
    got = dict(jax.tree_util.tree_leaves_with_path(sharded.trainable))
    assert len(want) == len(got)
    step_tol = 5e-3 * cfg.learning_rate * len(want_losses)
    for path, value in want:
        np.testing.assert_allclose(np.asarray(got[path]), np.asarray(value), atol=step_tol, rtol=0)
    # Trained parameters keep their plan layout through the update.
    from llama32_jax.nn.layers import flatten_tree

    specs = flatten_tree(nnx.to_pure_dict(sharding.param_specs(sharded.model, sharding.load_plan(plan))))
    for path, value in flatten_tree(nnx.to_pure_dict(sharded.trainable)).items():
        assert value.sharding.spec == specs[path], path
