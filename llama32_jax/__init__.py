"""llama32_jax: Meta's Llama 3.2 family (1B, 3B, 11B/90B Vision) in JAX / Flax NNX.

The public surface (see README.md)::

    import llama32_jax as lj
    model = lj.load("path/to/checkpoint", dtype="bfloat16")   # Orbax, HF or Meta dir, or .gguf -> Model
    model = lj.load("path/to/checkpoint", quantize="int8")    # weight-only int8 (or "int4", lj.QuantConfig(...))
    lj.convert("meta_or_hf_dir", "orbax_dir")          # streaming, atomic (also: python -m llama32_jax.convert)
    outs = model.generate(["Why is the sky blue?"], max_new_tokens=64, temperature=0.0)
    rows = lj.batch_generate(model, "prompts.jsonl", "results.jsonl")  # continuous batching, resumable
    cfg = lj.configs.LLAMA_3_2_1B                      # named configs, strict readers of params.json / config.json
    module = lj.init_model(lj.configs.TINY_TEXT)       # an NNX module with random weights
    logits, _ = lj.forward(module, tokens)             # [B, T] ints -> [B, T, V] fp32 (jitted)

Importing this package has no side effects beyond importing JAX.
"""

from llama32_jax import configs, errors, quant, sharding
from llama32_jax.api import Completion, Model, load
from llama32_jax.batch import batch_generate
from llama32_jax.checkpoint.hf_export import export_hf
from llama32_jax.checkpoint.pipeline import convert
from llama32_jax.configs.base import ModelConfig, RopeScaling, TextConfig, VisionConfig
from llama32_jax.configs.hf import from_hf_config
from llama32_jax.configs.readers import from_params_json
from llama32_jax.inference.engine import Engine, Request, RequestResult
from llama32_jax.models.build import abstract_model, forward, init_model, load_params, param_count
from llama32_jax.models.text import Transformer
from llama32_jax.nn.cache import KVCache
from llama32_jax.quant.config import QuantConfig

__version__ = "0.1.0"

__all__ = [
    "Completion",
    "Engine",
    "KVCache",
    "Model",
    "ModelConfig",
    "QuantConfig",
    "Request",
    "RequestResult",
    "RopeScaling",
    "TextConfig",
    "Transformer",
    "VisionConfig",
    "abstract_model",
    "batch_generate",
    "configs",
    "convert",
    "errors",
    "export_hf",
    "forward",
    "from_hf_config",
    "from_params_json",
    "init_model",
    "load",
    "load_params",
    "param_count",
    "quant",
    "sharding",
]
