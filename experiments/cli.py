"""How the experiment scripts run: ``cli.run(main)`` instead of ``absl.app.run(main)``.

A typed llama32_jax error (bad flag value, missing checkpoint, bad data file, ...) is printed as one line,
``error: <ErrorType>: <message>``, and the script exits 2, as ``python -m llama32_jax.convert`` does; anything else
keeps its traceback (a bug should be seen). On a host without TPU chips where libtpu is installed (the
``tpu-compile`` extra), libtpu's start-up warnings are silenced first (``sharding.tpu.quiet_libtpu_on_cpu_host``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from absl import app

from llama32_jax.errors import LlamaJaxError
from llama32_jax.sharding.tpu import quiet_libtpu_on_cpu_host


def run(main: Callable[[list[str]], object]) -> None:
    quiet_libtpu_on_cpu_host()

    def checked(argv: list[str]) -> object:
        try:
            return main(argv)
        except LlamaJaxError as e:
            print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
            sys.exit(2)

    app.run(checked)
