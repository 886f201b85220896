"""The Llama 3.2 Vision key tables, proved against two references nobody here wrote.

A tiny Mllama is built in Meta's reference (``llama_models.llama3.multimodal.model``) with seeded random weights.
Its state dict goes Meta -> ours -> HF through the tables, is written as an HF checkpoint (hub names) and loaded
by ``transformers.MllamaForConditionalGeneration.from_pretrained``. Both references then run the same pixels,
aspect ratios and prompt (two images, non-(1, 1) aspect ratios, a padding image slot): equal logits prove every
Meta and HF name, shape, transform, the merged HF layer index and the precomputed tile embeddings. The reference
builders (and why Meta's encoder is rebuilt at tiny size) are in tests/refs_vision.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from llama32_jax.checkpoint import keymap_vision as kv
from llama32_jax.checkpoint.convert_vision import vision_params_from_state_dict, vision_state_dict_from_params
from llama32_jax.configs import (
    LLAMA_3_2_11B_VISION,
    LLAMA_3_2_90B_VISION,
    TINY_TEXT,
)
from llama32_jax.errors import CheckpointError
from tests.refs_vision import (
    CFG,
    IMAGES,
    SEQ,
    TOKENS,
    _import_meta_multimodal,
    align_hf_intermediate_layers,
    hf_inputs,
    meta_logits,
)
from tests.vision_fixtures import hf_model, hf_sd, meta_model, meta_sd, params, tiles  # noqa: F401

# Meta's reference gathers with a torch collective that torch marks deprecated; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:.*all_gather_tensor.*:FutureWarning")


# --------------------------------------------------------------------------------------------------------------
# Tests.


def test_meta_reference_keys_are_the_table(meta_sd):
    assert set(meta_sd) == set(kv.expected_source_keys(CFG, "meta"))
    for key, (rule, _) in kv.expected_source_keys(CFG, "meta").items():
        assert meta_sd[key].shape == kv.source_shape(rule, CFG), key


def test_hf_reference_keys_are_the_table(hf_model, hf_sd):
    """Every in-memory tensor of transformers' model is one of our HF keys, loaded with exactly our values."""
    import torch

    memory = hf_model.state_dict()
    assert sorted(map(kv.hf_stored_key, memory)) == sorted(hf_sd) == sorted(kv.expected_source_keys(CFG, "hf"))
    for key, value in memory.items():
        assert value.dtype == torch.float32
        np.testing.assert_array_equal(value.numpy(), hf_sd[kv.hf_stored_key(key)], err_msg=key)


def test_meta_and_hf_logits_agree(meta_model, hf_model, tiles):
    """The decisive check: the same inputs through Meta's model and through transformers' loaded conversion."""
    import torch

    mm = _import_meta_multimodal()
    v = CFG.vision
    pixels, _ = mm._stack_images(tiles, v.max_num_tiles, v.image_size, max(len(r) for r in IMAGES))
    meta = meta_logits(meta_model, tiles)
    shifted = align_hf_intermediate_layers(hf_model)
    with torch.no_grad():
        hf = hf_model(**hf_inputs(CFG, pixels)).logits.numpy()
    assert meta.shape == hf.shape == (len(TOKENS), SEQ, CFG.text.vocab_size)
    assert np.std(meta) > 0.3  # the random model is far from trivial
    delta = np.abs(meta - hf).max()
    print(f"max |meta - hf| logit = {delta:.3g} (transformers intermediate-layer indices shifted: {shifted})")
    assert delta < 1e-4


