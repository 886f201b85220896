"""Dataset-scale generation: :func:`batch_generate` runs every row of a JSONL file, a list or a grain data source
through the continuous-batching :class:`~llama32_jax.inference.engine.Engine`, journals results as they finish so an
interrupted run resumes where it stopped, and writes the outputs in input order atomically.

``rows`` reads and validates input rows, ``journal`` owns the resume journal and the final file, ``run`` ties them to
the engine."""

from llama32_jax.batch.run import batch_generate

__all__ = ["batch_generate"]
