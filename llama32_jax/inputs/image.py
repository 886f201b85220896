"""Mllama image preprocessing (docs/model-facts.md §6): images in, the vision encoder's numpy inputs out.

Pipeline for each image (the numbers are for the published models: 560-pixel tiles, at most 4 tiles):

1. **Load and convert to RGB** (:func:`load_image`, :func:`to_rgb`): transparency is composited over white, as HF's
   ``convert_to_rgb`` does (docs/model-facts.md §6.1); 16-bit grayscale is scaled to 8 bits (PIL would clip it).
2. **Best-fit canvas** (:func:`best_fit_canvas`): among the supported ``(tiles_h, tiles_w)`` arrangements pick the
   smallest upscale >= 1 if any canvas allows one, else the largest downscale; ties go to the smaller canvas.
3. **Resize without distortion** (:func:`fit_size`): upscaling is limited to one tile per side; PIL bilinear.
4. **Pad** bottom/right with black to the canvas, **rescale** by 1/255, **normalise** with the CLIP mean/std (so the
   padding becomes ``-mean/std``, not 0).
5. **Split into tiles** in row-major order, ``[tiles, 3, S, S]``.

:func:`preprocess` runs this on a batch (a list of prompts, each a list of images) and packs the result into an
:class:`ImageBatch` whose missing tiles and images are exact zeros. The output is bit-identical to transformers'
``MllamaImageProcessorPil`` configured with ``size=560x560``, the CLIP mean/std and ``max_image_tiles=4`` (see
``tests/unit/test_image.py``), except where a docstring below says otherwise.

All float arithmetic follows HF's order: ``float32(float64(u8) * (1/255))``, then ``(x - mean) / std`` in float32.
Since the input is 8-bit, that is a 256-entry lookup table per channel, which is how it is computed here.

Input errors are :class:`~llama32_jax.errors.InvalidInputError` naming the image (``images[b][i]``) and saying what
would be valid. A decompression-bomb guard (``max_pixels``, default 10^8 ~ 10k x 10k) refuses oversized images from
their header, before any pixel is decoded.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from llama32_jax.configs.base import VisionConfig
from llama32_jax.errors import ConfigError, InvalidInputError

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "DEFAULT_MAX_PIXELS",
    "ImageBatch",
    "ImageInput",
    "best_fit_canvas",
    "fit_size",
    "load_image",
    "preprocess",
    "preprocess_image",
    "to_rgb",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Decompression-bomb guard: width * height above this is refused before decoding (~10k x 10k, 300 MB as RGB).
DEFAULT_MAX_PIXELS = 100_000_000
# HF's rescale factor, applied in float64 before the cast to float32 (bit-for-bit parity needs the same order).
_RESCALE = 1 / 255

ImageInput = Image.Image | np.ndarray | str | os.PathLike
_VALID_TYPES = "a PIL.Image.Image, a numpy uint8 array (H, W), (H, W, 1|2|3|4), or a path (str / os.PathLike)"
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
# Modes refused by to_rgb (PIL would clip them to 0..255 silently), with the reason given to the caller.
_REFUSED_MODES = {"F": "32-bit float pixels have no defined 8-bit range; convert the image to 'L' or 'RGB' first"}


@dataclass(frozen=True)
class ImageBatch:
    """Preprocessed images for the Mllama vision encoder (numpy; B prompts, N images per prompt at most).

    Attributes:
        pixel_values: float32 ``[B, N, max_num_tiles, 3, S, S]``; tiles beyond an image's own count and image slots
            beyond a prompt's own images are exact zeros.
        aspect_ratio_ids: int32 ``[B, N]``; 1 + index of the image's ``(tiles_h, tiles_w)`` in
            ``config.supported_aspect_ratios`` (1..8 for the published models), 0 for padding image slots.
        aspect_ratio_mask: int32 ``[B, N, max_num_tiles]``; 1 for an image's real tiles. As in HF (and Meta, which
            pads the aspect ratio with (1, 1)), tile 0 is 1 for padding image slots too, so no image's tile
            attention is empty.
        num_tiles: ``num_tiles[b][i]`` = tiles of image i of prompt b (no entry for padding slots).
    """

    pixel_values: np.ndarray
    aspect_ratio_ids: np.ndarray
    aspect_ratio_mask: np.ndarray
    num_tiles: list[list[int]]


# ----------------------------------------------------------------------------------------------------------------
# Geometry (docs/model-facts.md §6.2-6.4; identical float arithmetic to HF so ties and floors land the same way)
# ----------------------------------------------------------------------------------------------------------------


def best_fit_canvas(
    height: int, width: int, tile_size: int, aspect_ratios: Sequence[tuple[int, int]]
) -> tuple[int, int]:
    """The ``(tiles_h, tiles_w)`` canvas for an image of ``height x width`` pixels (docs/model-facts.md §6.3).

    Each canvas scales the image by ``min(canvas_w / width, canvas_h / height)``. If some canvas needs no
    downscaling (scale >= 1), the smallest such scale wins; otherwise the largest scale (< 1) does. Among canvases
    with the winning scale the smallest area wins, and among equal areas the first in ``aspect_ratios``.
    """
    scales = [min((tw * tile_size) / width, (th * tile_size) / height) for th, tw in aspect_ratios]
    up = [s for s in scales if s >= 1]
    chosen = min(up) if up else max(scales)
    best: tuple[int, int] | None = None
    for (th, tw), s in zip(aspect_ratios, scales, strict=True):
        if s == chosen and (best is None or th * tw < best[0] * best[1]):
            best = (th, tw)
    assert best is not None
    return best


def fit_size(height: int, width: int, canvas_height: int, canvas_width: int, tile_size: int) -> tuple[int, int]:
    """The resized ``(new_h, new_w)`` of an image placed on a canvas, aspect ratio preserved (docs/model-facts.md §6.4).

    Each side's target is the image's own size clipped to ``[tile_size, canvas side]`` (so a small image is
    upscaled to at most one tile, a large one downscaled to fit); the side with the smaller target/own ratio takes
    its target and the other side follows it, floored and capped at its own target. HF additionally keeps the
    floored side at >= 1 pixel (docs/model-facts.md §6.4 omits this; it only matters for images thinner than 1:560), as
    here.
    """
    target_w = min(max(width, tile_size), canvas_width)
    target_h = min(max(height, tile_size), canvas_height)
    scale_h = target_h / height
    scale_w = target_w / width
    if scale_w < scale_h:
        return min(math.floor(height * scale_w) or 1, target_h), target_w
    return target_h, min(math.floor(width * scale_h) or 1, target_w)


# ----------------------------------------------------------------------------------------------------------------
# Loading and RGB conversion
# ----------------------------------------------------------------------------------------------------------------


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert one PIL image to mode ``RGB``, pixel-identical to HF ``convert_to_rgb`` wherever HF is sensible.

    Per mode:

    * ``RGB`` (opaque): unchanged. ``L``: gray replicated to R=G=B. ``1``: 0 / 255. ``CMYK``, ``YCbCr``, ``P`` without
      transparency and other PIL modes: PIL's own ``convert("RGB")`` (HF does the same; CMYK uses PIL's naive
      ``R = 255 - C - K`` formula, without colour management).
    * Anything with transparency -- an ``A`` band (``RGBA``, ``LA``, ``PA``) or a ``transparency`` entry in
      ``image.info`` (``P`` with a transparent palette index, ``L``/``RGB`` with a transparent colour): converted to
      ``RGBA`` and alpha-composited over **opaque white**, then alpha dropped -- exactly HF's ``convert_to_rgb``.
      Meta's reference instead calls ``convert("RGB")``, which drops alpha and keeps whatever colour the
      transparent pixels hold (docs/model-facts.md §6.1, §10.13); we follow HF.
    * 16-bit grayscale (``I;16``, ``I;16L``, ``I;16B``, ``I;16N``) and 32-bit integer ``I`` (how older Pillow and
      some TIFFs hold 16-bit data): **our choice, differs from HF** -- values are clipped to [0, 65535] and scaled to
      8 bits by ``round(v / 257)`` (0 -> 0, 65535 -> 255), then replicated to RGB. PIL's (and so HF's)
      ``convert("RGB")`` clips every value above 255 to 255, which turns a normal 16-bit photo nearly white.
    * ``F`` (float32 pixels): refused with :class:`InvalidInputError` (no defined range; convert it yourself).
    """
    if image.mode in _REFUSED_MODES:
        raise InvalidInputError(f"image mode {image.mode!r} is not supported: {_REFUSED_MODES[image.mode]}")
    if image.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.int64)
        gray = np.rint(np.clip(values, 0, 65535) / 257.0).astype(np.uint8)
        return Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2), mode="RGB")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _check_size(width: int, height: int, where: str, max_pixels: int | None) -> None:
    if width <= 0 or height <= 0:
        raise InvalidInputError(f"{where} has zero size ({width}x{height} pixels); images need width, height >= 1")
    if max_pixels is not None and width * height > max_pixels:
        raise InvalidInputError(
            f"{where} is {width}x{height} = {width * height} pixels, over the limit of {max_pixels} "
            "(decompression-bomb guard); downscale it first or raise max_pixels"
        )


