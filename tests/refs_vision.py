"""Reference builders for the Llama 3.2 Vision tests: a tiny Mllama in Meta's ``llama_models`` reference and in HF
transformers, their inputs, and the tiny config both share (see tests/checkpoint/test_vision_keymap.py).

Meta's ``CrossAttentionTransformerVision`` hard-codes the encoder size (width 1280, 32 + 8 layers, 16 heads,
intermediate layers 3,7,15,23,30), far too big for a fast CPU test. Its ``VisionEncoder`` takes all of those as
constructor arguments, so the tiny model swaps in a ``CrossAttentionTransformerVision`` whose ``__init__`` builds the
same two modules (encoder + projection) at our tiny size; every forward computation is Meta's, unchanged.
"""

from __future__ import annotations

import dataclasses
import sys
import types

import numpy as np

from llama32_jax.configs import TINY_VISION, ModelConfig, llama3_ffn_dim
from tests.refs import hf_rope_parameters, init_meta_model_parallel, meta_params_json

# TINY_VISION with two cross-attention layers (Meta schedule [1, 3], HF merged positions [1, 4]) so the merged
# index is exercised beyond its first entry; <|image|> is the first learnable-embedding row (vocab_size, the
# analogue of 128256) as in the published models.
CFG: ModelConfig = TINY_VISION.replace(
    name="tiny-vision-2x", text=dataclasses.replace(TINY_VISION.text, n_cross_attention_layers=2)
)
assert CFG.image_token_id == CFG.text.vocab_size
IMG = CFG.image_token_id
SEQ = 12
# Two samples: sample 0 has two images, (2, 1) and (1, 3) tiles; sample 1 one (2, 2) image and a padding slot.
IMAGES = [[(2, 1), (1, 3)], [(2, 2)]]
# Each sample starts with <|image|>, so no text row is fully masked from the images (docs/model-facts.md §4.3: there HF
# and Meta differ on purpose). 513 and 519 are learnable-embedding rows 1 and 7, so all of them reach the logits.
TOKENS = [
    [IMG, 5, 17, 513, IMG, 100, 7, 519, 3, 44, 255, 9],
    [IMG, 511, 2, 13, 99, 513, 7, 8, 519, 1, 0, 300],
]
# The same images placed after some text: rows 0-2 (sample 0) and 0-3 (sample 1) see no image. Meta zeroes the
# cross-attention blocks' output there (both branches); HF zeroes only the FFN branch, so only Meta is compared.
TOKENS_TEXT_FIRST = [
    [5, 17, 9, IMG, 100, 7, 519, 3, IMG, 44, 255, 9],
    [511, 2, 13, 99, IMG, 513, 7, 8, 519, 1, 0, 300],
]


# --------------------------------------------------------------------------------------------------------------
# Meta's reference.


def _import_meta_multimodal():
    """``llama_models.llama3.multimodal.model``; torchvision is only needed by Meta's image preprocessing.

    ``multimodal/image_transform.py`` imports torchvision at module level, and the test environment does not have
    it. This test feeds pixel tensors directly (no preprocessing), so when torchvision is absent the import sees
    placeholder modules that raise if preprocessing is ever called; they are removed from ``sys.modules`` after.
    """
    try:
        import torchvision  # noqa: F401
    except ImportError:

        class _Unavailable:
            def __init__(self, *args, **kwargs):
                pass

            def __call__(self, *args, **kwargs):
                raise RuntimeError("torchvision is not installed: Meta's image preprocessing is unavailable here")

        tv = types.ModuleType("torchvision.transforms")
        tv.ToTensor = tv.Normalize = _Unavailable
        tv.InterpolationMode = types.SimpleNamespace(BILINEAR="bilinear")
        fn = types.ModuleType("torchvision.transforms.functional")
        fn.resize = _Unavailable()
        tv.functional = fn
        root = types.ModuleType("torchvision")
        root.transforms = tv
        stubs = {"torchvision": root, "torchvision.transforms": tv, "torchvision.transforms.functional": fn}
        sys.modules.update(stubs)
        try:
            import llama_models.llama3.multimodal.model as mm
        finally:
            for name in stubs:
                sys.modules.pop(name, None)
        return mm
    import llama_models.llama3.multimodal.model as mm

    return mm


