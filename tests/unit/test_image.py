"""Image preprocessing (docs/model-facts.md §6) against transformers' ``MllamaImageProcessorPil``: pixels must be
bit-identical.

The reference is the PIL backend of HF's Mllama image processor (the default processor needs torchvision), built
with the published models' settings: 560x560 tiles, CLIP mean/std, at most 4 tiles. Every comparison below is
exact (``np.array_equal`` on float32, so the max abs diff is 0), not a tolerance.

docs/model-facts.md §6 and HF agree on every step (canvas choice, resize sizes, bilinear PIL resample, black
bottom/right padding, rescale, CLIP normalisation, row-major tiles, zero packing, aspect-ratio ids and mask). Two
details docs/model-facts.md §6 leaves out and we follow HF on: the floored resize side is kept >= 1 pixel
(``test_geometry_matches_hf`` covers 1-pixel thin images), and the aspect-ratio mask has tile 0 set for padding image
slots too (``test_batch_with_padding``). docs/model-facts.md §6.1 notes that Meta drops alpha where HF composites over
white and does not pick one; we follow HF.

Our deliberate departures from HF (documented in ``llama32_jax.inputs.image``), each tested below:
* 16-bit grayscale (``I;16``, ``I``) is scaled to 8 bits; HF/PIL clip every value above 255 to white.
* A transparent image *file* is composited over white like a transparent PIL image; HF's ``load_image`` drops the
  alpha of files (``convert("RGB")``) while compositing PIL images -- an inconsistency we do not copy.
* (H, W, 2) gray+alpha arrays and (H, W) arrays are accepted (HF refuses them); ``F`` mode is refused (HF clips).
"""

from __future__ import annotations

import io
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from llama32_jax.configs import ALL_ASPECT_RATIOS_4, TINY_VISION
from llama32_jax.errors import InvalidInputError
from llama32_jax.inputs.image import (
    CLIP_MEAN,
    CLIP_STD,
    ImageBatch,
    best_fit_canvas,
    fit_size,
    load_image,
    preprocess,
    to_rgb,
)

TILE = 560


@pytest.fixture(scope="module")
def hf():
    from transformers import MllamaImageProcessorPil

    return MllamaImageProcessorPil(
        size={"height": TILE, "width": TILE},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
        max_image_tiles=4,
        resample=Image.Resampling.BILINEAR,
    )


def _assert_same(ours: ImageBatch, theirs) -> None:
    """Exact equality of every output against an HF BatchFeature."""
    ref = np.asarray(theirs["pixel_values"])
    assert ours.pixel_values.dtype == np.float32 and ref.dtype == np.float32
    assert ours.pixel_values.shape == ref.shape
    max_diff = float(np.max(np.abs(ours.pixel_values - ref)))
    assert max_diff == 0.0, f"max abs diff {max_diff}"
    assert np.array_equal(ours.pixel_values, ref)
    assert ours.aspect_ratio_ids.dtype == np.int32 and ours.aspect_ratio_mask.dtype == np.int32
    np.testing.assert_array_equal(ours.aspect_ratio_ids, np.asarray(theirs["aspect_ratio_ids"]))
    np.testing.assert_array_equal(ours.aspect_ratio_mask, np.asarray(theirs["aspect_ratio_mask"]))
    assert ours.num_tiles == [list(n) for n in theirs["num_tiles"]]


def _random_rgb(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _photo(name: str) -> np.ndarray:
    import skimage.data

    return getattr(skimage.data, name)()


# ---------------------------------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("width", "height", "canvas", "new_wh"),
    [  # docs/model-facts.md §6.4 examples (w x h)
        (640, 480, (1, 2), (640, 480)),
        (1280, 853, (2, 2), (1120, 746)),
        (224, 224, (1, 1), (560, 560)),
        (4000, 1000, (1, 4), (2240, 560)),
    ],
)
def test_spec_examples(width, height, canvas, new_wh):
    assert best_fit_canvas(height, width, TILE, ALL_ASPECT_RATIOS_4) == canvas
    new_h, new_w = fit_size(height, width, canvas[0] * TILE, canvas[1] * TILE, TILE)
    assert (new_w, new_h) == new_wh


