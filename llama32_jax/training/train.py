"""Fine-tuning: the causal-LM loss with prompt masking, AdamW with warmup + cosine decay, gradient accumulation,
activation checkpointing, LoRA or full fine-tuning, on one device or sharded under a plan.

Functional core (what scripts and the scaling study compile)::

    cfg = TrainConfig(mode="lora", learning_rate=2e-4, total_steps=200, accum_steps=2, remat="full")
    graphdef, trainable, frozen = split_for_training(model, cfg)   # adds LoRA adapters / sets remat first
    tx = make_optimizer(cfg)
    opt_state = tx.init(trainable)
    step = jax.jit(make_train_step(graphdef, tx, cfg), donate_argnums=(0, 2))
    trainable, opt_state, metrics = step(trainable, frozen, opt_state, batch)

and :class:`Trainer`, which holds that state for a loop. A batch is a dict of ``[B, T]`` arrays (as
:mod:`llama32_jax.training.data` yields them): ``inputs`` (int), ``targets`` (int, the next token), ``loss_mask``
(float: 1 where the target is trained, 0 on prompts and padding), and optionally ``positions`` / ``segment_ids`` (packed
rows) and, for the vision models, ``pixel_values`` / ``aspect_ratio_ids`` / ``tile_mask``. :func:`check_batch`
(:mod:`llama32_jax.training.batch`) validates it on the host before every :meth:`Trainer.step`: ids within the
model's vocabulary, targets wherever the mask is 1, a 0/1 mask; a masked-out target is never read and may hold a
sentinel such as ``-100``.

A step whose loss or gradient norm is not finite is skipped inside the jitted step (parameters and optimizer state
come back bit-identical; ``metrics["skipped"] == 1``); :class:`Trainer` counts such steps and raises
:class:`~llama32_jax.errors.TrainingError` after ``TrainConfig.max_nonfinite_steps`` in a row.

The loss is the mean negative log-likelihood over the trained target tokens of the whole (global) batch. With
``accum_steps = k`` the batch is cut into ``k`` micro-batches along its first axis; their loss sums, token counts
and gradients are added before one division, so the step equals the un-accumulated step on the same batch
(up to float summation order).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from llama32_jax import dims
from llama32_jax.errors import InvalidInputError, TrainingError
from llama32_jax.models.text import REMAT_POLICIES
from llama32_jax.sharding.apply import shard_model
from llama32_jax.training.batch import VISION_KEYS, check_batch
from llama32_jax.training.lora import TARGETS, add_lora, has_lora

__all__ = [
    "MODES",
    "TrainConfig",
    "Trainer",
    "check_batch",
    "learning_rate_schedule",
    "lm_loss",
    "make_optimizer",
    "make_train_step",
    "split_for_training",
]

MODES = ("lora", "full")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """What to train and how. ``mode="lora"`` trains only adapters on ``lora_targets`` (everything else frozen);
    ``"full"`` trains every parameter."""

    mode: str = "lora"
    learning_rate: float = 1e-4
    warmup_steps: int = 0
    total_steps: int = 1000
    end_lr_ratio: float = 0.1  # the cosine decays to learning_rate * end_lr_ratio at total_steps
    weight_decay: float = 0.0  # decoupled (AdamW), on matrices only (not norms, gates or biases)
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    grad_clip: float | None = 1.0  # global-norm clipping; 0 or None disables
    accum_steps: int = 1
    remat: str = "none"  # text.REMAT_POLICIES: "none", "full", "dots"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("attention", "mlp")
    seed: int = 0  # LoRA initialisation
    max_nonfinite_steps: int = 3  # Trainer.step raises TrainingError after this many non-finite steps in a row

    def __post_init__(self):
        def bad(field, why):
            raise InvalidInputError(f"TrainConfig.{field}={getattr(self, field)!r}: {why}")

        def number(field, valid, ok):
            """A finite real (bools and strings refused) within ``ok``; stored as a Python float."""
            value = getattr(self, field)
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
                bad(field, f"must be a number {valid}, got {type(value).__name__}")
            if not math.isfinite(value) or not ok(value):
                bad(field, f"must be a finite number {valid}")
            object.__setattr__(self, field, float(value))

        def integer(field, valid, ok):
            value = getattr(self, field)
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
                bad(field, f"must be an int {valid}, got {type(value).__name__} (whole-number floats are refused too)")
            if not ok(value):
                bad(field, f"must be an int {valid}")
            object.__setattr__(self, field, int(value))

        def choice(field, options):
            value = getattr(self, field)
            if not isinstance(value, str) or value not in options:
                bad(field, f"expected one of {tuple(options)}")

        choice("mode", MODES)
        choice("remat", sorted(REMAT_POLICIES))
        number("learning_rate", "> 0", lambda x: x > 0)
        integer("total_steps", ">= 1", lambda x: x >= 1)
        integer("warmup_steps", f"with 0 <= warmup_steps <= total_steps={self.total_steps}", lambda x: 0 <= x)
        if self.warmup_steps > self.total_steps:
            bad("warmup_steps", f"need 0 <= warmup_steps <= total_steps (total_steps={self.total_steps})")
        number("end_lr_ratio", "in [0, 1]", lambda x: 0 <= x <= 1)
        number("weight_decay", ">= 0", lambda x: x >= 0)
        number("b1", "in [0, 1)", lambda x: 0 <= x < 1)
        number("b2", "in [0, 1)", lambda x: 0 <= x < 1)
        number("eps", "> 0", lambda x: x > 0)
        if self.grad_clip is not None:
            number("grad_clip", ">= 0 (0 or None: no clipping)", lambda x: x >= 0)
        integer("accum_steps", ">= 1", lambda x: x >= 1)
        integer("lora_rank", ">= 1", lambda x: x >= 1)
        number("lora_alpha", "> 0", lambda x: x > 0)
        integer("seed", "in [0, 2**32)", lambda x: 0 <= x < 2**32)
        integer("max_nonfinite_steps", ">= 1", lambda x: x >= 1)
        targets = self.lora_targets
        if isinstance(targets, str) or not isinstance(targets, (tuple, list)):
            bad("lora_targets", f"must be a tuple of target names from {TARGETS}, e.g. ('attention',)")
        object.__setattr__(self, "lora_targets", tuple(targets))
        if self.mode == "lora" and (not self.lora_targets or set(self.lora_targets) - set(TARGETS)):
            bad("lora_targets", f"must be a non-empty subset of {TARGETS}")


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warmup from 0 to ``learning_rate`` over ``warmup_steps``, then cosine decay to
    ``learning_rate * end_lr_ratio`` at ``total_steps``."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.learning_rate,
        warmup_steps=cfg.warmup_steps,
        decay_steps=cfg.total_steps,
        end_value=cfg.learning_rate * cfg.end_lr_ratio,
    )


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping (``grad_clip``) then AdamW on :func:`learning_rate_schedule`."""
    adamw = optax.adamw(
        learning_rate_schedule(cfg),
        b1=cfg.b1,
        b2=cfg.b2,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        mask=lambda params: jax.tree.map(lambda x: x.ndim >= 2, params),
    )
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw) if cfg.grad_clip else adamw


