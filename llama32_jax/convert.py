"""Command line: convert a Meta or HF checkpoint to our Orbax format, or export any checkpoint to an HF directory.

    python -m llama32_jax.convert --source Llama-3.2-1B/original --output ckpt/llama-3.2-1b [--dtype bfloat16]
    python -m llama32_jax.convert --source ckpt/llama-3.2-1b --output hf/llama-3.2-1b --to hf

Exit status: 0 on success, 2 for bad arguments or input (the message names the file, key or flag), 130 when
interrupted. No output directory is left behind by a failed run. From Python, use ``llama32_jax.convert(...)``
(the function; see :func:`llama32_jax.checkpoint.pipeline.convert`).
"""

from __future__ import annotations

import argparse
import sys
import time
import types

from llama32_jax.checkpoint.pipeline import DTYPES
from llama32_jax.checkpoint.pipeline import convert as convert
from llama32_jax.errors import LlamaJaxError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m llama32_jax.convert",
        description="Convert Meta (params.json + consolidated.NN.pth) or HF (config.json + safetensors) checkpoints "
        "to a llama32_jax Orbax checkpoint, streaming tensor by tensor; or export a checkpoint to an HF directory.",
    )
    p.add_argument("--source", required=True, help="Meta, HF or (with --to hf) converted checkpoint directory")
    p.add_argument("--output", required=True, help="directory to create (published atomically when complete)")
    p.add_argument("--to", choices=("orbax", "hf"), default="orbax", help="output format (default: orbax)")
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="stored parameter dtype (default bfloat16)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--flush-mb", type=float, default=256.0, help="write to Orbax every this many MB (default 256)")
    p.add_argument("--compress", action="store_true", help="zstd-compress the stored arrays (needs more memory)")
    p.add_argument("--rope-factor", type=float, default=None, help="Meta sources: override the RoPE scaling factor")
    tie = p.add_mutually_exclusive_group()
    tie.add_argument("--tied", dest="tie", action="store_true", default=None, help="Meta: output head = embedding")
    tie.add_argument("--untied", dest="tie", action="store_false", help="Meta: separate output head")
    return p


def _export_hf(args) -> str:
    from llama32_jax.api import load
    from llama32_jax.checkpoint.hf_export import export_hf

    if args.rope_factor is not None or args.tie is not None:
        raise LlamaJaxError("--rope-factor/--tied/--untied apply to conversion to orbax, not to --to hf")
    model = load(args.source, dtype="float32")
    return str(export_hf(model, args.output, dtype=args.dtype, overwrite=args.overwrite))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    t0 = time.perf_counter()
    try:
        if args.to == "hf":
            out = _export_hf(args)
        else:
            out = convert(
                args.source,
                args.output,
                dtype=args.dtype,
                overwrite=args.overwrite,
                progress=not args.no_progress,
                rope_factor=args.rope_factor,
                tie_embeddings=args.tie,
                flush_bytes=int(max(0.0, args.flush_mb) * 2**20),
                compress=args.compress,
            )
    except LlamaJaxError as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; no output was written", file=sys.stderr)
        return 130
    print(f"wrote {out} in {time.perf_counter() - t0:.1f} s")
    return 0


class _CallableModule(types.ModuleType):
    """``import llama32_jax.convert`` replaces the package attribute ``convert`` with this module; keep it callable
    so that ``llama32_jax.convert(source, output)`` works either way."""

    def __call__(self, *args, **kwargs):
        return convert(*args, **kwargs)


if __name__ == "__main__":
    sys.exit(main())
else:
    sys.modules[__name__].__class__ = _CallableModule