def test_geometry_matches_hf():
    from transformers.models.mllama.image_processing_pil_mllama import (
        get_image_size_fit_to_canvas,
        get_optimal_tiled_canvas,
    )

    rng = np.random.default_rng(1)
    sizes = [tuple(int(v) for v in s) for s in rng.integers(1, 3000, (3000, 2))]
    sizes += [(1, 1), (1, 5000), (5000, 1), (1, 100000), (560, 560), (559, 561), (1120, 560), (2240, 560)]
    sizes += [(h, w) for h in (280, 559, 560, 561, 1119, 1120, 1121, 1680, 2240) for w in (280, 560, 561, 1121, 2241)]
    for h, w in sizes:
        ch, cw = (int(v) for v in get_optimal_tiled_canvas(h, w, 4, TILE))
        assert best_fit_canvas(h, w, TILE, ALL_ASPECT_RATIOS_4) == (ch // TILE, cw // TILE), (h, w)
        assert fit_size(h, w, ch, cw, TILE) == tuple(int(v) for v in get_image_size_fit_to_canvas(h, w, ch, cw, TILE))


# ---------------------------------------------------------------------------------------------------------------
# Pixels against HF
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["astronaut", "coffee", "chelsea", "rocket", "camera"])
def test_photos_match_hf(hf, name):
    image = Image.fromarray(_photo(name))  # camera() is 2-D grayscale -> mode L
    _assert_same(preprocess([[image]]), hf([[image]]))


# (height, width) of a random image landing on each supported (tiles_h, tiles_w), in ALL_ASPECT_RATIOS_4 order.
ASPECT_CASES = [
    ((500, 500), (1, 1)),  # upscaled to one tile
    ((300, 1000), (1, 2)),
    ((400, 1600), (1, 3)),
    ((300, 2200), (1, 4)),
    ((1000, 300), (2, 1)),
    ((1000, 1000), (2, 2)),  # downscaled
    ((1600, 400), (3, 1)),
    ((2500, 300), (4, 1)),  # downscaled, thin
]


def test_aspect_cases_cover_every_ratio():
    assert [ratio for _, ratio in ASPECT_CASES] == list(ALL_ASPECT_RATIOS_4)


@pytest.mark.parametrize(("size", "ratio"), ASPECT_CASES)
def test_each_aspect_ratio_matches_hf(hf, size, ratio):
    pixels = _random_rgb(*size, seed=size[0] * 7 + size[1])
    ours = preprocess([[pixels]])
    assert ours.aspect_ratio_ids[0, 0] == ALL_ASPECT_RATIOS_4.index(ratio) + 1
    assert ours.num_tiles == [[ratio[0] * ratio[1]]]
    assert ours.pixel_values.shape == (1, 1, 4, 3, TILE, TILE)
    _assert_same(ours, hf([[Image.fromarray(pixels)]]))
    # tiles beyond the image's own are exact zeros; canvas padding (if any) is -mean/std, not 0
    assert not ours.pixel_values[0, 0, ratio[0] * ratio[1] :].any()


def test_batch_with_padding(hf):
    """Two prompts with 1 and 2 images: the missing image slot is zeros, id 0, mask [1, 0, 0, 0] (as HF)."""
    a = Image.fromarray(_photo("astronaut"))
    b = Image.fromarray(_random_rgb(300, 1000, seed=3))
    c = Image.fromarray(_photo("rocket"))
    ours = preprocess([[a], [b, c]])
    assert ours.pixel_values.shape == (2, 2, 4, 3, TILE, TILE)
    assert not ours.pixel_values[0, 1].any()
    assert ours.aspect_ratio_ids.tolist() == [[1, 0], [2, 2]]
    assert ours.aspect_ratio_mask[0, 1].tolist() == [1, 0, 0, 0]
    assert ours.num_tiles == [[1], [2, 2]]
    _assert_same(ours, hf([[a], [b, c]]))


