"""quantize / dequantize / qlinear against an independent numpy statement of the format, and QuantConfig errors.

The reference below is written from the format's definition (llama32_jax.quant.config.QuantConfig's docstring),
not from the implementation: int8 per output channel, ``s = max|w| / 127`` over the channel's inputs,
``q = clip(round_half_even(w / s), -127, 127)``; int4 per ``group`` consecutive inputs of a channel,
``s = max|w| / 7`` over the group, ``q = clip(round_half_even(w / s), -8, 7)``; both in fp32 (a bf16 weight is
widened exactly first). An all-zero channel or group quantizes to zeros (its scale is any positive number).
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from llama32_jax.errors import QuantizationError
from llama32_jax.quant import QuantConfig, dequantize, qlinear, quantize, resolve_quantize, scale_axes, scale_shape
from llama32_jax.quant import arrays as quant_arrays
from llama32_jax.quant.config import SKIPPABLE

U = 2.0**-24  # fp32 unit roundoff


def ref_quantize(w: np.ndarray, n_in: int, mode: str, group: int) -> tuple[np.ndarray, np.ndarray]:
    """The format by its definition, in numpy fp32: ``(q as int8 values, scale)``."""
    w = np.asarray(w).astype(np.float32)
    out = w.shape[: w.ndim - n_in]
    n = math.prod(w.shape[w.ndim - n_in :])
    if mode == "int8":
        blocks, qmax, qmin = w.reshape(*out, 1, n), 127, -127
    else:
        blocks, qmax, qmin = w.reshape(*out, n // group, group), 7, -8
    amax = np.abs(blocks).max(axis=-1)
    scale = amax / np.float32(qmax)  # fp32 / fp32: one correctly rounded division
    safe = np.where(amax > 0, scale, np.float32(1.0)).astype(np.float32)
    q = np.clip(np.rint(blocks / safe[..., None]), qmin, qmax).astype(np.int8)  # rint: half to even
    scale = scale[..., 0] if mode == "int8" else scale
    return q.reshape(w.shape), scale.astype(np.float32)


def ref_dequantize(q: np.ndarray, scale: np.ndarray, n_in: int, mode: str, group: int) -> np.ndarray:
    q = np.asarray(q).astype(np.int8).astype(np.float32)
    out = q.shape[: q.ndim - n_in]
    n = math.prod(q.shape[q.ndim - n_in :])
    s = np.asarray(scale, np.float32)
    blocks = q.reshape(*out, 1, n) if mode == "int8" else q.reshape(*out, n // group, group)
    s = s[..., None] if mode == "int8" else s
    return (blocks * s[..., None]).reshape(q.shape)


def _weights(shape, seed=0, dtype=np.float32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # Heavy-tailed, with a few outliers and exact ties at half-steps, so clipping and rounding both matter.
    w = rng.standard_t(3, size=shape).astype(np.float32) * 0.05
    return w.astype(dtype)


CASES = [  # (shape, n_in, mode, group)
    ((24, 64), 1, "int8", 0),
    ((24, 64), 1, "int4", 16),
    ((24, 64), 1, "int4", 64),
    ((3, 8, 4, 32), 1, "int8", 0),  # stacked [L, heads, H, D] (HeadsProjection in the scanned layout)
    ((3, 8, 4, 32), 1, "int4", 8),
    ((32, 4, 8), 2, "int8", 0),  # MergeHeadsProjection [D, heads, H]: two input axes
    ((32, 4, 8), 2, "int4", 16),  # groups of 16 span two heads' worth of the flattened input
    ((2, 32, 4, 8), 2, "int4", 32),  # stacked, two input axes
]


def _int8_values(q) -> np.ndarray:
    return np.asarray(q).astype(np.int8)


@pytest.mark.parametrize(("shape", "n_in", "mode", "group"), CASES)
def test_quantize_matches_the_definition(shape, n_in, mode, group):
    w = _weights(shape, seed=len(shape) + n_in)
    want_q, want_s = ref_quantize(w, n_in, mode, group)
    q, s = quantize(w, n_in, mode, group)
    assert isinstance(q, np.ndarray) and isinstance(s, np.ndarray)
    assert q.shape == shape and q.dtype == (np.int8 if mode == "int8" else ml_dtypes.int4)
    assert s.dtype == np.float32 and s.shape == scale_shape(shape, n_in, mode, group) == want_s.shape
    np.testing.assert_array_equal(s, want_s)
    np.testing.assert_array_equal(_int8_values(q), want_q)
    # Every code is used as the format says: +-qmax reached (each block's largest |w|), -8 never produced in int4.
    qmax = 127 if mode == "int8" else 7
    assert np.abs(_int8_values(q)).max() == qmax and _int8_values(q).min() >= -qmax
    np.testing.assert_array_equal(
        dequantize(q, s, n_in, mode, group), ref_dequantize(want_q, want_s, n_in, mode, group)
    )


@pytest.mark.parametrize(("shape", "n_in", "mode", "group"), CASES)
def test_numpy_and_jax_paths_are_identical(shape, n_in, mode, group):
    w = _weights(shape, seed=7)
    qn, sn = quantize(w, n_in, mode, group)
    qj, sj = quantize(jnp.asarray(w), n_in, mode, group)
    assert isinstance(qj, jax.Array) and isinstance(sj, jax.Array)
    assert qj.dtype == (jnp.int8 if mode == "int8" else jnp.int4)
    np.testing.assert_array_equal(np.asarray(sj), sn)
    np.testing.assert_array_equal(_int8_values(qj), _int8_values(qn))
    qjit, sjit = jax.jit(quantize, static_argnums=(1, 2, 3))(jnp.asarray(w), n_in, mode, group)
    np.testing.assert_array_equal(np.asarray(sjit), sn)
    np.testing.assert_array_equal(_int8_values(qjit), _int8_values(qn))
    np.testing.assert_array_equal(
        np.asarray(dequantize(qj, sj, n_in, mode, group)), dequantize(qn, sn, n_in, mode, group)
    )


@pytest.mark.parametrize(("shape", "n_in", "mode", "group"), CASES)
def test_round_trip_error_is_at_most_half_a_step(shape, n_in, mode, group):
    """``|w - dequantize(quantize(w))| <= s / 2`` for every element (its own block's scale s). The slack covers the
    two fp32 roundings (``w / s``, at most ``qmax`` in magnitude, and ``q * s``): ``2 * qmax * u`` steps."""
    w = _weights(shape, seed=11)
    q, s = quantize(w, n_in, mode, group)
    back = dequantize(q, s, n_in, mode, group)
    step = ref_dequantize(np.ones(shape, np.int8), s, n_in, mode, group)  # each element's own scale
    qmax = 127 if mode == "int8" else 7
    assert np.all(np.abs(w - back) <= step * (0.5 + 2 * qmax * U))
    # ... and it is not trivially small: some element is off by more than a tenth of its step.
    assert np.any(np.abs(w - back) > 0.1 * step)


def test_half_steps_round_to_even():
    """Values exactly half-way between two codes go to the even code (the max element fixes s = 1 exactly)."""
    w = np.array([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5]], np.float32)
    q, s = quantize(w, 1, "int8", 0)
    assert s.tolist() == [1.0]
    assert _int8_values(q).tolist() == [[127, 0, 2, 2, 0, -2, -2, 126]]
    w4 = np.array([[7.0, 0.5, 1.5, 2.5, 3.5, -0.5, -1.5, -6.5]], np.float32)
    q4, s4 = quantize(jnp.asarray(w4), 1, "int4", 8)
    assert np.asarray(s4).tolist() == [[1.0]]
    assert _int8_values(q4).tolist() == [[7, 0, 2, 2, 4, 0, -2, -6]]


@pytest.mark.parametrize("xp", [np, jnp], ids=["numpy", "jax"])
def test_zero_rows_and_groups_quantize_to_zero(xp):
    w = _weights((6, 32), seed=3)
    w[2] = 0.0  # a whole channel
    w[4, 8:16] = 0.0  # one int4 group of 8
    for mode, group in (("int8", 0), ("int4", 8)):
        q, s = quantize(xp.asarray(w), 1, mode, group)
        s, qi = np.asarray(s), _int8_values(q)
        assert np.all(np.isfinite(s)) and np.all(s > 0)
        assert not qi[2].any()
        np.testing.assert_array_equal(np.asarray(dequantize(q, s, 1, mode, group))[2], 0.0)
        if mode == "int4":
            assert not qi[4, 8:16].any() and qi[4, :8].any()
        want_q, _ = ref_quantize(w, 1, mode, group)
        np.testing.assert_array_equal(qi, want_q)


@pytest.mark.parametrize("mode,group", [("int8", 0), ("int4", 16)])
def test_bf16_weights_are_quantized_from_their_exact_fp32_values(mode, group):
    w = _weights((16, 64), seed=5, dtype=ml_dtypes.bfloat16)
    want_q, want_s = ref_quantize(w.astype(np.float32), 1, mode, group)
    for given in (w, jnp.asarray(w, jnp.bfloat16)):
        q, s = quantize(given, 1, mode, group)
        assert np.asarray(s).dtype == np.float32
        np.testing.assert_array_equal(np.asarray(s), want_s)
        np.testing.assert_array_equal(_int8_values(q), want_q)
    back = dequantize(q, s, 1, mode, group, dtype=jnp.bfloat16)
    assert back.dtype == jnp.bfloat16
    want = ref_dequantize(want_q, want_s, 1, mode, group).astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(np.asarray(back), want)


def test_stacked_kernels_equal_per_layer_quantization():
    w = _weights((3, 12, 48), seed=9)
    for mode, group in (("int8", 0), ("int4", 16)):
        q, s = quantize(w, 1, mode, group)
        for layer in range(3):
            ql, sl = quantize(w[layer], 1, mode, group)
            np.testing.assert_array_equal(_int8_values(q)[layer], _int8_values(ql))
            np.testing.assert_array_equal(s[layer], sl)


def test_scale_axes_follow_the_kernel():
    axes = ("layers", "embed", "q_heads", "head_dim")  # a MergeHeadsProjection-like stacked kernel, n_in = 2
    assert scale_axes(axes, 2, "int8") == ("layers", "embed")
    assert scale_axes(axes, 2, "int4") == ("layers", "embed", "q_heads")
    assert scale_shape((5, 64, 4, 16), 2, "int4", 32) == (5, 64, 2)


# ------------------------------------------------------------------------------------------------ qlinear


@pytest.mark.parametrize("chunking", [True, False])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 64])
@pytest.mark.parametrize(("mode", "group"), [("int8", 0), ("int4", 32)])
def test_qlinear_equals_the_product_with_the_dequantized_weight(rows, mode, group, chunking, monkeypatch):
    """``qlinear(x, q, s) == x @ dequantize(q, s).T`` in fp32, up to the two products' summation rounding:
    the standard bound ``|fl(x.w) - x.w| <= n u sum|x_i w_i|`` for each, so ``2 n u (|x| @ |W|.T)`` (plus the
    scale's one multiplication). Where qlinear chunks (one-device CPU; forced on and off here) and chunks of 8
    output channels are allowed, every product takes the chunked branch (5 chunks of 8 channels); without
    chunking, the plain one."""
    n_out, n_in = 40, 96
    w = _weights((n_out, n_in), seed=rows)
    q, s = quantize(jnp.asarray(w), 1, mode, group)
    deq = np.asarray(dequantize(q, s, 1, mode, group))
    x = np.random.default_rng(100 + rows).standard_normal((rows, n_in)).astype(np.float32)

    calls = []
    original = quant_arrays._rows_product

    def counting(x2, q2, *args):
        calls.append((x2.shape[0], q2.shape[0]))
        return original(x2, q2, *args)

    monkeypatch.setattr(quant_arrays, "_rows_product", counting)
    monkeypatch.setattr(quant_arrays, "CPU_CHUNK_BYTES", 4 * n_in * 8)
    monkeypatch.setattr(quant_arrays, "cpu_chunking", lambda: chunking)
    got = np.asarray(qlinear(jnp.asarray(x), q, s, mode, group))
    assert calls == [(rows, 8 if chunking else n_out)]

    want = x.astype(np.float64) @ deq.T.astype(np.float64)
    bound = (2 * n_in + 2) * U * (np.abs(x).astype(np.float64) @ np.abs(deq).T.astype(np.float64))
    assert got.shape == (rows, n_out) and got.dtype == np.float32
    assert np.all(np.abs(got - want) <= bound), float(np.max(np.abs(got - want) - bound))
    # The same through jit (the models run it traced) and with leading batch axes [B, T, I].
    jitted = jax.jit(qlinear, static_argnums=(3, 4))(jnp.asarray(x), q, s, mode, group)
    assert np.all(np.abs(np.asarray(jitted) - want) <= bound)
    batched = qlinear(jnp.asarray(x)[None], q, s, mode, group)
    assert batched.shape == (1, rows, n_out)
    np.testing.assert_array_equal(np.asarray(batched)[0], got)


def test_qlinear_out_dtype_and_bf16_inputs():
    w = _weights((16, 32), seed=2)
    q, s = quantize(jnp.asarray(w), 1, "int8", 0)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 32)), jnp.bfloat16)
    assert qlinear(x, q, s, "int8", 0).dtype == jnp.bfloat16
    y = qlinear(x, q, s, "int8", 0, out_dtype=jnp.float32)
    assert y.dtype == jnp.float32
    want = np.asarray(x, np.float64) @ np.asarray(dequantize(q, s, 1, "int8", 0), np.float64).T
    # bf16 operands (int8 codes are exact in bf16), products accumulated at least in bf16's 8-bit precision.
    np.testing.assert_allclose(np.asarray(y), want, rtol=0, atol=2**-7 * float(np.abs(want).max()))


# ------------------------------------------------------------------------------------------------ errors


def test_int4_group_that_does_not_divide_names_the_shape():
    with pytest.raises(QuantizationError, match=r"group size 64 does not divide the input dimension 96.*\(8, 96\)"):
        quantize(np.zeros((8, 96), np.float32), 1, "int4", 64)
    with pytest.raises(QuantizationError, match=r"\(4, 3, 10\)"):
        scale_shape((4, 3, 10), 2, "int4", 8)


def test_int4_needs_a_positive_group():
    for group in (0, -16, None, 8.0):
        with pytest.raises(QuantizationError, match=r"positive int group size, got " + re.escape(repr(group))):
            quantize(np.zeros((8, 16), np.float32), 1, "int4", group)


def test_bad_input_axes_name_the_shape():
    for n_in in (0, 2, -1):
        with pytest.raises(QuantizationError, match=rf"shape \(8, 16\) cannot have {n_in} input axes"):
            quantize(np.zeros((8, 16), np.float32), n_in, "int8", 0)


@pytest.mark.parametrize("fn", ["quantize", "scale_shape", "dequantize", "qlinear"])
def test_unknown_mode_is_refused_by_every_array_function(fn):
    w = np.zeros((8, 16), np.float32)
    calls = {
        "quantize": lambda: quantize(w, 1, "int2", 0),
        "scale_shape": lambda: scale_shape((8, 16), 1, "int2", 0),
        "dequantize": lambda: dequantize(w.astype(np.int8), np.ones(8, np.float32), 1, "int2", 0),
        "qlinear": lambda: qlinear(jnp.ones((1, 16)), jnp.zeros((8, 16), jnp.int8), jnp.ones(8), "int2", 0),
    }
    with pytest.raises(QuantizationError, match=r"mode must be one of \('int8', 'int4'\), got 'int2'"):
        calls[fn]()


@pytest.mark.parametrize("mode", ["int2", "INT8", "", None, 8])
def test_quant_config_bad_mode(mode):
    with pytest.raises(
        QuantizationError, match=r"mode must be one of \('int8', 'int4'\), got " + re.escape(repr(mode))
    ):
        QuantConfig(mode)


@pytest.mark.parametrize("group", [0, 1, 3, 96, -128, True, 128.0, "128", None])
def test_quant_config_bad_group(group):
    with pytest.raises(
        QuantizationError, match=r"group_size must be a power of two >= 2.*got " + re.escape(repr(group))
    ):
        QuantConfig("int4", group)


@pytest.mark.parametrize("skip", ["vision", None, 3, {"vision": 1}])
def test_quant_config_skip_of_the_wrong_type(skip):
    with pytest.raises(QuantizationError, match=r"skip must be a tuple of names from .*got " + re.escape(repr(skip))):
        QuantConfig("int8", skip=skip)


@pytest.mark.parametrize("skip", [("text",), ("vision", "embed"), ("Head",)])
def test_quant_config_unknown_skip_names(skip):
    bad = sorted(set(skip) - set(SKIPPABLE))
    with pytest.raises(QuantizationError, match=re.escape(f"unknown parts {bad!r}; valid: ('vision', 'head')")):
        QuantConfig("int8", skip=skip)


def test_quant_config_normalises_valid_input():
    qc = QuantConfig("int4", 32, ["head", "vision", "head"])
    assert qc.skip == ("vision", "head") and qc.group == 32
    assert QuantConfig("int8", 64).group == 0  # int8 is per channel whatever the group size
    assert QuantConfig.from_json(qc.to_json()) == qc
    assert resolve_quantize(None) is None
    assert resolve_quantize(qc) is qc
    assert resolve_quantize("int8") == QuantConfig("int8")
    assert resolve_quantize({"mode": "int4", "group_size": 64}) == QuantConfig("int4", 64)


@pytest.mark.parametrize(
    ("value", "pattern"),
    [
        ("int3", r"quantize must be one of \('int8', 'int4'\).*got 'int3'"),
        ("", r"quantize must be one of .*got ''"),
        (8, r"quantize must be one of .*got int"),
        (True, r"quantize must be one of .*got bool"),
        (["int8"], r"quantize must be one of .*got list"),
        ({"group_size": 64}, r"takes 'mode' and optionally 'group_size', 'skip'; got keys \['group_size'\]"),
        ({"mode": "int4", "bits": 4}, r"got keys \['bits', 'mode'\]"),
        ({"mode": "int4", "group_size": 48}, r"group_size must be a power of two >= 2 .*got 48"),
        ({"mode": "int5"}, r"mode must be one of .*got 'int5'"),
    ],
)
def test_resolve_quantize_errors_name_the_input(value, pattern):
    with pytest.raises(QuantizationError, match=pattern):
        resolve_quantize(value)


def test_resolve_quantize_uses_the_given_argument_name():
    with pytest.raises(QuantizationError, match=r"^--quantize must be one of"):
        resolve_quantize("int16", name="--quantize")


@pytest.mark.parametrize("record", [{"group_size": 128}, {"mode": "int8", "extra": 1}, ["int8"], "int8"])
def test_malformed_quantization_record(record):
    with pytest.raises(QuantizationError, match=r"malformed quantization record"):
        QuantConfig.from_json(record)
