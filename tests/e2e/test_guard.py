"""Multimodal chat and Llama Guard moderation end to end, with Meta's real tokenizer (128256-row vocabulary).

The reference is Meta's ``llama-models`` model (tests/refs_vision.py) loaded with the same weights: in both
prompts below the image follows the header tokens, and on those first rows, which see no image, HF's masking
differs from Meta's by design (docs/model-facts.md §4.3; a logit difference of ~6e-3 here, enough to flip near-ties of a
random model), so HF is not the reference for them.

- ``test_chat_with_an_image_equals_meta``: a tiny random Mllama with the published vocabulary layout (<|image|> =
  128256); ``Model.chat`` (our chat format, preprocessing, model) generates greedily what Meta's model does from
  the ids Meta's own ``ChatFormat`` gives for the same dialog, on our pixels (pixel-identical to HF's processor,
  tests/unit/test_image.py), and its logits on every row equal Meta's.
- ``test_vision_moderation_feeds_the_documented_prompt``: ``Model.moderate`` on the same random model; its
  answer is gibberish, so it raises ``ModerationError`` carrying the text, which must be what the model generates
  from Meta's documented Llama-Guard-3-11B-Vision prompt (tests/unit/test_guard.py) tokenized as a whole; the
  logits for that prompt equal Meta's on every row.
- ``test_moderation_verdicts_from_a_wired_model``: a tiny text model wired by hand so that greedy decoding after
  the prompt writes ``"\\n\\nsafe"`` / ``"\\n\\nunsafe\\nS2"`` then ``<|eot_id|>`` (embeddings as one-hot
  states, no attention or FFN output, a head mapping each state to the next token): ``moderate`` returns the
  typed verdicts.
"""

from __future__ import annotations

import dataclasses
import io
import itertools

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llama32_jax import configs
from llama32_jax.api import Model
from llama32_jax.checkpoint.convert import to_numpy
from llama32_jax.checkpoint.convert_vision import vision_params_from_state_dict
from llama32_jax.inference.guard import ModerationError, ModerationResult
from llama32_jax.inputs.image import preprocess
from llama32_jax.inputs.tokenizer import LlamaTokenizer
from llama32_jax.models.build import init_model, load_params
from tests.refs_vision import CFG, meta_logits, meta_mllama
from tests.unit.test_guard import HF_11B_VISION_TARGET, MAYO

pytestmark = pytest.mark.filterwarnings("ignore:.*all_gather_tensor.*:FutureWarning")
VOCAB = 128256
BIG = CFG.replace(name="tiny-vision-llama3-vocab", text=dataclasses.replace(CFG.text, vocab_size=VOCAB),
                  image_token_id=VOCAB)  # fmt: skip
STOPS = [128001, 128008, 128009]  # Meta's stop tokens (the tokenizer's default)


@pytest.fixture(scope="module")
def tok():
    return LlamaTokenizer.default()


@pytest.fixture(scope="module")
def meta():
    """Meta's model, seeded noise on every weight (gates included), with room for the guard prompt."""
    return meta_mllama(BIG, seed=5, max_seq_len=256)


@pytest.fixture(scope="module")
def params(meta):
    return vision_params_from_state_dict(BIG, {k: to_numpy(v).copy() for k, v in meta.state_dict().items()}, "meta")


@pytest.fixture(scope="module")
def api(params, tok):
    return Model(load_params(BIG, params, param_dtype=jnp.float32), tok)


@pytest.fixture(scope="module")
def image():
    s = BIG.vision.image_size
    return np.random.default_rng(3).integers(0, 256, (s, 2 * s - 3, 3), dtype=np.uint8)  # a (1, 2) tile canvas


def _meta_logits(meta, ids, image) -> np.ndarray:
    import torch

    batch = preprocess([[image]], BIG.vision)
    n = batch.num_tiles[0][0]
    grid = tuple(BIG.vision.supported_aspect_ratios[int(batch.aspect_ratio_ids[0, 0]) - 1])
    tiles = [[torch.from_numpy(batch.pixel_values[0, 0, :n])]]
    return meta_logits(meta, tiles, [ids], [[grid]], image_token=VOCAB)[0]


_MEMO: dict = {}


def _meta_greedy(meta, ids, image, new: int) -> list[int]:
    key = (tuple(ids), new)  # one image per module: memoised across the parametrised tests
    if key not in _MEMO:
        seq = list(ids)
        for _ in range(new):
            seq.append(int(_meta_logits(meta, seq, image)[-1].argmax()))
        _MEMO[key] = seq[len(ids) :]
    return _MEMO[key]


@pytest.fixture(params=["xla", "pallas"])
def attention_impl(request, api):
    """Both attention implementations (the Pallas kernels run interpreted on this CPU) against Meta."""
    api.set_attention_impl(request.param)
    yield request.param
    api.set_attention_impl("auto")