def test_canvas_padding_value():
    """A 640x480 image keeps its size on a 1x2 canvas; the right padding normalises to -mean/std
    (docs/model-facts.md §6.6)."""
    out = preprocess([[_random_rgb(480, 640)]]).pixel_values[0, 0]
    pad = -np.asarray(CLIP_MEAN, np.float32) / np.asarray(CLIP_STD, np.float32)
    assert np.all(out[:2, :, 480:, :] == pad[None, :, None, None])  # rows below the image, both tiles
    assert np.all(out[1, :, :, 80:] == pad[:, None, None])  # columns right of the image (640 - 560 = 80)


def test_tiny_config():
    """Other tile sizes (TINY_VISION uses 28) work the same way."""
    config = TINY_VISION.vision
    assert config.image_size == 28
    out = preprocess([[_random_rgb(20, 60)]], config)
    assert out.pixel_values.shape == (1, 1, 4, 3, 28, 28)
    assert out.num_tiles == [[3]] and out.aspect_ratio_ids.tolist() == [[3]]


# ---------------------------------------------------------------------------------------------------------------
# Modes and input types
# ---------------------------------------------------------------------------------------------------------------


def _mode_images() -> dict[str, Image.Image]:
    rgb = _random_rgb(300, 420, seed=5)
    rgba = np.concatenate([rgb, np.random.default_rng(6).integers(0, 256, (300, 420, 1), dtype=np.uint8)], axis=2)
    base = Image.fromarray(rgb)
    images = {
        "RGB": base,
        "RGBA": Image.fromarray(rgba, "RGBA"),
        "L": base.convert("L"),
        "LA": Image.fromarray(rgba, "RGBA").convert("LA"),
        "1": base.convert("1"),
        "CMYK": base.convert("CMYK"),
        "P": base.convert("P", palette=Image.Palette.ADAPTIVE, colors=64),
        "PA": Image.fromarray(rgba, "RGBA").convert("PA"),
        "YCbCr": base.convert("YCbCr"),
    }
    p_trans = images["P"].copy()
    p_trans.info["transparency"] = 3  # palette index 3 is transparent
    images["P+transparency"] = p_trans
    l_trans = images["L"].copy()
    l_trans.info["transparency"] = 128
    images["L+transparency"] = l_trans
    rgb_trans = base.copy()
    rgb_trans.info["transparency"] = tuple(int(v) for v in rgb[0, 0])  # a transparent colour (PNG tRNS)
    images["RGB+transparency"] = rgb_trans
    return images


MODE_NAMES = [
    "RGB",
    "RGBA",
    "L",
    "LA",
    "1",
    "CMYK",
    "P",
    "PA",
    "YCbCr",
    "P+transparency",
    "L+transparency",
    "RGB+transparency",
]


@pytest.mark.parametrize("mode", MODE_NAMES)
def test_modes_match_hf(hf, mode):
    image = _mode_images()[mode]
    assert image.mode == mode.split("+")[0]
    assert to_rgb(image).mode == "RGB"
    _assert_same(preprocess([[image]]), hf([[image]]))
    if mode == "RGB+transparency":  # the transparent colour really was composited (to white)
        assert not np.array_equal(np.asarray(to_rgb(image)), np.asarray(image))


def test_transparency_composites_over_white():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200  # red, fully transparent -> white; half transparent -> blend
    rgba[1, :, 3] = 128
    rgba[2, :, 3] = 255
    out = np.asarray(to_rgb(Image.fromarray(rgba, "RGBA")))
    assert out[0].tolist() == [[255, 255, 255]] * 4
    assert out[2].tolist() == [[200, 0, 0]] * 4
    assert out[1, 0].tolist() == [round(200 * 128 / 255 + 127 * 255 / 255), 127, 127]


