"""The tiny random Mllama shared by the vision tests (import the fixtures you use, with those they depend on).

``meta_model``: Meta's reference (tests/refs_vision.py, seed 0); ``meta_sd``: its state dict as numpy;
``params``: our tree of it (the converter's Meta key table); ``hf_sd``: that tree under HF's hub names;
``hf_model``: transformers' ``MllamaForConditionalGeneration`` loaded from it, with nothing left at random init;
``tiles``: random image tiles for ``refs_vision.IMAGES``.
"""

from __future__ import annotations

import numpy as np
import pytest

from llama32_jax.checkpoint.convert import to_numpy
from llama32_jax.checkpoint.convert_vision import vision_params_from_state_dict, vision_state_dict_from_params
from tests.refs_vision import CFG, IMAGES, hf_mllama_config, meta_mllama

ALL = ("hf_model", "hf_sd", "meta_model", "meta_sd", "params", "tiles")


@pytest.fixture(scope="module")
def meta_model():
    return meta_mllama(CFG, seed=0)


@pytest.fixture(scope="module")
def meta_sd(meta_model):
    return {k: to_numpy(v).copy() for k, v in meta_model.state_dict().items()}


@pytest.fixture(scope="module")
def tiles():
    import torch

    gen = torch.Generator().manual_seed(1)
    v = CFG.vision
    return [
        [torch.randn(h * w, v.num_channels, v.image_size, v.image_size, generator=gen) for h, w in row]
        for row in IMAGES
    ]


@pytest.fixture(scope="module")
def params(meta_sd):
    return vision_params_from_state_dict(CFG, meta_sd, "meta")


@pytest.fixture(scope="module")
def hf_sd(params):
    return vision_state_dict_from_params(CFG, params, "hf")


@pytest.fixture(scope="module")
def hf_model(hf_sd, tmp_path_factory):
    """transformers loads our HF export from disk (hub key names, its own renaming); nothing may be left over."""
    import torch
    from safetensors.numpy import save_file
    from transformers import MllamaForConditionalGeneration

    path = tmp_path_factory.mktemp("mllama")
    hf_mllama_config(CFG).save_pretrained(path)
    save_file({k: np.ascontiguousarray(v) for k, v in hf_sd.items()}, str(path / "model.safetensors"))
    model, info = MllamaForConditionalGeneration.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager", output_loading_info=True
    )
    for kind, keys in info.items():
        assert not keys, f"transformers {kind}: {keys}"
    return model.eval()
