"""Cross-attention masks (docs/model-facts.md §4.3) against both references: HF's ``get_cross_attention_token_mask`` +
``convert_sparse_cross_attention_mask_to_dense`` and Meta's ``create_vision_mask`` + ``_pad_masks``, on random
prompts with 0-4 image tokens, runs of consecutive images, and images at the start, middle and end."""

from __future__ import annotations

import numpy as np
import pytest

from llama32_jax.errors import InvalidInputError
from llama32_jax.models.cross_mask import (
    OPEN_END,
    dense_cross_attention_mask,
    extend_for_generation,
    image_token_ranges,
    text_row_mask,
)

IMG = 128256
MAX_TILES = 4


def _prompts(seed: int, n: int = 60) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(1, 40))
        tokens = rng.integers(0, 1000, size=length).tolist()
        for _ in range(int(rng.integers(0, 5))):
            at = int(rng.integers(0, length))
            run = int(rng.integers(1, 3))  # sometimes two image tokens in a row
            tokens[at : at + run] = [IMG] * len(tokens[at : at + run])
        out.append(tokens)
    out += [[IMG], [IMG, IMG, 5, 6], [1, 2, IMG], [IMG, 3, IMG, IMG, 4, 5, IMG, 6], [7, 8, 9]]
    return out


def test_ranges_equal_hf_and_meta():
    from llama_models.llama3.chat_format import create_vision_mask
    from transformers.models.mllama.processing_mllama import get_cross_attention_token_mask

    for tokens in _prompts(0):
        ours = [list(r) for r in image_token_ranges(tokens, IMG)]
        assert ours == get_cross_attention_token_mask(tokens, IMG), tokens
        assert ours == create_vision_mask(tokens, IMG), tokens


def test_dense_mask_equals_hf_and_meta_batched():
    import torch
    from transformers.models.mllama.processing_mllama import convert_sparse_cross_attention_mask_to_dense

    from tests.refs_vision import _import_meta_multimodal

    _pad_masks = _import_meta_multimodal()._pad_masks  # Meta's module imports torchvision only for preprocessing
    rng = np.random.default_rng(1)
    prompts = [p for p in _prompts(2) if IMG in p]
    for start in range(0, len(prompts), 4):
        batch = prompts[start : start + 4]
        length = max(len(p) for p in batch) + 5  # room for generated tokens (Meta's total_len)
        ranges = [image_token_ranges(p, IMG) for p in batch]
        tiles = [[int(rng.integers(1, MAX_TILES + 1)) for _ in r] for r in ranges]
        ours = dense_cross_attention_mask(ranges, tiles, length, MAX_TILES)
        hf = convert_sparse_cross_attention_mask_to_dense(
            [[list(x) for x in r] for r in ranges], tiles, MAX_TILES, length
        )
        np.testing.assert_array_equal(ours, hf.astype(bool))
        meta = _pad_masks([[list(x) for x in r] for r in ranges], tiles, length, MAX_TILES)
        np.testing.assert_array_equal(ours, (meta == 0).numpy())
        assert meta.dtype == torch.get_default_dtype()


def test_row_mask_and_generation_rules():
    one = [1, 2, IMG, 3, 4]
    two = [IMG, 3, IMG, 4]
    ranges = [image_token_ranges(one, IMG), image_token_ranges(two, IMG), []]
    assert ranges[0] == [(2, OPEN_END)]
    mask = dense_cross_attention_mask(ranges, [[2], [1, 4], []], length=7, max_tiles=MAX_TILES)
    rows = text_row_mask(mask)
    # Text before the first image, and a prompt without images, see nothing.
    np.testing.assert_array_equal(rows[0], [False, False, True, True, True, True, True])
    np.testing.assert_array_equal(rows[2], [False] * 7)
    # Meta, several images: the last range stops at the prompt's length, so positions 4.. (generated) see no image.
    np.testing.assert_array_equal(rows[1], [True, True, True, True, False, False, False])
    # HF repeats the prompt's last row for generated tokens instead.
    prompt_mask = dense_cross_attention_mask(ranges[1:2], [[1, 4]], length=4, max_tiles=MAX_TILES)
    hf_style = extend_for_generation(prompt_mask, 3)
    assert hf_style.shape == (1, 7, 2, MAX_TILES) and text_row_mask(hf_style)[0].all()
    np.testing.assert_array_equal(hf_style[0, 4:, 1], [[True] * 4] * 3)  # the last image, all 4 tiles
    np.testing.assert_array_equal(hf_style[0, 4:, 0], [[False] * 4] * 3)


def test_bad_inputs_are_named():
    r = [image_token_ranges([IMG, 1, IMG], IMG)]
    with pytest.raises(InvalidInputError, match=r"prompt 0 has 2 <\|image\|> token\(s\) but 1 image"):
        dense_cross_attention_mask(r, [[1]], 5, MAX_TILES)
    with pytest.raises(InvalidInputError, match=r"prompt 0, image 1: 5 tiles; expected 1..4"):
        dense_cross_attention_mask(r, [[1, 5]], 5, MAX_TILES)
    with pytest.raises(InvalidInputError, match="more than max_images=1"):
        dense_cross_attention_mask(r, [[1, 1]], 5, MAX_TILES, max_images=1)
    with pytest.raises(InvalidInputError, match="cover 1 prompts but num_tiles 2"):
        dense_cross_attention_mask(r, [[1, 1], [1]], 5, MAX_TILES)
