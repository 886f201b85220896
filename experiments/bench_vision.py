"""Llama 3.2 Vision costs: image preprocessing, decode-step compile time and memory, cross-attention K/V reuse.

    .venv/bin/python -m experiments.bench_vision                    # all sections: ~5 min, ~17 GB RAM on 2 cores
    .venv/bin/python -m experiments.bench_vision --sections=compile --compile_dtypes=bfloat16
    .venv/bin/python -m experiments.bench_vision --sections=cross --text_layers=8 --cross_layers=2 --skip_hf

Sections (``--sections``):

- ``preprocess``: ms per image, ours (``llama32_jax.inputs.image.preprocess``) vs transformers'
  ``MllamaImageProcessorPil`` (560 tiles, CLIP mean/std, 4 tiles, bilinear) on scikit-image photos, best of
  ``--preprocess_repeats``. The pixel arrays, aspect-ratio ids and masks are asserted equal first, so both time the
  same work.
- ``compile``: one decode step ``model(tokens [1, 1], cache, cross=CrossInputs, last_only=True)`` of the full-size
  11B / 90B Vision models, scanned vs unrolled decoder, lowered and compiled from abstract shapes only (parameters,
  a ``--context``-slot KV cache, one 4-tile image's cross K/V; nothing allocated), cache donated as in generation.
  Reports lowering / compile seconds and XLA's ``memory_analysis()`` (argument / output / alias / temp bytes).
  XLA:CPU has no bf16 dot: it converts each bf16 weight to an f32 temporary, so bf16 temp bytes here are a CPU
  artefact; ``float32`` is compiled too for comparison. ``cost_analysis()`` counts a scan body once.
- ``cross``: a reduced-depth, full-width 11B (``--text_layers`` / ``--cross_layers``, real vocabulary and widths;
  a vision encoder of ``--vision_layers`` + ``--vision_global_layers`` full-width layers). The encoder's time per
  4-tile image, ours (jit) vs HF ``MllamaVisionModel`` + projector (eager PyTorch, same weights: HF's random init
  converted to ours with the checkpoint key map; outputs compared). Then one decode step (batch 1, ``--cache_len``
  slots half full, that image's 4 x 1601 vision tokens): without images, with cached ``CrossInputs``, and
  recomputing every cross block's K/V inside the step; best and median of ``--steps`` after a compile + warm-up.

Every comparison takes its repeats in turn (ours, HF, ours, ...), so a background load that comes and goes skews
both sides alike; the load average at start and end is recorded.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import statistics
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

import llama32_jax as lj
from experiments import cli
from experiments.results_io import git_commit, machine, write_result
from llama32_jax.models.mllama import CrossInputs, MllamaText
from llama32_jax.nn.cache import KVCache

_SECTIONS = flags.DEFINE_list("sections", ["preprocess", "compile", "cross"], "which measurements to run")
_PHOTOS = flags.DEFINE_list(
    "photos",
    ["astronaut", "camera", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina"],
    "skimage.data photos for the preprocessing section",
)
_PRE_REPEATS = flags.DEFINE_integer("preprocess_repeats", 5, "timed repeats per photo (best reported)")
_MODELS = flags.DEFINE_list("compile_models", ["Llama-3.2-11B-Vision", "Llama-3.2-90B-Vision"], "full-size configs")
_LAYOUTS = flags.DEFINE_list("layouts", ["scanned", "unrolled"], "decoder layouts to compile")
_COMPILE_DTYPES = flags.DEFINE_list("compile_dtypes", ["bfloat16", "float32"], "parameter/cache dtypes to compile")
_CONTEXT = flags.DEFINE_integer("context", 4096, "KV cache slots of the compiled decode step")
_TEXT_LAYERS = flags.DEFINE_integer("text_layers", 4, "reduced model: self-attention layers")
_CROSS_LAYERS = flags.DEFINE_integer("cross_layers", 1, "reduced model: cross-attention layers")
_VISION_LAYERS = flags.DEFINE_integer("vision_layers", 4, "reduced encoder: local layers")
_VISION_GLOBAL = flags.DEFINE_integer("vision_global_layers", 1, "reduced encoder: global (gated) layers")
_VISION_INTER = flags.DEFINE_list("vision_intermediate", ["1", "2", "3"], "reduced encoder: intermediate layers")
_IMAGE = flags.DEFINE_string("image", "hubble_deep_field", "skimage.data photo for the encoder (must give 4 tiles)")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "reduced model's weights (CPU: fp32)")
_CACHE = flags.DEFINE_integer("cache_len", 512, "reduced model: KV cache slots (half full when timing)")
_STEPS = flags.DEFINE_integer("steps", 8, "timed decode steps per variant")
_ENC_REPEATS = flags.DEFINE_integer("encode_repeats", 2, "timed encoder runs (after one warm-up)")
_SKIP_HF = flags.DEFINE_bool("skip_hf", False, "cross section: time our encoder only")
_OUT = flags.DEFINE_string("out", "", "JSON path (default experiments/results/bench_vision_<sections>.json)")

GB = 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _best_interleaved(fns: dict, repeats: int) -> dict:
    """Best time of each function, the repeats taken in turn (a load that drifts hits every function alike)."""
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(_timed(fn))
    return {name: min(t) for name, t in times.items()}


def _photo(name: str):
    import skimage.data
    from PIL import Image

    return Image.fromarray(getattr(skimage.data, name)())


def bench_preprocess() -> dict:
    from PIL import Image
    from transformers import MllamaImageProcessorPil

    from llama32_jax.inputs.image import CLIP_MEAN, CLIP_STD, preprocess

    size, mean, std = {"height": 560, "width": 560}, list(CLIP_MEAN), list(CLIP_STD)
    bilinear = Image.Resampling.BILINEAR
    hf = MllamaImageProcessorPil(size=size, image_mean=mean, image_std=std, max_image_tiles=4, resample=bilinear)
    rows = []
    for name in _PHOTOS.value:
        img = _photo(name)
        ours, theirs = preprocess([[img]]), hf([[img]])
        assert np.array_equal(ours.pixel_values, np.asarray(theirs["pixel_values"])), name
        assert np.array_equal(ours.aspect_ratio_ids, np.asarray(theirs["aspect_ratio_ids"])), name
        assert np.array_equal(ours.aspect_ratio_mask, np.asarray(theirs["aspect_ratio_mask"])), name
        fns = {"ours": lambda img=img: preprocess([[img]]), "hf": lambda img=img: hf([[img]])}
        t_ours, t_hf = _best_interleaved(fns, _PRE_REPEATS.value).values()
        row = dict(photo=name, size_wh=list(img.size), mode=img.mode, tiles=ours.num_tiles[0][0])
        row.update(ours_ms=round(1e3 * t_ours, 2), hf_ms=round(1e3 * t_hf, 2), hf_over_ours=round(t_hf / t_ours, 2))
        rows.append(row)
        print(f"preprocess {name:20s} {row['size_wh']} {img.mode:4s} {row['tiles']} tiles: ours {row['ours_ms']:7.2f}"
              f" ms  HF {row['hf_ms']:7.2f} ms  ({row['hf_over_ours']}x)", flush=True)  # fmt: skip
    total = {k: round(sum(r[k] for r in rows), 2) for k in ("ours_ms", "hf_ms")}
    return {"pixels_equal": True, "photos": rows, "total_ms": total}


def _compile_one(cfg, dtype) -> dict:
    """Lower and compile one decode step of ``cfg`` from abstract shapes; nothing is allocated."""
    t0 = time.perf_counter()
    graphdef, state = nnx.split(lj.abstract_model(cfg, param_dtype=dtype))
    state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    v, ctx = cfg.vision, _CONTEXT.value
    n_vision = v.max_num_tiles * v.tokens_per_tile  # one 4-tile image
    tokens = jax.ShapeDtypeStruct((1, n_vision, cfg.text.dim), dtype)
    kv = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s).vision_kv(x), state, tokens)
    cross = CrossInputs(kv, jax.ShapeDtypeStruct((1, ctx, 1, v.max_num_tiles), jnp.bool_), v.tokens_per_tile)
    cache = jax.eval_shape(lambda: KVCache.init(cfg, 1, ctx, dtype=dtype))
    abstract_s = time.perf_counter() - t0

    def step(state, tok, cache, cross):
        return nnx.merge(graphdef, state)(tok, cache, cross=cross, last_only=True)

    t0 = time.perf_counter()
    lowered = jax.jit(step, donate_argnums=2).lower(state, jax.ShapeDtypeStruct((1, 1), jnp.int32), cache, cross)
    lower_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))  # noqa: E731
    text_state = {k: v for k, v in state.items() if k not in ("vision", "projector")}
    out = dict(abstract_model_s=round(abstract_s, 2), lower_s=round(lower_s, 2), compile_s=round(compile_s, 2))
    sizes = dict(param_GB=state, text_param_GB=text_state, kv_cache_GB=(cache.k, cache.v), cross_kv_GB=kv)
    out.update({k: round(nbytes(tree) / GB, 3) for k, tree in sizes.items()})
    for field in ("argument", "output", "alias", "temp"):
        out[f"{field}_GB"] = round(getattr(mem, f"{field}_size_in_bytes") / GB, 3)
    out["peak_estimate_GB"] = round(out["argument_GB"] + out["output_GB"] - out["alias_GB"] + out["temp_GB"], 3)
    cost = compiled.cost_analysis() or {}
    cost = cost[0] if isinstance(cost, list) else cost
    out["cost_flops_G"] = round(float(cost.get("flops", 0.0)) / 1e9, 2)
    out["cost_bytes_accessed_GB"] = round(float(cost.get("bytes accessed", 0.0)) / GB, 2)
    return out


def bench_compile() -> list[dict]:
    rows = []
    for name in _MODELS.value:
        for dtype_name in _COMPILE_DTYPES.value:
            for layout in _LAYOUTS.value:
                cfg = lj.configs.get_config(name).replace(scan_layers=layout == "scanned")
                row = dict(model=cfg.name, layout=layout, dtype=dtype_name, **_compile_one(cfg, jnp.dtype(dtype_name)))
                rows.append(row)
                print(f"compile {cfg.name:22s} {dtype_name:8s} {layout:8s}: lower {row['lower_s']:5.2f} s, compile "
                      f"{row['compile_s']:6.2f} s | args {row['argument_GB']:7.2f} GB, temp {row['temp_GB']:7.2f} GB, "
                      f"peak ~{row['peak_estimate_GB']:7.2f} GB", flush=True)  # fmt: skip
                gc.collect()
    return rows


def _reduced_config():
    base = lj.configs.LLAMA_3_2_11B_VISION
    text = dataclasses.replace(base.text, n_layers=_TEXT_LAYERS.value, n_cross_attention_layers=_CROSS_LAYERS.value)
    vision = dataclasses.replace(
        base.vision,
        n_layers=_VISION_LAYERS.value,
        n_global_layers=_VISION_GLOBAL.value,
        intermediate_layers=tuple(int(i) for i in _VISION_INTER.value),
    )
    return base.replace(name="11B-Vision-reduced", text=text, vision=vision, scan_layers=False)


def _hf_vision(cfg):
    """HF's vision model + projector at random init (seeded), and the same weights as our VisionTower."""
    import torch
    from transformers import MllamaVisionModel

    from llama32_jax.checkpoint.convert_vision import VisionTensorMapper
    from llama32_jax.models.vision import load_vision_params
    from tests.refs_vision import align_hf_intermediate_layers, hf_mllama_config

    torch.manual_seed(0)
    vision = MllamaVisionModel(hf_mllama_config(cfg).vision_config).eval()
    projector = torch.nn.Linear(cfg.vision.output_dim, cfg.text.dim).eval()
    # transformers 5.x returns layer outputs only, one layer late for Meta's intermediate features (tests/refs_vision)
    shifted = align_hf_intermediate_layers(types.SimpleNamespace(model=types.SimpleNamespace(vision_model=vision)))
    mapper, tree = VisionTensorMapper(cfg, "hf"), {}
    sd = {f"vision_model.{k}": v for k, v in vision.state_dict().items()}
    sd.update({f"multi_modal_projector.{k}": v for k, v in projector.state_dict().items()})
    for key, value in sd.items():
        for path, array in mapper.map(key, value.detach()):
            node = tree
            for part in path[:-1]:
                node = node.setdefault(part, {})
            node[path[-1]] = array
    tower = load_vision_params(cfg, tree, param_dtype=jnp.dtype(_DTYPE.value))
    return vision, projector, tower, shifted