def _open_file(path: os.PathLike | str, where: str, max_pixels: int | None) -> Image.Image:
    """Open an image file; refuse it from its header if it is too large, then decode, EXIF-rotate, convert."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise InvalidInputError(f"{where}: no such file {path!r}; pass an existing image file, a PIL image or an array")
    if not os.path.isfile(path):
        raise InvalidInputError(f"{where}: {path!r} is not a regular file; pass the path of an image file")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", Image.DecompressionBombWarning)
            handle = Image.open(path)  # reads the header only
    except Image.DecompressionBombError as e:
        raise InvalidInputError(
            f"{where} ({path!r}) refused by PIL's decompression-bomb check: {e}; "
            "raise PIL.Image.MAX_IMAGE_PIXELS as well as max_pixels if the image is genuine"
        ) from e
    except UnidentifiedImageError as e:
        raise InvalidInputError(f"{where}: {path!r} is not an image file PIL can read ({e})") from e
    except OSError as e:
        raise InvalidInputError(f"{where}: cannot read {path!r} ({e})") from e
    with handle:
        # PIL warns (rather than refusing) between MAX_IMAGE_PIXELS and twice that; our own limit decides there.
        bomb = [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
        width, height = handle.size
        try:
            _check_size(width, height, f"{where} ({path!r})", max_pixels)
        except InvalidInputError as e:
            if bomb:
                raise InvalidInputError(f"{e} (PIL also warned: {bomb[0].message})") from e
            raise
        try:
            handle.load()
            upright = ImageOps.exif_transpose(handle)
        except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt data (PIL raises all three)
            raise InvalidInputError(f"{where}: cannot decode {path!r} ({e})") from e
    return upright


def _from_array(array: np.ndarray, where: str, max_pixels: int | None) -> Image.Image:
    """An HWC / HW uint8 array as a PIL image (mode from the channel count)."""
    if array.dtype != np.uint8:
        raise InvalidInputError(
            f"{where} is a numpy array of dtype {array.dtype}; pass uint8 pixels (0..255), e.g. "
            "(np.clip(x, 0, 1) * 255).round().astype(np.uint8) for floats in [0, 1]"
        )
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (2, 3, 4)):
        raise InvalidInputError(
            f"{where} is a numpy array of shape {array.shape}; pass (H, W) grayscale or channels-last "
            "(H, W, C) with C = 1 (gray), 2 (gray+alpha), 3 (RGB) or 4 (RGBA)"
        )
    _check_size(array.shape[1], array.shape[0], where, max_pixels)
    mode = "L" if array.ndim == 2 else {2: "LA", 3: "RGB", 4: "RGBA"}[array.shape[2]]
    return Image.fromarray(np.ascontiguousarray(array), mode=mode)


def load_image(image: Any, *, where: str = "image", max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Validate one input image and return it as an RGB PIL image (see :func:`to_rgb` for the mode rules).

    Accepts a PIL image, a numpy ``uint8`` array ((H, W), or channels-last (H, W, C) with C in 1..4: gray,
    gray+alpha, RGB, RGBA -- converted exactly as the PIL image of the same mode), or a path to an image file.

    Files are opened lazily and refused from their header if larger than ``max_pixels`` (``None`` = no limit of
    ours; PIL's own ``Image.MAX_IMAGE_PIXELS`` check still refuses files above twice that value). A file's EXIF
    orientation is applied (as HF's ``load_image`` does for paths); PIL images and arrays are taken as given (as HF
    does). Difference from HF: a transparent *file* is composited over white like any other transparent image,
    whereas HF's ``load_image`` drops the alpha of files (``convert("RGB")``) -- so a path and the PIL image read
    from it give the same result here.

    Raises:
        InvalidInputError: naming ``where`` -- missing/unreadable file, not an image, zero size, too many pixels,
            unsupported type, dtype, shape or mode.
    """
    if isinstance(image, Image.Image):
        _check_size(image.width, image.height, where, max_pixels)
        try:
            image.load()
        except (OSError, SyntaxError, ValueError) as e:
            raise InvalidInputError(f"{where}: cannot decode the PIL image ({e})") from e
    elif isinstance(image, np.ndarray):
        image = _from_array(image, where, max_pixels)
    elif isinstance(image, (str, os.PathLike)):
        image = _open_file(image, where, max_pixels)
    else:
        raise InvalidInputError(f"{where} has type {type(image).__name__}; each image must be {_VALID_TYPES}")
    try:
        return to_rgb(image)
    except InvalidInputError as e:
        raise InvalidInputError(f"{where}: {e}") from e
    except (OSError, ValueError) as e:
        raise InvalidInputError(f"{where}: cannot convert mode {image.mode!r} to RGB ({e})") from e


