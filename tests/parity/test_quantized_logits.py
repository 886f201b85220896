"""A quantized model computes exactly what its dequantized weights say: logits, generation, guard, Pallas.

The reference for a quantized model is the SAME architecture built with float parameters equal to the
dequantized weights (``q * scale``, computed here by the test's own formula from the stored codes and scales,
not by the library) -- the "dequantized-weights reference". Quantization error itself is then out of the
comparison: any difference left is fp32 summation order (the int8 path multiplies the scale after the product,
``(x @ q.T) * s``, the reference before, ``x @ (q * s).T``), so the tolerance is rounding level. The text
reference is also run through HF transformers' LlamaForCausalLM (its state dict from our converter), so the
quantized model is held to a reference nobody here wrote.

Weights are seeded noise of std 0.08 (tests/refs.randomize_ on the HF model, norms around 1), so the logits are
O(1) and a wrong scale, group or code would move them by orders of magnitude more than the tolerance.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llama32_jax import configs
from llama32_jax.api import Model
from llama32_jax.checkpoint import params_from_state_dict, state_dict_from_params
from llama32_jax.errors import QuantizationError
from llama32_jax.models.build import abstract_model, forward, init_model, load_params
from llama32_jax.models.quantize import quantize_model
from llama32_jax.nn.attend import set_attention_impl
from llama32_jax.nn.layers import flatten_tree
from llama32_jax.quant import QuantConfig
from tests.refs import hf_llama, torch_logits

# Rounding-level tolerance, relative to the largest |logit| (O(1) here). One fp32 product of length n differs
# between summation orders by at most n*u*sum|x_i w_i| (u = 6e-8) and typically by sqrt(n)*u relative
# (~1e-6 at n = 192); a few layers and RMSNorms amplify that a few times. Measured: int8 <= 1.1e-6 relative; int4
# bit-identical (its product dequantizes the weight first, as the reference does).
# 1e-5 keeps a 5x margin and is far below any quantization-sized error (an int8 step is ~1% of a weight).
REL = 1e-5
HF_TOL = 1e-4  # our float model vs HF transformers, as tests/parity/test_text_hf.py

TEXT = configs.TINY_TEXT  # tied head
UNTIED = configs.TINY_TEXT.replace(
    name="tiny-text-untied", text=dataclasses.replace(configs.TINY_TEXT.text, tie_embeddings=False)
)
VISION = configs.TINY_VISION
GROUP = 32  # divides every tiny input dimension (64, 192, vision 32 / 64 / 96)
MODES = {"int8": QuantConfig("int8"), "int4": QuantConfig("int4", GROUP)}


# --------------------------------------------------------------------------------------------- references


def dequantized_tree(tree: dict) -> dict:
    """Every ``x`` with a sibling ``x_scale`` replaced by ``x * scale`` in fp32, the scale removed.

    The layout comes from the shapes alone: an int8 scale has the kernel's output axes (``n_in`` = the rest), an
    int4 scale also one axis of ``I / group`` groups; the codes are read as int8 (int4 widens exactly)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out[key] = dequantized_tree(value)
        elif isinstance(key, str) and key.endswith("_scale"):
            continue
        elif f"{key}_scale" in tree and tree[f"{key}_scale"] is not None:
            q = np.asarray(value).astype(np.int8).astype(np.float32)
            s = np.asarray(tree[f"{key}_scale"], np.float32)
            if np.issubdtype(np.asarray(value).dtype, np.int8):  # int8: per output channel
                out_shape = s.shape
                n = math.prod(q.shape[len(out_shape) :])
                w = q.reshape(*out_shape, n) * s[..., None]
            else:  # int4: [*out, I // group]
                out_shape, n_groups = s.shape[:-1], s.shape[-1]
                n = math.prod(q.shape[len(out_shape) :])
                w = q.reshape(*out_shape, n_groups, n // n_groups) * s[..., None]
            out[key] = w.reshape(q.shape)
        else:
            out[key] = np.asarray(value)
    return out


def params_of(model) -> dict:
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def reference_model(config, qmodel):
    """The dequantized-weights reference: ``config`` built in fp32 from ``qmodel``'s dequantized weights."""
    return load_params(config, dequantized_tree(params_of(qmodel)), param_dtype=jnp.float32)


def assert_rounding_close(got, want):
    got, want = np.asarray(got), np.asarray(want)
    scale = float(np.abs(want).max())
    err = float(np.abs(got - want).max())
    print(f"max |dlogit| = {err:.3g} (max |logit| {scale:.3g}, relative {err / scale:.2g})")
    assert scale > 0.5  # O(1) logits: the relative tolerance is meaningful
    assert err <= REL * scale


def _tokens(vocab, batch, length, seed):
    return np.random.default_rng(seed).integers(0, vocab, size=(batch, length))


@pytest.fixture(scope="module")
def hf_text():
    """HF's tiny Llama (seeded noise, std 0.08) for each text config; our tree of its weights."""
    out = {}
    for i, config in enumerate((TEXT, UNTIED)):
        ref = hf_llama(config.text, seed=10 + i)
        out[config.name] = (ref, params_from_state_dict(config, ref.state_dict(), "hf"))
    return out


# --------------------------------------------------------------------------------------------- text


@pytest.mark.parametrize(
    ("base", "mode", "scan"),
    [(TEXT, "int8", False), (UNTIED, "int4", True)],
    ids=["tied-int8-unrolled", "untied-int4-scanned"],
)  # each mode, layout and head kind once (the generation and skip tests below add untied int8 / int4 unrolled)
def test_text_logits_equal_the_dequantized_reference_and_hf(hf_text, base, mode, scan):
    import torch

    config = base.replace(scan_layers=scan)
    qc = MODES[mode]
    hf_ref, params = hf_text[base.name]
    qmodel = load_params(config, params, param_dtype=jnp.float32, quant=qc)  # quantized on the host
    assert qmodel.quant_config == qc
    # The same codes and scales when a built float model is quantized in place (the JAX path).
    inplace = quantize_model(load_params(config, params, param_dtype=jnp.float32), qc)
    for (path, a), (_, b) in zip(
        flatten_tree(params_of(qmodel)).items(), flatten_tree(params_of(inplace)).items(), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a).astype(np.float32), np.asarray(b).astype(np.float32), path)
    kernels = [v for p, v in flatten_tree(params_of(qmodel)).items() if p[-1] in ("kernel", "lm_head")]
    assert all(np.asarray(k).dtype == (np.int8 if mode == "int8" else jnp.int4) for k in kernels)
    assert len(kernels) == 7 * (1 if scan else config.text.n_layers) + (not config.text.tie_embeddings)

    tokens = _tokens(config.text.vocab_size, 2, 48, seed=3)
    got = np.asarray(forward(qmodel, jnp.asarray(tokens))[0])
    ref = reference_model(config, qmodel)
    want = np.asarray(forward(ref, jnp.asarray(tokens))[0])
    assert_rounding_close(got, want)
    # Quantization did change the model (the reference is not just the float model).
    float_logits = np.asarray(forward(load_params(config, params, param_dtype=jnp.float32), jnp.asarray(tokens))[0])
    assert float(np.abs(float_logits - want).max()) > 100 * REL * float(np.abs(want).max())

    # HF transformers with the dequantized weights (exported with our HF key names) agrees as well.
    deq = dequantized_tree(params_of(qmodel))
    if scan:
        from llama32_jax.models.text import unstack_layers

        deq = unstack_layers(deq)
    sd = state_dict_from_params(config.replace(scan_layers=False), deq, "hf")
    hf = hf_llama(config.text, seed=0)
    missing, unexpected = hf.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"} and (config.text.tie_embeddings or not missing)
    if config.text.tie_embeddings:
        hf.tie_weights()
    hf_logits = torch_logits(hf, tokens)
    err = float(np.abs(got - hf_logits).max())
    print(f"[quantized {mode} vs HF] max |dlogit| = {err:.3g}")
    assert err <= HF_TOL
    assert float(np.abs(torch_logits(hf_ref, tokens) - hf_logits).max()) > 100 * HF_TOL  # HF saw the new weights


