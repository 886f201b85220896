"""Building models: random init, abstract (shape-only) models, and loading a parameter tree strictly."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llama32_jax.configs.base import ModelConfig
from llama32_jax.errors import CheckpointError, InvalidInputError
from llama32_jax.inputs.checks import check_concrete_ids, input_vocab, token_array
from llama32_jax.models.mllama import Mllama
from llama32_jax.models.quantize import quantize_model, quantize_tree
from llama32_jax.models.text import Transformer, check_cache, stack_layers, unstack_layers
from llama32_jax.nn.cache import KVCache
from llama32_jax.nn.layers import flatten_tree
from llama32_jax.quant.config import QuantConfig


def model_class(config: ModelConfig) -> type[nnx.Module]:
    """:class:`~llama32_jax.models.text.Transformer` for text configs, :class:`~llama32_jax.models.mllama.Mllama` for
    vision."""
    if config.is_vision:
        return Mllama
    return Transformer


def init_model(config: ModelConfig, *, param_dtype=jnp.bfloat16, seed: int = 0) -> nnx.Module:
    """A randomly initialised model (weights ~ N(0, 0.02), norms = 1)."""
    return model_class(config)(config, param_dtype=param_dtype, rngs=nnx.Rngs(seed))


def abstract_model(config: ModelConfig, *, param_dtype=jnp.bfloat16, quant: QuantConfig | None = None) -> nnx.Module:
    """The model with ``jax.ShapeDtypeStruct`` leaves: shapes, dtypes and axes, no memory allocated; with
    ``quant``, its quantized form (:mod:`llama32_jax.models.quantize`)."""
    cls = model_class(config)
    if quant is None:
        return nnx.eval_shape(lambda: cls(config, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
    return nnx.eval_shape(lambda: quantize_model(cls(config, param_dtype=param_dtype, rngs=nnx.Rngs(0)), quant))


def param_count(model: nnx.Module) -> int:
    """Number of parameters (works on abstract models)."""
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def _path_str(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def load_params(
    config: ModelConfig,
    params: Mapping,
    *,
    param_dtype=jnp.bfloat16,
    layout: str = "auto",
    quant: QuantConfig | None = None,
) -> nnx.Module:
    """Build a model from a nested parameter tree (our names), strictly.

    ``params`` may be in the per-layer or the stacked layout (``layout="auto"`` detects it); it is converted to
    the layout ``config.scan_layers`` asks for. Every model parameter must be present with the right shape and no
    extra entry may remain, else :class:`~llama32_jax.errors.CheckpointError` names the path.

    ``quant``: build the quantized model (:mod:`llama32_jax.models.quantize`). Float weights in ``params`` are
    quantized one at a time (numpy leaves on the host, so the device never holds them); a tree that already holds
    the quantized values and scales (a quantized checkpoint) is taken as it is.
    """
    layers = params.get("layers", {})
    is_per_layer = bool(layers) and all(isinstance(k, int) for k in layers)
    if layout == "auto":
        layout = "per_layer" if is_per_layer else "stacked"
    if config.scan_layers and layout == "per_layer":
        params = stack_layers(dict(params))
    elif not config.scan_layers and layout == "stacked":
        params = unstack_layers(dict(params))

    if quant is not None:
        params = quantize_tree(config, params, quant)
    abstract = abstract_model(config, param_dtype=param_dtype, quant=quant)
    graphdef, state = nnx.split(abstract)
    target = flatten_tree(nnx.to_pure_dict(state))
    given = flatten_tree(params)
    missing = sorted(_path_str(p) for p in target.keys() - given.keys())
    unused = sorted(_path_str(p) for p in given.keys() - target.keys())
    if missing:
        raise CheckpointError(
            f"parameters missing for {config.name}: {missing[:8]}{' ...' if len(missing) > 8 else ''}"
        )
    if unused:
        raise CheckpointError(
            f"unexpected parameters for {config.name}: {unused[:8]}{' ...' if len(unused) > 8 else ''}"
        )
    values = {}
    for path, spec in target.items():
        value = given[path]
        if tuple(np.shape(value)) != tuple(spec.shape):
            raise CheckpointError(
                f"parameter {_path_str(path)}: shape {tuple(np.shape(value))} does not match the model's {spec.shape}"
            )
        is_int = jnp.issubdtype(value.dtype, jnp.integer)  # int4 too (numpy's issubdtype says no)
        if is_int != jnp.issubdtype(spec.dtype, jnp.integer):
            what = "quantized" if is_int else "float"
            raise CheckpointError(
                f"parameter {_path_str(path)} holds {what} values ({np.dtype(value.dtype).name}) where the model "
                f"expects {np.dtype(spec.dtype).name}: load a quantized checkpoint with its own quantize setting"
            )
        values[path] = jnp.asarray(value, dtype=spec.dtype)
    nested: dict = {}
    for path, value in values.items():
        node = nested
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    nnx.replace_by_pure_dict(state, nested)
    return nnx.merge(graphdef, state)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, tokens, cache, cross):
    kw = {} if cross is None else {"cross": cross}
    return nnx.merge(graphdef, state)(tokens, cache, **kw)


def forward(
    model: nnx.Module, tokens: jax.Array, cache: KVCache | None = None, *, cross: Any = None
) -> tuple[jax.Array, KVCache | None]:
    """Jitted ``model(tokens, cache)``: compiled once per (model structure, shapes), validated before tracing.

    ``tokens``: integer ids ``[batch, length]`` in ``[0, vocab)`` (a vision model's image-token rows included).
    The range is checked when the values are known: host arrays (numpy, lists) on the host, concrete JAX arrays
    with one small reduction on their device. Traced tokens (``forward`` called inside ``jit``) are not checked,
    so compiled code pays nothing; there an out-of-range id gives NaN logits.

    ``cross``: a vision model's encoded images (:meth:`~llama32_jax.models.mllama.Mllama.cross_inputs`), or None."""
    if not isinstance(tokens, jax.Array):
        if isinstance(tokens, (list, tuple)):  # element by element: bools and floats are refused, not converted
            tokens = token_array(tokens, input_vocab(model.config), name="tokens")
        tokens = np.asarray(tokens)
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
        raise InvalidInputError(
            f"tokens must be an integer array [batch, length], got {tokens.dtype}{list(tokens.shape)}"
        )
    check_concrete_ids(tokens, input_vocab(model.config))
    tokens = jnp.asarray(tokens)
    if cache is not None:
        check_cache(cache, model.config, tokens.shape[0], tokens.shape[1])
    graphdef, state = nnx.split(model)
    if cross is not None and not model.config.is_vision:
        raise InvalidInputError(f"{model.config.name} is a text model; it takes no cross-attention inputs")
    return _forward(graphdef, state, tokens, cache, cross)
