"""Fine-tuning mechanics on tiny random models (fp32): the loss, LoRA (add / train / merge), gradient accumulation,
activation checkpointing, packed rows, the vision cross-attention adapter, and input errors."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llama32_jax import configs
from llama32_jax.errors import InvalidInputError
from llama32_jax.models.build import forward, init_model, param_count
from llama32_jax.training.lora import add_lora, has_lora, lora_param_count, merge_lora
from llama32_jax.training.train import TrainConfig, Trainer, check_batch, lm_loss

TEXT = configs.TINY_TEXT


def _batch(b=4, t=24, seed=0, vocab=512):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (b, t + 1))
    mask = np.ones((b, t), np.float32)
    mask[:, : t // 3] = 0.0  # a "prompt" that is not trained
    return {"inputs": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": mask}


def _params(model):
    return {k: np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))}


def test_loss_is_the_mean_nll_of_the_trained_targets():
    model = init_model(TEXT, param_dtype=jnp.float32)
    batch = _batch()
    total, count = lm_loss(model, {k: jnp.asarray(v) for k, v in batch.items()})
    logits = np.asarray(forward(model, jnp.asarray(batch["inputs"]))[0], np.float64)
    logp = (
        logits
        - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - logits.max(-1)[..., None]
    )
    nll = -np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
    assert float(count) == batch["loss_mask"].sum()
    np.testing.assert_allclose(float(total), (nll * batch["loss_mask"]).sum(), rtol=1e-5)
    # Prompt targets do not matter.
    other = dict(batch, targets=np.where(batch["loss_mask"] > 0, batch["targets"], 7))
    np.testing.assert_allclose(float(lm_loss(model, {k: jnp.asarray(v) for k, v in other.items()})[0]), float(total))


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_lora_trains_only_adapters_and_merges_exactly(scan):
    config = TEXT.replace(scan_layers=scan)
    model = init_model(config, param_dtype=jnp.float32)
    base_count = param_count(model)
    ids = jnp.asarray(_batch()["inputs"])
    before = np.asarray(forward(model, ids)[0])
    frozen_before = _params(model)

    n = add_lora(model, rank=4, alpha=8.0, targets=("attention", "mlp"))
    assert n == (7 if scan else 7 * config.text.n_layers)  # wq wk wv wo w1 w2 w3 per layer (stacked: one each)
    np.testing.assert_array_equal(np.asarray(forward(model, ids)[0]), before)  # B = 0: a fresh adapter is inert

    trainer = Trainer(model, TrainConfig(mode="lora", learning_rate=1e-2, total_steps=10))
    losses = [trainer.step(_batch())["loss"] for _ in range(6)]
    assert losses[-1] < losses[0] - 0.1
    trained = trainer.model
    assert lora_param_count(trained) == sum(
        4 * (a + b) * (1 if scan else config.text.n_layers) * (config.text.n_layers if scan else 1)
        for a, b in _lora_shapes(config)
    )
    for path, value in _params(trained).items():  # every base weight untouched
        if path in frozen_before:
            np.testing.assert_array_equal(value, frozen_before[path])
    unmerged = np.asarray(forward(trained, ids)[0])
    assert np.abs(unmerged - before).max() > 1e-3  # the adapters learned something

    merge_lora(trained)
    assert not has_lora(trained) and param_count(trained) == base_count
    np.testing.assert_allclose(np.asarray(forward(trained, ids)[0]), unmerged, atol=1e-5, rtol=0)


def _lora_shapes(config):
    """(in, out) of each adapted projection of one layer."""
    t = config.text
    q, kv = t.n_heads * t.head_dim, t.n_kv_heads * t.head_dim
    return [
        (t.dim, q),
        (t.dim, kv),
        (t.dim, kv),
        (q, t.dim),
        (t.dim, t.ffn_dim),
        (t.dim, t.ffn_dim),
        (t.ffn_dim, t.dim),
    ]


def test_gradient_accumulation_equals_one_big_batch():
    batch = _batch(b=4)
    results = []
    # Accumulation changes the order of fp32 sums, so gradients agree to rounding. With AdamW's usual eps (1e-8)
    # an element whose gradient is ~1e-9 is normalised to an update of +-lr, so that rounding would reappear as an
    # lr-sized difference in the parameters. eps=1 makes the update ~lr * g: linear in the gradient, which is what
    # this test compares.
    for accum in (1, 2, 4):
        cfg = TrainConfig(mode="full", accum_steps=accum, eps=1.0)
        trainer = Trainer(init_model(TEXT, param_dtype=jnp.float32), cfg)
        metrics = [trainer.step(batch) for _ in range(2)]
        results.append((metrics, jax.tree.leaves(trainer.trainable)))
    for metrics, leaves in results[1:]:
        for got, want in zip(metrics, results[0][0], strict=True):
            assert got["loss"] == pytest.approx(want["loss"], rel=1e-6)
            assert got["tokens"] == want["tokens"]
        for got, want in zip(leaves, results[0][1], strict=True):
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-7, rtol=1e-5)


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_policies_change_nothing_but_memory(remat):
    batch = _batch()
    out = {}
    for policy in ("none", remat):
        trainer = Trainer(init_model(TEXT, param_dtype=jnp.float32), TrainConfig(mode="full", remat=policy))
        out[policy] = (trainer.step(batch), jax.tree.leaves(trainer.trainable))
    assert out[remat][0]["loss"] == pytest.approx(out["none"][0]["loss"], rel=1e-6)
    for got, want in zip(out[remat][1], out["none"][1], strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-7, rtol=1e-6)


def test_packed_rows_equal_their_sequences_run_alone():
    """``segment_ids`` / ``positions``: two sequences packed in one row give each sequence's own logits."""
    model = init_model(TEXT, param_dtype=jnp.float32)
    rng = np.random.default_rng(3)
    a, b = rng.integers(0, 512, 9), rng.integers(0, 512, 6)
    row = np.concatenate([a, b, [0, 0]])[None]
    segments = np.array([[1] * 9 + [2] * 6 + [0, 0]])
    positions = np.array([[*range(9), *range(6), 0, 0]])
    packed = np.asarray(model(jnp.asarray(row), positions=jnp.asarray(positions), segment_ids=jnp.asarray(segments))[0])
    np.testing.assert_allclose(packed[0, :9], np.asarray(forward(model, jnp.asarray(a[None]))[0])[0], atol=1e-5)
    np.testing.assert_allclose(packed[0, 9:15], np.asarray(forward(model, jnp.asarray(b[None]))[0])[0], atol=1e-5)


