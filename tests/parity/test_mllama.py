"""The whole Llama 3.2 Vision model (vision tower + decoder) against Meta's reference and HF transformers.

The tiny random Mllama of tests/refs_vision.py: two samples, images of (2, 1), (1, 3) and (2, 2) tiles and a padding
image slot, a run of two images. Every sample starts with ``<|image|>``, so no text row is fully masked and HF's
masking agrees with Meta's (docs/model-facts.md §4.3): all rows are compared with both. transformers 5.24's
one-layer-late intermediate vision features are realigned in memory (``align_hf_intermediate_layers``; its weights
untouched). Our model loads the converter's tree of Meta's weights; the HF model loads the same tree exported to HF
names.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama32_jax import configs
from llama32_jax.models.build import abstract_model, load_params, param_count
from llama32_jax.models.cross_mask import dense_cross_attention_mask, image_token_ranges
from llama32_jax.models.mllama import Mllama
from llama32_jax.models.vision import aspect_ratio_ids
from tests.refs_vision import (
    CFG,
    IMAGES,
    IMG,
    SEQ,
    TOKENS,
    _import_meta_multimodal,
    align_hf_intermediate_layers,
    hf_inputs,
    meta_logits,
)
from tests.vision_fixtures import hf_model, hf_sd, meta_model, meta_sd, params, tiles  # noqa: F401

pytestmark = pytest.mark.filterwarnings("ignore:.*all_gather_tensor.*:FutureWarning")
TOL = 1e-4


@pytest.fixture(scope="module")
def ours(params):
    model = load_params(CFG, params, param_dtype=jnp.float32)
    assert isinstance(model, Mllama)
    return model


@pytest.fixture(scope="module")
def pixels(tiles):
    v = CFG.vision
    stacked, _ = _import_meta_multimodal()._stack_images(tiles, v.max_num_tiles, v.image_size, 2)
    return stacked  # torch [B, I, R, C, H, W], zero tiles / images where there are none


def _our_logits(model, pixels) -> np.ndarray:
    ratios = [[*row, *[(0, 0)] * (2 - len(row))] for row in IMAGES]
    ids = aspect_ratio_ids(CFG.vision, ratios)
    ranges = [image_token_ranges(row, IMG) for row in TOKENS]
    tile_mask = dense_cross_attention_mask(ranges, [[h * w for h, w in r] for r in IMAGES], SEQ, 4, max_images=2)
    cross = model.cross_inputs(jnp.asarray(pixels.numpy()), jnp.asarray(ids), tile_mask)
    logits, _ = model(jnp.asarray(TOKENS), cross=cross)
    return np.asarray(logits)


def test_equals_meta_end_to_end(ours, meta_model, tiles, pixels):
    expected = meta_logits(meta_model, tiles)
    delta = float(np.abs(_our_logits(ours, pixels) - expected).max())
    print(f"max |ours - meta| logit = {delta:.3g}")
    assert delta <= TOL


def test_equals_hf_end_to_end(ours, hf_model, pixels):
    import torch

    align_hf_intermediate_layers(hf_model)
    with torch.no_grad():
        expected = hf_model(**hf_inputs(CFG, pixels)).logits.numpy()
    delta = float(np.abs(_our_logits(ours, pixels) - expected).max())
    print(f"max |ours - hf| logit = {delta:.3g}")
    assert delta <= TOL


@pytest.mark.parametrize(
    ("name", "spec_billions"), [("Llama-3.2-11B-Vision", 10.629), ("Llama-3.2-90B-Vision", 88.552)]
)
@pytest.mark.parametrize("scan_layers", [False, True])
def test_full_size_parameter_counts(name, spec_billions, scan_layers):
    """docs/model-facts.md §1.4 counts Meta's 4x4 tile grids; our (and HF's) tables hold one row per aspect-ratio id
    instead (9 x 4 tiles): the difference is exactly those extra entries. Both decoder layouts hold the same
    parameters."""
    cfg = configs.get_config(name).replace(scan_layers=scan_layers)
    before = {id(a) for a in jax.live_arrays()}
    count = param_count(abstract_model(cfg))
    assert not {id(a) for a in jax.live_arrays()} - before  # eval_shape only: nothing allocated
    v = cfg.vision
    rows = len(v.supported_aspect_ratios) + 1
    extra = (rows * v.max_num_tiles - v.max_num_tiles**2) * (v.tokens_per_tile * v.width + 2 * v.width)
    assert round((count - extra) / 1e9, 3) == spec_billions