def test_chat_with_an_image_equals_meta(api, meta, image, tok, attention_impl):
    from llama_models.datatypes import RawMediaItem, RawMessage, RawTextItem
    from llama_models.llama3.chat_format import ChatFormat
    from llama_models.llama3.tokenizer import Tokenizer

    from llama32_jax.inputs.tokenizer import default_llama3_tokenizer_path

    dialog = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": MAYO}]}]
    got = api.chat(dialog, max_new_tokens=8, stop_ids=[], return_details=True)[0]
    meta_format = ChatFormat(Tokenizer(default_llama3_tokenizer_path()))
    from PIL import Image

    png = io.BytesIO()
    Image.fromarray(image).save(png, format="PNG")
    raw = RawMessage(role="user", content=[RawMediaItem(data=png.getvalue()), RawTextItem(text=MAYO)])
    ids = meta_format.encode_dialog_prompt([raw]).tokens  # model ids: <|image|> is 128256
    assert ids.count(VOCAB) == 1 and got.prompt_tokens == len(ids)
    assert got.tokens == _meta_greedy(meta, ids, image, 8)
    delta = float(np.abs(api.logits([ids], images=[[image]])[0] - _meta_logits(meta, ids, image)).max())
    print(f"max |ours - meta| logit = {delta:.3g}")
    assert delta <= 1e-4
    # The image is read: without it the reply differs.
    blind = api.chat([{"role": "user", "content": MAYO}], max_new_tokens=8, stop_ids=[], return_details=True)[0]
    assert blind.tokens != got.tokens


def test_vision_moderation_feeds_the_documented_prompt(api, meta, image, tok):
    conversation = [{"role": "user", "content": [{"type": "text", "text": MAYO}, {"type": "image", "image": image}]}]
    with pytest.raises(ModerationError) as info:
        api.moderate(conversation)
    ids = [VOCAB if t == tok.image_id else t for t in tok.encode(HF_11B_VISION_TARGET, allow_special=True)]
    want = api.generate([ids], images=[[image]], max_new_tokens=32, stop_ids=STOPS, return_details=True)[0]
    assert info.value.raw == want.text
    delta = float(np.abs(api.logits([ids], images=[[image]])[0] - _meta_logits(meta, ids, image)).max())
    print(f"max |ours - meta| logit = {delta:.3g}")
    assert delta <= 1e-4


def test_moderation_input_errors_are_named(api, image):
    two = [{"type": "image", "image": image}, {"type": "image", "image": image}, {"type": "text", "text": "hi"}]
    with pytest.raises(Exception, match="conversation 0 has 2 images"):
        api.moderate([{"role": "user", "content": two}])
    text_model = Model(init_model(configs.TINY_TEXT, param_dtype=jnp.float32), LlamaTokenizer.default())
    with pytest.raises(Exception, match="is a text model; image moderation needs"):
        text_model.moderate([{"role": "user", "content": two[1:]}])


# --------------------------------------------------------------------------------------------------------------
# A hand-wired guard: the answer is a function of the last token only.

GUARD = configs.LLAMA_GUARD_3_1B.replace(
    name="tiny-guard",
    text=dataclasses.replace(configs.TINY_TEXT.text, vocab_size=VOCAB, tie_embeddings=False),
)


def _wired_guard(chain: list[int]) -> Model:
    """``chain[i]`` is followed by ``chain[i + 1]``: token ``chain[i]`` embeds as one-hot state ``i`` (scaled), the
    blocks add nothing (``wo = w2 = 0``), and head row ``chain[i + 1]`` reads state ``i``; every other row is 0."""
    model = init_model(GUARD, param_dtype=jnp.float32, seed=0)
    tree = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    for layer in tree["layers"].values():
        layer["attention"]["wo"]["kernel"] = jnp.zeros_like(layer["attention"]["wo"]["kernel"])
        layer["feed_forward"]["w2"]["kernel"] = jnp.zeros_like(layer["feed_forward"]["w2"]["kernel"])
    embed = np.asarray(tree["embed"]["embedding"]).copy()
    head = np.zeros_like(np.asarray(tree["lm_head"]))
    for i, (token, nxt) in enumerate(itertools.pairwise(chain)):
        embed[token] = 0.0
        embed[token, i] = 10.0
        head[nxt, i] = 1.0
    tree["embed"]["embedding"], tree["lm_head"] = jnp.asarray(embed), jnp.asarray(head)
    return Model(load_params(GUARD, tree, param_dtype=jnp.float32), LlamaTokenizer.default())


@pytest.mark.parametrize(
    ("answer", "safe", "codes"), [("\n\nsafe", True, ()), ("\n\nunsafe\nS2", False, ("S2",))]
)  # fmt: skip
def test_moderation_verdicts_from_a_wired_model(tok, answer, safe, codes):
    end_header = tok.token_to_id("<|end_header_id|>")
    guard = _wired_guard([end_header, *tok.encode(answer), tok.token_to_id("<|eot_id|>")])
    conversation = [{"role": "user", "content": "How do I whisk eggs?"}, {"role": "assistant", "content": "Fast."}]
    result = guard.moderate(conversation)
    assert isinstance(result, ModerationResult)
    assert (result.safe, result.categories, result.role, result.raw) == (safe, codes, "Agent", answer)
    assert result.names == (("Non-Violent Crimes.",) if codes else ())
    batch = guard.moderate([conversation, conversation[:1]])  # a batch: one result per conversation
    assert [(r.safe, r.role) for r in batch] == [(safe, "Agent"), (safe, "User")]
    many = guard.moderate([conversation, conversation[:1]] * 3, slots=2)  # more than the slots: the Engine
    assert [(r.safe, r.categories, r.role) for r in many] == [(r.safe, r.categories, r.role) for r in batch] * 3