def test_gated_and_tile_paths_matter(meta_model, tiles):
    """Guard against a parity that holds only because a path is inert: each perturbed tensor moves Meta's logits."""
    import torch

    base = meta_logits(meta_model, tiles)
    sd = meta_model.state_dict()
    for key in (
        "vision_model.vision_encoder.gated_positional_embedding",
        "vision_model.vision_encoder.pre_tile_pos_embed.embedding",
        "vision_model.vision_encoder.post_tile_pos_embed.embedding",
        "vision_model.vision_encoder.global_transformer.resblocks.1.gate_ffn",
        "text_model.cross_attention_layers.1.gate_attn",
        "text_model.learnable_embedding.weight",
    ):
        with torch.no_grad():
            saved = sd[key].clone()
            if key.endswith("embedding") and "learnable" not in key:
                # grid cell (1, 0): read by the (2, 1) and (2, 2) images only. Random, not constant: LayerNorm
                # would cancel a shift that is the same in every channel.
                sd[key][1, 0] += torch.randn(sd[key][1, 0].shape, generator=torch.Generator().manual_seed(2))
            else:
                sd[key].add_(0.5)
            moved = np.abs(meta_logits(meta_model, tiles) - base).max()
            sd[key].copy_(saved)
        assert moved > 1e-3, key
    np.testing.assert_array_equal(meta_logits(meta_model, tiles), base)


def test_learnable_embedding_rows_join_hf_embed_tokens(meta_sd, params, hf_sd):
    v, e = CFG.text.vocab_size, CFG.text.n_image_embeddings
    np.testing.assert_array_equal(params["embed"]["embedding"], meta_sd["text_model.tok_embeddings.weight"])
    np.testing.assert_array_equal(params["learnable_embedding"], meta_sd["text_model.learnable_embedding.weight"])
    joined = hf_sd["language_model.model.embed_tokens.weight"]
    assert joined.shape == (v + e, CFG.text.dim)
    np.testing.assert_array_equal(joined[:v], meta_sd["text_model.tok_embeddings.weight"])
    np.testing.assert_array_equal(joined[v:], meta_sd["text_model.learnable_embedding.weight"])
    assert hf_sd["language_model.lm_head.weight"].shape == (v, CFG.text.dim)


def test_full_size_embedding_and_vision_shapes():
    """At full size: 128256 + 8 = 128264 HF embedding rows, and the docs/model-facts.md §8.3 / §8.5 shapes of the 11B /
    90B."""
    hf = kv.expected_source_keys(LLAMA_3_2_11B_VISION, "hf")
    meta = kv.expected_source_keys(LLAMA_3_2_11B_VISION, "meta")

    def shape(table, key, cfg=LLAMA_3_2_11B_VISION):
        return kv.source_shape(table[key][0], cfg)

    assert shape(hf, "language_model.model.embed_tokens.weight") == (128264, 4096)
    assert shape(meta, "text_model.tok_embeddings.weight") == (128256, 4096)
    assert shape(meta, "text_model.learnable_embedding.weight") == (8, 4096)
    assert shape(hf, "language_model.lm_head.weight") == (128256, 4096)
    assert shape(meta, "vision_model.vision_encoder.conv1._linear.weight") == (1280, 588)
    assert shape(hf, "vision_model.patch_embedding.weight") == (1280, 3, 14, 14)
    assert shape(meta, "vision_model.vision_encoder.gated_positional_embedding") == (4, 4, 1601, 1280)
    assert shape(hf, "vision_model.gated_positional_embedding.tile_embedding.weight") == (9, 4 * 1601 * 1280)
    assert shape(hf, "vision_model.pre_tile_positional_embedding.embedding.weight") == (9, 4 * 1280)
    assert shape(meta, "vision_model.vision_encoder.pre_tile_pos_embed.embedding") == (4, 4, 1, 1280)
    assert shape(meta, "vision_model.vision_projection.weight") == (4096, 7680)
    assert shape(hf, "language_model.model.layers.3.cross_attn.q_norm.weight") == (128,)
    assert shape(hf, "language_model.model.layers.38.cross_attn_mlp_gate") == (1,)
    assert shape(hf, "language_model.model.layers.39.self_attn.k_proj.weight") == (1024, 4096)
    assert "language_model.model.layers.3.self_attn.q_proj.weight" not in hf
    assert "vision_model.global_transformer.layers.7.gate_ffn" in hf
    assert "vision_model.transformer.layers.31.mlp.fc2.bias" in hf
    # 11B HF: 32 x 9 self + 8 x 13 cross + 3 text; 13 + 32 x 12 + 8 x 14 vision; 2 projector. Meta: + learnable.
    assert len(hf) == 32 * 9 + 8 * 13 + 3 + 13 + 32 * 12 + 8 * 14 + 2 == 906
    assert len(meta) == len(hf) + 1
    # the split itself, at full size: rows 128256..128263 of embed_tokens are Meta's learnable_embedding
    rows = np.arange(128264)[:, None]
    text_rows, image_rows = kv.TRANSFORMS["hf_embed"](rows, LLAMA_3_2_11B_VISION)
    np.testing.assert_array_equal(text_rows[:, 0], np.arange(128256))
    np.testing.assert_array_equal(image_rows[:, 0], np.arange(128256, 128264))
    np.testing.assert_array_equal(kv.INVERSE_TRANSFORMS["hf_embed"]((text_rows, image_rows), None), rows)
    hf90 = kv.expected_source_keys(LLAMA_3_2_90B_VISION, "hf")
    cross90 = {int(k.split(".")[3]) for k in hf90 if ".cross_attn." in k}
    assert sorted(cross90) == list(range(3, 100, 5))
    assert shape(hf90, "language_model.model.embed_tokens.weight", LLAMA_3_2_90B_VISION) == (128264, 8192)


