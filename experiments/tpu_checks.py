"""What one compiled step of a Llama 3.2 model under a TPU plan must hold, read from its optimized HLO
(``experiments/hlo_text.py``): the collectives the plan implies, the Pallas kernels, no materialised attention
scores with the kernels; and ``compile_step``, one step of ``experiments.scaling_steps.build`` compiled for a TPU
plan. Used by ``experiments/tpu_models.py`` and ``tests/tpu/test_models_compile.py``.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time

import jax
import jax.numpy as jnp

from experiments.hlo_text import Collective, Module


@dataclasses.dataclass(frozen=True)
class Expected:
    """What one compiled step of a Llama 3.2 model under a pure tensor-parallel plan (``tensor`` ways, optionally
    ``data`` replicas) must contain, derived from the config, the plan and the step's arguments.

    Self-attention layers shard the q/kv heads and the MLP's hidden units over ``tensor`` (Megatron layout): each
    layer's attention output projection and MLP down projection leave per-device partial sums of the ``[B, T, D]``
    residual stream, so each needs one all-reduce over the tensor group, and nothing else does (the cache and the
    cross-attention K/V are split by kv head, as the queries are). The vocab-sharded embedding lookup leaves one
    partial ``[B, T, D]`` per sharded table (masked lookups), all-reduced once; the vocab-sharded output head's
    logits are returned vocab-sharded (``[B, 1, V/tensor]`` per device), with no collective. In training, each
    layer's backward needs the input gradients of its column-parallel projections (q/k/v, and gate/up) summed over
    the tensor group (2 per layer) and, with ``remat="full"``, recomputes the forward up to the MLP input (the
    attention output projection's all-reduce: 1 more); the weight gradients need no cross-shard sum under pure
    tensor parallelism (each device owns its shard's gradient); with ``data`` replicas every trainable parameter
    shard's gradient is summed over the data group once per step, except a tied embedding table's (1B, 3B),
    which XLA:TPU sums twice: its gradient has two parts, the output head's ``dlogits^T @ h`` and the lookup's
    scatter-add, each a partial sum over the data group, and XLA all-reduces each before adding them (observed in
    the compiled program, libtpu 0.0.42.1): one extra table shard per step on the data axis (66 MB per device for
    1B on tpu-v5e-16).
    """

    phase: str
    impl: str
    batch: int  # per device
    length: int  # T: query tokens (1 in decode)
    keys: int  # S: self-attention key slots (cache slots; T in training)
    dim: int
    vocab: int
    heads: int  # query heads per device
    head_dim: int
    tensor: int
    data: int
    groups: int  # scan trip count: layers (text) or cross-attention groups (vision)
    self_per_group: int
    cross_per_group: int  # 0 without images
    vision_tokens: int  # N_v (0 without images)
    embed_tables: int  # vocab-sharded embedding tables
    trainable_elements: int  # per device, train only
    tied_elements: int  # per device: a tied embedding table's shard (0 when untied)
    remat: str


def expected(config, plan, case, step, impl: str) -> Expected:
    """:class:`Expected` for ``case`` (``experiments.scaling_steps.Case``) built as ``step`` under ``plan``."""
    t = config.text
    sizes = dict(zip(plan.mesh_axes, plan.mesh_shape, strict=True))
    tensor, data = sizes.get("tensor", 1), sizes.get("data", 1)
    if set(sizes) - {"tensor", "data"}:
        raise ValueError(f"plan {plan.name}: only tensor/data meshes are modelled here, not {plan.mesh_axes}")
    images = case.images if case.phase != "train" else 0
    if config.is_vision:
        groups = t.n_cross_attention_layers
        self_per_group = t.n_layers // groups
        v = config.vision
        vision_tokens = images * v.max_num_tiles * ((v.image_size // v.patch_size) ** 2 + 1)
    else:
        groups, self_per_group, vision_tokens = t.n_layers, 1, 0
    params = step.args[0]
    tables = 0
    if case.phase != "train":
        for key in ("embed", "learnable_embedding"):
            for leaf in _leaves(params.get(key, {})):
                if leaf.sharding.spec and leaf.sharding.spec[0] is not None:
                    tables += 1
        trainable = 0
    else:
        tables = 1
        trainable = sum(math.prod(x.sharding.shard_shape(x.shape)) for x in _leaves(step.args[0]))
    tied = 0
    if t.tie_embeddings:
        (table,) = _leaves(step.args[0]["embed"]) if case.phase == "train" else _leaves(params["embed"])
        tied = math.prod(table.sharding.shard_shape(table.shape))
    length = 1 if case.phase == "decode" else case.seq_len
    keys = case.seq_len if case.phase == "train" else step.args[2].k.shape[-2]  # cache [L, B, K, S, H]
    return Expected(
        phase=case.phase, impl=impl, batch=case.batch // data, length=length, keys=keys, dim=t.dim,
        vocab=t.vocab_size, heads=t.n_heads // tensor, head_dim=t.head_dim, tensor=tensor, data=data,
        groups=groups, self_per_group=self_per_group, cross_per_group=1 if images else 0,
        vision_tokens=vision_tokens, embed_tables=tables, trainable_elements=trainable, remat=case.remat,
        tied_elements=tied,
    )  # fmt: skip


def _leaves(tree):
    return jax.tree.leaves(tree)


def compile_step(
    model: str, plan_name: str, mesh, impl: str, phase: str, seq_len: int, rows: int, slots: int,
    depth: int | None = None,
):  # fmt: skip
    """Compile one step of ``experiments.scaling_steps.build`` for a TPU plan: ``model`` with scanned layers at
    full depth (or ``depth`` scan units: layers of a text model, 4-self + 1-cross groups of a vision model; the
    widths, heads, vocabulary and vision tower stay), ``rows`` sequences per data replica of ``seq_len`` tokens
    (prefill: ``slots`` more cache slots; vision prefill/decode: one 4-tile image; training: text only,
    ``mode="full"``, ``remat="full"``). Returns ``(compiled, Expected, compile seconds)``."""
    from experiments import scaling_steps
    from llama32_jax import configs, sharding

    plan = sharding.load_plan(plan_name)
    placement = sharding.Placement(plan, mesh)
    config = configs.get_config(model)
    if depth is not None:
        config = scaling_steps.at_depth(config, depth)
    config = config.replace(scan_layers=True)
    data = dict(zip(plan.mesh_axes, plan.mesh_shape, strict=True)).get("data", 1)
    images = 1 if config.is_vision and phase != "train" else 0
    train = phase == "train"
    case = scaling_steps.Case(model, plan_name, rows * data, seq_len, phase, "bfloat16", "scan", images,
                              "full" if train else "", "full" if train else "")  # fmt: skip
    step = scaling_steps.build(config, case, placement, jnp.bfloat16, slots, impl)
    t0 = time.perf_counter()
    compiled = jax.jit(step.fn, donate_argnums=step.donate).trace(*step.args).lower().compile()
    seconds = time.perf_counter() - t0
    return compiled, expected(config, plan, case, step, impl), seconds


def score_tensors(module: Module, e: Expected, keys: int) -> list[str]:
    """Float arrays shaped like one device's attention scores over ``keys`` keys, in any layout XLA picks:
    exactly ``batch x heads x T x keys`` elements, with ``keys`` among their dims (and the query length ``T`` too,
    a second time when it equals ``keys``)."""
    out = set()
    size = e.batch * e.heads * e.length * keys
    for _, a in module.arrays():
        if a.dtype not in ("f32", "bf16", "f16") or math.prod(a.dims) != size or keys not in a.dims:
            continue
        rest = list(a.dims)
        rest.remove(keys)
        if e.length > 1 and e.length not in rest:
            continue
        out.add(str(a))
    return sorted(out)


def check(module: Module, e: Expected) -> list[str]:
    """Every way the compiled program departs from :class:`Expected`; empty when it matches."""
    bad: list[str] = []
    colls = module.collectives()
    act = (e.batch, e.length, e.dim)

    def describe(c: Collective) -> str:
        arrays = " ".join(map(str, c.results))
        return f"{c.kind} {c.name} {arrays} (group {c.group_size}, in {c.computation}, x{c.trips})"

    # Only all-reduces: no all-gather of weights or of the KV cache, no reduce-scatter / all-to-all / permute.
    others = [c for c in colls if c.kind != "all-reduce" and not (e.phase == "train" and e.data > 1
              and c.kind == "reduce-scatter" and c.group_size == e.data)]  # fmt: skip
    bad += [f"unexpected {describe(c)}" for c in others]
    ar = [c for c in colls if c.kind == "all-reduce"]
    tp = [c for c in ar if c.group_size == e.tensor]
    dp = [c for c in colls if e.data > 1 and c.group_size == e.data and c not in tp]
    bad += [f"all-reduce over neither the tensor nor the data group: {describe(c)}" for c in ar if c not in tp + dp]
    # Nothing touches the cache's slots or the logits' vocab (cache: split by kv head; logits: returned sharded).
    for c in colls:
        for a in c.results + c.operands:
            if e.phase != "train" and e.keys in a.dims and e.head_dim in a.dims:
                bad.append(f"collective over a KV-cache-shaped array {a}: {describe(c)}")
            if e.vocab in a.dims or (e.vocab // e.tensor in a.dims and e.phase != "train"):
                bad.append(f"collective over a logits/vocab-shaped array {a}: {describe(c)}")
    if e.phase != "train":
        root = module.computations[module.entry][-1]
        if (e.batch, 1, e.vocab // e.tensor) not in {a.dims for a in root.shapes}:
            bad.append(f"logits not returned vocab-sharded [B, 1, V/{e.tensor}] per device: {root.shapes}")
    # Tensor-parallel all-reduces: per layer inside the scan, the embedding's outside.
    loops = sorted({b for c in tp for b in c.loops[:1]})
    per_loop = {b: [c for c in tp if c.loops[:1] == (b,)] for b in loops}
    outside = [c for c in tp if not c.loops]
    if e.phase == "train":
        want = sorted([2 * e.self_per_group, (3 if e.remat == "full" else 2) * e.self_per_group])
    else:
        want = [2 * e.self_per_group + 2 * e.cross_per_group]
    got = sorted(len(v) for v in per_loop.values())
    if got != want:
        bad.append(f"tensor all-reduces per scanned group: {got} in {len(loops)} loop(s), want {want}")
    for b, cs in per_loop.items():
        if module.trip_counts.get(b) != e.groups:
            bad.append(f"loop {b} runs {module.trip_counts.get(b)} times, want {e.groups}")
        bad += [f"in-loop tensor all-reduce not of [B, T, D] {act}: {describe(c)}" for c in cs
                if [a.dims for a in c.results] != [act]]  # fmt: skip
    if e.phase != "train":
        arrays = [a.dims for c in outside for a in c.results]
        if arrays != [act] * e.embed_tables:
            bad.append(f"outside the scan: all-reduced {arrays}, want {e.embed_tables} embedding partial(s) {act}")
    else:  # forward embedding, head backward, cross-entropy over vocab shards, gradient norms: activations/scalars
        for c in outside:
            for a in c.results:
                if a.dims and a.dims[:2] != (e.batch, e.length):
                    bad.append(f"tensor all-reduce of a non-activation {a} in training: {describe(c)}")
    # Data-parallel gradient sums: every trainable shard once.
    if e.phase == "train" and e.data > 1:
        elements = sum(c.trips * math.prod(a.dims) for c in dp for a in c.results if a.dims)
        want = e.trainable_elements + e.tied_elements
        if elements != want:
            bad.append(
                f"data-group gradient collectives cover {elements} elements per device, want every trainable "
                f"shard once and a tied embedding's twice: {want} = {e.trainable_elements} + {e.tied_elements}"
            )
    elif dp:
        bad += [f"unexpected data-group collective: {describe(c)}" for c in dp]
    # Attention: Pallas kernels (and no score tensor), or XLA's own (with one).
    ks = module.kernels()
    runs: dict[str, int] = {}
    for k in ks:
        base = k.name.rsplit(".", 1)[0] if re.search(r"\.\d+$", k.name) else k.name
        runs[base] = runs.get(base, 0) + math.prod(module.trip_counts.get(b, 1) for b in k.loops)
    layers = e.groups * e.self_per_group
    cross = e.groups * e.cross_per_group
    if e.impl == "xla":
        want_k: dict[str, int] = {}
    elif e.phase == "prefill":
        want_k = {"flash_attention_fwd_tpu": layers}
    elif e.phase == "decode":
        want_k = {"decode_attention_tpu": layers}
    else:
        fwd = 2 if e.remat == "full" else 1
        want_k = {"flash_attention_fwd_tpu": fwd * layers, "flash_attention_dq_tpu": layers,
                  "flash_attention_dkv_tpu": layers}  # fmt: skip
    if cross and e.impl != "xla":
        want_k["cross_attention_fwd"] = cross
    if runs != want_k:
        bad.append(f"Pallas kernel executions per step {runs}, want {want_k}")
    for keys, what in ((e.keys, "self"), (e.vision_tokens, "cross")):
        if not keys:
            continue
        scores = score_tensors(module, e, keys)
        if e.impl != "xla" and scores:
            bad.append(f"{what}-attention score tensors materialised with Pallas: {scores[:4]}")
        if e.impl == "xla" and not scores:
            bad.append(f"no {what}-attention score tensor found in XLA attention (the check would be blind)")
    return bad
