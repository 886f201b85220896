"""The vision models' text decoder against Meta's reference, given the same vision tokens.

Meta's tiny random Mllama (tests/refs_vision.py) runs its own pipeline (``compute_vision_tokens_masks`` +
``forward``) with its vision tower replaced by fixed random vision tokens, so this compares the decoder alone:
learnable image-token embedding, the fusion schedule, cross-attention K/V, the tile masks from ``<|image|>``
positions (a run of two images, text rows before the first image in no sample here: each starts with an image),
and the head. Every row is compared: all follow Meta's masking. The vision tower is tested in its own file.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from llama32_jax.cache import KVCache
from llama32_jax.checkpoint.convert_vision import vision_params_from_state_dict
from llama32_jax.cross_mask import dense_cross_attention_mask, image_token_ranges
from llama32_jax.mllama import CrossInputs, MllamaText
from tests.refs_vision import CFG, IMAGES, IMG, SEQ, TOKENS, meta_logits, meta_mllama

pytestmark = pytest.mark.filterwarnings("ignore:.*all_gather_tensor.*:FutureWarning")
TOL = 1e-4
P = CFG.vision.tokens_per_tile


class _FixedVision(torch.nn.Module):
    def __init__(self, tokens: torch.Tensor, like):
        super().__init__()
        self.tokens = tokens
        self.image_res, self.patch_size = like.image_res, like.patch_size

    def forward(self, images, aspect_ratios):
        return self.tokens


@pytest.fixture(scope="module")
def setup():
    meta = meta_mllama(CFG, seed=11)
    tree = vision_params_from_state_dict(CFG, {k: v.detach() for k, v in meta.state_dict().items()}, "meta")
    text_tree = {k: v for k, v in tree.items() if k not in ("vision", "projector")}
    ours = MllamaText(CFG, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(ours)
    nnx.replace_by_pure_dict(state, text_tree)
    ours = nnx.merge(graphdef, state)

    rng = np.random.default_rng(4)
    n_img = max(len(r) for r in IMAGES)
    vision = rng.standard_normal((len(TOKENS), n_img, CFG.vision.max_num_tiles, P, CFG.text.dim)).astype(np.float32)
    meta.vision_model = _FixedVision(torch.as_tensor(vision), meta.vision_model)
    v = CFG.vision
    tiles = [[torch.zeros(h * w, v.num_channels, v.image_size, v.image_size) for h, w in row] for row in IMAGES]
    expected = meta_logits(meta, tiles)
    return ours, vision, expected


def _cross(ours, vision, length: int) -> CrossInputs:
    ranges = [image_token_ranges(row, IMG) for row in TOKENS]
    num_tiles = [[h * w for h, w in row] for row in IMAGES]
    tile_mask = dense_cross_attention_mask(ranges, num_tiles, length, CFG.vision.max_num_tiles, max_images=2)
    b = vision.shape[0]
    return CrossInputs(ours.vision_kv(jnp.asarray(vision.reshape(b, -1, CFG.text.dim))), jnp.asarray(tile_mask), P)


def test_decoder_equals_meta_given_the_same_vision_tokens(setup):
    ours, vision, expected = setup
    logits, _ = ours(jnp.asarray(TOKENS), cross=_cross(ours, vision, SEQ))
    delta = float(np.abs(np.asarray(logits) - expected).max())
    print(f"max |ours - meta| logit = {delta:.3g}")
    assert delta <= TOL


def test_prefill_then_decode_with_cached_vision_kv_equals_full_forward(setup):
    """Cross-attention K/V computed once and reused: token-by-token decoding equals the one-shot forward."""
    ours, vision, expected = setup
    cross = _cross(ours, vision, SEQ)
    cache = KVCache.init(CFG, batch_size=len(TOKENS), max_len=SEQ, dtype=jnp.float32)
    tokens = jnp.asarray(TOKENS)
    logits, cache = ours(tokens[:, :5], cache, cross=cross)
    steps = [logits]
    for t in range(5, SEQ):
        step, cache = ours(tokens[:, t : t + 1], cache, cross=cross)
        steps.append(step)
    np.testing.assert_allclose(np.concatenate([np.asarray(s) for s in steps], axis=1), expected, atol=TOL, rtol=0)


def test_text_only_call_skips_cross_attention(setup):
    ours, _, _ = setup
    text = [[1, 2, 3, 4, 5, 6]]
    a, _ = ours(jnp.asarray(text))
    # With images present but no <|image|> token in the prompt every row is masked: the blocks are identities.
    tile_mask = jnp.zeros((1, 6, 1, CFG.vision.max_num_tiles), bool)
    kv = ours.vision_kv(jnp.ones((1, CFG.vision.max_num_tiles * P, CFG.text.dim), jnp.float32))
    b, _ = ours(jnp.asarray(text), cross=CrossInputs(kv, tile_mask, P))
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)
