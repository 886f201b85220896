"""Shared test setup: fp32 at the highest matmul precision, so our results compare tightly with the references."""

from __future__ import annotations

import os

# Before jax initialises: 8 simulated CPU devices for the sharding tests, and quiet XLA logs.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax

jax.config.update("jax_default_matmul_precision", "highest")