def test_hf_round_trip_is_exact(hf_model, hf_sd):
    """HF -> ours -> HF, from the hub names and from transformers-5's in-memory names, reproduces every tensor."""
    memory = {k: v.numpy() for k, v in hf_model.state_dict().items()}
    for source in (hf_sd, memory):
        back = vision_state_dict_from_params(CFG, vision_params_from_state_dict(CFG, source, "hf"), "hf")
        assert list(back) == list(hf_sd)
        for key, value in back.items():
            assert value.dtype == hf_sd[key].dtype
            np.testing.assert_array_equal(value, hf_sd[key], err_msg=key)


def test_our_layout(params):
    t, v = CFG.text, CFG.vision
    r1 = len(v.supported_aspect_ratios) + 1
    assert sorted(params) == [
        "cross_layers",
        "embed",
        "layers",
        "learnable_embedding",
        "lm_head",
        "norm",
        "projector",
        "vision",
    ]
    assert sorted(params["layers"]) == list(range(t.n_layers))
    assert sorted(params["cross_layers"]) == list(range(t.n_cross_attention_layers))
    cross = params["cross_layers"][1]
    assert cross["attention"]["wq"]["kernel"].shape == (t.n_heads, t.head_dim, t.dim)
    assert cross["attention"]["wo"]["kernel"].shape == (t.dim, t.n_heads, t.head_dim)
    assert cross["attention"]["k_norm"]["weight"].shape == (t.head_dim,)
    assert cross["gate_attn"].shape == cross["gate_ffwd"].shape == (1,)
    vis = params["vision"]
    assert vis["patch_embed"]["kernel"].shape == (v.width, v.num_channels * v.patch_size**2)
    assert vis["gated_positional_embedding"]["tile_embedding"].shape == (r1, 4, v.tokens_per_tile, v.width)
    assert vis["pre_tile_pos_embed"]["embedding"].shape == (r1, 4, v.width)
    layer = vis["global_transformer"]["layers"][1]
    assert layer["attention"]["wq"]["kernel"].shape == (v.n_heads, v.width // v.n_heads, v.width)
    assert layer["attention"]["wo"]["kernel"].shape == (v.width, v.n_heads, v.width // v.n_heads)
    assert layer["mlp"]["fc1"]["kernel"].shape == (v.mlp_dim, v.width)
    assert sorted(layer) == ["attention", "gate_attn", "gate_ffn", "ln_1", "ln_2", "mlp"]
    assert params["projector"]["kernel"].shape == (t.dim, v.output_dim)
    # every rule's transform makes the shapes the export checks
    for rule, _ in kv.expected_source_keys(CFG, "meta").values():
        src = np.zeros(kv.source_shape(rule, CFG), np.float32)
        out = kv.TRANSFORMS[rule.transform](src, CFG)
        outs = out if len(rule.targets) > 1 else (out,)
        assert tuple(o.shape for o in outs) == kv.target_shapes(rule.transform, CFG, src.shape)


def test_tile_tables_are_precomputed_from_meta_grids(meta_sd, params):
    v = CFG.vision
    grid = meta_sd["vision_model.vision_encoder.gated_positional_embedding"]
    table = params["vision"]["gated_positional_embedding"]["tile_embedding"]
    np.testing.assert_array_equal(table[0], 0)
    r = v.supported_aspect_ratios.index((2, 1)) + 1
    np.testing.assert_array_equal(table[r, 0], grid[0, 0])
    np.testing.assert_array_equal(table[r, 1], grid[1, 0])
    np.testing.assert_array_equal(table[r, 2:], 0)
    pre = meta_sd["vision_model.vision_encoder.pre_tile_pos_embed.embedding"]
    r = v.supported_aspect_ratios.index((2, 2)) + 1
    np.testing.assert_array_equal(params["vision"]["pre_tile_pos_embed"]["embedding"][r], pre[:2, :2, 0].reshape(4, -1))


def test_meta_export_round_trip_and_reload(meta_model, meta_sd, params, tiles):
    """ours -> Meta -> ours is exact; the exported Meta dict (unused grid cells zero) loads strictly into Meta's
    model and gives the same logits."""
    import torch

    exported = vision_state_dict_from_params(CFG, params, "meta")
    assert set(exported) == set(meta_sd)
    again = vision_params_from_state_dict(CFG, exported, "meta")
    back = vision_state_dict_from_params(CFG, again, "hf")
    for key, value in vision_state_dict_from_params(CFG, params, "hf").items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)
    base = meta_logits(meta_model, tiles)
    original = {k: t.clone() for k, t in meta_model.state_dict().items()}
    try:
        meta_model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(a)) for k, a in exported.items()})
        delta = np.abs(meta_logits(meta_model, tiles) - base).max()
    finally:
        meta_model.load_state_dict(original)
    assert delta < 1e-5


