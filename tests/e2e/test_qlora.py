"""QLoRA end to end: LoRA adapters on an int8 / int4 weight-only quantized tiny Llama, trained, merged, exported.

- the adapters are float (the model's compute dtype) with the shapes the kernel's geometry gives, in both layer
  layouts; the train step differentiates and updates only them (every quantized code, scale and other weight is
  bit-identical after training) and lowers the loss on a fixed batch;
- ``merge_lora`` leaves a float model (no codes, scales or ``quant_config``) whose kernels are the test's own
  ``q * s + (alpha / r) B A``, whose logits equal the quantized model's with adapters up to fp32 rounding, and
  which ``export_hf`` writes as a directory HF transformers loads with equal logits;
- full fine-tuning of a quantized model is refused by name; ``dequantize_model`` gives the dequantized float model.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llama32_jax import configs
from llama32_jax.api import Model
from llama32_jax.checkpoint.hf_export import export_hf
from llama32_jax.errors import InvalidInputError
from llama32_jax.models.build import forward, init_model, load_params
from llama32_jax.models.quantize import dequantize_model, quantize_model
from llama32_jax.nn.layers import flatten_tree
from llama32_jax.quant import QuantConfig
from llama32_jax.training.lora import add_lora, merge_lora
from llama32_jax.training.train import TrainConfig, Trainer, split_for_training
from tests.parity.test_quantized_logits import REL, assert_rounding_close, dequantized_tree
from tests.refs import hf_llama

HF_TOL = 1e-4  # our fp32 model vs HF transformers' (tests/parity/test_text_hf.py)
UNTIED = configs.TINY_TEXT.replace(
    name="tiny-text-untied", text=dataclasses.replace(configs.TINY_TEXT.text, tie_embeddings=False)
)
RANK, ALPHA = 4, 8.0


def _params(model) -> dict:
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _flat(model, kind=nnx.Param) -> dict:
    return {
        tuple(map(str, p)): np.asarray(v) for p, v in flatten_tree(nnx.to_pure_dict(nnx.state(model, kind))).items()
    }


def _without_lora(tree: dict) -> dict:
    return {k: _without_lora(v) if isinstance(v, dict) else v for k, v in tree.items() if k != "lora"}


def _batch(vocab, b=4, t=32, seed=0):
    ids = np.random.default_rng(seed).integers(0, vocab, (b, t + 1))
    return {"inputs": ids[:, :-1], "targets": ids[:, 1:], "loss_mask": np.ones((b, t), np.float32)}


@pytest.fixture(scope="module")
def float_params():
    """HF-initialised weights (seeded noise, std 0.08): O(1) logits."""
    ref = hf_llama(UNTIED.text, seed=21)
    from llama32_jax.checkpoint import params_from_state_dict

    return params_from_state_dict(UNTIED, ref.state_dict(), "hf")


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_adapters_on_quantized_kernels_are_float_and_shaped_by_the_kernel(scan, dtype):
    config = UNTIED.replace(scan_layers=scan)
    model = quantize_model(init_model(config, param_dtype=dtype), QuantConfig("int4", 32))
    n = add_lora(model, rank=RANK, alpha=ALPHA)
    assert n == 7 * (1 if scan else config.text.n_layers)
    t = config.text
    lead = (t.n_layers,) if scan else ()
    layer = model.layers if scan else model.layers[0]
    q_out, kv_out = t.n_heads * t.head_dim, t.n_kv_heads * t.head_dim
    want = {  # (A [r, in], B [out, r]) from each projection's flattened [out, in] kernel
        "wq": ((RANK, t.dim), (q_out, RANK)),
        "wk": ((RANK, t.dim), (kv_out, RANK)),
        "wo": ((RANK, q_out), (t.dim, RANK)),
        "w1": ((RANK, t.dim), (t.ffn_dim, RANK)),
        "w2": ((RANK, t.ffn_dim), (t.dim, RANK)),
    }
    for name, (a_shape, b_shape) in want.items():
        proj = getattr(layer.attention if name.startswith("wq") or name in ("wk", "wo") else layer.feed_forward, name)
        assert proj.kernel.dtype == jnp.int4 and proj.quant == ("int4", 32)
        assert proj.lora.a.dtype == dtype and proj.lora.b.dtype == dtype
        assert proj.lora.a.shape == (*lead, *a_shape) and proj.lora.b.shape == (*lead, *b_shape)
    if scan or dtype != jnp.float32:
        return
    # A fresh adapter (B = 0) changes nothing.
    ids = jnp.asarray(_batch(t.vocab_size, 2, 12)["inputs"])
    plain = quantize_model(init_model(config, param_dtype=dtype), QuantConfig("int4", 32))
    np.testing.assert_array_equal(np.asarray(forward(model, ids)[0]), np.asarray(forward(plain, ids)[0]))


def test_qlora_trains_only_the_adapters_merges_into_a_float_model_and_exports(float_params, tmp_path):
    import torch
    from transformers import LlamaForCausalLM

    config = UNTIED
    model = load_params(config, float_params, param_dtype=jnp.float32, quant=QuantConfig("int8"))
    base = _flat(model)
    assert any(v.dtype == np.int8 for v in base.values())

    cfg = TrainConfig(mode="lora", learning_rate=1e-2, total_steps=8, lora_rank=RANK, lora_alpha=ALPHA)
    trainer = Trainer(model, cfg)
    # What the step differentiates: only the float LoRA parameters; every int code is in the frozen state.
    trainable = flatten_tree(nnx.to_pure_dict(trainer.trainable))
    assert trainable and all(jnp.issubdtype(v.dtype, jnp.floating) for v in trainable.values())
    assert all(path[-2:] in (("lora", "a"), ("lora", "b")) for path in trainable)
    variables = jax.tree.leaves(trainer.trainable, is_leaf=lambda x: isinstance(x, nnx.Variable))
    assert all(type(v) is nnx.LoRAParam for v in variables)
    frozen_ints = [v for v in jax.tree.leaves(trainer.frozen) if jnp.issubdtype(v.dtype, jnp.integer)]
    assert len(frozen_ints) == 7 * config.text.n_layers + 1  # every projection and the head

    batch = _batch(config.text.vocab_size)
    losses = [trainer.step(batch)["loss"] for _ in range(6)]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.1, losses

    trained = nnx.merge(trainer.graphdef, trainer.trainable, trainer.frozen, copy=True)
    after = _flat(trained)
    for path, value in base.items():  # codes, scales, norms, embedding: bit-identical
        assert after[path].dtype == value.dtype, path
        np.testing.assert_array_equal(after[path].view(np.uint8), value.view(np.uint8), str(path))
    adapters = _flat(trained, nnx.LoRAParam)
    assert set(after) - set(base) == set(adapters)
    assert any(np.abs(v).max() > 0 for p, v in adapters.items() if p[-1] == "b")  # B moved off zero

    ids = jnp.asarray(_batch(config.text.vocab_size, 2, 40, seed=5)["inputs"])
    unmerged = np.asarray(forward(trained, ids)[0])
    quantized_tree = jax.tree.map(np.asarray, _params(trained))  # before merging: codes, scales, adapters
    merged = merge_lora(trained)

    # A float model: no codes, no scales, no quantization record, the structure of a never-quantized model.
    flat = _flat(merged)
    assert all(v.dtype == np.float32 for v in flat.values())
    assert set(flat) == set(_flat(init_model(config, param_dtype=jnp.float32)))
    assert merged.quant_config is None and merged.head_quant is None
    assert all(getattr(n, "quant", None) is None for _, n in nnx.iter_graph(merged))
    # Its kernels are the test's own dequantized codes plus (alpha / r) B A.
    deq = flatten_tree(dequantized_tree(quantized_tree))
    lora = flatten_tree(quantized_tree)
    for path in [p for p in lora if p[-1] == "kernel"]:
        a, b = lora[(*path[:-1], "lora", "a")], lora[(*path[:-1], "lora", "b")]
        w = deq[path].astype(np.float64).reshape(b.shape[0], -1)
        w = w + (ALPHA / RANK) * (b.astype(np.float64) @ a.astype(np.float64))
        got = flat[tuple(map(str, path))].astype(np.float64).reshape(w.shape)
        np.testing.assert_allclose(got, w, rtol=0, atol=4 * 2**-24 * np.abs(w).max())
    np.testing.assert_array_equal(flat[("lm_head",)], deq[("lm_head",)])  # the head: dequantized exactly

    # Merged = quantized base + adapters, up to fp32 rounding (tests/parity/test_quantized_logits.py REL).
    merged_logits = np.asarray(forward(merged, ids)[0])
    assert_rounding_close(merged_logits, unmerged)
    base_only = load_params(config, dequantized_tree(_without_lora(quantized_tree)), param_dtype=jnp.float32)
    assert float(np.abs(unmerged - np.asarray(forward(base_only, ids)[0])).max()) > 100 * REL  # adapters matter

    # The merged model exports to HF, and transformers computes the same logits from the directory.
    out = export_hf(Model(merged), tmp_path / "hf", dtype="float32")
    hf = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        hf_logits = hf(torch.as_tensor(np.array(ids), dtype=torch.long)).logits.numpy()
    err = float(np.abs(hf_logits - merged_logits).max())
    print(f"merged QLoRA vs HF transformers: max |dlogit| = {err:.3g}")
    assert err <= HF_TOL


def test_full_fine_tuning_of_a_quantized_model_is_refused():
    model = quantize_model(init_model(UNTIED, param_dtype=jnp.float32), QuantConfig("int8"))
    with pytest.raises(InvalidInputError, match=r"full fine-tuning of a quantized model \(int8, per channel\).*lora"):
        split_for_training(model, TrainConfig(mode="full"))


def test_dequantize_model_gives_the_dequantized_float_model(float_params):
    model = load_params(UNTIED, float_params, param_dtype=jnp.float32, quant=QuantConfig("int4", 32))
    ids = jnp.asarray(_batch(UNTIED.text.vocab_size, 2, 24, seed=7)["inputs"])
    reference = load_params(UNTIED, dequantized_tree(_params(model)), param_dtype=jnp.float32)
    quantized_logits = forward(model, ids)[0]
    dequantize_model(model)
    assert model.quant_config is None
    got, want = _flat(model), _flat(reference)
    assert set(got) == set(want)
    for path in want:
        np.testing.assert_array_equal(got[path], want[path], str(path))
    np.testing.assert_array_equal(np.asarray(forward(model, ids)[0]), np.asarray(forward(reference, ids)[0]))
    assert_rounding_close(forward(model, ids)[0], quantized_logits)
    # bf16: the dequantized weights are cast to the model's compute dtype.
    bf16 = dequantize_model(quantize_model(init_model(UNTIED, param_dtype=jnp.bfloat16), QuantConfig("int8")))
    assert {v.dtype for v in _flat(bf16).values()} == {np.dtype(jnp.bfloat16)}