def trainable_filter(cfg: TrainConfig):
    """The NNX filter of what ``cfg`` trains: LoRA adapters, or every parameter."""
    return nnx.LoRAParam if cfg.mode == "lora" else nnx.Param


def split_for_training(model: nnx.Module, cfg: TrainConfig) -> tuple[Any, nnx.State, nnx.State]:
    """Prepare ``model`` in place (LoRA adapters on ``cfg.lora_targets`` unless it has some, placed by the model's
    sharding plan if it has one; ``cfg.remat``) and split it into ``(graphdef, trainable, frozen)``;
    ``nnx.merge(graphdef, trainable, frozen)`` rebuilds it."""
    if cfg.mode == "lora" and not has_lora(model):
        add_lora(model, rank=cfg.lora_rank, alpha=cfg.lora_alpha, targets=cfg.lora_targets, seed=cfg.seed)
        placement = getattr(model, "placement", None)
        if placement is not None:  # a sharded model: lay the new adapters out by its plan too
            shard_model(model, placement.plan, placement.mesh)
    if cfg.mode == "full" and has_lora(model):
        raise InvalidInputError("full fine-tuning of a model with LoRA adapters: merge_lora(model) first")
    if cfg.mode == "full" and getattr(model, "quant_config", None) is not None:
        raise InvalidInputError(
            f"full fine-tuning of a quantized model ({model.quant_config.describe()}): its int8/int4 weights cannot "
            "be trained; use mode='lora' (QLoRA: adapters on the frozen quantized weights) or "
            "llama32_jax.models.quantize.dequantize_model(model) first"
        )
    model.remat = cfg.remat
    return nnx.split(model, trainable_filter(cfg), ...)