def test_skip_head_keeps_the_head_float_and_exact(hf_text):
    _, params = hf_text[UNTIED.name]
    qc = QuantConfig("int8", skip=("head",))
    qmodel = load_params(UNTIED, params, param_dtype=jnp.float32, quant=qc)
    assert qmodel.head_quant is None and qmodel.lm_head_scale is None
    assert qmodel.lm_head.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(qmodel.lm_head[...]), np.asarray(params["lm_head"]))
    assert qmodel.layers[0].feed_forward.w1.kernel.dtype == jnp.int8
    tokens = jnp.asarray(_tokens(UNTIED.text.vocab_size, 1, 20, seed=4))
    assert_rounding_close(forward(qmodel, tokens)[0], forward(reference_model(UNTIED, qmodel), tokens)[0])


def test_int4_group_that_does_not_divide_names_the_shape_and_changes_nothing():
    model = init_model(TEXT, param_dtype=jnp.float32, seed=1)
    before = jax.tree.map(np.asarray, params_of(model))
    with pytest.raises(QuantizationError, match=r"group size 128 does not divide the input dimension 64 .*shape \("):
        quantize_model(model, QuantConfig("int4", 128))
    after = params_of(model)
    assert jax.tree.structure(after) == jax.tree.structure(before)
    jax.tree.map(np.testing.assert_array_equal, after, before)
    assert model.quant_config is None
    assert all(getattr(n, "quant", None) is None for _, n in nnx.iter_graph(model))
    # The scanned layout (checked on the abstract model): the message names the stacked [L, ...] kernel.
    with pytest.raises(QuantizationError, match=r"of a weight of shape \(2, \d+, \d+"):
        abstract_model(TEXT.replace(scan_layers=True), param_dtype=jnp.float32, quant=QuantConfig("int4", 128))


