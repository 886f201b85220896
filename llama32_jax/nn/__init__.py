"""Neural-network building blocks shared by the text and vision models: parameterised layers (``layers``), rotary
embeddings (``rope``), the XLA reference attention (``attention``), the KV cache (``cache``) and the model-side
attention dispatch (``attend``: XLA or the Pallas kernels of ``llama32_jax.kernels``, under ``shard_map`` when the
model is sharded).

May import ``errors``, ``dims``, ``configs``, ``sharding.plan`` / ``sharding.placement`` and ``kernels`` (which in
turn imports ``nn.attention``, the reference its kernels are checked against); never ``models`` or anything above.
"""