# ----------------------------------------------------------------------------------------------------------------
# Pixels
# ----------------------------------------------------------------------------------------------------------------


def _lookup_table(mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """``[3, 256]`` float32: every uint8 value rescaled and normalised with HF's exact float operations."""
    rescaled = (np.arange(256, dtype=np.float64) * _RESCALE).astype(np.float32)
    mean32 = np.asarray(mean, dtype=np.float32)[:, None]
    std32 = np.asarray(std, dtype=np.float32)[:, None]
    return (rescaled[None, :] - mean32) / std32


_CLIP_TABLE = _lookup_table(CLIP_MEAN, CLIP_STD)


def _vision_geometry(config: VisionConfig) -> tuple[int, tuple[tuple[int, int], ...]]:
    if config.num_channels != 3:
        raise ConfigError(
            f"image preprocessing produces 3 (RGB) channels, but the vision config has {config.num_channels}"
        )
    return config.image_size, tuple(config.supported_aspect_ratios)


def preprocess_image(rgb: Image.Image, config: VisionConfig | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    """Tiles of one RGB image: float32 ``[tiles_h * tiles_w, 3, S, S]`` (row-major tiles) and ``(tiles_h, tiles_w)``.

    Best-fit canvas, bilinear resize (PIL, as HF), black padding at the bottom/right, rescale and CLIP
    normalisation, split into ``S x S`` tiles (docs/model-facts.md §6.2-6.7).
    """
    if not isinstance(rgb, Image.Image) or rgb.mode != "RGB":
        raise InvalidInputError("preprocess_image takes an RGB PIL image; use load_image() to convert other inputs")
    config = config or VisionConfig()
    tile, ratios = _vision_geometry(config)
    width, height = rgb.size
    tiles_h, tiles_w = best_fit_canvas(height, width, tile, ratios)
    new_h, new_w = fit_size(height, width, tiles_h * tile, tiles_w * tile, tile)
    resized = rgb.resize((new_w, new_h), resample=Image.Resampling.BILINEAR)
    canvas = np.zeros((tiles_h * tile, tiles_w * tile, 3), dtype=np.uint8)
    canvas[:new_h, :new_w] = np.asarray(resized)
    # (H, W, C) -> (tiles_h, tile, tiles_w, tile, C) -> (tiles_h, tiles_w, C, tile, tile)
    tiles = canvas.reshape(tiles_h, tile, tiles_w, tile, 3).transpose(0, 2, 4, 1, 3)
    tiles = tiles.reshape(tiles_h * tiles_w, 3, tile, tile)
    values = _CLIP_TABLE[np.arange(3)[None, :, None, None], tiles]
    return values, (tiles_h, tiles_w)


def preprocess(
    images: Sequence[Sequence[ImageInput]],
    config: VisionConfig | None = None,
    *,
    max_images: int | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> ImageBatch:
    """Preprocess a batch of prompts' images for the Mllama vision encoder (docs/model-facts.md §6).

    Args:
        images: one list per prompt, each holding that prompt's images in ``<|image|>`` order; a prompt may have
            none (a mixed batch: its slots are padding), but at least one prompt must have an image.
            An image is a PIL image, a numpy uint8 array ((H, W) or channels-last (H, W, 1|2|3|4)) or a file path;
            see :func:`load_image` and :func:`to_rgb` for how each is read and converted to RGB.
        config: the vision config (tile size ``image_size``, ``max_num_tiles``, ``supported_aspect_ratios``);
            defaults to the published models' ``VisionConfig()`` (560-pixel tiles, up to 4).
        max_images: if given, the most images any one prompt may have (Meta recommends one per prompt).
        max_pixels: per-image decompression-bomb guard (width * height); ``None`` disables our check.

    Returns:
        An :class:`ImageBatch`; ``N`` = the largest number of images of any prompt.

    Raises:
        InvalidInputError: an empty batch, no image at all, too many images, or a bad image (named
            ``images[b][i]``).
    """
    config = config or VisionConfig()
    tile, ratios = _vision_geometry(config)
    if isinstance(images, (str, bytes, os.PathLike, np.ndarray, Image.Image)) or not isinstance(images, Sequence):
        raise InvalidInputError(
            f"images must be a list (one entry per prompt) of lists of images, got {type(images).__name__}; "
            "e.g. [[img]] for one prompt with one image"
        )
    if len(images) == 0:
        raise InvalidInputError("images is an empty batch; pass at least one prompt's list of images")
    if max_images is not None and (not isinstance(max_images, int) or max_images < 1):
        raise InvalidInputError(f"max_images must be a positive int or None, got {max_images!r}")
    if max_pixels is not None and (not isinstance(max_pixels, int) or max_pixels < 1):
        raise InvalidInputError(f"max_pixels must be a positive int or None, got {max_pixels!r}")
    for b, prompt in enumerate(images):
        if isinstance(prompt, (str, bytes, os.PathLike, np.ndarray, Image.Image)) or not isinstance(prompt, Sequence):
            raise InvalidInputError(
                f"images[{b}] must be a list of images (one prompt's images), got {type(prompt).__name__}; "
                "wrap single images as [[img]]"
            )
        if max_images is not None and len(prompt) > max_images:
            raise InvalidInputError(f"images[{b}] has {len(prompt)} images, more than max_images={max_images}")

    n_images = max(len(prompt) for prompt in images)
    if n_images == 0:
        raise InvalidInputError("no prompt in images has an image; run text-only prompts without images")
    max_tiles = config.max_num_tiles
    pixel_values = np.zeros((len(images), n_images, max_tiles, 3, tile, tile), dtype=np.float32)
    aspect_ratio_ids = np.zeros((len(images), n_images), dtype=np.int32)
    aspect_ratio_mask = np.zeros((len(images), n_images, max_tiles), dtype=np.int32)
    aspect_ratio_mask[:, :, 0] = 1
    num_tiles: list[list[int]] = []
    for b, prompt in enumerate(images):
        counts = []
        for i, item in enumerate(prompt):
            rgb = load_image(item, where=f"images[{b}][{i}]", max_pixels=max_pixels)
            tiles, (tiles_h, tiles_w) = preprocess_image(rgb, config)
            n = tiles_h * tiles_w
            pixel_values[b, i, :n] = tiles
            aspect_ratio_ids[b, i] = ratios.index((tiles_h, tiles_w)) + 1
            aspect_ratio_mask[b, i, :n] = 1
            counts.append(n)
        num_tiles.append(counts)
    return ImageBatch(pixel_values, aspect_ratio_ids, aspect_ratio_mask, num_tiles)
