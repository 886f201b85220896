"""The scaling study's steps (``experiments/scaling_study.py`` runs the sweep): the row key :class:`Case`, MaxText's
analytic FLOPs, each phase's step built on abstract arrays placed by a sharding plan (``prefill`` and ``decode``:
the model into a KV cache; ``train``: one ``llama32_jax.training.train`` optimiser step), the unrolled 1- and 2-layer
configs of the depth fit, and compiling helpers: XLA's cost analysis, real inputs in the abstract shardings, a
step's median time.

Import it after the simulated CPU devices are configured (``scaling_study`` does so before JAX starts)."""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from experiments import memory_plan
from llama32_jax import dims, sharding
from llama32_jax.models.build import abstract_model
from llama32_jax.nn.attend import set_attention_impl
from llama32_jax.nn.cache import KVCache

FLOP_CONVENTION = (
    "MaxText (calculate_tflops_training_per_device), all devices together. Per token and self-attention layer: "
    "matmuls 2*(D*(N+2K)*H + N*H*D + 3*D*F), attention 4*N*H*S_visible (QK^T and PV) with S_visible the keys the "
    "query sees, causal counting half: a T-token prefill or training sequence counts 4*N*H*T^2/2 per layer, a decode "
    "step with a T-slot cache 4*N*H*T. Output head 2*D*V per row computed (prefill and decode: last row only; "
    "training: all T). Vision models with images, per cross-attention block and token: 2*(2*D*N*H + 3*D*F) + "
    "4*N*H*N_v, every vision token visible (the vision K/V are computed once per image, outside the step). Not "
    "counted: embedding lookups, norms, RoPE, softmax. Training = 3x forward (mode=full; rematerialisation not "
    "counted: MFU, not HFU) or 2x forward (mode=lora: no weight gradients of the frozen weights). "
    "MFU = analytic_flops / step_s / (devices * peak_tflops)."
)


@dataclasses.dataclass(frozen=True)
class Case:
    """One row of the sweep: with the platform, its key in the CSV."""

    model: str
    plan: str
    batch: int
    seq_len: int
    phase: str
    dtype: str
    layout: str
    images: int
    train_mode: str
    remat: str


class Skip(Exception):
    """The row cannot run here; its message is recorded as the reason."""


@dataclasses.dataclass
class Step:
    """One compiled step's ingredients: ``fn(*args)`` with abstract sharded ``args``, donated ``donate``;
    ``params`` (for the f32-upcast scan), per-device bytes; ``feed(args, outputs) -> next args`` for timing."""

    fn: Callable
    args: tuple
    donate: tuple[int, ...]
    params: Any
    weights: int
    state: int
    read: int
    feed: Callable


# ------------------------------------------------------------------------------------------------ analytic FLOPs


def analytic_flops(config, phase: str, batch: int, seq_len: int, images: int, mode: str = "full") -> float:
    """MaxText-convention FLOPs of one step, all devices (:data:`FLOP_CONVENTION`)."""
    t = config.text
    d, n, k, h, f = t.dim, t.n_heads, t.n_kv_heads, t.head_dim, t.ffn_dim
    layer = 2 * (d * (n + 2 * k) * h + n * h * d + 3 * d * f)  # per token
    queries = 1 if phase == "decode" else seq_len
    visible = seq_len if phase == "decode" else seq_len / 2  # mean keys per query (causal: half)
    per_seq = t.n_layers * (queries * layer + 4 * n * h * queries * visible)
    per_seq += 2 * d * t.vocab_size * (seq_len if phase == "train" else 1)
    if config.is_vision and images and phase != "train":
        n_v = images * config.vision.max_num_tiles * config.vision.tokens_per_tile
        per_seq += t.n_cross_attention_layers * queries * (2 * (2 * d * n * h + 3 * d * f) + 4 * n * h * n_v)
    forward = batch * per_seq
    return forward * ((2 if mode == "lora" else 3) if phase == "train" else 1)


# ------------------------------------------------------------------------------------------------ building steps


def at_depth(config, units: int):
    """``config`` unrolled with ``units`` layers (vision: groups of k self layers + 1 cross block)."""
    t = config.text
    if config.is_vision:
        every = t.cross_attention_every
        text = dataclasses.replace(t, n_layers=every * units, n_cross_attention_layers=units)
    else:
        text = dataclasses.replace(t, n_layers=units)
    return config.replace(text=text, scan_layers=False)


def depth_units(config) -> int:
    return config.text.n_cross_attention_layers if config.is_vision else config.text.n_layers


def _placed_model(model, placement, attention_impl: str = "auto"):
    for _, node in nnx.iter_graph(model):  # as shard_model: the model and its attention modules
        if isinstance(node, nnx.Module) and hasattr(node, "placement"):
            node.placement = placement
    return set_attention_impl(model, attention_impl)


