"""Model configurations: the frozen dataclasses and named constants (``base``) and the strict readers of a
checkpoint's own configuration: Meta ``params.json`` (``readers``), HF ``config.json`` (``hf``), and the shared
file/field checks (``files``).

The lowest layer after ``errors`` and ``dims``: modules here import only those two and each other. Library modules
above import the submodules; ``llama32_jax.configs`` itself (``lj.configs.LLAMA_3_2_1B``,
``lj.configs.from_hf_config``) re-exports them for users.
"""

from llama32_jax.configs import base
from llama32_jax.configs.base import *  # noqa: F403  (base.__all__: the dataclasses and named configs)
from llama32_jax.configs.base import ALL_ASPECT_RATIOS_4, IMAGE_TOKEN_ID, NUM_IMAGE_EMBEDDINGS
from llama32_jax.configs.readers import config_from_dict, config_to_dict, from_hf_config, from_params_json

__all__ = [
    *base.__all__,
    "ALL_ASPECT_RATIOS_4",
    "IMAGE_TOKEN_ID",
    "NUM_IMAGE_EMBEDDINGS",
    "config_from_dict",
    "config_to_dict",
    "from_hf_config",
    "from_params_json",
]
