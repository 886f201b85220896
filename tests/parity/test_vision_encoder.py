"""The vision encoder + projector (``llama32_jax.models.vision``) against Meta's and transformers' references.

A tiny Mllama is built in Meta's reference with seeded random weights (tests/refs_vision.py; gates well away from
0, so every gated path matters). Its state dict goes through our converter into our tree, and from there into an
HF checkpoint that ``MllamaForConditionalGeneration.from_pretrained`` loads. All three run the same pixels: one
image of every supported aspect ratio, with the missing tiles zero, plus a padding image slot.

What a padding image slot holds differs by design: Meta runs it as a (1, 1) image (``aspect_ratios`` padded with
(1, 1)); HF gives it ``aspect_ratio_id`` 0 (zero tile embeddings) and keeps its tile 0 unmasked; we take HF's ids,
so our padding slot equals HF's, and equals Meta's when we are given id 1 for it instead. The text model masks
these tokens out of cross-attention either way. The missing tiles of real images are computed identically by all
three (same embeddings, same mask), so they are compared too.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llama32_jax.checkpoint import keymap_vision as kv
from llama32_jax.configs import LLAMA_3_2_11B_VISION
from llama32_jax.errors import CheckpointError, InvalidInputError
from llama32_jax.models.vision import (
    VisionTower,
    abstract_vision_tower,
    aspect_ratio_ids,
    load_vision_params,
    num_pad_tokens,
    vision_tokens,
)
from tests.refs_vision import CFG, align_hf_intermediate_layers
from tests.vision_fixtures import hf_model, hf_sd, meta_model, meta_sd, params  # noqa: F401

pytestmark = pytest.mark.filterwarnings("ignore:.*all_gather_tensor.*:FutureWarning")

TOL = 1e-4
V = CFG.vision
# Three samples of three image slots: all 8 supported aspect ratios, then a padding slot (None).
RATIOS = [[(2, 1), (1, 3), (2, 2)], [(1, 1), (1, 2), (1, 4)], [(3, 1), (4, 1), None]]


def _subtree(params: dict) -> dict:
    return {"vision": params["vision"], "projector": params["projector"]}


@pytest.fixture(scope="module")
def tower(params):
    return load_vision_params(CFG, _subtree(params), param_dtype=jnp.float32)


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    """``[B, I, R, C, H, W]``: random real tiles, exact zeros for missing tiles and the padding image."""
    rng = np.random.default_rng(1)
    out = np.zeros((len(RATIOS), len(RATIOS[0]), V.max_num_tiles, V.num_channels, V.image_size, V.image_size))
    for b, row in enumerate(RATIOS):
        for i, r in enumerate(row):
            if r is not None:
                out[b, i, : r[0] * r[1]] = rng.standard_normal(out.shape[3:])
    return out.astype(np.float32)


def _ids(padding_as) -> np.ndarray:
    return aspect_ratio_ids(V, [[padding_as if r is None else r for r in row] for row in RATIOS])


def _real_slots():
    return [(b, i) for b, row in enumerate(RATIOS) for i, r in enumerate(row) if r is not None]


@pytest.fixture(scope="module")
def ours(tower, pixels) -> np.ndarray:
    return np.asarray(vision_tokens(tower, pixels, _ids((0, 0))))


# --------------------------------------------------------------------------------------------------------------
# Parity.


def test_meta_parity(meta_model, tower, pixels, ours):
    import torch

    assert ours.shape == (len(RATIOS), len(RATIOS[0]), V.max_num_tiles, V.tokens_per_tile, CFG.text.dim)
    # Meta's own call: CrossAttentionTransformer.compute_vision_tokens_masks -> vision_model(images, aspect_ratios)
    # with (h, w) pairs, padding slots as (1, 1).
    ar = torch.tensor([[r or (1, 1) for r in row] for row in RATIOS])
    with torch.no_grad():
        ref = meta_model.vision_model(torch.from_numpy(pixels), ar).numpy()
    assert ref.shape == ours.shape and np.std(ref) > 0.3
    deltas = {}
    for b, i in _real_slots():
        h, w = RATIOS[b][i]
        deltas[(h, w)] = float(np.abs(ref[b, i, : h * w] - ours[b, i, : h * w]).max())
        # the missing tiles of a real image: same computation in both
        np.testing.assert_allclose(ours[b, i, h * w :], ref[b, i, h * w :], atol=TOL, rtol=0)
    print(f"max |meta - ours| per aspect ratio (real tiles): {deltas}")
    assert max(deltas.values()) <= TOL
    # The padding slot: ours (id 0, HF semantics) differs from Meta's (1, 1) run; with id 1 it is Meta's.
    assert np.abs(ref[2, 2] - ours[2, 2]).max() > 1e-2
    as_meta = np.asarray(vision_tokens(tower, pixels, _ids((1, 1))))
    np.testing.assert_allclose(as_meta, ref, atol=TOL, rtol=0)


def test_hf_parity(hf_model, pixels, ours):
    import torch

    shifted = align_hf_intermediate_layers(hf_model)
    ids = torch.from_numpy(_ids((0, 0))).long()
    tile_mask = torch.zeros(*ids.shape, V.max_num_tiles, dtype=torch.long)
    tile_mask[:, :, 0] = 1  # HF's processor always keeps tile 0, padding images included
    for b, i in _real_slots():
        tile_mask[b, i, : RATIOS[b][i][0] * RATIOS[b][i][1]] = 1
    inner = hf_model.model
    with torch.no_grad():
        feats = inner.vision_model(
            pixel_values=torch.from_numpy(pixels), aspect_ratio_ids=ids, aspect_ratio_mask=tile_mask
        ).last_hidden_state
        ref = inner.multi_modal_projector(feats).numpy()
    assert ref.shape == ours.shape
    delta = float(np.abs(ref - ours).max())
    print(f"max |hf - ours| = {delta:.3g}, padding slot included (intermediate indices shifted: {shifted})")
    assert delta <= TOL


def test_encoder_features_match_meta_before_the_projector(meta_model, tower, pixels):
    """The encoder's own output, ``[B, I, R, P, W * (K + 1)]``: final features first, then the intermediates
    interleaved per channel (docs/model-facts.md §5 step 11), compared channel by channel with Meta's
    ``VisionEncoder``."""
    import torch

    ar = torch.tensor([[r or (1, 1) for r in row] for row in RATIOS])
    with torch.no_grad():
        ref = meta_model.vision_model.vision_encoder(torch.from_numpy(pixels), ar).numpy()
    feats = np.asarray(jax.jit(tower.vision)(jnp.asarray(pixels), jnp.asarray(_ids((1, 1)))))
    k = len(V.intermediate_layers)
    assert feats.shape == ref.shape == (*pixels.shape[:3], V.tokens_per_tile, V.width * (k + 1))
    np.testing.assert_allclose(feats, ref, atol=TOL, rtol=0)
    inter = feats[..., V.width :].reshape(*feats.shape[:-1], V.width, k)  # [..., c, k]
    assert np.abs(inter[..., 0] - inter[..., 1]).max() > 1e-2  # distinct layers: a (k, c) layout would not match


def test_jit_matches_eager_and_bf16_runs(tower, pixels, ours, params):
    eager = np.asarray(tower(jnp.asarray(pixels), jnp.asarray(_ids((0, 0)))))
    np.testing.assert_allclose(eager, ours, atol=1e-5, rtol=0)
    bf16 = load_vision_params(CFG, _subtree(params), param_dtype=jnp.bfloat16)
    out = vision_tokens(bf16, pixels, _ids((0, 0)))
    assert out.dtype == jnp.bfloat16
    assert np.abs(np.asarray(out, np.float32) - ours).max() < 0.25 * np.abs(ours).max()


# --------------------------------------------------------------------------------------------------------------
# Parameters and loading.


def _leaves(tree, prefix=()):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves(value, (*prefix, key))
        else:
            yield (*prefix, key), tuple(np.shape(value))


def test_state_paths_are_the_converter_tree(params):
    module = VisionTower(CFG, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    state = nnx.to_pure_dict(nnx.state(module, nnx.Param))
    assert dict(_leaves(state)) == dict(_leaves(_subtree(params)))
    # every parameter carries one logical axis name per dimension
    for path, leaf in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        assert len(leaf.get_metadata()["axes"]) == leaf[...].ndim, path


def test_strict_loading_names_the_path(params):
    good = _subtree(params)

    def copy(tree):
        return {k: copy(v) if isinstance(v, dict) else v for k, v in tree.items()}

    missing = copy(good)
    del missing["vision"]["global_transformer"]["layers"][1]["gate_ffn"]
    with pytest.raises(CheckpointError, match=r"missing.*vision\.global_transformer\.layers\.1\.gate_ffn"):
        load_vision_params(CFG, missing)
    extra = copy(good)
    extra["vision"]["transformer"]["layers"][V.n_layers] = extra["vision"]["transformer"]["layers"][0]
    with pytest.raises(CheckpointError, match=rf"unexpected.*vision\.transformer\.layers\.{V.n_layers}\.ln_1"):
        load_vision_params(CFG, extra)
    with pytest.raises(CheckpointError, match=r"unexpected.*\['cross_layers', 'embed', "):
        load_vision_params(CFG, params)  # a whole-model tree: pass only the vision and projector subtrees
    bad = copy(good)
    bad["projector"]["kernel"] = np.zeros((CFG.text.dim, V.width), np.float32)
    with pytest.raises(CheckpointError, match=r"projector\.kernel: shape \(64, 32\) does not match.*\(64, 96\)"):
        load_vision_params(CFG, bad)


def test_full_size_param_count_and_shapes():
    """11B: our count equals HF's module (precomputed tile tables); minus the extra table cells it is Meta's,
    which is docs/model-facts.md §1.4's vision 0.823 B + projector 0.031 B."""
    v = LLAMA_3_2_11B_VISION.vision
    before = len(jax.live_arrays())
    tower = abstract_vision_tower(LLAMA_3_2_11B_VISION)
    assert len(jax.live_arrays()) == before
    state = nnx.to_pure_dict(nnx.state(tower, nnx.Param))
    count = {k: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state[k])) for k in state}

    def source_count(fmt, prefixes):
        keys = kv.expected_source_keys(LLAMA_3_2_11B_VISION, fmt).items()
        return sum(
            int(np.prod(kv.source_shape(r, LLAMA_3_2_11B_VISION))) for k, (r, _) in keys if k.startswith(prefixes)
        )

    assert count["vision"] + count["projector"] == source_count("hf", ("vision_model.", "multi_modal_projector."))
    # HF/our tables hold (R+1) x T tile cells where Meta's grids hold T x T; each cell: P + 2 (pre, post) vectors.
    extra = ((len(v.supported_aspect_ratios) + 1) * v.max_num_tiles - v.max_num_tiles**2) * (v.tokens_per_tile + 2)
    meta_vision = count["vision"] - extra * v.width
    assert meta_vision == source_count("meta", ("vision_model.vision_encoder.",)) == 822_530_579
    assert round(meta_vision / 1e9, 3) == 0.823 and round(count["projector"] / 1e9, 3) == 0.031
    assert count["projector"] == 4096 * 7680 + 4096
    # and the forward pass traces at full size: [B, I, 4, 1601, 4096] vision tokens in the parameter dtype
    graphdef, abstract = nnx.split(tower)
    out = jax.eval_shape(
        lambda st, px, ids: nnx.merge(graphdef, st)(px, ids),
        abstract,
        jax.ShapeDtypeStruct((2, 1, 4, 3, 560, 560), jnp.float32),
        jax.ShapeDtypeStruct((2, 1), jnp.int32),
    )
    assert (out.shape, out.dtype) == ((2, 1, 4, 1601, 4096), jnp.bfloat16)


# --------------------------------------------------------------------------------------------------------------
# Inputs.


def test_inputs_are_validated(tower, pixels):
    with pytest.raises(InvalidInputError, match="pixel_values"):
        vision_tokens(tower, pixels[:, :, :2], _ids((0, 0)))
    with pytest.raises(InvalidInputError, match="aspect_ratio_ids must be"):
        vision_tokens(tower, pixels, _ids((0, 0))[:, :2])
    with pytest.raises(InvalidInputError, match=r"in \[0, 8\]"):
        vision_tokens(tower, pixels, np.full((3, 3), 9))
    with pytest.raises(InvalidInputError, match=r"\(2, 3\)"):
        aspect_ratio_ids(V, [(2, 3)])
    assert aspect_ratio_ids(V, [(1, 1), (2, 2), (4, 1), (0, 0)]).tolist() == [1, 6, 8, 0]


def test_pad_tokens_follow_meta():
    assert num_pad_tokens(1601) == 7 and num_pad_tokens(V.tokens_per_tile) == 3
    assert num_pad_tokens(1024) == 8  # Meta pads a full 8 where HF pads 0
