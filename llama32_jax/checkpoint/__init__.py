"""Checkpoint readers, key tables and conversion into our parameter layout."""

from llama32_jax.checkpoint.convert import params_from_state_dict, state_dict_from_params

__all__ = ["params_from_state_dict", "state_dict_from_params"]
