"""Command line: convert a Meta or HF checkpoint to our Orbax format, or export any checkpoint to an HF directory.

    python -m llama32_jax.convert --source Llama-3.2-1B/original --output ckpt/llama-3.2-1b [--dtype bfloat16]
    python -m llama32_jax.convert --source ckpt/llama-3.2-1b --output hf/llama-3.2-1b --to hf
    python -m llama32_jax.convert --source Llama-3.2-1B --output ckpt/llama-3.2-1b-int4 --quantize int4 \
        [--group-size 128] [--keep-float vision,head]

``--quantize int8|int4`` writes a weight-only quantized checkpoint (int values + fp32 scales, quantized tensor by
tensor as they stream; ``--dtype`` is then the dtype of the parameters that stay float): ``--group-size`` is the
int4 group (a power of two dividing every quantized weight's input dimension, default 128), ``--keep-float`` a
comma-separated list of parts left in float (``vision``: the vision tower, ``head``: the untied output head).

Paths may be relative, start with ``~`` or pass through symlinks. The output must not overlap the source (either
way), and ``--overwrite`` replaces only an empty directory or a complete earlier output of llama32_jax (a
converted checkpoint with its ``llama32_jax.json`` manifest, or an HF export with its ``llama32_jax_export.json``
marker, holding nothing else); anything else is refused and nothing is deleted.

Exit status: 0 on success, 2 for bad arguments or input, an unsafe output path or a failed write such as a full
disk (``error: <ErrorType>: ...`` names the file, key or flag), 130 when interrupted. No output directory (nor a
temporary one) is left behind by a failed run. From Python, use ``llama32_jax.convert(...)``
(the function; see :func:`llama32_jax.checkpoint.pipeline.convert`).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import threading
import time
import types

from llama32_jax.api import load
from llama32_jax.checkpoint.hf_export import export_hf
from llama32_jax.checkpoint.pipeline import check_output
from llama32_jax.checkpoint.pipeline import convert as convert
from llama32_jax.checkpoint.safety import check_source_dir
from llama32_jax.configs.base import DTYPES
from llama32_jax.errors import LlamaJaxError, QuantizationError
from llama32_jax.quant.config import GROUP_SIZE, MODES, SKIPPABLE, QuantConfig
from llama32_jax.sharding.tpu import quiet_libtpu_on_cpu_host

DEFAULT_FLUSH_MB = 256.0


def _flush_mb(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of MB, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number of MB > 0, got {text!r}")
    return value


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
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing output directory: only an empty one or an earlier output of llama32_jax",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--flush-mb", type=_flush_mb, default=None, help="write to Orbax every this many MB (default 256)")
    p.add_argument("--compress", action="store_true", help="zstd-compress the stored arrays (needs more memory)")
    p.add_argument("--rope-factor", type=float, default=None, help="Meta sources: override the RoPE scaling factor")
    p.add_argument("--quantize", choices=MODES, default=None, help="weight-only quantization (default: none)")
    p.add_argument(
        "--group-size", type=int, default=None, help=f"int4: inputs per scale, a power of two (default {GROUP_SIZE})"
    )
    p.add_argument(
        "--keep-float",
        default=None,
        metavar="PARTS",
        help=f"with --quantize: comma-separated parts kept in --dtype, from {','.join(SKIPPABLE)}",
    )
    tie = p.add_mutually_exclusive_group()
    tie.add_argument("--tied", dest="tie", action="store_true", default=None, help="Meta: output head = embedding")
    tie.add_argument("--untied", dest="tie", action="store_false", help="Meta: separate output head")
    return p


def _quant(args) -> QuantConfig | None:
    """``--quantize`` / ``--group-size`` / ``--keep-float`` as a :class:`QuantConfig` (None: no quantization)."""
    if args.quantize is None:
        if args.group_size is not None or args.keep_float is not None:
            raise QuantizationError("--group-size and --keep-float apply with --quantize int8|int4 only")
        return None
    if args.group_size is not None and args.quantize != "int4":
        raise QuantizationError("--group-size applies to --quantize int4 (int8 has one scale per output channel)")
    keep = () if args.keep_float is None else tuple(p.strip() for p in args.keep_float.split(",") if p.strip())
    group = GROUP_SIZE if args.group_size is None else args.group_size
    return QuantConfig(args.quantize, group, keep)


def _export_hf(args) -> str:
    if args.quantize is not None or args.group_size is not None or args.keep_float is not None:
        raise LlamaJaxError(
            "--quantize/--group-size/--keep-float apply to conversion to orbax; an HF export is float "
            "(a quantized source is dequantized)"
        )
    if args.rope_factor is not None or args.tie is not None:
        raise LlamaJaxError("--rope-factor/--tied/--untied apply to conversion to orbax, not to --to hf")
    if args.flush_mb is not None or args.compress:
        raise LlamaJaxError("--flush-mb/--compress apply to conversion to orbax, not to --to hf")
    source = check_source_dir(args.source, "--source")
    check_output(args.output, overwrite=args.overwrite, source=source)  # before the (slow) load
    model = load(source, dtype="float32")
    return str(export_hf(model, args.output, dtype=args.dtype, overwrite=args.overwrite))


class _QuietOrbaxNoise(logging.Filter):
    """Drops Orbax's own error logs (tracebacks of its worker threads) and asyncio's "exception was never
    retrieved" reports of the writes a failed Orbax save abandoned: the failure they describe reaches us as an
    exception and is reported once, typed (``error: StorageError: ...``)."""

    LOGGERS = ("absl", "asyncio")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        if record.name == "asyncio":
            return "exception was never retrieved" not in record.getMessage()
        return "orbax" not in record.pathname

    def install(self) -> None:
        for name in self.LOGGERS:
            logging.getLogger(name).addFilter(self)

    def remove(self) -> None:
        for name in self.LOGGERS:
            logging.getLogger(name).removeFilter(self)


class _QuietStderr:
    """``sys.stderr`` minus the "RuntimeError: Event loop is closed" tracebacks that TensorStore's callbacks print
    after an Orbax write has failed (e.g. on a full disk); everything else (progress bar, warnings) passes.

    Several TensorStore threads print such a traceback at once, line by line, so their lines interleave: each
    thread's traceback is collected apart (by thread id) up to its exception line, then dropped or written whole.
    """

    _NOISE = ("RuntimeError: Event loop is closed",)

    def __init__(self, stream):
        self._stream = stream
        self._blocks: dict[int, str] = {}  # thread id -> the traceback it is printing, so far
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        with self._lock:
            self._write(threading.get_ident(), text)
        return len(text)

    def _write(self, thread: int, text: str) -> None:
        block = self._blocks.get(thread)
        if block is None:
            if not text.startswith("Traceback (most recent call last):"):
                self._stream.write(text)
                return
            block = ""
        block += text
        lines = block.split("\n")
        for i, line in enumerate(lines[1:-1], start=1):  # the exception line: the first unindented after the header
            if line and not line.startswith(" "):
                self._blocks.pop(thread, None)
                if line.strip() not in self._NOISE:
                    self._stream.write("\n".join(lines[: i + 1]) + "\n")
                rest = "\n".join(lines[i + 1 :])
                if rest:
                    self._write(thread, rest)
                return
        self._blocks[thread] = block

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name):
        return getattr(self._stream, name)


def main(argv: list[str] | None = None) -> int:
    quiet_libtpu_on_cpu_host()  # libtpu installed on a host without TPU chips: no start-up warnings
    args = _parser().parse_args(argv)
    t0 = time.perf_counter()
    noise, stderr = _QuietOrbaxNoise(), sys.stderr
    noise.install()
    if not isinstance(sys.stderr, _QuietStderr):
        sys.stderr = _QuietStderr(sys.stderr)
    try:
        return _run(args, t0)
    finally:
        noise.remove()
        sys.stderr = stderr


def _run(args, t0: float) -> int:
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
                flush_bytes=int((args.flush_mb or DEFAULT_FLUSH_MB) * 2**20),
                compress=args.compress,
                quantize=_quant(args),
            )
    except LlamaJaxError as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # not expected (writes and reads are typed at depth); still no traceback
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
    # Kept to the end: late TensorStore callbacks print after main returns.
    sys.stderr = _QuietStderr(sys.stderr)
    _QuietOrbaxNoise().install()
    sys.exit(main())
else:
    sys.modules[__name__].__class__ = _CallableModule
