"""The dimension letters of every einsum string and shape comment, and the logical axis names.

Einsum strings give each operand axis one lower-case letter, always with the meaning below, so that
``"btd,ed->bte"`` reads as "activations [batch, query length, model width] times Wq flattened to [heads x head dim,
model width]" (weights keep torch's ``(out, in)`` orientation: :class:`llama32_jax.nn.layers.Einsum`).

======  ==================================================  ===================================================
letter  meaning                                             einsums that use it
======  ==================================================  ===================================================
b       batch                                               every decoder einsum
t       query length (tokens processed in this call)        every decoder einsum
s       key length (cache slots, or T without a cache)      ``btkgh,bksh->bkgts``, ``bkgts,bksh->bkgth``
d       model width (``dim`` / ``hidden_size``)             projections, ``btd,vd->btv``
e       heads x head dim, flattened (N*H or K*H)            ``btd,ed->bte`` (Wq, Wk, Wv), ``bte,de->btd`` (Wo)
k       key/value heads                                     the two attention einsums
g       query heads per key/value head (N / K, GQA)         the two attention einsums
h       head dim                                            the two attention einsums
f       FFN width (``intermediate_size``)                   ``btd,fd->btf`` (w1, w3), ``btf,df->btd`` (w2)
v       vocabulary                                          ``btd,vd->btv`` (the output head)
w       vision width (1280)                                 ``...c,wc->...w`` (patch embedding)
c       unfolded patch features (channels x patch x patch)  ``...c,wc->...w``
i, o    a generic layer's input and output features         ``...i,oi->...o`` (vision Linear), LoRA
r       LoRA rank                                           ``...i,ri->...r``, ``...r,or->...o``, ``...or,...ri->...oi``
======  ==================================================  ===================================================

Shape comments and docstrings (``[B, T, N, H]``) use the upper-case letters with the same meanings for ``B T S D K
G H F V W``, and these axes that no einsum spells: ``N`` query heads (projections produce ``[B, T, N, H]`` by
reshaping ``e``), ``L`` layers and ``C`` cross-attention blocks (stacked-parameter axes), ``I`` images per sample,
``R`` tiles per image, ``P`` tokens per tile (1601 = 40 x 40 patches + CLS), ``N_v = I*R*P`` vision tokens.

Logical axis names are attached to every parameter (``nnx.Param(..., axes=(...))``) and to the caches; a
sharding plan maps them onto mesh axes (see ``llama32_jax.sharding``).
"""

# Parameter axes.
LAYERS = "layers"
VOCAB = "vocab"
EMBED = "embed"
Q_HEADS = "q_heads"
KV_HEADS = "kv_heads"
HEAD_DIM = "head_dim"
MLP = "mlp"
GATE = "gate"  # the one-element tanh gates of the vision models (never sharded)
LORA_RANK = "lora_rank"  # the rank axis of LoRA adapters (llama32_jax.training.lora; small, never sharded)

# Activation / cache axes.
BATCH = "batch"
SEQ = "seq"
CACHE_SEQ = "cache_seq"

PARAM_AXES = (LAYERS, VOCAB, EMBED, Q_HEADS, KV_HEADS, HEAD_DIM, MLP, GATE, LORA_RANK)

# Logical axis names of the vision parameters (llama32_jax.models.vision). The projector's output axis is the text
# width, EMBED.
VISION_EMBED = "vision_embed"  # W
VISION_HEADS = "vision_heads"  # attention heads
VISION_HEAD_DIM = "vision_head_dim"  # W / heads
VISION_MLP = "vision_mlp"  # MLP width
PATCH = "vision_patch"  # C * p * p, one unfolded patch
TILE_TOKENS = "vision_tokens"  # P, tokens per tile
TILES = "vision_tiles"  # R, tile slots per image
ASPECT_RATIOS = "vision_aspect_ratios"  # R+1 rows of the per-aspect-ratio tables (row 0: padding image)
VISION_FEATURES = "vision_features"  # W * (len(intermediate_layers) + 1), the projector's input
VISION_GATE = "vision_gate"  # the single element of a tanh gate

VISION_PARAM_AXES = (
    VISION_EMBED,
    VISION_HEADS,
    VISION_HEAD_DIM,
    VISION_MLP,
    PATCH,
    TILE_TOKENS,
    TILES,
    ASPECT_RATIOS,
    VISION_FEATURES,
    VISION_GATE,
)