def _time_steps(runs: dict, cache0) -> dict:
    """Decode steps of each variant (``run(cache) -> (logits, cache)``): compile, warm up, then the variants in turn."""
    caches, first, times = {}, {}, {name: [] for name in runs}

    def step(name):
        logits, caches[name] = runs[name](caches[name])
        jax.block_until_ready((logits, caches[name]))

    for name in runs:
        caches[name] = cache0
        first[name] = _timed(lambda name=name: step(name))
        step(name)  # warm-up
    for _ in range(_STEPS.value):
        for name in runs:
            times[name].append(_timed(lambda name=name: step(name)))
    return {
        name: dict(
            ms_min=round(1e3 * min(t), 1),
            ms_median=round(1e3 * statistics.median(t), 1),
            first_call_incl_compile_s=round(first[name], 2),
        )
        for name, t in times.items()
    }


def _encoder(cfg, dtype) -> tuple[dict, jax.Array]:
    """Time the vision tower on one 4-tile photo, ours vs HF; returns the numbers and our vision tokens."""
    import torch

    from llama32_jax.inputs.image import preprocess
    from llama32_jax.models.vision import vision_tokens

    batch = preprocess([[_photo(_IMAGE.value)]], cfg.vision)
    assert batch.num_tiles == [[cfg.vision.max_num_tiles]], f"{_IMAGE.value}: {batch.num_tiles} tiles, want 4"
    pixels, ids = jnp.asarray(batch.pixel_values, dtype), jnp.asarray(batch.aspect_ratio_ids)
    vision, projector, tower, shifted = _hf_vision(cfg)
    enc = {"tower_params_M": round(sum(x.size for x in jax.tree.leaves(nnx.state(tower, nnx.Param))) / 1e6, 1)}
    ours = vision_tokens(tower, pixels, ids)  # compile + warm-up
    ours.block_until_ready()
    fns = {"ours_s": lambda: vision_tokens(tower, pixels, ids).block_until_ready()}
    if not _SKIP_HF.value:
        args = dict(
            pixel_values=torch.from_numpy(batch.pixel_values),
            aspect_ratio_ids=torch.from_numpy(batch.aspect_ratio_ids).long(),
            aspect_ratio_mask=torch.from_numpy(batch.aspect_ratio_mask).long(),
        )

        def hf_run():
            with torch.no_grad():
                return projector(vision(**args).last_hidden_state)

        ref = hf_run().numpy()  # warm-up
        fns["hf_s"] = hf_run
        diff = float(np.abs(np.asarray(ours, np.float32) - ref).max())
        enc.update(max_abs_diff=diff, max_abs_ref=float(np.abs(ref).max()), hf_intermediate_shifted=shifted)
        enc.update(hf_attn=vision.config._attn_implementation, torch_threads=torch.get_num_threads())
    enc.update({k: round(v, 3) for k, v in _best_interleaved(fns, _ENC_REPEATS.value).items()})
    if "hf_s" in enc:
        enc["hf_over_ours"] = round(enc["hf_s"] / enc["ours_s"], 2)
    print(f"encoder (4 tiles): {enc}", flush=True)
    return enc, ours.reshape(1, -1, cfg.text.dim).astype(dtype)  # [1, 4 x 1601, D]


