"""Our Pallas attention kernels and their dispatch (docs/design.md §6).

Three ops, one folder each, every folder laid out the same way:

- ``reference.py`` re-exports the op's reference from :mod:`llama32_jax.nn.attention` (the ``"xla"`` implementation;
  never a second copy);
- ``pallas_gpu.py``: the GPU kernel (Pallas, Triton lowering);
- ``pallas_tpu.py``: the TPU kernel (Pallas, Mosaic TPU lowering: a grid over key blocks with VMEM accumulators);
- ``__init__.py``: the op itself, which checks its arguments and dispatches on ``impl``.

``impl`` is ``"auto"`` (Pallas on GPU and TPU, XLA on CPU), ``"xla"`` or ``"pallas"``. ``backend`` picks the
kernel flavour (``"gpu"`` or ``"tpu"``; default: the platform's, and the GPU flavour on CPU), and ``interpret``
runs the kernel in Pallas' interpreter (default: on CPU, where nothing else runs Pallas). Every op and flavour
runs on CPU in interpret mode, which is how CI tests them.

The ops (each imported from its folder, e.g. ``from llama32_jax.kernels.flash_attention import flash_attention``):

- ``flash_attention``: prefill/training attention (causal, GQA, per-sequence valid key ranges) with a
  ``custom_vjp`` backward made of Pallas kernels;
- ``decode_attention``: a few new queries against a long KV cache, split along the key axis;
- ``cross_attention``: Mllama text queries over vision tokens with the per-image, per-tile mask.

The model reaches them through :mod:`llama32_jax.nn.attend`.

May import ``errors``, ``dims`` and ``nn.attention`` (the references); never ``models`` or anything above. Each
op's package imports its Pallas backends on first use (they import the op package back, for shared helpers).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from llama32_jax.configs.base import ATTENTION_IMPLS
from llama32_jax.errors import InvalidInputError

BACKENDS = ("gpu", "tpu")


def platform() -> str:
    """The default JAX backend's platform: ``"cpu"``, ``"gpu"`` or ``"tpu"``."""
    name = jax.default_backend()
    return "gpu" if name in ("gpu", "cuda", "rocm") else name


