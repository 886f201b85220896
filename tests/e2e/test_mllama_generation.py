"""Multimodal generation through our API on the tiny random Mllama, against HF ``MllamaForConditionalGeneration``.

Greedy, token-id prompts with one image each at the start: there HF's and Meta's masking agree on every row,
generated tokens included (one image is visible to the end; HF repeats the last mask row, Meta's range is open).
Images go through our preprocessing (equal to HF's processor, tests/unit/test_image.py) at the tiny tile size.
transformers 5.24's one-layer-late intermediate vision features are realigned in memory first.
"""

from __future__ import annotations

import numpy as np
import pytest

from llama32_jax.api import Model
from llama32_jax.inference.generate import generate_tokens
from llama32_jax.inputs.image import preprocess
from llama32_jax.models.build import load_params
from tests.refs_vision import CFG, IMG, align_hf_intermediate_layers
from tests.vision_fixtures import hf_model, hf_sd, meta_model, meta_sd, params  # noqa: F401

pytestmark = pytest.mark.filterwarnings("ignore:.*all_gather_tensor.*:FutureWarning")
NEW = 6
S = CFG.vision.image_size
PROMPTS = [[IMG, 5, 17, 300, 9, 41], [IMG, 44, 2, 13]]


@pytest.fixture(scope="module")
def ours(params):
    import jax.numpy as jnp

    return load_params(CFG, params, param_dtype=jnp.float32)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(7)
    # (2, 1) and (1, 3) tile canvases at the tiny tile size.
    return [[rng.integers(0, 256, (2 * S, S, 3), dtype=np.uint8)], [rng.integers(0, 256, (S, 3 * S - 5, 3), np.uint8)]]


def _hf_inputs(prompt, batch, b) -> dict:
    """HF's model inputs for prompt ``b`` (one image) of our preprocessed ``batch``, HF's own mask helpers."""
    import torch
    from transformers.models.mllama.processing_mllama import (
        convert_sparse_cross_attention_mask_to_dense,
        get_cross_attention_token_mask,
    )

    dense = convert_sparse_cross_attention_mask_to_dense(
        [get_cross_attention_token_mask(prompt, IMG)], [batch.num_tiles[b]], CFG.vision.max_num_tiles, len(prompt)
    )
    return dict(
        input_ids=torch.tensor([prompt]),
        pixel_values=torch.from_numpy(batch.pixel_values[b : b + 1, :1]),
        aspect_ratio_ids=torch.from_numpy(batch.aspect_ratio_ids[b : b + 1, :1]).long(),
        aspect_ratio_mask=torch.from_numpy(batch.aspect_ratio_mask[b : b + 1, :1]).long(),
        cross_attention_mask=torch.from_numpy(dense),
    )


def _hf_greedy(model, prompt, batch, b) -> list[int]:
    import torch

    with torch.no_grad():
        out = model.generate(
            **_hf_inputs(prompt, batch, b), max_new_tokens=NEW, do_sample=False, eos_token_id=None, pad_token_id=0
        )
    return out[0, len(prompt) :].tolist()


def test_greedy_generation_equals_hf(ours, hf_model, images):
    align_hf_intermediate_layers(hf_model)
    hf_model.generation_config.eos_token_id = None
    batch = preprocess(images, CFG.vision)
    assert [r[0] for r in batch.num_tiles] == [2, 3]
    got = generate_tokens(ours, PROMPTS, max_new_tokens=NEW, images=batch)  # one padded batch
    for b, prompt in enumerate(PROMPTS):
        assert got[b].tokens == _hf_greedy(hf_model, prompt, batch, b), f"prompt {b}"


def test_logits_with_images_equal_hf(ours, hf_model, images):
    """``Model.logits(ids, images=...)``: our preprocessing, vision tower and decoder on every row, fp32."""
    import torch

    align_hf_intermediate_layers(hf_model)
    api = Model(ours)
    for b, prompt in enumerate(PROMPTS):
        got = api.logits([prompt], images=[images[b]])
        with torch.no_grad():
            want = hf_model(**_hf_inputs(prompt, preprocess(images, CFG.vision), b)).logits.numpy()
        delta = float(np.abs(got - want).max())
        print(f"prompt {b}: max |ours - hf| logit = {delta:.3g}")
        assert delta <= 1e-4
    with pytest.raises(Exception, match=r"prompt 0 has 1 <\|image\|> token\(s\) but 2 image"):
        api.logits([PROMPTS[0]], images=[images[0] + images[1]])


