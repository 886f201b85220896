"""Fine-tuning: the training step and :class:`~llama32_jax.training.train.Trainer` (``train``), batch checks
(``batch``), LoRA adapters (``lora``), chat/text datasets with packing (``data``), training checkpoints
(``state``) and base models / export of a run (``base_models``).

The top layer with ``api``: it may import everything, including ``llama32_jax.api`` (a run's base model is a
:class:`~llama32_jax.api.Model`); nothing in the library imports it.
"""