# --------------------------------------------------------------------------------------------- generation


@pytest.mark.parametrize("mode", list(MODES))
def test_greedy_generation_and_pallas_equal_the_reference(hf_text, mode):
    _, params = hf_text[UNTIED.name]
    qmodel = load_params(UNTIED, params, param_dtype=jnp.float32, quant=MODES[mode])
    ref = reference_model(UNTIED, qmodel)
    prompts = [list(range(5, 25)), [7, 300, 41], list(range(100, 133))]
    want = Model(ref).generate(prompts, max_new_tokens=8, return_details=True)
    got = Model(qmodel).generate(prompts, max_new_tokens=8, return_details=True)
    assert [c.tokens for c in got] == [c.tokens for c in want]
    assert len({tuple(c.tokens) for c in got}) == 3  # not a degenerate model

    if mode != "int8":
        return
    # The Pallas attention kernels (interpreted on CPU) on the quantized model: the same logits.
    ids = jnp.asarray(_tokens(UNTIED.text.vocab_size, 2, 40, seed=6))
    xla_logits = forward(qmodel, ids)[0]
    set_attention_impl(qmodel, "pallas")
    np.testing.assert_allclose(np.asarray(forward(qmodel, ids)[0]), np.asarray(xla_logits), atol=1e-5, rtol=0)


def test_llama_guard_moderates_on_a_quantized_model():
    """The hand-wired tiny guard of tests/e2e/test_guard.py, quantized int8 (its head included, 128256 x 64):
    ``moderate`` still returns the typed verdicts (zero ``wo`` / ``w2`` stay exactly zero; the one-hot head rows
    dequantize to ~1, far from every other row's 0)."""
    from llama32_jax.inference.guard import ModerationResult
    from llama32_jax.inputs.tokenizer import LlamaTokenizer
    from tests.e2e.test_guard import _wired_guard

    tok = LlamaTokenizer.default()
    end_header = tok.token_to_id("<|end_header_id|>")
    answer = "\n\nunsafe\nS2"
    guard = _wired_guard([end_header, *tok.encode(answer), tok.token_to_id("<|eot_id|>")])
    model = Model(quantize_model(guard.module, QuantConfig("int8")), guard.tokenizer)
    assert model.module.lm_head.dtype == jnp.int8 and model.module.head_quant == ("int8", 0)
    result = model.moderate([{"role": "user", "content": "How do I whisk eggs?"}])
    assert isinstance(result, ModerationResult)
    assert (result.safe, result.categories, result.role, result.raw) == (False, ("S2",), "User", answer)


