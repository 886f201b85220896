"""llama32_jax: Meta's Llama 3.2 family (1B, 3B, 11B/90B Vision) in JAX / Flax NNX.

The public surface (see README.md)::

    import llama32_jax as lj
    cfg = lj.configs.LLAMA_3_2_1B                      # named configs, strict readers of params.json / config.json
    model = lj.init_model(lj.configs.TINY_TEXT)        # random weights
    logits, _ = lj.forward(model, tokens)              # [B, T] ints -> [B, T, V] fp32 (jitted)

Importing this package has no side effects beyond importing JAX.
"""

from llama32_jax import configs, errors
from llama32_jax.cache import KVCache
from llama32_jax.configs import ModelConfig, RopeScaling, TextConfig, VisionConfig, from_hf_config, from_params_json
from llama32_jax.model import abstract_model, forward, init_model, load_params, param_count
from llama32_jax.text import Transformer

__version__ = "0.1.0"

__all__ = [
    "KVCache",
    "ModelConfig",
    "RopeScaling",
    "TextConfig",
    "Transformer",
    "VisionConfig",
    "abstract_model",
    "configs",
    "errors",
    "forward",
    "from_hf_config",
    "from_params_json",
    "init_model",
    "load_params",
    "param_count",
]