# --------------------------------------------------------------------------------------------------------------
# Strictness.


def test_rope_freqs_ignored_and_torch_values_accepted(meta_model, params):
    import torch

    sd = dict(meta_model.state_dict())
    sd["text_model.rope.freqs"] = torch.zeros(8)
    sd["rope.freqs"] = torch.zeros(8)
    out = vision_params_from_state_dict(CFG, sd, "meta")
    np.testing.assert_array_equal(out["cross_layers"][0]["gate_ffwd"], params["cross_layers"][0]["gate_ffwd"])


@pytest.mark.parametrize("fmt", ["meta", "hf"])
def test_unknown_missing_and_wrong_shape_keys(fmt, meta_sd, hf_sd):
    sd = meta_sd if fmt == "meta" else hf_sd
    unknown = "vision_model.vision_encoder.ln_pre.scale" if fmt == "meta" else "vision_model.layernorm_pre.scale"
    with pytest.raises(CheckpointError, match=f"unexpected key '{unknown}'"):
        vision_params_from_state_dict(CFG, {**sd, unknown: np.zeros(32)}, fmt)
    gone = (
        "text_model.cross_attention_layers.1.attention.k_norm.weight"
        if fmt == "meta"
        else "language_model.model.layers.4.cross_attn.k_norm.weight"
    )
    with pytest.raises(CheckpointError, match=f"has no '{gone}'"):
        vision_params_from_state_dict(CFG, {k: v for k, v in sd.items() if k != gone}, fmt)
    wrong = (
        "vision_model.vision_encoder.gated_positional_embedding"
        if fmt == "meta"
        else "vision_model.gated_positional_embedding.tile_embedding.weight"
    )
    bad = {**sd, wrong: sd[wrong][..., :-1]}
    with pytest.raises(CheckpointError, match=f"key '{wrong}': shape"):
        vision_params_from_state_dict(CFG, bad, fmt)
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        vision_params_from_state_dict(CFG, sd, "gguf")


