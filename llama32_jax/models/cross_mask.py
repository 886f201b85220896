"""Which text tokens may attend to which image tiles in the Mllama cross-attention (docs/model-facts.md §4.3).

Three steps, each a pure numpy function (they run on the host while a batch is assembled):

1. :func:`image_token_ranges` — from the positions of the ``<|image|>`` tokens in one prompt, the token range each
   image is visible to. Image *m* is visible from its own token up to the next image token; the last image to the
   end; a single image to the end *including generated tokens* (end ``-1``); and a run of consecutive image tokens
   shares the range that follows the run.
2. :func:`dense_cross_attention_mask` — a boolean ``[B, length, max_images, max_tiles]`` mask: True where the token
   may attend to the tile (real tiles of a real image, inside that image's range).
3. :func:`text_row_mask` — ``[B, length]``: True for rows that see at least one tile. Rows that see none (text
   before the first image, prompts without images) must not take anything from the cross-attention block: Meta
   zeroes both its attention and its FFN output there (followed here; HF zeroes only the FFN, docs/model-facts.md §4.3).

Generated tokens: with one image the range is open (``-1``), so every generated token sees it. With several
images the last range ends at the prompt's length in Meta's ``create_vision_mask``/``_pad_masks``, which leaves
generated tokens seeing no image at all in Meta's generator; HF instead repeats the prompt's last mask row for
each generated token (:func:`extend_for_generation`). For a prompt that ends inside the last image's range the two
differ exactly on the generated tokens of multi-image prompts.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from llama32_jax.errors import InvalidInputError

OPEN_END = -1  # "to the end of the sequence, generated tokens included"


def image_token_ranges(tokens: Sequence[int], image_token_id: int) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` per ``<|image|>`` token of one prompt (end exclusive; ``-1``: open, see module doc)."""
    positions = [i for i, t in enumerate(tokens) if int(t) == image_token_id]
    if not positions:
        return []
    if len(positions) == 1:
        return [(positions[0], OPEN_END)]
    ends = [*positions[1:], len(tokens)]
    # A run of consecutive image tokens: every image of the run is visible up to where the run's last image ends.
    for m in range(len(positions) - 2, -1, -1):
        if ends[m] == positions[m] + 1:
            ends[m] = ends[m + 1]
    return list(zip(positions, ends, strict=True))


def dense_cross_attention_mask(
    ranges: Sequence[Sequence[tuple[int, int]]],
    num_tiles: Sequence[Sequence[int]],
    length: int,
    max_tiles: int,
    *,
    max_images: int | None = None,
) -> np.ndarray:
    """Boolean ``[B, length, max_images, max_tiles]`` mask from per-prompt ranges and per-image tile counts.

    ``ranges[b]`` are :func:`image_token_ranges` of prompt ``b`` and ``num_tiles[b]`` the tile count of each of its
    images (1..max_tiles), in the same order. An open end (``-1``) and ends past ``length`` stop at ``length``.
    """
    if len(ranges) != len(num_tiles):
        raise InvalidInputError(f"ranges cover {len(ranges)} prompts but num_tiles {len(num_tiles)}")
    most = max((len(r) for r in ranges), default=0)
    max_images = most if max_images is None else max_images
    if most > max_images:
        raise InvalidInputError(f"a prompt has {most} images, more than max_images={max_images}")
    mask = np.zeros((len(ranges), length, max(max_images, 0), max_tiles), dtype=bool)
    for b, (spans, tiles) in enumerate(zip(ranges, num_tiles, strict=True)):
        if len(spans) != len(tiles):
            raise InvalidInputError(
                f"prompt {b} has {len(spans)} <|image|> token(s) but {len(tiles)} image(s); give one image per token"
            )
        for m, ((start, end), n) in enumerate(zip(spans, tiles, strict=True)):
            if not 1 <= int(n) <= max_tiles:
                raise InvalidInputError(f"prompt {b}, image {m}: {n} tiles; expected 1..{max_tiles}")
            stop = length if end == OPEN_END else min(end, length)
            mask[b, start:stop, m, : int(n)] = True
    return mask


def text_row_mask(mask: np.ndarray) -> np.ndarray:
    """``[B, length]``: True where a text row may attend to at least one image tile."""
    return mask.reshape(*mask.shape[:2], -1).any(axis=-1)


def extend_for_generation(mask: np.ndarray, new_tokens: int) -> np.ndarray:
    """HF's rule for generated tokens: each new row repeats the last row of the prompt's mask."""
    last = mask[:, -1:]
    return np.concatenate([mask, np.repeat(last, new_tokens, axis=1)], axis=1)
