"""The dimension-letter table used in every einsum string, and the logical axis names.

Einsum strings in this package spell shapes with these letters, so that ``"btd,dnh->btnh"`` reads as
"activations [batch, query length, model width] times Wq [model width, query heads, head dim]".

==========  =================================================================
letter      meaning
==========  =================================================================
B           batch
T           query length (tokens processed in this call)
S           key length (cache slots, or T when there is no cache)
D           model width (``dim`` / ``hidden_size``)
N           query heads
K           key/value heads
G           query heads per key/value head (N / K, grouped-query attention)
H           head dim
F           FFN width (``intermediate_size``)
V           vocabulary
L           layers (stacked-parameter axis)
I           images per sample (vision)
R           tiles per image (vision)
P           tokens per tile (vision: 1601 = 40 x 40 patches + CLS)
W           vision width (1280)
==========  =================================================================

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
