"""bench_kernels' implementations and sections: ours, cuDNN, ``jax.nn`` XLA, our XLA reference and tokamax for each
of ``flash`` / ``flash_bwd``, ``decode`` and ``cross``, and the shapes each section sweeps
(``experiments/bench_kernels.py`` describes them)."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench_kernels_measure import (
    BSNH,
    Bench,
    Config,
    Impl,
    Inputs,
    as_tuple,
    error_text,
    print_header,
    random_normals,
)
from llama32_jax.nn import attention as reference

DECODE_MODELS = {"1B": (32, 8, 64), "3B": (24, 8, 128)}  # (query heads, kv heads, head_dim)


def ours_detail() -> str:
    from llama32_jax.kernels import resolve_backend, resolve_interpret

    backend = resolve_backend(None)
    return f"pallas, {backend} flavour" + (", interpreted" if resolve_interpret(None, backend) else "")


# ------------------------------------------------------------------------------------------------ implementations


def _ours(op_name: str) -> tuple[Callable | None, str]:
    """Our op from ``llama32_jax.kernels.<op_name>``, or None and why not."""
    try:
        module = __import__(f"llama32_jax.kernels.{op_name}", fromlist=[op_name])
        return getattr(module, op_name), ""
    except Exception as e:
        return None, f"unavailable: {error_text(e)}"


def _tokamax() -> tuple[Callable | None, str]:
    """tokamax's attention entry point (found by introspection), or None and why not."""
    try:
        import tokamax
    except Exception as e:
        return None, f"unavailable: {error_text(e)}"
    for name in ("dot_product_attention", "attention", "flash_attention"):
        fn = getattr(tokamax, name, None)
        if callable(fn):
            return fn, f"tokamax.{name} {getattr(tokamax, '__version__', '')}".strip()
    names = [n for n in dir(tokamax) if "attention" in n.lower()]
    return None, f"unavailable: no attention entry point in tokamax (attention names: {names})"


def _jax_nn(implementation: str, **kwargs) -> Callable:
    def fn(q, k, v, *extra):
        return jax.nn.dot_product_attention(q, k, v, implementation=implementation, **kwargs)

    return fn


def _from_bsnh(out) -> tuple:
    """Gradients (dq [B, T, N, H], dk / dv [B, S, K, H]) -> the reference's layout."""
    dq, dk, dv = out
    return dq, dk.transpose(BSNH), dv.transpose(BSNH)


def flash_impls(cfg: Config, *, backward: bool) -> list[Impl]:
    causal = cfg.causal
    impls = []
    op, why = _ours("flash_attention")

    def ours(q, k, v):
        return op(q, k, v, causal=causal, impl="pallas", block_q=cfg.block_q, block_k=cfg.block_k)

    def ref(q, k, v):
        return reference.self_attention(q, k, v, causal=causal)

    cands = {
        "ours": Impl("ours", ours if op else None, detail=ours_detail(), error=why),
        "cudnn": Impl("cudnn", _jax_nn("cudnn", is_causal=causal), layout="bsnh"),
        "jax_xla": Impl("jax_xla", _jax_nn("xla", is_causal=causal), layout="bsnh"),
        "xla_ref": Impl("xla_ref", ref, detail="llama32_jax.nn.attention.self_attention"),
    }
    if not backward:
        fn, detail = _tokamax()
        cands["tokamax"] = Impl(
            "tokamax",
            (lambda q, k, v: fn(q, k, v, is_causal=causal)) if fn else None,
            layout="bsnh",
            detail=detail if fn else "",
            error="" if fn else detail,
        )
    for name in cfg.impls:
        if name not in cands:
            continue
        impl = cands[name]
        if backward and impl.fn is not None:
            impl.fn = _fwd_bwd(impl.fn)
            impl.post = _from_bsnh if impl.layout == "bsnh" else as_tuple
        impl.fn = jax.jit(impl.fn) if impl.fn is not None else None
        impls.append(impl)
    return impls


def _fwd_bwd(attn: Callable) -> Callable:
    def loss(q, k, v, do):
        return jnp.sum(attn(q, k, v).astype(jnp.float32) * do.astype(jnp.float32))

    return jax.grad(loss, argnums=(0, 1, 2))