def _cache(config, batch: int, slots: int, dtype, placement) -> KVCache:
    c = jax.eval_shape(lambda: KVCache.init(config, batch, slots, dtype=dtype))
    axes = sharding.cache_axes(c.stacked)

    def place(x, what):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=placement.sharding(axes, x.shape, what))

    if c.stacked:
        k, v = place(c.k, "KV cache k"), place(c.v, "KV cache v")
    else:
        k, v = (tuple(place(x, f"KV cache {n}[{i}]") for i, x in enumerate(xs)) for n, xs in (("k", c.k), ("v", c.v)))
    start = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=placement.sharding((dims.BATCH,), (batch,), "start"))
    index = jax.ShapeDtypeStruct((), jnp.int32, sharding=placement.replicated())
    return KVCache(k=k, v=v, start=start, index=index)


def _cross(config, batch: int, slots: int, images: int, dtype, placement):
    """Abstract :class:`CrossInputs`: every cross block's K/V over ``images`` 4-tile images, and the tile mask."""
    from llama32_jax.models.mllama import CrossInputs

    t, v = config.text, config.vision
    one = (batch, t.n_kv_heads, images * v.max_num_tiles * v.tokens_per_tile, t.head_dim)

    def arr(shape, axes):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=placement.sharding(axes, shape, "cross K/V"))

    if config.scan_layers:
        stacked = (t.n_cross_attention_layers, *one)
        kv = (
            arr(stacked, (dims.LAYERS, *sharding.CROSS_KV_AXES)),
            arr(stacked, (dims.LAYERS, *sharding.CROSS_KV_AXES)),
        )
    else:
        kv = tuple(
            (arr(one, sharding.CROSS_KV_AXES), arr(one, sharding.CROSS_KV_AXES))
            for _ in range(t.n_cross_attention_layers)
        )
    mask_shape = (batch, slots, images, v.max_num_tiles)
    mask = jax.ShapeDtypeStruct(
        mask_shape, jnp.bool_, sharding=placement.sharding((dims.BATCH, None, None, None), mask_shape, "tile mask")
    )
    return CrossInputs(kv, mask, v.tokens_per_tile)


def _bytes(tree) -> int:
    return sum(memory_plan._shard_bytes(x) for x in jax.tree.leaves(tree))


def _step_weight_bytes(config, params: dict) -> int:
    """Per-device bytes of the weights a prefill/decode step multiplies by: not the vision tower, nor an untied
    embedding table (only gathered)."""
    skip = {"vision", "projector"} | ({"embed", "learnable_embedding"} if not config.text.tie_embeddings else set())
    return sum(_bytes(v) for k, v in params.items() if k not in skip)


def build_inference(config, case: Case, placement, dtype, decode_slots: int, attention_impl: str = "auto") -> Step:
    """Prefill (``T`` tokens into an empty cache of ``T + decode_slots``) or one decode step (``T``-slot cache)."""
    model = _placed_model(abstract_model(config, param_dtype=dtype), placement, attention_impl)
    graphdef, state = nnx.split(model)
    params = memory_plan._abstract(
        nnx.to_pure_dict(state), nnx.to_pure_dict(sharding.param_specs(model, placement.plan)), placement.mesh
    )
    length = 1 if case.phase == "decode" else case.seq_len
    slots = case.seq_len if case.phase == "decode" else case.seq_len + decode_slots
    cache = _cache(config, case.batch, slots, dtype, placement)
    cross = _cross(config, case.batch, slots, case.images, dtype, placement) if case.images else None
    shape = (case.batch, length)
    tokens = jax.ShapeDtypeStruct(shape, jnp.int32, sharding=placement.sharding((dims.BATCH, None), shape, "tokens"))

    def step(params, tokens, cache, cross):
        kw = {} if cross is None else {"cross": cross}
        return nnx.merge(graphdef, params)(tokens, cache, last_only=True, **kw)

    index = case.seq_len - 1 if case.phase == "decode" else 0

    def feed(args, out):  # the donated cache comes back; rewind it so every timed step does the same work
        cache = dataclasses.replace(out[1], index=jax.device_put(jnp.int32(index), placement.replicated()))
        return (args[0], args[1], cache, args[3])

    state_bytes = _bytes((cache.k, cache.v)) + (_bytes(cross.kv) if cross is not None else 0)
    weights = _step_weight_bytes(config, params)
    args = (params, tokens, cache, cross)
    return Step(step, args, (2,), params, _bytes(params), state_bytes, weights + state_bytes, feed)


def _shard_like_params(tree, specs: dict, mesh):
    """Abstract leaves with shardings: a leaf whose path ends with a parameter's path gets that parameter's spec
    (the parameters themselves, and optimiser moments such as ``...mu.<param path>``); anything else (step
    counters) is replicated."""

    def leaf(path, x):
        keys = tuple(getattr(p, "key", getattr(p, "idx", None)) for p in path)
        keys = tuple(k for k in keys if k is not None)
        spec = next((specs[keys[i:]] for i in range(len(keys)) if keys[i:] in specs), None)
        if spec is None or len(spec) > len(x.shape):
            spec = P()
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec))

    return jax.tree_util.tree_map_with_path(leaf, tree)


