"""The models: the text decoder (``text``), the Mllama vision-language model (``mllama``) with its cross-attention
blocks (``cross_attention``), the cross-attention mask from image tokens (``cross_mask``) and the vision encoder
(``vision``); ``build`` creates them (random init, abstract shapes, strict loading of a parameter tree) and runs
the jitted forward pass.

May import ``errors``, ``dims``, ``configs``, ``sharding.plan`` / ``sharding.placement``, ``nn``, ``kernels`` and
``inputs``; never ``sharding.apply``, ``checkpoint``, ``inference``, ``training`` or ``api``.
"""