def randomize_mllama_(module, seed: int) -> None:
    """Seeded noise for every parameter: norm scales near 1, gates well away from 0, embeddings larger."""
    import torch

    gates = {"gate", "gate_attn", "gate_ffn", "gate_ffwd", "gated_positional_embedding_gate"}
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if leaf in gates:  # tanh(gate) in +-[0.38, 0.76]: every gated path matters
                p.copy_(torch.sign(noise) * (0.4 + 0.6 * torch.rand(p.shape, generator=gen)))
            elif leaf == "weight" and ("norm" in name or ".ln_" in name):
                p.copy_(1.0 + 0.2 * noise)
            elif leaf == "bias":
                p.copy_(0.1 * noise)
            elif "embed" in name:
                p.copy_(0.5 * noise)
            else:
                p.copy_(0.1 * noise)


def meta_mllama(config: ModelConfig, seed: int = 0, max_seq_len: int = SEQ):
    """Meta's ``CrossAttentionTransformer`` for ``config`` (fp32, seeded random weights)."""
    import torch
    from fairscale.nn.model_parallel.layers import ColumnParallelLinear
    from llama_models.llama3.args import ModelArgs

    mm = _import_meta_multimodal()
    init_meta_model_parallel()
    t, v = config.text, config.vision
    assert v.patch_size == 14 and v.max_num_tiles == 4, "Meta hard-codes patch 14 and 4 tiles"
    assert t.head_dim * t.n_heads == t.dim, "Meta derives head_dim = dim / n_heads"

    class TinyVision(mm.CrossAttentionTransformerVision):
        """Meta's __init__ with the encoder sizes of ``config`` instead of its constants; forward is Meta's."""

        def __init__(self, args):
            torch.nn.Module.__init__(self)
            self.vision_input_dim = v.output_dim
            self.image_res = args.vision_chunk_size
            self.max_num_chunks = args.vision_max_num_chunks
            self.patch_size = v.patch_size
            self.vision_encoder = mm.VisionEncoder(
                max_num_tiles=v.max_num_tiles,
                image_size=args.vision_chunk_size,
                patch_size=v.patch_size,
                width=v.width,
                layers=v.n_layers,
                heads=v.n_heads,
                mlp_ratio=v.mlp_dim / v.width,
                n_global_layers=v.n_global_layers,
                global_model=True,
                return_intermediate=list(v.intermediate_layers),
            )
            self.vision_projection = ColumnParallelLinear(
                self.vision_input_dim, args.dim, bias=True, init_method=lambda x: x
            )

    multiple_of = 32
    assert llama3_ffn_dim(t.dim, multiple_of, None) == t.ffn_dim
    assert t.rope_scaling is not None  # Meta hard-codes factor 8, low 1, high 4, 8192: the vision models' values
    args = ModelArgs(
        **meta_params_json(t, multiple_of, None),
        max_seq_len=max_seq_len,
        max_batch_size=len(TOKENS),
        vision_chunk_size=v.image_size,
        vision_max_num_chunks=v.max_num_tiles,
        vision_num_cross_attention_layers=t.n_cross_attention_layers,
    )
    original = mm.CrossAttentionTransformerVision
    mm.CrossAttentionTransformerVision = TinyVision
    try:
        torch.manual_seed(seed)
        model = mm.CrossAttentionTransformer(args).eval().to(torch.float32)
    finally:
        mm.CrossAttentionTransformerVision = original
    randomize_mllama_(model, seed)
    model.setup_cache(len(TOKENS), torch.device("cpu"), torch.float32)
    return model


def meta_logits(model, tiles, tokens=TOKENS, images=IMAGES, image_token: int = IMG) -> np.ndarray:
    """Meta's own pipeline (``compute_vision_tokens_masks`` + ``forward``), minus PIL preprocessing.

    ``tokens``: ``[B, T]`` prompts holding one ``image_token`` per entry of ``images[b]`` (the ``(h, w)`` tile
    grids); ``tiles[b][m]``: image m's ``[h * w, C, S, S]`` tiles."""
    import torch
    from llama_models.llama3.chat_format import create_vision_mask

    # compute_vision_tokens_masks calls image_transform(image) -> (tiles, aspect ratio); ours are already tiled.
    model.image_transform = lambda image: image
    batch_images = [[(tiles[b][m], ar) for m, ar in enumerate(row)] for b, row in enumerate(images)]
    batch_masks = [create_vision_mask(row, image_token) for row in tokens]
    length = len(tokens[0])
    with torch.no_grad():
        xattn_caches, xattn_mask, row_mask = model.compute_vision_tokens_masks(
            batch_images, batch_masks, length, torch.device("cpu")
        )
        logits = model.forward(
            position_ids=torch.arange(length),
            tokens=torch.tensor(tokens),
            cross_attention_masks=xattn_mask,
            full_text_row_masked_out_mask=row_mask,
            xattn_caches=xattn_caches,
        )
    return logits.numpy()


# --------------------------------------------------------------------------------------------------------------
# transformers' reference.


