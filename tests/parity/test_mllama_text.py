"""The vision models' text decoder against Meta's reference, given the same vision tokens.

Meta's tiny random Mllama (tests/refs_vision.py) runs its own pipeline (``compute_vision_tokens_masks`` +
``forward``) with its vision tower replaced by fixed random vision tokens, so this compares the decoder alone:
learnable image-token embedding, the fusion schedule, cross-attention K/V, the tile masks from ``<|image|>``
positions (a run of two images), and the head, in both parameter layouts (unrolled, and scanned groups
``[self, cross, self]`` here). Every row is compared: all follow Meta's masking, including, in
``TOKENS_TEXT_FIRST``, the text rows before the first image, which see no image (Meta zeroes the cross-attention
blocks there; HF does not zero their attention branch, docs/model-facts.md §4.3, so HF is not the reference for those
rows). The vision tower is tested in its own file.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from llama32_jax.checkpoint.convert_vision import vision_params_from_state_dict
from llama32_jax.models.cross_mask import dense_cross_attention_mask, image_token_ranges
from llama32_jax.models.mllama import CrossInputs, MllamaText
from llama32_jax.models.text import stack_layers
from llama32_jax.nn.cache import KVCache
from tests.refs_vision import CFG, IMAGES, IMG, SEQ, TOKENS, TOKENS_TEXT_FIRST, meta_logits, meta_mllama

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
    expected_text_first = meta_logits(meta, tiles, TOKENS_TEXT_FIRST)
    scanned = MllamaText(CFG.replace(scan_layers=True), param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(scanned)
    nnx.replace_by_pure_dict(state, stack_layers(text_tree))
    scanned = nnx.merge(graphdef, state)
    return dict(unrolled=ours, scanned=scanned), vision, dict(first=expected, text_first=expected_text_first)


def _cross(ours, vision, length: int, tokens=TOKENS) -> CrossInputs:
    ranges = [image_token_ranges(row, IMG) for row in tokens]
    num_tiles = [[h * w for h, w in row] for row in IMAGES]
    tile_mask = dense_cross_attention_mask(ranges, num_tiles, length, CFG.vision.max_num_tiles, max_images=2)
    b = vision.shape[0]
    return CrossInputs(ours.vision_kv(jnp.asarray(vision.reshape(b, -1, CFG.text.dim))), jnp.asarray(tile_mask), P)


LAYOUTS = ["unrolled", "scanned"]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("prompts", ["first", "text_first"])
def test_decoder_equals_meta_given_the_same_vision_tokens(setup, layout, prompts):
    models, vision, expected = setup
    ours = models[layout]
    tokens = TOKENS if prompts == "first" else TOKENS_TEXT_FIRST
    logits, _ = ours(jnp.asarray(tokens), cross=_cross(ours, vision, SEQ, tokens))
    delta = float(np.abs(np.asarray(logits) - expected[prompts]).max())
    print(f"{layout}, {prompts}: max |ours - meta| logit = {delta:.3g}")
    assert delta <= TOL


def test_rows_before_the_first_image_equal_a_text_only_call(setup):
    """Meta's row masking: a row that sees no image gets nothing from any cross-attention block, so the rows
    before the first ``<|image|>`` equal the model run without images (causal: later rows cannot reach them)."""
    models, vision, _ = setup
    ours = models["unrolled"]
    tokens = jnp.asarray(TOKENS_TEXT_FIRST)
    with_images, _ = ours(tokens, cross=_cross(ours, vision, SEQ, TOKENS_TEXT_FIRST))
    text_only, _ = ours(tokens)
    for b, row in enumerate(TOKENS_TEXT_FIRST):
        first = row.index(IMG)
        np.testing.assert_allclose(with_images[b, :first], text_only[b, :first], atol=1e-6, rtol=0)
        assert float(np.abs(with_images[b, first:] - text_only[b, first:]).max()) > 1e-3  # the images do matter


@pytest.mark.parametrize("layout", LAYOUTS)
def test_prefill_then_decode_with_cached_vision_kv_equals_full_forward(setup, layout):
    """Cross-attention K/V computed once and reused: token-by-token decoding equals the one-shot forward."""
    models, vision, expected = setup
    ours = models[layout]
    expected = expected["first"]
    cross = _cross(ours, vision, SEQ)
    cache = KVCache.init(ours.config, batch_size=len(TOKENS), max_len=SEQ, dtype=jnp.float32)
    tokens = jnp.asarray(TOKENS)
    logits, cache = ours(tokens[:, :5], cache, cross=cross)
    steps = [logits]
    for t in range(5, SEQ):
        step, cache = ours(tokens[:, t : t + 1], cache, cross=cross)
        steps.append(step)
    np.testing.assert_allclose(np.concatenate([np.asarray(s) for s in steps], axis=1), expected, atol=TOL, rtol=0)


def test_text_only_call_skips_cross_attention(setup):
    ours = setup[0]["unrolled"]
    text = [[1, 2, 3, 4, 5, 6]]
    a, _ = ours(jnp.asarray(text))
    # With images present but no <|image|> token in the prompt every row is masked: the blocks are identities.
    tile_mask = jnp.zeros((1, 6, 1, CFG.vision.max_num_tiles), bool)
    kv = ours.vision_kv(jnp.ones((1, CFG.vision.max_num_tiles * P, CFG.text.dim), jnp.float32))
    b, _ = ours(jnp.asarray(text), cross=CrossInputs(kv, tile_mask, P))
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)