def test_rgba_array_path_matches_hf_formula():
    """Every (value, alpha) pair: our PIL compositing equals HF's numpy float formula (used for RGBA arrays)."""
    from transformers.image_transforms import convert_to_rgb

    v, a = np.meshgrid(np.arange(256, dtype=np.uint8), np.arange(256, dtype=np.uint8), indexing="ij")
    rgba = np.stack([v, 255 - v, v // 2, a], axis=2)
    ours = np.asarray(load_image(rgba))
    assert np.array_equal(ours, convert_to_rgb(rgba, return_numpy=True))


@pytest.mark.parametrize("shape", [(300, 420), (300, 420, 1), (300, 420, 3), (300, 420, 4)])
def test_numpy_inputs_match_hf(hf, shape):
    array = np.random.default_rng(7).integers(0, 256, shape, dtype=np.uint8)
    ref_input = array if array.ndim == 3 else array[:, :, None]  # HF needs an explicit channel axis
    _assert_same(preprocess([[array]]), hf([[ref_input]]))


def test_numpy_gray_alpha_equals_pil_la():
    la = np.random.default_rng(8).integers(0, 256, (50, 70, 2), dtype=np.uint8)
    assert np.array_equal(np.asarray(load_image(la)), np.asarray(to_rgb(Image.fromarray(la, "LA"))))


@pytest.mark.parametrize("mode", ["I;16", "I"])
def test_sixteen_bit_gray_is_scaled_not_clipped(hf, mode):
    """Our choice: round(v / 257) to 8 bits. HF/PIL clip every value > 255 to 255 (a near-white image)."""
    values = np.random.default_rng(9).integers(0, 65536, (300, 420)).astype(np.uint16)
    image = Image.fromarray(values) if mode == "I;16" else Image.fromarray(values.astype(np.int32))
    assert image.mode == mode
    gray8 = np.rint(values / 257.0).astype(np.uint8)
    assert np.array_equal(np.asarray(to_rgb(image))[..., 0], gray8)
    assert np.array_equal(np.asarray(to_rgb(image)).min(axis=2), np.asarray(to_rgb(image)).max(axis=2))
    # identical to HF on the 8-bit image; HF on the 16-bit image itself clips
    _assert_same(preprocess([[image]]), hf([[Image.fromarray(gray8, "L")]]))
    clipped = np.asarray(image.convert("RGB"))[..., 0]
    assert np.array_equal(clipped, np.minimum(values, 255).astype(np.uint8))


def test_sixteen_bit_png_file(tmp_path):
    values = (np.arange(256 * 40, dtype=np.uint32).reshape(40, 256) * 6).astype(np.uint16)
    path = tmp_path / "gray16.png"
    Image.fromarray(values).save(path)
    rgb = np.asarray(load_image(path))
    assert np.array_equal(rgb[..., 1], np.rint(values / 257.0).astype(np.uint8))


def test_file_paths_match_hf(hf, tmp_path):
    """Paths (str and Path) load like HF's load_image for opaque files, EXIF orientation included."""
    pixels = _random_rgb(300, 1000, seed=10)
    png = tmp_path / "plain.png"
    Image.fromarray(pixels).save(png)
    jpg = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise on display
    Image.fromarray(pixels).save(jpg, exif=exif, quality=95)
    ours = preprocess([[str(png), jpg]])
    _assert_same(ours, hf([[str(png), str(jpg)]]))
    assert ours.aspect_ratio_ids.tolist() == [[2, 5]]  # 300x1000 landscape -> (1, 2); rotated -> (2, 1)


def test_transparent_file_is_composited(hf, tmp_path):
    """Deliberate difference: HF's load_image drops a file's alpha; we composite files like PIL images."""
    rgba = np.random.default_rng(11).integers(0, 256, (200, 300, 4), dtype=np.uint8)
    path = tmp_path / "alpha.png"
    Image.fromarray(rgba, "RGBA").save(path)
    ours = preprocess([[path]])
    _assert_same(ours, hf([[Image.fromarray(rgba, "RGBA")]]))
    assert not np.array_equal(ours.pixel_values, np.asarray(hf([[str(path)]])["pixel_values"]))


# ---------------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------------


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height and which holds no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def _raises(match: str, images, **kwargs) -> InvalidInputError:
    with pytest.raises(InvalidInputError, match=match) as info:
        preprocess(images, **kwargs)
    assert isinstance(info.value, ValueError)
    return info.value


def test_missing_and_unreadable_files(tmp_path):
    ok = _random_rgb(50, 50)
    _raises(r"images\[0\]\[1\]: no such file", [[ok, str(tmp_path / "nope.png")]])
    _raises(r"images\[0\]\[0\].*not a regular file", [[tmp_path]])
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    _raises(r"images\[1\]\[0\].*not an image file", [[ok], [text]])
    truncated = tmp_path / "truncated.png"
    buffer = io.BytesIO()
    Image.fromarray(_random_rgb(200, 200)).save(buffer, format="PNG")
    truncated.write_bytes(buffer.getvalue()[:2000])
    _raises(r"images\[0\]\[0\]: cannot decode", [[truncated]])


def test_zero_size_images():
    _raises(r"images\[0\]\[0\] has zero size \(0x5", [[Image.new("RGB", (0, 5))]])
    _raises(r"images\[0\]\[1\] has zero size", [[_random_rgb(5, 5), np.zeros((0, 4, 3), np.uint8)]])


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (None, "has type NoneType"),
        (3, "has type int"),
        (b"\x89PNG", "has type bytes"),
        ([[1, 2], [3, 4]], "has type list"),
        (np.zeros((4, 4, 3), np.float32), "dtype float32; pass uint8"),
        (np.zeros((4, 4, 5), np.uint8), r"shape \(4, 4, 5\)"),
        (np.zeros((2, 4, 4, 3), np.uint8), r"shape \(2, 4, 4, 3\)"),
        (Image.new("F", (8, 8)), "mode 'F' is not supported"),
    ],
)
def test_bad_image_types(bad, match):
    _raises(r"images\[0\]\[0\].*" + match, [[bad]])


