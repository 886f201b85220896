"""Fine-tuning given bad inputs: TrainConfig fields, training batches, LoRA arguments, and non-finite steps.

Every bad value is an InvalidInputError naming the field / batch key and what is valid, raised before anything
runs. A step whose loss or gradient is not finite changes neither the parameters nor the optimizer state (bit for
bit, its step count included), is counted, and several in a row raise TrainingError; training then goes on as if
the bad step had never happened."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama32_jax import configs
from llama32_jax.errors import InvalidInputError, TrainingError
from llama32_jax.models.build import init_model
from llama32_jax.training.lora import add_lora, has_lora, lora_param_count, merge_lora
from llama32_jax.training.train import TrainConfig, Trainer, check_batch

TEXT = configs.TINY_TEXT
VISION = configs.TINY_VISION
V = TEXT.text.vocab_size  # 512


# ------------------------------------------------------------------------------------------------ TrainConfig


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("learning_rate", float("inf"), "must be a finite number > 0"),
        ("learning_rate", float("nan"), "must be a finite number > 0"),
        ("learning_rate", 0.0, "must be a finite number > 0"),
        ("learning_rate", -1e-4, "must be a finite number > 0"),
        ("learning_rate", "1e-4", "must be a number > 0, got str"),
        ("learning_rate", True, "must be a number > 0, got bool"),
        ("learning_rate", None, "must be a number > 0, got NoneType"),
        ("b1", 1.5, r"must be a finite number in \[0, 1\)"),
        ("b1", -0.1, r"in \[0, 1\)"),
        ("b2", 1.0, r"in \[0, 1\)"),
        ("eps", -1, "must be a finite number > 0"),
        ("eps", 0.0, "must be a finite number > 0"),
        ("grad_clip", float("nan"), r"must be a finite number >= 0 \(0 or None: no clipping\)"),
        ("grad_clip", -1.0, ">= 0"),
        ("grad_clip", float("inf"), "finite"),
        ("grad_clip", "1", "got str"),
        ("weight_decay", -0.1, "must be a finite number >= 0"),
        ("weight_decay", float("inf"), "finite"),
        ("end_lr_ratio", 1.5, r"in \[0, 1\]"),
        ("total_steps", 10.5, r"must be an int >= 1, got float \(whole-number floats are refused too\)"),
        ("total_steps", 10.0, "got float"),
        ("total_steps", True, "got bool"),
        ("total_steps", 0, "must be an int >= 1"),
        ("warmup_steps", -1, "0 <= warmup_steps"),
        ("warmup_steps", 2.0, "got float"),
        ("warmup_steps", 2000, r"need 0 <= warmup_steps <= total_steps \(total_steps=1000\)"),
        ("accum_steps", 0, "must be an int >= 1"),
        ("accum_steps", 1.5, "got float"),
        ("lora_rank", 0, "must be an int >= 1"),
        ("lora_rank", 2.5, "got float"),
        ("lora_alpha", 0.0, "must be a finite number > 0"),
        ("lora_alpha", float("nan"), "finite"),
        ("lora_targets", "attention", r"must be a tuple of target names"),
        ("lora_targets", ("embeddings",), "must be a non-empty subset"),
        ("lora_targets", (), "must be a non-empty subset"),
        ("seed", -1, r"in \[0, 2\*\*32\)"),
        ("seed", 1.5, "got float"),
        ("max_nonfinite_steps", 0, "must be an int >= 1"),
        ("max_nonfinite_steps", 2.0, "got float"),
        ("mode", 3, r"expected one of \('lora', 'full'\)"),
        ("remat", None, "expected one of"),
    ],
)
def test_train_config_field_errors(field, value, match):
    with pytest.raises(InvalidInputError, match=rf"TrainConfig\.{field}=.*{match}"):
        TrainConfig(**{field: value})


def test_train_config_normalizes_accepted_values():
    cfg = TrainConfig(learning_rate=np.float32(1e-3), total_steps=np.int64(10), lora_targets=["mlp"], grad_clip=None)
    assert type(cfg.learning_rate) is float and type(cfg.total_steps) is int
    assert cfg.lora_targets == ("mlp",) and hash(cfg)  # a list becomes a (hashable) tuple
    assert TrainConfig(grad_clip=0).grad_clip == 0.0  # 0 (and None) disable clipping, as before
    assert TrainConfig(learning_rate=1).learning_rate == 1.0


# ------------------------------------------------------------------------------------------------ batches


def _batch(b=4, t=12, seed=0, vocab=V):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (b, t + 1))
    mask = np.ones((b, t), np.float32)
    mask[:, : t // 3] = 0.0
    return {"inputs": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": mask}


def _with(key, value, **base):
    batch = _batch(**base)
    batch[key] = value
    return batch


def _set(key, index, value, dtype=None):
    batch = _batch()
    arr = np.array(batch[key], dtype=dtype or np.asarray(batch[key]).dtype)
    arr[index] = value
    batch[key] = arr
    return batch


@pytest.mark.parametrize(
    ("batch", "match"),
    [
        (
            _set("inputs", (1, 3), V),
            r"batch\['inputs'\] \(shape \(4, 12\), dtype int64\): "
            r"token ids must be in \[0, 512\); index \[1, 3\] holds 512",
        ),
        (_set("inputs", (2, 0), -1), r"batch\['inputs'\].*index \[2, 0\] holds -1"),
        (
            _with("inputs", _batch()["inputs"].astype(np.float32)),
            r"batch\['inputs'\] .*dtype float32\) must hold integer token ids",
        ),
        (_with("inputs", _batch()["inputs"] > 5), r"batch\['inputs'\] .*dtype bool\) must hold integer"),
        (
            _set("targets", (0, 11), V + 3),
            r"batch\['targets'\].*where loss_mask is 1, targets must be in \[0, 512\); index \[0, 11\] holds 515",
        ),
        (_set("targets", (3, 8), -1), r"batch\['targets'\].*index \[3, 8\] holds -1"),
        (_with("targets", _batch()["targets"] * 1.0), r"batch\['targets'\].*must hold integer token ids"),
        (_set("targets", (0, 0), 2**40), r"masked-out targets must be in \[-2147483648, 2147483648\)"),
        (_set("loss_mask", (1, 5), 2.0), r"batch\['loss_mask'\] .* must hold only 0 and 1 .*index \[1, 5\] holds 2.0"),
        (_set("loss_mask", (1, 5), np.nan), r"batch\['loss_mask'\].*index \[1, 5\] holds nan"),
        (_set("loss_mask", (0, 0), 0.5), r"holds 0.5 \(1 bad value\(s\)\); for per-token weights"),
        (_with("loss_mask", np.full((4, 12), "1")), r"batch\['loss_mask'\] .* must be bool, integer or float"),
        (
            _with("positions", np.tile(np.arange(-1, 11), (4, 1))),
            r"batch\['positions'\].*positions must be >= 0; index \[0, 0\] holds -1",
        ),
        (_with("positions", np.zeros((4, 12), np.float32)), r"batch\['positions'\].*must hold integer positions"),
        (_with("segment_ids", -np.ones((4, 12), int)), r"batch\['segment_ids'\].*segment_ids must be >= 0"),
        (_with("positions", np.zeros((4, 11), int)), r"batch\['positions'\] has shape \(4, 11\), expected \(4, 12\)"),
        (_with("labels", np.zeros((4, 12), int)), r"unknown key\(s\) \['labels'\]; valid: \['inputs', 'targets'"),
        (_with("inputs", [[1, 2], [3]]), r"batch\['inputs'\] must be an array, got list"),
        (_with("inputs", np.zeros((4, 0), int)), r"needs >= 1 row and position"),
        (
            _with("pixel_values", np.zeros((4, 1, 4, 3, 8, 8), np.float32)),
            r"\['pixel_values'\] but tiny-text is a text model",
        ),
        ({"inputs": [[1]], "targets": [[1]], "loss_mask": [[1]], "extra": None}, None),  # None counts as absent
    ],
)
def test_batch_errors_name_the_key_and_first_bad_value(batch, match):
    if match is None:
        check_batch(batch, TrainConfig(), TEXT)
        return
    with pytest.raises(InvalidInputError, match=match):
        check_batch(batch, TrainConfig(), TEXT)


def test_masked_out_targets_may_hold_a_sentinel():
    batch = _batch()
    masked = batch["loss_mask"] == 0
    sentinel = dict(batch, targets=np.where(masked, -100, batch["targets"]))
    out = check_batch(sentinel, TrainConfig(), TEXT)
    want = np.where(masked, 0, batch["targets"])
    np.testing.assert_array_equal(np.asarray(out["targets"]), want)
    bool_mask = dict(sentinel, loss_mask=~masked)
    np.testing.assert_array_equal(np.asarray(check_batch(bool_mask, TrainConfig(), TEXT)["targets"]), want)
    with pytest.raises(InvalidInputError, match="a training batch must be a dict of arrays, got list"):
        check_batch([batch], TrainConfig())


def _vision_batch(b=2, t=8):
    v = VISION.vision
    rng = np.random.default_rng(0)
    ids = rng.integers(0, V, (b, t + 1))
    ids[:, 0] = VISION.image_token_id  # 512: an image-token row, valid input, never a valid target
    return {
        "inputs": ids[:, :-1],
        "targets": ids[:, 1:],
        "loss_mask": np.ones((b, t), np.float32),
        "pixel_values": rng.standard_normal((b, 1, v.max_num_tiles, 3, v.image_size, v.image_size)).astype(np.float32),
        "aspect_ratio_ids": np.ones((b, 1), np.int32),
        "tile_mask": np.ones((b, t, 1, v.max_num_tiles), bool),
    }


def test_vision_batch_checks():
    check_batch(_vision_batch(), TrainConfig(), VISION)  # the image token id is a valid input
    n_in = V + VISION.text.n_image_embeddings
    cases = [
        (dict(_vision_batch(), inputs=np.full((2, 8), n_in)), rf"token ids must be in \[0, {n_in}\)"),
        (dict(_vision_batch(), targets=np.full((2, 8), V)), r"where loss_mask is 1, targets must be in \[0, 512\)"),
        ({k: v for k, v in _vision_batch().items() if k != "tile_mask"}, r"but not \['tile_mask'\]"),
        (dict(_vision_batch(), aspect_ratio_ids=np.full((2, 1), 99)), r"batch: aspect_ratio_ids must be in \[0, "),
        (dict(_vision_batch(), pixel_values=np.zeros((2, 1, 2, 3, 4, 4), np.float32)), "batch: pixel_values must be"),
        (dict(_vision_batch(), tile_mask=np.ones((2, 7, 1, 4), bool)), r"tile_mask.*must be \[batch, length, images"),
        (dict(_vision_batch(), tile_mask=np.full((2, 8, 1, 4), 3)), r"batch\['tile_mask'\].*must hold only 0 and 1"),
    ]
    bad_pixels = _vision_batch()
    bad_pixels["pixel_values"][1, 0, 2, 0, 3, 3] = np.inf
    cases.append((bad_pixels, r"batch\['pixel_values'\].*must be finite; index \[1, 0, 2, 0, 3, 3\] holds inf"))
    for batch, match in cases:
        with pytest.raises(InvalidInputError, match=match):
            check_batch(batch, TrainConfig(), VISION)


def test_trainer_refuses_a_bad_batch_before_the_step():
    trainer = Trainer(init_model(TEXT, param_dtype=jnp.float32), TrainConfig(mode="lora", total_steps=5))
    before = _snapshot(trainer)
    with pytest.raises(InvalidInputError, match=r"batch\['inputs'\].*index \[1, 3\] holds 512"):
        trainer.step(_set("inputs", (1, 3), V))
    assert trainer.steps_done == 0
    _assert_same(_snapshot(trainer), before)
    with pytest.raises(InvalidInputError, match="cfg must be a llama32_jax.training.train.TrainConfig, got dict"):
        Trainer(init_model(TEXT, param_dtype=jnp.float32), {"mode": "lora"})
    with pytest.raises(InvalidInputError, match="model must be an nnx.Module"):
        Trainer("model", TrainConfig())


# ------------------------------------------------------------------------------------------------ LoRA arguments


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"targets": "attention"}, "must be a sequence of names"),
        ({"targets": ("attn",)}, "must be a non-empty subset"),
        ({"rank": True}, "rank must be a positive integer, got True"),
        ({"rank": 2.0}, "rank must be a positive integer"),
        ({"alpha": float("nan")}, "alpha must be a finite number > 0"),
        ({"alpha": "16"}, "alpha must be a finite number > 0"),
        ({"seed": "0"}, r"seed must be an int in \[0, 2\*\*32\)"),
    ],
)
def test_add_lora_argument_errors(kwargs, match):
    with pytest.raises(InvalidInputError, match=match):
        add_lora(init_model(TEXT, param_dtype=jnp.float32), **kwargs)


@pytest.mark.parametrize("fn", [add_lora, has_lora, merge_lora, lora_param_count])
def test_lora_functions_need_a_module(fn):
    with pytest.raises(InvalidInputError, match=rf"{fn.__name__} needs an nnx.Module .*got dict"):
        fn({"params": 1})


# ------------------------------------------------------------------------------------------------ non-finite steps


def _snapshot(trainer):
    """Host copies of every trained array and optimizer leaf (the device arrays are donated to the next step)."""
    return [np.array(x) for x in jax.tree.leaves((trainer.trainable, trainer.opt_state))]


def _assert_same(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_array_equal(g, w)


def _poisoned(frozen):
    """A copy of the frozen weights that are all NaN: every loss and gradient through them is NaN."""
    return jax.tree.map(lambda x: jnp.full_like(x, jnp.nan) if jnp.issubdtype(x.dtype, jnp.floating) else x, frozen)


def _trainer(**kwargs):
    cfg = TrainConfig(mode="lora", learning_rate=1e-2, total_steps=10, accum_steps=2, **kwargs)
    return Trainer(init_model(TEXT, param_dtype=jnp.float32, seed=3), cfg)


def test_a_non_finite_step_changes_nothing_and_training_goes_on_as_without_it():
    batches = [_batch(seed=s) for s in (1, 2)]
    clean = _trainer()
    clean_metrics = [clean.step(b) for b in batches]

    trainer = _trainer()
    first = trainer.step(batches[0])
    assert first["skipped"] == 0.0 and first["skipped_total"] == 0.0
    before = _snapshot(trainer)
    good = trainer.frozen
    trainer.frozen = _poisoned(good)
    bad = trainer.step(batches[1])
    assert bad["skipped"] == 1.0 and bad["skipped_total"] == 1.0 and not np.isfinite(bad["loss"])
    assert bad["learning_rate"] == clean_metrics[1]["learning_rate"]  # the schedule did not advance
    _assert_same(_snapshot(trainer), before)  # parameters and optimizer state (step count included) bit-identical
    trainer.frozen = good
    after = trainer.step(batches[1])
    assert after["skipped"] == 0.0 and after["skipped_total"] == 1.0 and trainer.steps_done == 3
    assert after["loss"] == clean_metrics[1]["loss"] and after["learning_rate"] == clean_metrics[1]["learning_rate"]
    _assert_same(_snapshot(trainer), _snapshot(clean))


def test_consecutive_non_finite_steps_raise_training_error():
    trainer = _trainer(max_nonfinite_steps=2)
    before = _snapshot(trainer)
    good = trainer.frozen
    trainer.frozen = _poisoned(good)
    assert trainer.step(_batch(seed=1))["skipped"] == 1.0
    with pytest.raises(
        TrainingError, match=r"2 training steps in a row \(up to step 2\) had a non-finite loss"
    ) as info:
        trainer.step(_batch(seed=2))
    msg = str(info.value)
    assert "learning rate" in msg and "the data" in msg and "dtype" in msg and "max_nonfinite_steps=2" in msg
    assert trainer.skipped_total == 2
    _assert_same(_snapshot(trainer), before)  # the trainer keeps its last good state and can go on
    trainer.frozen = good
    assert trainer.step(_batch(seed=1))["skipped"] == 0.0 and trainer.nonfinite_streak == 0


def test_good_steps_between_bad_ones_reset_the_streak():
    trainer = _trainer(max_nonfinite_steps=2)
    good = trainer.frozen
    for poisoned in (True, False, True, False):
        trainer.frozen = _poisoned(good) if poisoned else good
        assert trainer.step(_batch(seed=1))["skipped"] == float(poisoned)
    assert trainer.skipped_total == 2 and trainer.nonfinite_streak == 0