def test_vision_cross_attention_adapter_trains_alone():
    """LoRA on the cross-attention blocks only, with images: only those adapters exist and change, loss falls."""
    from llama32_jax.inference.generate import image_tile_mask
    from llama32_jax.inputs.image import preprocess

    config = configs.TINY_VISION
    model = init_model(config, param_dtype=jnp.float32)
    tree = nnx.to_pure_dict(nnx.state(model, nnx.Param))  # open the gates so the adapter matters
    tree = jax.tree_util.tree_map_with_path(lambda p, x: jnp.full_like(x, 0.5) if "gate" in str(p[-1].key) else x, tree)
    nnx.replace_by_pure_dict(state := nnx.state(model, nnx.Param), tree)
    nnx.update(model, state)
    rng = np.random.default_rng(4)
    s = config.vision.image_size
    images = preprocess([[rng.integers(0, 256, (s, 2 * s, 3), np.uint8)]] * 2, config.vision)
    ids = np.concatenate([[config.image_token_id], rng.integers(0, 512, 16)])[None].repeat(2, 0)
    batch = {
        "inputs": ids[:, :-1],
        "targets": ids[:, 1:],
        "loss_mask": np.ones((2, 16), np.float32),
        "pixel_values": images.pixel_values,
        "aspect_ratio_ids": images.aspect_ratio_ids,
        "tile_mask": image_tile_mask(config, ids[:, :-1].tolist(), images, 16),
    }
    frozen_before = _params(model)
    trainer = Trainer(model, TrainConfig(mode="lora", lora_targets=("cross",), learning_rate=2e-2, total_steps=10))
    paths = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(trainer.trainable)}
    assert paths and all("cross_layers" in p for p in paths)
    losses = [trainer.step(batch)["loss"] for _ in range(5)]
    assert losses[-1] < losses[0]
    for path, value in _params(trainer.model).items():
        if path in frozen_before:
            np.testing.assert_array_equal(value, frozen_before[path])


def test_configuration_and_batch_errors_are_named():
    with pytest.raises(InvalidInputError, match="TrainConfig.mode"):
        TrainConfig(mode="qlora")
    with pytest.raises(InvalidInputError, match="TrainConfig.warmup_steps"):
        TrainConfig(warmup_steps=20, total_steps=10)
    with pytest.raises(InvalidInputError, match="TrainConfig.remat"):
        TrainConfig(remat="some")
    with pytest.raises(InvalidInputError, match="TrainConfig.lora_targets"):
        TrainConfig(lora_targets=("embeddings",))
    with pytest.raises(InvalidInputError, match="no projections for LoRA target"):
        add_lora(init_model(TEXT, param_dtype=jnp.float32), targets=("cross",))
    model = init_model(TEXT, param_dtype=jnp.float32)
    add_lora(model)
    with pytest.raises(InvalidInputError, match="already has LoRA"):
        add_lora(model)
    with pytest.raises(InvalidInputError, match="merge_lora"):
        Trainer(model, TrainConfig(mode="full"))
    cfg = TrainConfig(accum_steps=3)
    with pytest.raises(InvalidInputError, match="not divisible by accum_steps=3"):
        check_batch(_batch(b=4), cfg)
    with pytest.raises(InvalidInputError, match="missing \\['loss_mask'\\]"):
        check_batch({k: v for k, v in _batch().items() if k != "loss_mask"}, TrainConfig())
    bad = dict(_batch(), targets=np.zeros((4, 5), int))
    with pytest.raises(InvalidInputError, match="batch\\['targets'\\] has shape"):
        check_batch(bad, TrainConfig())
    with pytest.raises(InvalidInputError, match="positions / segment_ids"):
        from llama32_jax.nn.cache import KVCache

        m = init_model(TEXT, param_dtype=jnp.float32)
        m(jnp.zeros((1, 3), jnp.int32), KVCache.init(TEXT, 1, 8), positions=jnp.zeros((1, 3), jnp.int32))


def test_lora_dataclass_config_is_hashable():
    assert hash(TrainConfig()) == hash(dataclasses.replace(TrainConfig()))
