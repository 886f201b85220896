"""Checkpoints: readers of Meta (``meta``), HF safetensors (``hf``) and GGUF (``gguf``) checkpoints, the key tables
(``keymap``, ``keymap_vision``) and the conversion of state dicts into our parameter layout (``convert``,
``convert_vision``), our Orbax format (``orbax_ckpt``), the streaming converter (``pipeline``), the HF export
(``hf_export``) and the path/storage safety checks they share (``safety``).

Above ``llama32_jax.models`` (it builds abstract models as restore targets): may import ``errors``, ``dims``,
``configs``, ``sharding.plan``, ``nn``, ``inputs`` and ``models``; never ``inference``, ``training`` or ``api``.
"""

from llama32_jax.checkpoint.convert import params_from_state_dict, state_dict_from_params

__all__ = ["params_from_state_dict", "state_dict_from_params"]
