"""Only what pyproject.toml cannot say: the sharding plans, kept in the repository's top-level ``sharding/`` folder,
ship inside the wheel as the package data ``llama32_jax/plans/*.toml`` (``llama32_jax.sharding`` reads them from
there when installed, and from ``sharding/`` in a source checkout)."""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["llama32_jax*"]), "llama32_jax.plans"],
    package_dir={"llama32_jax.plans": "sharding"},
    package_data={"llama32_jax.plans": ["*.toml"]},
)
