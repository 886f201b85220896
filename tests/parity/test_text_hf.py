"""Logit parity with HF transformers' LlamaForCausalLM on tiny random configs (fp32, highest precision).

Covers GQA ratios 1, 2, 4 and 8, tied and untied heads, llama3 RoPE factors 32 and 8 (and no scaling), both
parameter layouts (scanned stack / unrolled layers), and prompts of 520 tokens so RoPE errors at long range show.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from llama32_jax.checkpoint import params_from_state_dict, state_dict_from_params
from llama32_jax.configs import ModelConfig, RopeScaling, TextConfig, from_hf_config
from llama32_jax.models.build import load_params
from tests.refs import hf_llama, torch_logits

TOL = 1e-4  # max |Δlogit|, fp32 end to end


def _text(n_heads, n_kv, tied, factor, n_layers=2) -> TextConfig:
    return TextConfig(
        vocab_size=384,
        dim=64,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=64 // n_heads * 2,
        ffn_dim=160,
        norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling=None if factor is None else RopeScaling(factor=factor),
        tie_embeddings=tied,
    )


CASES = {
    "gqa1-tied-f32": _text(4, 4, True, 32.0),
    "gqa2-untied-f8": _text(4, 2, False, 8.0),
    "gqa4-tied-f32": _text(8, 2, True, 32.0, n_layers=3),
    "gqa8-untied-f32": _text(8, 1, False, 32.0),
    "gqa2-tied-noscale": _text(4, 2, True, None),
}


def _tokens(vocab: int, batch: int, length: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(batch, length))


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_hf(case, scan):
    text = CASES[case]
    ref = hf_llama(text, seed=list(CASES).index(case))
    cfg = ModelConfig(text=text, name=case, scan_layers=scan)
    params = params_from_state_dict(cfg, ref.state_dict(), "hf")
    model = load_params(cfg, params, param_dtype=jnp.float32)

    tokens = _tokens(text.vocab_size, 2, 520, seed=1)
    expected = torch_logits(ref, tokens)
    ours, _ = model(jnp.asarray(tokens))
    err = float(np.max(np.abs(np.asarray(ours) - expected)))
    print(f"[parity hf {case} {'scan' if scan else 'unrolled'}] max |dlogit| = {err:.3e}")
    assert err <= TOL
    # The logits are not trivially small: a wrong RoPE or head would move them far more than TOL.
    assert float(np.std(expected)) > 0.05


def test_config_round_trip_through_hf_config_json(tmp_path):
    """Our strict reader recovers the config from the config.json HF itself writes."""
    for name, text in CASES.items():
        ref_cfg = hf_llama(text).config
        ref_cfg.save_pretrained(tmp_path / name)
        got = from_hf_config(tmp_path / name)
        assert got.text == text, name


def test_wrong_rope_factor_is_detected():
    """Negative control: the same weights with factor 8 instead of 32 differ far beyond the tolerance."""
    text = CASES["gqa4-tied-f32"]
    ref = hf_llama(text, seed=3)
    wrong = dataclasses.replace(text, rope_scaling=RopeScaling(factor=8.0))
    cfg = ModelConfig(text=wrong)
    model = load_params(cfg, params_from_state_dict(cfg, ref.state_dict(), "hf"), param_dtype=jnp.float32)
    tokens = _tokens(text.vocab_size, 1, 520, seed=2)
    err = float(np.max(np.abs(np.asarray(model(jnp.asarray(tokens))[0]) - torch_logits(ref, tokens))))
    assert err > 100 * TOL


def test_export_to_hf_names_round_trips():
    """Our parameters exported with HF names equal the HF state dict they came from."""
    text = CASES["gqa2-untied-f8"]
    ref = hf_llama(text, seed=5)
    cfg = ModelConfig(text=text)
    params = params_from_state_dict(cfg, ref.state_dict(), "hf")
    back = state_dict_from_params(cfg, params, "hf")
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    assert set(back) == set(sd)
    for k, v in back.items():
        np.testing.assert_array_equal(v, sd[k], err_msg=k)