def test_scanned_layout_generates_the_same(ours, params, images):
    """The scanned decoder (stacked ``[self, cross, self]`` groups under ``lax.scan``, stacked cache) generates
    what the unrolled one does, with images and without, in one mixed batch."""
    import jax.numpy as jnp

    scanned = load_params(CFG.replace(scan_layers=True), params, param_dtype=jnp.float32)
    assert scanned.cross_layers.gate_attn.shape == (CFG.text.n_cross_attention_layers, 1)  # stacked
    prompts, imgs = [PROMPTS[0], [3, 8, 21, 7]], [images[0], []]
    got = Model(scanned).generate(prompts, images=imgs, max_new_tokens=NEW, return_details=True)
    want = Model(ours).generate(prompts, images=imgs, max_new_tokens=NEW, return_details=True)
    assert [g.tokens for g in got] == [w.tokens for w in want]


def test_mixed_batch_equals_each_request_alone(ours, images):
    """A batch may mix requests with and without images: each result equals its request run alone."""
    text_only = [3, 8, 21, 7, 7, 100, 12]
    api = Model(ours)
    mixed = api.generate([PROMPTS[0], text_only], images=[images[0], []], max_new_tokens=NEW, return_details=True)
    alone_image = api.generate([PROMPTS[0]], images=[images[0]], max_new_tokens=NEW, return_details=True)
    alone_text = api.generate([text_only], max_new_tokens=NEW, return_details=True)
    assert mixed[0].tokens == alone_image[0].tokens
    assert mixed[1].tokens == alone_text[0].tokens
    # And the image matters: the same prompt without its image generates something else.
    blind = generate_tokens(ours, [PROMPTS[0]], max_new_tokens=NEW)
    assert blind[0].tokens != alone_image[0].tokens


def test_bad_image_requests_are_named(ours, images):
    from llama32_jax.errors import InvalidInputError

    api = Model(ours)
    with pytest.raises(InvalidInputError, match=r"prompt 0 has 1 <\|image\|> token\(s\) but 2 image"):
        api.generate([PROMPTS[0]], images=[[images[0][0], images[1][0]]], max_new_tokens=2)
    with pytest.raises(InvalidInputError, match="one list of images per prompt"):
        api.generate(PROMPTS, images=[images[0]], max_new_tokens=2)


def test_text_prompt_marks_images_with_the_image_string(ours):
    """With images, ``<|image|>`` in a text prompt becomes the model's image token; without, text stays text."""
    from llama32_jax.inputs.tokenizer import LlamaTokenizer, default_llama3_tokenizer_path

    tok = LlamaTokenizer.from_file(default_llama3_tokenizer_path())
    api = Model(ours, tok)
    ids = api._encode_prompt("<|image|>Describe this photo:", 0, None, images=True)
    assert ids == [tok.bos_id, CFG.image_token_id, *tok.encode("Describe this photo:", bos=False)]
    plain = api._encode_prompt("<|image|>Describe", 0, None)
    assert CFG.image_token_id not in plain and tok.image_id not in plain


def test_continuous_batching_keeps_each_slots_images(ours, hf_model, images):
    """More requests than slots (the ``Engine``): each slot holds its own image K/V and tile-mask rows. Image
    requests generate what HF does for them; the text-only one what it does alone; a request whose image fails to
    load fails alone and the run goes on."""
    from llama32_jax.inference.engine import Engine, Request

    align_hf_intermediate_layers(hf_model)
    hf_model.generation_config.eos_token_id = None
    batch = preprocess(images, CFG.vision)
    text_only = [3, 8, 21, 7, 7, 100, 12]
    api = Model(ours)
    prompts = [PROMPTS[0], text_only, PROMPTS[1], PROMPTS[0]]
    imgs = [images[0], [], images[1], images[0]]
    got = api.generate(prompts, images=imgs, max_new_tokens=NEW, return_details=True, slots=2)
    for k, b in ((0, 0), (2, 1), (3, 0)):
        assert got[k].tokens == _hf_greedy(hf_model, PROMPTS[b], batch, b), f"request {k}"
    assert got[1].tokens == generate_tokens(ours, [text_only], max_new_tokens=NEW)[0].tokens

    def unreadable():
        raise OSError("cannot read cat.jpg")

    requests = [Request(PROMPTS[0], NEW, images=unreadable), Request(PROMPTS[1], NEW, images=lambda: images[1])]
    results = {r.index: r for r in Engine(ours, slots=1).run(requests, errors="result")}
    assert not results[0].ok and "cannot read cat.jpg" in results[0].error
    assert results[1].output.tokens == _hf_greedy(hf_model, PROMPTS[1], batch, 1)
