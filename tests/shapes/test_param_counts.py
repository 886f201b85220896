"""``eval_shape`` of every full-size config: nothing allocated, parameter counts as docs/model-facts.md §1.4 derives
them."""

from __future__ import annotations

import dataclasses
import gc

import jax
import pytest

from llama32_jax import configs
from llama32_jax.models.build import abstract_model, param_count

# docs/model-facts.md §1.4 (rounded to the digits given there), in billions.
EXPECTED = {
    "Llama-3.2-1B": 1.236,
    "Llama-3.2-1B-Instruct": 1.236,
    "Llama-3.2-3B": 3.213,
    "Llama-3.2-3B-Instruct": 3.213,
    "Llama-Guard-3-1B": 1.498,
}
# The text backbones of the vision models, without cross-attention (docs/model-facts.md §1.4: text 8.030 B and
# 70.554 B).
BACKBONES = {"Llama-3.2-11B-Vision": 8.030, "Llama-3.2-90B-Vision": 70.554}


def _count_without_allocating(cfg) -> int:
    gc.collect()  # arrays of earlier tests held in reference cycles must not be freed mid-measurement
    before = len(jax.live_arrays())
    model = abstract_model(cfg)
    leaves = jax.tree.leaves(model)
    assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    assert len(jax.live_arrays()) == before
    return param_count(model)


@pytest.mark.parametrize("name", list(EXPECTED))
@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_text_model_counts(name, scan):
    cfg = configs.get_config(name).replace(scan_layers=scan)
    assert round(_count_without_allocating(cfg) / 1e9, 3) == EXPECTED[name]


@pytest.mark.parametrize("name", list(BACKBONES))
def test_vision_text_backbone_counts(name):
    cfg = configs.get_config(name)
    text = dataclasses.replace(cfg.text, n_cross_attention_layers=0, n_image_embeddings=0)
    backbone = configs.ModelConfig(text=text, name=name + "-backbone", scan_layers=True)
    assert round(_count_without_allocating(backbone) / 1e9, 3) == BACKBONES[name]