def build_train(config, case: Case, placement, dtype, decode_slots: int = 0, attention_impl: str = "auto") -> Step:
    """One ``llama32_jax.training.train`` step on ``[B, T]`` inputs/targets/loss_mask (trainable + optimiser state
    donated)."""
    from llama32_jax.training.train import TrainConfig, make_optimizer, make_train_step, split_for_training

    cfg = TrainConfig(mode=case.train_mode, remat=case.remat)
    if cfg.mode == "lora":  # adapters added to the abstract model here (split_for_training would place real ones)
        from llama32_jax.models.build import init_model
        from llama32_jax.training.lora import add_lora

        def with_lora():
            model = init_model(config, param_dtype=dtype)
            add_lora(model, rank=cfg.lora_rank, alpha=cfg.lora_alpha, targets=cfg.lora_targets, seed=cfg.seed)
            return model

        model = _placed_model(nnx.eval_shape(with_lora), placement, attention_impl)
    else:
        model = _placed_model(abstract_model(config, param_dtype=dtype), placement, attention_impl)
    specs = nnx.to_pure_dict(sharding.param_specs(model, placement.plan))  # adapters included
    flat = {
        tuple(p.key for p in path): spec
        for path, spec in jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda x: isinstance(x, P))
    }
    graphdef, trainable, frozen = split_for_training(model, cfg)
    tx = make_optimizer(cfg)
    step = make_train_step(graphdef, tx, cfg)
    trainable = _shard_like_params(trainable, flat, placement.mesh)
    frozen = _shard_like_params(frozen, flat, placement.mesh)
    opt_state = _shard_like_params(jax.eval_shape(tx.init, trainable), flat, placement.mesh)
    shape = (case.batch, case.seq_len)
    bs = placement.sharding((dims.BATCH, None), shape, "batch")
    batch = {
        "inputs": jax.ShapeDtypeStruct(shape, jnp.int32, sharding=bs),
        "targets": jax.ShapeDtypeStruct(shape, jnp.int32, sharding=bs),
        "loss_mask": jax.ShapeDtypeStruct(shape, jnp.float32, sharding=bs),
    }

    def feed(args, out):
        return (out[0], args[1], out[1], args[3])

    weights = _bytes(trainable) + _bytes(frozen)
    state = _bytes(opt_state)
    params = (trainable, frozen)
    return Step(step, (trainable, frozen, opt_state, batch), (0, 2), params, weights, state, weights + state, feed)


def build(config, case: Case, placement, dtype, decode_slots: int, attention_impl: str = "auto") -> Step:
    """The step of ``case.phase``; ``decode_slots``: a prefill's KV-cache slots beyond the prompt; ``attention_impl``
    as ``llama32_jax.load``'s (``"auto"`` follows the plan's devices: Pallas on a GPU/TPU mesh)."""
    fn = build_train if case.phase == "train" else build_inference
    return fn(config, case, placement, dtype, decode_slots, attention_impl)


# ------------------------------------------------------------------------------------------------ compiling, timing


def xla_cost(compiled) -> tuple[float, float]:
    """XLA's cost analysis of one device's program: (flops, bytes accessed); every loop body counted once."""
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, list | tuple) else ca
    return float(ca.get("flops", float("nan"))), float(ca.get("bytes accessed", float("nan")))


def _materialise(tree, seed: int, vocab: int):
    """Real arrays in the abstract leaves' shardings, made by one jitted call: floats ~ N(0, 0.02), bools True,
    ``[B, T]`` ints random tokens below ``vocab``, other ints 0 (cache ``start``/``index``: the callers set them)."""
    leaves, treedef = jax.tree.flatten(tree)

    def make(key):
        out = []
        for k, x in zip(jax.random.split(key, len(leaves)), leaves, strict=True):
            if jnp.issubdtype(x.dtype, jnp.floating):
                out.append((0.02 * jax.random.normal(k, x.shape, jnp.float32)).astype(x.dtype))
            elif x.dtype == jnp.bool_:
                out.append(jnp.ones(x.shape, bool))
            elif x.ndim == 2:
                out.append(jax.random.randint(k, x.shape, 0, vocab, x.dtype))
            else:
                out.append(jnp.zeros(x.shape, x.dtype))
        return out

    arrays = jax.jit(make, out_shardings=[x.sharding for x in leaves])(jax.random.key(seed))
    return jax.tree.unflatten(treedef, arrays)


def time_step(compiled, step: Step, vocab: int, repeats: int) -> float:
    """Median seconds of ``repeats`` runs of ``compiled`` on random inputs (after one warm-up), fed by ``step.feed``."""
    args = _materialise(step.args, 0, vocab)
    if step.donate == (2,):  # inference: start from the row's own cache index
        args = step.feed(args, (None, args[2]))
    out = compiled(*args)
    jax.block_until_ready(out)
    times = []
    for _ in range(repeats):
        args = step.feed(args, out)
        t0 = time.perf_counter()
        out = compiled(*args)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t0)
    del args, out
    return statistics.median(times)