def lm_loss(model: nnx.Module, batch: dict) -> tuple[jax.Array, jax.Array]:
    """``(sum of the trained targets' negative log-likelihood, number of trained targets)``, both fp32 scalars."""
    kwargs = {}
    if all(key in batch for key in VISION_KEYS):
        kwargs["cross"] = model.cross_inputs(*(batch[key] for key in VISION_KEYS))
    for key in ("positions", "segment_ids"):
        if batch.get(key) is not None:
            kwargs[key] = batch[key]
    logits, _ = model(batch["inputs"], **kwargs)  # [B, T, V] fp32
    logp = jax.nn.log_softmax(logits, axis=-1)
    mask = batch["loss_mask"].astype(jnp.float32)
    # A masked-out target is never read: a sentinel there (-1, -100, an image token id) must not turn into NaN.
    targets = jnp.where(mask > 0, batch["targets"].astype(jnp.int32), 0)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(mask > 0, nll * mask, 0.0)), jnp.sum(mask)


def make_train_step(graphdef, tx: optax.GradientTransformation, cfg: TrainConfig):
    """A pure ``step(trainable, frozen, opt_state, batch) -> (trainable, opt_state, metrics)`` (jit it; donating
    ``trainable`` and ``opt_state`` updates them in place). ``metrics``: ``loss`` (mean over trained tokens),
    ``tokens``, ``grad_norm`` (before clipping), ``learning_rate`` (of this step), ``skipped`` (1.0 when the
    loss or the gradient norm was not finite: then ``trainable`` and ``opt_state``, its step count included, come
    back bit-identical, so one bad batch cannot poison later steps)."""
    schedule = learning_rate_schedule(cfg)

    def sums(trainable, frozen, micro):
        return lm_loss(nnx.merge(graphdef, trainable, frozen), micro)

    grad_fn = jax.value_and_grad(sums, has_aux=True)

    def step(trainable, frozen, opt_state, batch):
        if cfg.accum_steps == 1:
            (loss_sum, count), grads = grad_fn(trainable, frozen, batch)
        else:
            micro = jax.tree.map(lambda x: x.reshape(cfg.accum_steps, -1, *x.shape[1:]), batch)

            def body(carry, mb):
                (s, n), g = grad_fn(trainable, frozen, mb)
                acc_s, acc_n, acc_g = carry
                acc_g = jax.tree.map(lambda a, x: a + x.astype(jnp.float32), acc_g, g)
                return (acc_s + s, acc_n + n, acc_g), None

            zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), trainable)  # fp32 accumulators
            init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zeros)
            (loss_sum, count, grads), _ = jax.lax.scan(body, init, micro)
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / denom.astype(g.dtype), grads)
        loss, grad_norm = loss_sum / denom, _global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        index = _count(opt_state)  # before the update: the schedule's index of this step
        updates, new_opt_state = tx.update(grads, opt_state, trainable)
        new_trainable = optax.apply_updates(trainable, updates)
        # A non-finite step changes nothing (a select, not a branch: cheap next to the step, and sharding-neutral).
        keep = functools.partial(jax.tree.map, lambda new, old: jnp.where(finite, new, old))
        metrics = {
            "loss": loss,
            "tokens": count,
            "grad_norm": grad_norm,
            "learning_rate": schedule(index),
            "skipped": (~finite).astype(jnp.float32),
        }
        return keep(new_trainable, trainable), keep(new_opt_state, opt_state), metrics

    return step


def _global_norm(tree) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def _count(opt_state) -> jax.Array:
    """The optimizer's step counter: the schedule's index of the next update."""
    counts = [x for x in jax.tree.leaves(opt_state) if jnp.issubdtype(x.dtype, jnp.integer) and x.ndim == 0]
    return counts[0] if counts else jnp.zeros((), jnp.int32)