def resolve_impl(impl: str, target: str | None = None) -> str:
    """``"auto"`` -> ``"pallas"`` on GPU/TPU, ``"xla"`` elsewhere; ``"xla"`` / ``"pallas"`` unchanged.

    ``target``: the platform the op is compiled for when it is not the default backend's (the devices of a mesh
    the model is placed on, e.g. a TPU slice compiled for ahead of time from a CPU host)."""
    if impl not in ATTENTION_IMPLS:
        raise InvalidInputError(f"impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
    if impl == "auto":
        return "pallas" if (target or platform()) in BACKENDS else "xla"
    return impl


def resolve_backend(backend: str | None) -> str:
    """The kernel flavour: ``backend`` if given, else the platform's (the GPU flavour on CPU)."""
    if backend is None:
        return "tpu" if platform() == "tpu" else "gpu"
    if backend not in BACKENDS:
        raise InvalidInputError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    return backend


def resolve_interpret(interpret, backend: str):
    """Interpret mode: as asked, else whenever the platform cannot lower ``backend``'s kernels (e.g. on CPU).

    ``interpret`` may also be a ``pltpu.InterpretParams()``: Pallas' TPU interpreter, which simulates the TPU's
    memory spaces, DMAs and semaphores (and detects races) at 50-100x the cost of ``interpret=True``."""
    if interpret is None:
        return platform() != backend
    return interpret if not isinstance(interpret, (bool, int)) else bool(interpret)


FLOAT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def check_qkv(op: str, q, k, v, keys: str = "S") -> tuple[int, int, int, int, int, int]:
    """Validate an op's ``q [B, T, N, H]`` and ``k, v [B, K, <keys>, H]``; returns ``(B, T, N, H, K, S)``.

    Raises :class:`InvalidInputError` (prefixed with ``op``) for a wrong rank, a dtype other than float32 / bfloat16
    / float16 or not shared by all three, ``k`` and ``v`` of different shapes, a batch or head dim that differs
    from ``q``'s, an empty dimension, or query heads that are not a multiple of the kv heads."""
    kv_layout = f"[B, K, {keys}, H]"
    for name, x in (("q", q), ("k", k), ("v", v)):
        if getattr(x, "ndim", None) != 4:
            layout = "[B, T, N, H]" if name == "q" else kv_layout
            raise InvalidInputError(f"{op}: {name} must be a rank-4 array {layout}, got shape {jnp.shape(x)}")
        if jnp.dtype(x.dtype) not in FLOAT_DTYPES:
            raise InvalidInputError(f"{op}: {name} must be float32, bfloat16 or float16, got {x.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise InvalidInputError(f"{op}: q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape:
        raise InvalidInputError(f"{op}: k {tuple(k.shape)} and v {tuple(v.shape)} must have one shape {kv_layout}")
    b, t, n, h = q.shape
    kb, kv_heads, s, kh = k.shape
    if kb != b or kh != h:
        raise InvalidInputError(
            f"{op}: k/v {tuple(k.shape)} must match q {tuple(q.shape)} in batch (dim 0) and head dim (dim 3)"
        )
    if min(b, t, n, h, kv_heads, s) < 1:
        raise InvalidInputError(f"{op}: empty dimension: q {tuple(q.shape)}, k/v {tuple(k.shape)}")
    if n % kv_heads:
        raise InvalidInputError(
            f"{op}: query heads N={n} (q {tuple(q.shape)}) must be a multiple of kv heads K={kv_heads}"
        )
    return b, t, n, h, kv_heads, s


def mxu_precision(dtype) -> jax.lax.Precision:
    """The explicit precision of a TPU kernel's matmul on ``dtype`` operands: ``HIGHEST`` for fp32 when the session
    asks for full fp32 matmuls (``jax_default_matmul_precision`` "highest" / "float32" / "fp32"), else ``DEFAULT``.

    Never None: a dot without a precision takes the session's default, and Mosaic rejects ``HIGHEST`` (fp32
    contraction) on 16-bit operands ("Bad lhs type") and anything but DEFAULT / HIGHEST; the interpreter accepts
    both, so only the real TPU compile showed it. For 16-bit operands (exact products, fp32 accumulation) the
    precision changes nothing in the result."""
    name = str(jax.config.jax_default_matmul_precision or "").lower()
    full = jnp.dtype(dtype) == jnp.float32 and name in ("highest", "float32", "fp32")
    return jax.lax.Precision.HIGHEST if full else jax.lax.Precision.DEFAULT


VMEM_LANES = 128  # a VMEM tile is (8 * packing) sublanes x 128 lanes of 32-bit words


def vmem_array_bytes(shape: tuple[int, ...], dtype) -> int:
    """The VMEM bytes of one ``shape`` array of ``dtype`` as Mosaic lays it out: the last dim padded to 128 lanes,
    the second-to-last to the sublane tile (8 rows of 32-bit words: 8 for fp32, 16 for bf16), leading dims
    multiplied. A ``(block_q, 1)`` fp32 column takes ``block_q x 128 x 4`` bytes."""
    dtype = jnp.dtype(dtype)
    *lead, rows, cols = (1, *shape) if len(shape) == 1 else shape
    sublanes = 8 * max(1, 4 // dtype.itemsize)
    n = -(-rows // sublanes) * sublanes * (-(-cols // VMEM_LANES) * VMEM_LANES) * dtype.itemsize
    for d in lead:
        n *= d
    return n


def split_blocks(lo, hi, split, *, block_k: int, num_splits: int):
    """The key blocks ``[first, stop)`` that split ``split`` processes (empty when ``stop <= first``).

    The blocks intersecting the key range ``[lo, hi)`` (``0 <= lo <= hi``) are cut into ``num_splits`` contiguous
    runs of ``ceil(n_blocks / num_splits)`` blocks; the last runs may be short or empty. Pure integer arithmetic
    on scalars, so the GPU kernel, the TPU kernel and the TPU index maps all call it on traced values.
    """
    div = jax.lax.div  # truncating = flooring here (everything is >= 0), and cheaper than `//` in the kernels
    first_block = div(lo, block_k)
    stop_block = div(hi + block_k - 1, block_k)
    per = div(jnp.where(hi > lo, stop_block - first_block, 0) + num_splits - 1, num_splits)
    first = first_block + split * per
    return first, jnp.minimum(first + per, stop_block)