def hf_mllama_config(config: ModelConfig):
    from transformers import MllamaConfig

    t, v = config.text, config.vision
    assert t.rope_scaling is not None, "the vision models use llama3 RoPE scaling"
    text = dict(
        vocab_size=t.vocab_size,
        hidden_size=t.dim,
        num_hidden_layers=t.n_layers + t.n_cross_attention_layers,
        cross_attention_layers=list(t.hf_cross_attention_layers),
        num_attention_heads=t.n_heads,
        num_key_value_heads=t.n_kv_heads,
        intermediate_size=t.ffn_dim,
        rms_norm_eps=t.norm_eps,
        max_position_embeddings=t.max_position_embeddings,
        rope_parameters=hf_rope_parameters(t),
        tie_word_embeddings=False,
        pad_token_id=None,  # HF's defaults (128004, 128000, 128001) are not rows of a tiny vocabulary
        bos_token_id=1,
        eos_token_id=2,
    )
    vision = dict(
        hidden_size=v.width,
        num_hidden_layers=v.n_layers,
        num_global_layers=v.n_global_layers,
        attention_heads=v.n_heads,
        intermediate_size=v.mlp_dim,
        vision_output_dim=v.output_dim,
        image_size=v.image_size,
        patch_size=v.patch_size,
        num_channels=v.num_channels,
        max_num_tiles=v.max_num_tiles,
        intermediate_layers_indices=list(v.intermediate_layers),
        supported_aspect_ratios=[list(r) for r in v.supported_aspect_ratios],
        norm_eps=v.norm_eps,
    )
    return MllamaConfig(text_config=text, vision_config=vision, image_token_index=config.image_token_id)


def hf_inputs(config: ModelConfig, pixels) -> dict:
    """HF's forward inputs, with its own processor helpers for the cross-attention mask."""
    import torch
    from transformers.models.mllama.processing_mllama import (
        convert_sparse_cross_attention_mask_to_dense,
        get_cross_attention_token_mask,
    )

    ratios = [tuple(r) for r in config.vision.supported_aspect_ratios]
    batch, n_img, n_tiles = pixels.shape[:3]
    ids = torch.zeros(batch, n_img, dtype=torch.long)  # 0: padding image
    tile_mask = torch.zeros(batch, n_img, n_tiles, dtype=torch.long)
    tile_mask[:, :, 0] = 1  # HF always keeps tile 0 of a padding image
    for b, row in enumerate(IMAGES):
        for m, (h, w) in enumerate(row):
            ids[b, m] = ratios.index((h, w)) + 1
            tile_mask[b, m, : h * w] = 1
    dense = convert_sparse_cross_attention_mask_to_dense(
        [get_cross_attention_token_mask(row, IMG) for row in TOKENS],
        [[h * w for h, w in row] for row in IMAGES],
        n_tiles,
        SEQ,
    )
    return dict(
        input_ids=torch.tensor(TOKENS),
        pixel_values=pixels,
        aspect_ratio_ids=ids,
        aspect_ratio_mask=tile_mask,
        cross_attention_mask=torch.from_numpy(dense),
        use_cache=False,
    )


def align_hf_intermediate_layers(model) -> bool:
    """Make transformers pick Meta's intermediate vision features; True if its installed version needed it.

    Meta stores the *input* of local layers 3, 7, 15, 23, 30 (docs/model-facts.md §5 step 7), and transformers 4.x read
    ``hidden_states[i]`` with the encoder's input first, the same thing. The installed transformers (5.24)
    ``MllamaVisionEncoder`` returns only the layer *outputs*, so ``hidden_states[i]`` is the input of layer i + 1
    and its intermediate features are one layer late (the regression of transformers PRs #39785 / #40083, again).
    That is a property of the reference, not of our tables, so the comparison selects the same features as Meta by
    shifting its indices; the weights are untouched.
    """
    import torch

    vision = model.model.vision_model
    if getattr(vision, "_llama32_jax_aligned", False):
        return True  # already shifted (module-scoped fixtures reach several tests)
    encoder = vision.transformer
    x = torch.randn(1, 8, vision.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        states = encoder(x).hidden_states
        if len(states) == len(encoder.layers) + 1 and torch.equal(states[0], x):
            return False  # the input first: Meta's convention
        assert len(states) == len(encoder.layers) and torch.allclose(states[0], encoder.layers[0](x))
    assert min(vision.intermediate_layers_indices) >= 1
    vision.intermediate_layers_indices = [i - 1 for i in vision.intermediate_layers_indices]
    vision._llama32_jax_aligned = True
    return True


# --------------------------------------------------------------------------------------------------------------
# Fixtures.
