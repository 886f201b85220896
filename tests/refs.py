"""Helpers that build the reference models (HF transformers, Meta llama-models) on tiny random configs.

These run the references nobody here wrote; the helpers only translate our config into theirs and initialise
their weights with a fixed seed.
"""

from __future__ import annotations

import os

import numpy as np

from llama32_jax.configs import TextConfig


def hf_rope_parameters(t: TextConfig) -> dict:
    """transformers' ``rope_parameters`` for our text config (llama3 scaling, or plain RoPE)."""
    if t.rope_scaling is None:
        return {"rope_type": "default", "rope_theta": t.rope_theta}
    s = t.rope_scaling
    return {
        "rope_type": "llama3",
        "rope_theta": t.rope_theta,
        "factor": s.factor,
        "low_freq_factor": s.low_freq_factor,
        "high_freq_factor": s.high_freq_factor,
        "original_max_position_embeddings": s.original_max_position_embeddings,
    }


def hf_llama_config(t: TextConfig):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=t.vocab_size,
        hidden_size=t.dim,
        intermediate_size=t.ffn_dim,
        num_hidden_layers=t.n_layers,
        num_attention_heads=t.n_heads,
        num_key_value_heads=t.n_kv_heads,
        head_dim=t.head_dim,
        rms_norm_eps=t.norm_eps,
        max_position_embeddings=t.max_position_embeddings,
        rope_parameters=hf_rope_parameters(t),
        tie_word_embeddings=t.tie_embeddings,
        attn_implementation="eager",
    )


def randomize_(module, seed: int, std: float = 0.08) -> None:
    """Overwrite every parameter with seeded noise (norm weights around 1) so no bug hides behind init values."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if "norm" in name:
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(std * noise)


def hf_llama(t: TextConfig, seed: int = 0):
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(hf_llama_config(t)).eval().to(torch.float32)
    randomize_(model, seed)
    if t.tie_embeddings:
        model.tie_weights()
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model


def init_meta_model_parallel() -> None:
    """Meta's reference needs torch.distributed + fairscale model parallel, even on one CPU process."""
    import torch.distributed as dist
    from fairscale.nn.model_parallel import initialize as fs_init

    if not dist.is_initialized():
        # A file store: no TCP port to collide on when many test workers start at once.
        import tempfile

        store_file = os.path.join(tempfile.mkdtemp(prefix="llama32_jax_dist_"), "store")
        dist.init_process_group("gloo", store=dist.FileStore(store_file, 1), rank=0, world_size=1)
    if not fs_init.model_parallel_is_initialized():
        fs_init.initialize_model_parallel(1)


def meta_params_json(t: TextConfig, multiple_of: int, ffn_dim_multiplier: float | None) -> dict:
    return {
        "dim": t.dim,
        "n_layers": t.n_layers,
        "n_heads": t.n_heads,
        "n_kv_heads": t.n_kv_heads,
        "vocab_size": t.vocab_size,
        "multiple_of": multiple_of,
        "ffn_dim_multiplier": ffn_dim_multiplier,
        "norm_eps": t.norm_eps,
        "rope_theta": t.rope_theta,
        "use_scaled_rope": t.rope_scaling is not None,
    }


def meta_transformer(params: dict, max_seq_len: int, max_batch_size: int, seed: int = 0, tied: bool = False):
    """Meta's reference ``llama_models.llama3.model.Transformer`` with seeded random weights (fp32)."""
    import torch
    from llama_models.llama3.args import ModelArgs
    from llama_models.llama3.model import Transformer

    init_meta_model_parallel()
    args = ModelArgs(**params, max_seq_len=max_seq_len, max_batch_size=max_batch_size)
    torch.manual_seed(seed)
    model = Transformer(args).eval().to(torch.float32)
    randomize_(model, seed)  # its parameters start as uninitialised memory
    if tied:
        with torch.no_grad():
            model.output.weight.copy_(model.tok_embeddings.weight)
    return model


def torch_logits(model, tokens: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model(torch.as_tensor(tokens, dtype=torch.long))
    logits = out.logits if hasattr(out, "logits") else out
    return logits.float().numpy()