def attention_inputs(seed: int, shapes: tuple, dtype: str, extra: Callable[[str], tuple] = lambda layout: ()) -> Inputs:
    """Random ``(q, k, v, *rest)`` of ``shapes`` (``k``, ``v`` given as ``[B, K, S, H]``, transposed in the "bsnh"
    layout), then ``extra(layout)``."""

    def make(layout):
        perm = BSNH if layout == "bsnh" else None
        perms = tuple(perm if i in (1, 2) else None for i in range(len(shapes)))
        return lambda: (*random_normals(seed, shapes, dtype, perms), *extra(layout))

    return Inputs({"cache": make("cache"), "bsnh": make("bsnh")})


# ------------------------------------------------------------------------------------------------ sections


def bench_flash(bench: Bench, *, backward: bool) -> None:
    cfg = bench.cfg
    section = "flash_bwd" if backward else "flash"
    impls = flash_impls(cfg, backward=backward)
    seqs = cfg.bwd_seq_lens if backward else cfg.seq_lens
    print_header(f"{section}: {'forward + backward' if backward else 'forward'}, {cfg.dtype}, causal={cfg.causal}",
                  bandwidth=False)  # fmt: skip
    for g in cfg.gqa:
        for h in cfg.head_dims:
            for s in seqs:
                n = cfg.model_dim // h
                b = max(1, cfg.tokens // s)
                if n % g:
                    print(f"  skip: {n} query heads not a multiple of gqa {g}")
                    continue
                shape = dict(batch=b, q_len=s, kv_len=s, n_heads=n, kv_heads=n // g, head_dim=h)
                shape.update(causal=cfg.causal, dtype=cfg.dtype)
                flops = 4 * b * n * s * s * h * (0.5 if cfg.causal else 1.0) * (3.5 if backward else 1.0)
                shapes = ((b, s, n, h), (b, n // g, s, h), (b, n // g, s, h)) + (((b, s, n, h),) if backward else ())
                inputs = attention_inputs(s, shapes, cfg.dtype)
                bench.group(section, shape, impls, inputs, flops=flops)


def bench_decode(bench: Bench) -> None:
    cfg = bench.cfg
    op, why = _ours("decode_attention")
    num_splits, block_k = cfg.num_splits, cfg.block_k

    def ours(q, k, v, q_offset):
        return op(q, k, v, q_offset=q_offset, impl="pallas", block_k=block_k, num_splits=num_splits)

    def ref(q, k, v, q_offset):
        return reference.self_attention(q, k, v, q_offset=q_offset, causal=True)

    def jax_nn(implementation):
        def fn(q, k, v, q_offset):
            lengths = jnp.full((q.shape[0],), q_offset + 1, jnp.int32)
            return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths, implementation=implementation)

        return fn

    cands = {
        "ours": Impl("ours", ours if op else None, detail=ours_detail(), error=why),
        "cudnn": Impl("cudnn", jax_nn("cudnn"), layout="bsnh", detail="key_value_seq_lengths = q_offset + 1"),
        "jax_xla": Impl("jax_xla", jax_nn("xla"), layout="bsnh", detail="key_value_seq_lengths = q_offset + 1"),
        "xla_ref": Impl("xla_ref", ref, detail="llama32_jax.nn.attention.self_attention"),
    }
    impls = [cands[n] for n in cfg.impls if n in cands]
    for impl in impls:
        impl.fn = jax.jit(impl.fn) if impl.fn is not None else None
    print_header(f"decode: 1 query per sequence, {cfg.dtype}", bandwidth=True)
    itemsize = jnp.dtype(cfg.dtype).itemsize
    for model in cfg.decode_models:
        n, kv, h = DECODE_MODELS[model]
        for b in cfg.decode_batches:
            for s in cfg.decode_lens:
                for fill in cfg.decode_fills:
                    q_offset = s // 2 - 1 if fill == "half" else s - 1
                    visible = q_offset + 1
                    shape = dict(model=model, batch=b, q_len=1, kv_len=s, n_heads=n, kv_heads=kv, head_dim=h)
                    shape.update(fill=fill, q_offset=q_offset, dtype=cfg.dtype)
                    bench.group(
                        "decode",
                        shape,
                        impls,
                        attention_inputs(
                            s,  # the seed: the same cache for both fills
                            ((b, 1, n, h), (b, kv, s, h), (b, kv, s, h)),
                            cfg.dtype,
                            lambda layout, q_offset=q_offset: (jnp.int32(q_offset),),
                        ),
                        flops=4 * b * n * visible * h,
                        kv_bytes=2 * b * kv * visible * h * itemsize,
                    )


def cross_tile_mask(b: int, t: int, images: int, tiles: int) -> np.ndarray:
    """The realistic Mllama mask ``[B, T, I, R]``: image i of sequence b has ``tiles - (b + i) % tiles`` valid tiles;
    rows before T/8 see nothing; rows from image i's position to the next image's see image i, and the last image
    is seen to the end (so a one-row call sees the last image)."""
    mask = np.zeros((b, t, images, tiles), bool)
    starts = [int(t * (0.125 + 0.875 * i / images)) for i in range(images)] + [t]
    for bi in range(b):
        for i in range(images):
            valid = tiles - (bi + i) % tiles
            mask[bi, starts[i] : starts[i + 1], i, :valid] = True  # empty if the next image starts on the same row
    return mask


def bench_cross(bench: Bench) -> None:
    cfg = bench.cfg
    n, kv, h = 32, 8, 128  # Llama 3.2 11B-Vision's text attention
    p, r = cfg.tokens_per_tile, cfg.tiles
    op, why = _ours("cross_attention")
    block_q, block_k = cfg.block_q, cfg.block_k

    def ours(q, k, v, tile_mask, token_mask):
        return op(q, k, v, tile_mask, tokens_per_tile=p, impl="pallas", block_q=block_q, block_k=block_k)

    def ref(q, k, v, tile_mask, token_mask):
        return reference.cross_attention(q, k, v, tile_mask, tokens_per_tile=p)

    def cudnn(q, k, v, tile_mask, token_mask):
        return jax.nn.dot_product_attention(q, k, v, mask=token_mask[:, None], implementation="cudnn")

    cands = {
        "ours": Impl("ours", ours if op else None, detail=ours_detail(), error=why),
        "cudnn": Impl("cudnn", cudnn, layout="bsnh", detail="dense token mask [B, 1, T, N_v] as mask="),
        "xla_ref": Impl("xla_ref", ref, detail="llama32_jax.nn.attention.cross_attention (builds the token mask)"),
    }
    impls = [cands[name] for name in cfg.impls if name in cands]
    for impl in impls:
        impl.fn = jax.jit(impl.fn) if impl.fn is not None else None
    print_header(f"cross: Mllama text over images x {r} tiles x {p} tokens, {cfg.dtype}", bandwidth=True)
    itemsize = jnp.dtype(cfg.dtype).itemsize
    for b in cfg.cross_batches:
        for images in cfg.cross_images:
            for t in cfg.cross_text:
                nv = images * r * p
                tile_mask = cross_tile_mask(b, t, images, r)
                token_mask = np.repeat(tile_mask.reshape(b, t, images * r), p, axis=-1)  # [B, T, N_v]
                seen_tokens = int(tile_mask.sum()) * p  # over (b, t) rows
                read_tokens = int(tile_mask.any(axis=1).sum()) * p  # tiles some row of the sequence sees

                shape = dict(batch=b, q_len=t, kv_len=nv, n_heads=n, kv_heads=kv, head_dim=h, images=images)
                shape.update(tiles=r, tokens_per_tile=p, visible_fraction=round(seen_tokens / (b * t * nv), 4))
                shape["dtype"] = cfg.dtype
                bench.group(
                    "cross",
                    shape,
                    impls,
                    attention_inputs(
                        t,  # the seed
                        ((b, t, n, h), (b, kv, nv, h), (b, kv, nv, h)),
                        cfg.dtype,
                        lambda layout, tm=tile_mask, dense=token_mask: (
                            jnp.asarray(tm),
                            jnp.asarray(dense) if layout == "bsnh" else None,  # only cuDNN takes the dense mask
                        ),
                    ),
                    flops=4 * n * h * seen_tokens,
                    kv_bytes=2 * kv * read_tokens * h * itemsize,
                    rows_seen=tile_mask.any(axis=(2, 3)),
                )
