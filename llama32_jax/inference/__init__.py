"""Inference on top of the models: the jitted prefill/decode loop with sampling and stop tokens (``generate``),
Llama Guard moderation prompts and verdicts (``guard``), and streaming detokenisation (``text_stream``).

May import everything below it (``errors``, ``dims``, ``configs``, ``sharding``, ``nn``, ``kernels``, ``inputs``,
``models``, ``checkpoint``); never ``training`` or ``api``.
"""
