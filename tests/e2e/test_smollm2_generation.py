"""A real trained model end to end: SmolLM2-135M-Instruct through ``llama32_jax.load`` against HF transformers.

Greedy continuations must equal transformers' greedy continuations token for token (fp32, >= 48 new tokens),
for raw-text and chat-formatted prompts, with all prompts generated together in one padded batch on our side
and one at a time (no padding) on transformers' side.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import llama32_jax as lj
from llama32_jax.errors import InvalidInputError

NEW = 48
PROMPTS = [
    "The history of the Roman Empire",
    "def quicksort(arr):",
    "Photosynthesis is the process by which",
]


@pytest.fixture(scope="module")
def model(gguf_file):
    return lj.load(gguf_file, dtype="float32")


def _hf_greedy(hf_model, ids: list[int], eos: int) -> list[int]:
    with torch.no_grad():
        out = hf_model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=NEW,
            do_sample=False,
            num_beams=1,
            repetition_penalty=1.0,
            temperature=None,
            top_p=None,
            top_k=None,
            eos_token_id=eos,
            pad_token_id=eos,
        )
    return out[0, len(ids) :].tolist()


def test_greedy_equals_transformers(model, hf_model, hf_tokenizer):
    chat = hf_tokenizer.apply_chat_template(
        [{"role": "user", "content": "Describe the water cycle in detail."}], add_generation_prompt=True, tokenize=False
    )
    texts = [*PROMPTS, chat]
    hf_ids = [hf_tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    ours_ids = [model.tokenizer.encode(t, allow_special=True) for t in texts]
    assert ours_ids == hf_ids  # same tokenizer, so both models see the same prompts
    eos = hf_tokenizer.eos_token_id
    assert eos in model.tokenizer.stop_ids
    outs = model.generate(ours_ids, max_new_tokens=NEW, return_details=True)
    long_enough = 0
    for i, ids in enumerate(hf_ids):
        expected = _hf_greedy(hf_model, ids, eos)
        assert outs[i].tokens == expected, f"prompt {i}: {texts[i]!r}"
        long_enough += len(expected) >= NEW
        print(f"[smollm2 greedy] prompt {i}: {len(expected)} tokens equal: {hf_tokenizer.decode(expected)[:60]!r}")
    assert long_enough >= 3


def test_text_api_and_chat(model, hf_tokenizer):
    text = model.generate(PROMPTS[:1], max_new_tokens=12)[0]
    ids = hf_tokenizer(PROMPTS[0], add_special_tokens=False)["input_ids"]
    assert text == hf_tokenizer.decode(model.generate([ids], max_new_tokens=12, return_details=True)[0].tokens)
    reply = model.chat([{"role": "user", "content": "What is the capital of France?"}], max_new_tokens=24)[0]
    assert "Paris" in reply
    streamed: list[str] = []
    full = model.generate(PROMPTS[1:2], max_new_tokens=16, stream=lambda i, d: streamed.append(d))[0]
    assert "".join(streamed) == full


def test_logits_match_transformers(model, hf_model, hf_tokenizer):
    ids = hf_tokenizer(PROMPTS[2], add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        expected = hf_model(torch.tensor([ids])).logits.numpy()
    ours = model.logits([ids])
    assert ours.dtype == np.float32 and ours.shape == expected.shape
    np.testing.assert_array_equal(ours.argmax(-1), expected.argmax(-1))


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda m: m.generate([]), "non-empty"),
        (lambda m: m.generate([""]), "empty string"),
        (lambda m: m.generate(["hi"], temperature=-0.5), "temperature"),
        (lambda m: m.generate(["hi"], top_p=2.0), "top_p"),
        (lambda m: m.generate([42]), "string or a list of token ids"),
        (lambda m: m.generate(["hi"], images=[[object()]]), "images"),
        (lambda m: m.generate([list(range(20))], max_new_tokens=10**6), "context"),
        (lambda m: m.chat([{"role": "wizard", "content": "hi"}]), "wizard"),
        (lambda m: m.chat([]), "non-empty"),
        (lambda m: m.logits([[1, 2, 10**7]]), r"\[0, 49152\)"),
        (lambda m: m.logits([1, 2, 3]), r"\[batch, length\]"),
    ],
)
def test_bad_input_typed_errors(model, call, match):
    with pytest.raises(InvalidInputError, match=match):
        call(model)


def test_load_errors(tmp_path):
    with pytest.raises(lj.errors.CheckpointError, match="does not exist"):
        lj.load(tmp_path / "nope")
    with pytest.raises(lj.errors.CheckpointError, match="not a checkpoint"):
        lj.load(tmp_path)
    (tmp_path / "params.json").write_text("{}")
    with pytest.raises(lj.errors.CheckpointError, match="no consolidated.NN.pth"):
        lj.load(tmp_path)
    with pytest.raises(InvalidInputError, match="dtype"):
        lj.load(tmp_path, dtype="int8")
    with pytest.raises(InvalidInputError, match="attention_impl"):
        lj.load(tmp_path, attention_impl="flash")