class Trainer:
    """A training loop's state: ``Trainer(model, cfg).step(batch) -> metrics``.

    The model is prepared and split by :func:`split_for_training` (a sharded model keeps its placement: the step
    then runs under its plan, the batch split over the plan's batch axes). The trainer takes the model over: its
    trained arrays are donated to the first step, so the module passed in must not be used afterwards; use
    ``trainer.model``, the current model (adapters included; :func:`llama32_jax.training.lora.merge_lora` folds them
    in). ``state()`` / ``restore(state)`` give the pytree a checkpoint holds (trainable parameters, optimizer
    state, step).

    Every batch is checked on the host first (:func:`llama32_jax.training.batch.check_batch`: keys, shapes, dtypes,
    ids within the model's vocabulary, a 0/1 mask). A step whose loss or gradient norm is not finite leaves the
    parameters and the optimizer state (its step count included) as they were; its metrics say ``skipped=1.0``,
    ``skipped_total`` counts such steps, and ``cfg.max_nonfinite_steps`` of them in a row raise
    :class:`~llama32_jax.errors.TrainingError` (the trainer keeps its last good state). ``steps_done`` counts the
    batches consumed, skipped ones included (the learning-rate schedule advances only on applied updates).
    """

    def __init__(self, model: nnx.Module, cfg: TrainConfig):
        if not isinstance(cfg, TrainConfig):
            raise InvalidInputError(f"cfg must be a llama32_jax.training.train.TrainConfig, got {type(cfg).__name__}")
        if not isinstance(model, nnx.Module):
            raise InvalidInputError(
                f"model must be an nnx.Module (init_model / load_params, or lj.load(...).module), "
                f"got {type(model).__name__}"
            )
        self.cfg = cfg
        self.model_config = getattr(model, "config", None)
        self.graphdef, self.trainable, self.frozen = split_for_training(model, cfg)
        self.tx = make_optimizer(cfg)
        self.opt_state = self.tx.init(self.trainable)
        self.placement = getattr(model, "placement", None)
        self.steps_done = 0
        self.skipped_total = 0  # non-finite steps skipped (this session; not part of a checkpoint)
        self.nonfinite_streak = 0  # ... of them in a row, up to the last step
        self._step = jax.jit(make_train_step(self.graphdef, self.tx, cfg), donate_argnums=(0, 2))

    @property
    def model(self) -> nnx.Module:
        """The model with the current weights: a new module (changing it, e.g. ``merge_lora``, leaves the trainer
        alone) that holds this step's arrays, which the next :meth:`step` consumes (they are donated): take it
        after training, or again after each step."""
        return nnx.merge(self.graphdef, self.trainable, self.frozen, copy=True)

    def _place(self, batch: dict) -> dict:
        if self.placement is None:
            return batch

        def put(x):
            axes = (dims.BATCH, *([None] * (x.ndim - 1)))
            return jax.device_put(x, self.placement.sharding(axes, x.shape, "training batch"))

        return {k: put(v) for k, v in batch.items()}

    def step(self, batch: dict) -> dict[str, float]:
        """One optimizer step on ``batch``; returns the metrics as Python floats (:func:`make_train_step`'s, plus
        ``skipped_total``). Raises :class:`InvalidInputError` for a bad batch (nothing changes) and
        :class:`TrainingError` after ``cfg.max_nonfinite_steps`` non-finite steps in a row."""
        batch = self._place(check_batch(batch, self.cfg, self.model_config))
        self.trainable, self.opt_state, metrics = self._step(self.trainable, self.frozen, self.opt_state, batch)
        self.steps_done += 1
        out = {k: float(v) for k, v in metrics.items()}
        if out["skipped"]:
            self.skipped_total += 1
            self.nonfinite_streak += 1
        else:
            self.nonfinite_streak = 0
        out["skipped_total"] = float(self.skipped_total)
        if self.nonfinite_streak >= self.cfg.max_nonfinite_steps:
            raise TrainingError(
                f"{self.nonfinite_streak} training steps in a row (up to step {self.steps_done}) had a non-finite "
                f"loss or gradient (last: loss={out['loss']}, grad_norm={out['grad_norm']}); none of them changed "
                "the parameters or the optimizer state, which stay at the last good step. Check the learning rate "
                f"(learning_rate={self.cfg.learning_rate}, too high diverges), the data (bad or empty examples), "
                "the parameter dtype (bfloat16/float16 overflow: try float32) and the weights themselves (NaN or "
                f"inf in the checkpoint); TrainConfig.max_nonfinite_steps={self.cfg.max_nonfinite_steps} is the limit"
            )
        return out

    def state(self) -> dict:
        return {"trainable": self.trainable, "opt_state": self.opt_state, "step": self.steps_done}

    def restore(self, state: dict) -> None:
        missing = [k for k in ("trainable", "opt_state", "step") if not isinstance(state, dict) or k not in state]
        if missing:
            raise InvalidInputError(
                f"Trainer.restore needs a dict with trainable, opt_state and step; missing {missing}"
            )
        self.trainable, self.opt_state = state["trainable"], state["opt_state"]
        self.steps_done = int(state["step"])
        self.nonfinite_streak = 0