# --------------------------------------------------------------------------------------------- vision


@pytest.fixture(scope="module")
def vision_params():
    """Seeded noise of std 0.08 on every weight (norm weights around 1) like the text references, the tanh gates
    opened to 0.6 (zero at init), so the images and the quantized tower move the logits."""
    rng = np.random.default_rng(2)

    def fill(path, spec):
        names = "/".join(str(p) for p in path)
        if "gate" in str(path[-1]):
            return np.full(spec.shape, 0.6, np.float32)
        noise = rng.standard_normal(spec.shape).astype(np.float32)
        return 1.0 + 0.2 * noise if "norm" in names else 0.08 * noise

    state = nnx.to_pure_dict(nnx.state(abstract_model(VISION, param_dtype=jnp.float32), nnx.Param))
    return jax.tree_util.tree_map_with_path(lambda path, x: fill([getattr(p, "key", p) for p in path], x), state)


@pytest.fixture(scope="module")
def images():
    s = VISION.vision.image_size
    rng = np.random.default_rng(5)
    return [[rng.integers(0, 256, (2 * s, s, 3), dtype=np.uint8)], [rng.integers(0, 256, (s, 3 * s, 3), np.uint8)]]


def _vision_prompts(config):
    img = config.image_token_id
    return [[3, 4, img, 5, 17, 300, 9, 40, 41], [img, *range(40, 60), 100, 7]]


def _vision_logits(model, prompts, images):
    length = max(len(p) for p in prompts)
    ids = np.array([[*p, *[0] * (length - len(p))] for p in prompts])
    return Model(model).logits(ids, images=images)


@pytest.mark.parametrize(("mode", "scan"), [("int8", False), ("int4", True)], ids=["int8-unrolled", "int4-scanned"])
def test_vision_logits_equal_the_dequantized_reference(vision_params, images, mode, scan):
    config = VISION.replace(scan_layers=scan)
    qmodel = load_params(config, vision_params, param_dtype=jnp.float32, quant=MODES[mode])
    flat = flatten_tree(params_of(qmodel))
    ints = {str(p[0]) for p, v in flat.items() if jnp.issubdtype(v.dtype, jnp.integer)}
    assert ints == {"layers", "cross_layers", "lm_head", "vision", "projector"}
    prompts = _vision_prompts(config)
    got = _vision_logits(qmodel, prompts, images)
    want = _vision_logits(reference_model(config, qmodel), prompts, images)
    assert_rounding_close(got, want)


def test_vision_skip_keeps_the_tower_float_and_exact(vision_params):
    qc = QuantConfig("int8", skip=("vision",))
    qmodel = load_params(VISION, vision_params, param_dtype=jnp.float32, quant=qc)
    got, given = flatten_tree(params_of(qmodel)), flatten_tree(vision_params)
    tower = [p for p in given if str(p[0]) in ("vision", "projector")]
    assert len(tower) > 20
    for path in tower:
        assert got[path].dtype == jnp.float32, path
        np.testing.assert_array_equal(np.asarray(got[path]), np.asarray(given[path]), str(path))
    assert not any(
        str(p[0]) in ("vision", "projector") and str(p[-1]).endswith("_scale") for p in got if got[p] is not None
    )
    # The decoder and its cross-attention blocks and the head are quantized.
    quantized = [p for p in got if jnp.issubdtype(got[p].dtype, jnp.integer)]
    assert any(str(p[0]) == "cross_layers" for p in quantized) and ("lm_head",) in [
        tuple(map(str, p)) for p in quantized
    ]