def bench_cross() -> dict:
    cfg, dtype = _reduced_config(), jnp.dtype(_DTYPE.value)
    out = {"config": {"text": dataclasses.asdict(cfg.text), "vision": dataclasses.asdict(cfg.vision)}}
    out["encoder_per_4_tile_image"], vt = _encoder(cfg, dtype)
    gc.collect()
    t0 = time.perf_counter()
    model = MllamaText(cfg, param_dtype=dtype, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    n_params = sum(x.size for x in jax.tree.leaves(state))
    out["text_params_B"] = round(n_params / 1e9, 3)
    print(f"reduced text stack: {n_params / 1e9:.2f} B params {dtype.name}, init {time.perf_counter() - t0:.0f} s")
    p = cfg.vision.tokens_per_tile
    tile_mask = jnp.ones((1, _CACHE.value, 1, cfg.vision.max_num_tiles), bool)
    kv_fn = jax.jit(lambda s, x: nnx.merge(graphdef, s).vision_kv(x))
    kv = jax.block_until_ready(kv_fn(state, vt))
    out["vision_kv_once_ms"] = round(
        1e3 * min(_timed(lambda: jax.block_until_ready(kv_fn(state, vt))) for _ in "abc"), 1
    )
    cross = CrossInputs(kv, tile_mask, p)

    @jax.jit
    def plain(state, tok, cache):
        return nnx.merge(graphdef, state)(tok, cache, last_only=True)

    @jax.jit
    def cached(state, tok, cache, cross):
        return nnx.merge(graphdef, state)(tok, cache, cross=cross, last_only=True)

    @jax.jit
    def recompute(state, tok, cache, vt, tile_mask):
        model = nnx.merge(graphdef, state)
        return model(tok, cache, cross=CrossInputs(model.vision_kv(vt), tile_mask, p), last_only=True)

    tok = jnp.ones((1, 1), jnp.int32)
    cache0 = dataclasses.replace(KVCache.init(cfg, 1, _CACHE.value, dtype=dtype), index=jnp.int32(_CACHE.value // 2))
    assert _STEPS.value + 2 <= _CACHE.value // 2
    runs = {
        "no_image": lambda c: plain(state, tok, c),
        "cached_cross_kv": lambda c: cached(state, tok, c, cross),
        "recompute_cross_kv": lambda c: recompute(state, tok, c, vt, tile_mask),
    }
    steps = _time_steps(runs, cache0)
    cached_ms, recompute_ms = steps["cached_cross_kv"]["ms_min"], steps["recompute_cross_kv"]["ms_min"]
    steps["recompute_over_cached"] = round(recompute_ms / cached_ms, 2)
    steps["recompute_extra_ms_per_cross_layer"] = round((recompute_ms - cached_ms) / cfg.text.n_cross_attention_layers)
    # bytes a step reads: every weight but the embedding tables (one row each is gathered)
    read = n_params - model.embed.embedding.size - model.learnable_embedding.size
    steps["weights_read_per_step_GB"] = round(read * dtype.itemsize / GB, 3)
    steps["cached_weight_GB_per_s"] = round(steps["weights_read_per_step_GB"] / (cached_ms / 1e3), 1)
    out["decode_step"] = steps
    print(f"decode step: {steps}", flush=True)
    return out


def main(argv):
    del argv
    import flax
    import PIL
    import torch
    import transformers

    sections = _SECTIONS.value
    unknown = set(sections) - {"preprocess", "compile", "cross"}
    if unknown:
        raise app.UsageError(f"unknown sections {sorted(unknown)}")
    record = {
        "benchmark": "bench_vision",
        "command": "python -m experiments.bench_vision "
        + " ".join(f.serialize() for f in flags.FLAGS.get_key_flags_for_module(sys.argv[0]) if f.name != "out"),
        "machine": machine(),
        "versions": {m.__name__: m.__version__ for m in (jax, flax, torch, transformers, PIL)},
        "jax_device": jax.devices()[0].device_kind,
        "git": git_commit(),
        "loadavg_1_5_15_at_start": [round(x, 2) for x in os.getloadavg()],  # other work on the cores skews times
    }
    t_all = time.perf_counter()
    if "preprocess" in sections:
        record["preprocess"] = bench_preprocess()
    if "compile" in sections:
        rows = bench_compile()
        record["compile_decode_step"] = {"batch": 1, "context": _CONTEXT.value, "images": "one, 4 tiles", "rows": rows}
    if "cross" in sections:
        record["cross_kv_reuse"] = bench_cross()
    record["total_s"] = round(time.perf_counter() - t_all, 1)
    record["loadavg_1_5_15_at_end"] = [round(x, 2) for x in os.getloadavg()]
    write_result(record, f"bench_vision_{'_'.join(sections)}.json", _OUT.value)


if __name__ == "__main__":
    cli.run(main)