def test_layer_indices_out_of_range_or_of_the_wrong_kind(meta_sd, hf_sd):
    extra = {**meta_sd, "text_model.cross_attention_layers.2.gate_attn": np.zeros(1)}
    with pytest.raises(CheckpointError, match="layer 2 is out of range for 2 cross-attention layers"):
        vision_params_from_state_dict(CFG, extra, "meta")
    extra = {**meta_sd, "vision_model.vision_encoder.global_transformer.resblocks.2.gate_ffn": np.zeros(1)}
    with pytest.raises(CheckpointError, match="layer 2 is out of range for 2 global vision layers"):
        vision_params_from_state_dict(CFG, extra, "meta")
    extra = {**hf_sd, "language_model.model.layers.6.input_layernorm.weight": np.ones(64)}
    with pytest.raises(CheckpointError, match="layer 6 is out of range for 6 HF decoder layers"):
        vision_params_from_state_dict(CFG, extra, "hf")
    extra = {**hf_sd, "language_model.model.layers.1.self_attn.q_proj.weight": np.zeros((64, 64))}
    with pytest.raises(CheckpointError, match="HF layer 1 is a cross-attention layer"):
        vision_params_from_state_dict(CFG, extra, "hf")
    extra = {**hf_sd, "language_model.model.layers.2.cross_attn_attn_gate": np.zeros(1)}
    with pytest.raises(CheckpointError, match="HF layer 2 is a self-attention layer"):
        vision_params_from_state_dict(CFG, extra, "hf")


def test_in_memory_and_stored_name_of_one_tensor_clash(hf_sd):
    sd = {**hf_sd, "lm_head.weight": hf_sd["language_model.lm_head.weight"]}
    with pytest.raises(CheckpointError, match="same HF tensor 'language_model.lm_head.weight'"):
        vision_params_from_state_dict(CFG, sd, "hf")


def test_export_is_strict(params):
    def without(tree, path):
        out = {k: (without(v, path[1:]) if k == path[0] and len(path) > 1 else v) for k, v in tree.items()}
        if len(path) == 1:
            del out[path[0]]
        return out

    with pytest.raises(CheckpointError, match="have no 'cross_layers.1.attention.q_norm.weight'"):
        vision_state_dict_from_params(CFG, without(params, ("cross_layers", 1, "attention", "q_norm")), "hf")
    with pytest.raises(CheckpointError, match="'vision.transformer.layers.0.attention.wq.kernel': shape"):
        bad = without(params, ("vision", "transformer", "layers", 0, "attention", "wq", "kernel"))
        bad["vision"]["transformer"]["layers"][0]["attention"]["wq"]["kernel"] = np.zeros((32, 32))
        vision_state_dict_from_params(CFG, bad, "hf")
    with pytest.raises(CheckpointError, match="'vision.extra' has no key"):
        vision_state_dict_from_params(CFG, {**params, "vision": {**params["vision"], "extra": np.zeros(1)}}, "hf")
    # a tile table no Meta grid produces (row (1, 1) disagrees with row (1, 2) on cell (0, 0)) has no Meta form
    table = params["vision"]["pre_tile_pos_embed"]["embedding"].copy()
    table[1, 0] += 1.0
    vision = {**params["vision"], "pre_tile_pos_embed": {**params["vision"]["pre_tile_pos_embed"], "embedding": table}}
    with pytest.raises(CheckpointError, match="no Meta form"):
        vision_state_dict_from_params(CFG, {**params, "vision": vision}, "meta")
    vision_state_dict_from_params(CFG, {**params, "vision": vision}, "hf")  # HF keeps any table


def test_text_configs_are_refused(meta_sd):
    with pytest.raises(CheckpointError, match="text model"):
        vision_params_from_state_dict(TINY_TEXT, meta_sd, "meta")