def test_bad_batch_structure():
    image = _random_rgb(10, 10)
    _raises("empty batch", [])
    _raises(r"images must be a list .* got ndarray", image)
    _raises(r"images must be a list .* got Image", Image.fromarray(image))
    _raises(r"images must be a list .* got str", "photo.png")
    _raises(r"images\[0\] must be a list of images .* got ndarray", [image])
    _raises("no prompt in images has an image", [[], []])
    mixed = preprocess([[image], []])  # a batch may mix prompts with and without images
    assert mixed.num_tiles[1] == [] and (mixed.aspect_ratio_ids[1] == 0).all() and not mixed.pixel_values[1].any()
    _raises(r"images\[1\] has 3 images, more than max_images=2", [[image], [image] * 3], max_images=2)
    _raises("max_images must be a positive int", [[image]], max_images=0)
    assert preprocess([[image, image]], max_images=2).num_tiles == [[1, 1]]


def test_bomb_guard_header_only_png(tmp_path):
    """Refused from the header, before any decoding: PIL's own error (far too big) and our limit (just over)."""
    huge = tmp_path / "huge.png"
    huge.write_bytes(_png_header_only(100_000, 100_000))  # 10^10 pixels: PIL's DecompressionBombError
    over = tmp_path / "over.png"
    over.write_bytes(_png_header_only(12_000, 9_000))  # 1.08e8 > 1e8: PIL only warns, our check refuses
    start = time.perf_counter()
    _raises(r"images\[0\]\[0\] .*decompression-bomb", [[huge]])
    error = _raises(r"images\[0\]\[0\] .*12000x9000 = 108000000 pixels, over the limit of 100000000", [[over]])
    assert "PIL also warned" in str(error)
    assert time.perf_counter() - start < 2.0


def test_bomb_guard_configurable():
    image = Image.fromarray(_random_rgb(40, 30))
    _raises(r"images\[0\]\[0\] is 30x40 = 1200 pixels, over the limit of 1000", [[image]], max_pixels=1000)
    _raises(r"images\[0\]\[0\] is 30x40 = 1200 pixels", [[np.asarray(image)]], max_pixels=1000)
    assert preprocess([[image]], max_pixels=1200).num_tiles == [[1]]
    assert preprocess([[image]], max_pixels=None).num_tiles == [[1]]
    _raises("max_pixels must be a positive int", [[image]], max_pixels=-1)
