"""The cross-attention block against Meta's ``CrossAttentionTransformerBlock`` (a tiny random Mllama's first one).

Both take the same text hidden states, projected vision tokens and mask, including rows that see no image (text
before the first ``<|image|>``, a prompt without images): there Meta's block is the identity (docs/model-facts.md §4.3),
and ours must be too. Weights go through the converter's Meta key table (``VisionTensorMapper``), so this also checks
the table's cross-attention entries against the module.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from llama32_jax.checkpoint.convert_vision import VisionTensorMapper
from llama32_jax.models.cross_attention import CrossAttentionBlock
from llama32_jax.models.cross_mask import dense_cross_attention_mask, image_token_ranges, text_row_mask
from tests.refs_vision import CFG, meta_mllama

pytestmark = pytest.mark.filterwarnings("ignore:.*all_gather_tensor.*:FutureWarning")
TOL = 1e-5
IMG = CFG.image_token_id
P = 9  # vision tokens per tile in this test (any count: the block does not know tiles)


@pytest.fixture(scope="module")
def blocks():
    meta = meta_mllama(CFG, seed=3).text_model.cross_attention_layers[1]
    mapper = VisionTensorMapper(CFG, "meta")
    ours = CrossAttentionBlock(CFG.text, dtype=jnp.float32, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(ours)
    tree: dict = {}
    for key, value in meta.state_dict().items():
        [(path, array)] = mapper.map(f"text_model.cross_attention_layers.1.{key}", value.detach())
        assert path[:2] == ("cross_layers", 1)
        node = tree
        for part in path[2:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = jnp.asarray(array)
    assert jax_paths(nnx.to_pure_dict(state)) == jax_paths(tree)
    nnx.replace_by_pure_dict(state, tree)
    return meta, nnx.merge(graphdef, state)


def jax_paths(tree, prefix=()):
    out = set()
    for k, v in tree.items():
        out |= jax_paths(v, (*prefix, k)) if isinstance(v, dict) else {(*prefix, k)}
    return out


def test_block_equals_meta_including_rows_without_images(blocks):
    meta, ours = blocks
    rng = np.random.default_rng(0)
    prompts = [
        [5, 6, IMG, 7, 8, 9, IMG, IMG, 3, 4],  # text before the first image (masked rows), a run of two images
        [IMG, 1, 2, 3, 4, 5, 6, 7, 8, 9],
        [1, 2, 3, 4, 5, 6, 7, 8, 9, 10],  # no image at all
    ]
    tiles = [[2, 4, 1], [3], []]
    ranges = [image_token_ranges(p, IMG) for p in prompts]
    tile_mask = dense_cross_attention_mask(ranges, tiles, length=10, max_tiles=4, max_images=3)
    rows = text_row_mask(tile_mask)
    assert not rows[0, :2].any() and rows[0, 2:].all() and not rows[2].any()
    mask = np.repeat(tile_mask.reshape(*tile_mask.shape[:2], -1), P, axis=-1)  # [B, T, I*R*P]: each tile's P tokens
    b, t, n_v = mask.shape
    x = rng.standard_normal((b, t, CFG.text.dim)).astype(np.float32)
    vision = rng.standard_normal((b, n_v, CFG.text.dim)).astype(np.float32)

    got = ours(jnp.asarray(x), ours.vision_kv(jnp.asarray(vision)), jnp.asarray(tile_mask), jnp.asarray(rows))

    with torch.no_grad():
        cache = meta.compute_xattn_kv_cache(torch.as_tensor(vision))
        row = torch.as_tensor(rows, dtype=torch.float32)[:, None, :, None]  # [B, 1, T, 1]
        additive = torch.where(torch.as_tensor(mask)[:, None], 0.0, torch.finfo(torch.float32).min) * row
        want = meta(torch.as_tensor(x), additive, row, cache).numpy()
    np.testing.assert_allclose(np.asarray(got), want, atol=TOL, rtol=0)
    # Rows that see no image come out unchanged, in both.
    np.testing.assert_array_equal(np.asarray(got)[~rows], x[~rows])
    # And the block is not inert: rows with images change.
    assert np.abs(np.asarray(got)[rows] - x[rows]).max() > 1e-2
