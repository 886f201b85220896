"""Rotary position embeddings: llama3 frequency scaling, and rotation in the half-split convention.

One internal convention: within each head, the pair rotated together is ``(i, i + head_dim/2)`` ("half-split",
HF's ``rotate_half``), and the rotation is computed in fp32 whatever the activation dtype (Meta's numerics).
Meta's checkpoints rotate adjacent pairs ``(2i, 2i+1)``; :func:`interleaved_to_half_split` permutes the rows of
their ``wq`` / ``wk`` once at load time so that both give identical attention scores (docs/model-facts.md §2.3).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from llama32_jax.configs.base import RopeScaling


def inv_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> np.ndarray:
    """Per-pair inverse frequencies ``[head_dim/2]`` in fp32, with llama3 scaling when given
    (docs/model-facts.md §2.1-2.2).

    Computed in float32 like both references. Bands by wavelength: shorter than
    ``L/high_freq_factor`` unchanged; longer than ``L/low_freq_factor`` divided by ``factor``; in between (both ends
    inclusive) a linear blend.
    """
    f32 = np.float32
    exponents = np.arange(0, head_dim, 2, dtype=f32)[: head_dim // 2] / f32(head_dim)
    inv_freq = (f32(1.0) / np.power(f32(theta), exponents)).astype(f32)
    if scaling is None:
        return inv_freq
    factor = f32(scaling.factor)
    lo, hi = f32(scaling.low_freq_factor), f32(scaling.high_freq_factor)
    old_len = f32(scaling.original_max_position_embeddings)
    low_freq_wavelen = old_len / lo
    high_freq_wavelen = old_len / hi
    wavelen = f32(2 * np.pi) / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq).astype(f32)
    smooth = (old_len / wavelen - lo) / (hi - lo)
    blended = (f32(1) - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(medium, blended, scaled).astype(f32)


def rope_angles(positions: jax.Array, inv_freq: np.ndarray | jax.Array) -> tuple[jax.Array, jax.Array]:
    """``cos, sin`` of ``positions[..., None] * inv_freq`` in fp32: ``[B, T] -> 2 x [B, T, H/2]``."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate ``x [B, T, heads, H]`` by angles ``[B, T, H/2]`` (half-split pairs), in fp32; returns ``x.dtype``."""
    half = x.shape[-1] // 2
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., :half], xf[..., half:]
    c, s = cos[:, :, None, :], sin[:, :, None, :]  # [B, T, 1, H/2], broadcast over heads
    out = jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)
    return out.astype(x.dtype)


def interleaved_to_half_split(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Permute the output rows of a Meta ``wq``/``wk`` weight ``[n_heads*H, in]`` to the half-split convention.

    Within each head, new row ``p*(H/2) + j`` is old row ``2j + p`` (even components first, then odd): the
    same permutation HF's converters apply (docs/model-facts.md §2.3). Works on numpy or torch-like arrays with
    ``reshape`` and ``transpose`` semantics of numpy.
    """
    rows, cols = w.shape
    head_dim = rows // n_heads
    if rows != n_heads * head_dim or head_dim % 2:
        raise ValueError(f"cannot split {rows} rows into {n_heads} heads of even size")
    return w.reshape(n_heads, head_dim // 2, 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def half_split_to_interleaved(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of :func:`interleaved_to_half_split` (our layout back to Meta's)."""
    rows, cols = w.shape
    head_dim = rows // n_heads
    if rows != n_heads * head_dim or head_dim % 2:
        raise ValueError(f"cannot split {rows} rows into {n_heads} heads of even size")
    return w.reshape(n_heads, 2, head_dim // 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)
