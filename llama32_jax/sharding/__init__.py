"""Sharding: plans (``plan``), placement inside the model (``placement``), sharding a model (``apply``),
multi-host setup (``distributed``) and TPU slices to compile for without a TPU (``tpu``).

A plan is a device mesh plus rules from logical axis names (``llama32_jax.dims``) to mesh axes, read from the TOML
files of the repository's top-level ``sharding/`` folder (shipped in the wheel as ``llama32_jax/plans/``).

Layers: ``plan``, ``distributed`` and ``tpu`` (TPU slices for compiling without a TPU) import only ``errors``,
``dims`` and ``plan``; ``placement`` sits with ``llama32_jax.nn`` (it also imports ``nn.cache``); ``apply`` sits
above ``llama32_jax.models``. Library modules import the submodule they need; this package re-exports the public
names for users (``lj.sharding.load_plan``, ``lj.sharding.shard_model``, ...), so it counts as the ``apply`` layer.
"""

from llama32_jax.sharding import distributed, tpu
from llama32_jax.sharding.apply import (
    flat_param_specs,
    param_axes,
    param_specs,
    restore_shardings,
    shard_model,
    validate,
)
from llama32_jax.sharding.placement import (
    Placement,
    cache_axes,
    constrain_activation,
    constrain_cache,
    constrain_cross,
)
from llama32_jax.sharding.plan import (
    CROSS_KV_AXES,
    PLAN_DIR,
    VISION_TOKENS_AXIS,
    Plan,
    PlanError,
    available_plans,
    load_plan,
    make_mesh,
    partition_spec,
    plan_for_mesh,
    plan_from_dict,
    resolve,
)

__all__ = [
    "CROSS_KV_AXES",
    "PLAN_DIR",
    "VISION_TOKENS_AXIS",
    "Placement",
    "Plan",
    "PlanError",
    "available_plans",
    "cache_axes",
    "constrain_activation",
    "constrain_cache",
    "constrain_cross",
    "distributed",
    "flat_param_specs",
    "load_plan",
    "make_mesh",
    "param_axes",
    "param_specs",
    "partition_spec",
    "plan_for_mesh",
    "plan_from_dict",
    "resolve",
    "restore_shardings",
    "shard_model",
    "tpu",
    "validate",
]
