"""What goes into a model, before any array is built on a device: tokenizers (``tokenizer``), chat formats and
templates (``chat_format``), image preprocessing to tiles (``image``), and the argument checks shared by the public
entry points (``checks``: token ids, per-prompt sampling options, image lists).

May import ``errors``, ``dims`` and ``configs`` only (no JAX model code), so every layer above can use it.
"""
