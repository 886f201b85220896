"""Reading XLA's optimized HLO text (``compiled.as_text()``: one device's SPMD program after partitioning and
scheduling): its computations, the call graph between them (which computation is a ``while`` loop's body, and what
each loop's trip count is), the collectives with their operand and result shapes and replica-group sizes, and the
Pallas TPU kernels (``tpu_custom_call``).

The text format read here is the one ``HloModule::ToString`` prints: a computation opens with
``[ENTRY ]%name (params) -> type {`` on one line and closes with ``}``; each instruction is one line,
``[ROOT ]%name = <shape> <opcode>(<operands>), <attributes>``, where a shape is ``bf16[2,1,2048]{layout}`` or a tuple
``(shape, shape, ...)``. Used by ``experiments/tpu_checks.py`` (what a plan implies), ``experiments/tpu_models.py``
and ``tests/tpu/test_models_compile.py``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable

COLLECTIVE_KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
# Opcodes that carry a collective: the synchronous op and the start half of its async pair (the done half only
# waits for it).
_COLLECTIVE_OPCODES = {k: k for k in COLLECTIVE_KINDS} | {f"{k}-start": k for k in COLLECTIVE_KINDS}

DTYPE_BYTES = {
    "pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "s32": 4, "u32": 4, "s64": 8, "u64": 8,
    "bf16": 2, "f16": 2, "f32": 4, "f64": 8, "f8e4m3fn": 1, "f8e5m2": 1, "c64": 8, "c128": 16, "token": 0,
}  # fmt: skip

_COMP_HEAD = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTR = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_ARRAY = re.compile(r"([a-z][a-z0-9]*)\[([0-9,]*)\]")
_CALLEES = re.compile(
    r"\b(calls|body|condition|to_apply|branch_computations|called_computations)=(\{[^}]*\}|%?[\w.\-]+)"
)
_OPERAND = re.compile(r"%([\w.\-]+)")


@dataclasses.dataclass(frozen=True)
class Array:
    """One array shape: ``dtype`` (HLO's name, ``bf16``) and ``dims``."""

    dtype: str
    dims: tuple[int, ...]

    @property
    def bytes(self) -> float:
        return DTYPE_BYTES.get(self.dtype, 0) * math.prod(self.dims)

    def __str__(self) -> str:
        return f"{self.dtype}[{','.join(map(str, self.dims))}]"


@dataclasses.dataclass(frozen=True)
class Instruction:
    name: str
    opcode: str
    shapes: tuple[Array, ...]  # the result: one array, or a tuple's arrays in order
    operands: tuple[str, ...]  # operand instruction names
    args: str  # the operand list as written (a constant's value)
    attrs: str  # everything after the operand list
    computation: str


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective of the program: ``kind`` (``all-reduce``, ...), its result and operand arrays, the size of
    its replica groups (devices that take part together; None when the text gives none), the computation it is
    in, and whether that computation runs inside a ``while`` loop (a scan's body, directly or through fusions)."""

    kind: str
    name: str
    results: tuple[Array, ...]
    operands: tuple[Array, ...]
    group_size: int | None
    computation: str
    loops: tuple[str, ...]  # the while bodies it runs in, innermost first
    trips: int  # how many times it runs per step: the product of those loops' trip counts (1 outside loops)

    @property
    def in_loop(self) -> bool:
        return bool(self.loops)

    @property
    def bytes(self) -> float:
        """Bytes of the larger side (result or operands): an all-gather's result, a reduce-scatter's operand."""
        return max(sum(a.bytes for a in self.results), sum(a.bytes for a in self.operands))


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One Pallas TPU kernel call site (``custom-call`` with target ``tpu_custom_call``); ``name`` is the
    instruction's name, which Mosaic derives from the kernel function's (``flash_attention_fwd_tpu.1``)."""

    name: str
    results: tuple[Array, ...]
    operands: tuple[Array, ...]
    computation: str
    loops: tuple[str, ...]


def parse_shapes(text: str) -> tuple[Array, ...]:
    """Every array in a shape string (``bf16[2,3]{1,0}`` or a tuple of them), in order."""
    text = re.sub(r"\{[^{}]*\}", "", re.sub(r"\{[^{}]*\{[^{}]*\}[^{}]*\}", "", text))  # layouts (one nesting level)
    return tuple(Array(m.group(1), tuple(int(d) for d in m.group(2).split(",") if d)) for m in _ARRAY.finditer(text))


def _split_shape(rest: str) -> tuple[str, str]:
    """``rest`` = ``<shape> <opcode>(...)...``: (shape text, the remainder from the opcode on)."""
    if rest.startswith("("):
        depth = 0
        for i, ch in enumerate(rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                return rest[: i + 1], rest[i + 1 :].lstrip()
        raise ValueError(f"unbalanced tuple shape: {rest[:200]}")
    depth = 0  # an array shape: up to the first space outside {} (layouts hold no spaces, but be safe)
    for i, ch in enumerate(rest):
        depth += ch == "{"
        depth -= ch == "}"
        if ch == " " and depth == 0:
            return rest[:i], rest[i + 1 :]
    return rest, ""


def _operand_list(text: str) -> tuple[str, str]:
    """``text`` starts just after the opcode's ``(``: (operand list, the attributes after it)."""
    depth = 1
    for i, ch in enumerate(text):
        depth += ch in "({"
        depth -= ch in ")}"
        if depth == 0:
            return text[:i], text[i + 1 :]
    return text, ""


def group_size(attrs: str) -> int | None:
    """The replica-group size of a collective's attributes, in any of XLA's spellings: explicit groups
    ``replica_groups={{0,1},{2,3}}``, iota groups ``replica_groups=[2,4]<=[8]`` (groups of 4), or mesh axes
    ``replica_groups=mesh['axis_0'=2,'axis_1'=8], device_ids=(...) {'axis_1'}`` (the product of the named axes'
    sizes)."""
    m = re.search(r"replica_groups=\{\{([^}]*)\}", attrs)
    if m:
        return len([x for x in m.group(1).split(",") if x.strip()])
    m = re.search(r"replica_groups=\[([0-9,]+)\]<=", attrs)
    if m:
        return int(m.group(1).split(",")[-1])
    m = re.search(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}", attrs)
    if m:
        sizes = {k: int(v) for k, v in re.findall(r"'([^']+)'=(\d+)", m.group(1))}
        return math.prod(sizes[a] for a in re.findall(r"'([^']+)'", m.group(2)))
    return None  # collective-permute (source_target_pairs), or no groups printed


class Module:
    """A parsed optimized HLO module."""

    def __init__(self, text: str):
        self.computations: dict[str, list[Instruction]] = {}
        self.entry: str | None = None
        current: str | None = None
        for line in text.splitlines():
            if current is None:
                head = _COMP_HEAD.match(line)
                if head and not line.startswith("HloModule"):
                    current = head.group(2)
                    self.computations[current] = []
                    if head.group(1):
                        self.entry = current
                continue
            if line.strip() == "}":
                current = None
                continue
            m = _INSTR.match(line)
            if not m:
                continue
            shape_text, rest = _split_shape(m.group(3))
            op = re.match(r"([a-z][a-z0-9\-]*)\((.*)$", rest)
            if not op:
                continue
            operands, attrs = _operand_list(op.group(2))
            self.computations[current].append(
                Instruction(
                    name=m.group(2),
                    opcode=op.group(1),
                    shapes=parse_shapes(shape_text),
                    operands=tuple(_OPERAND.findall(operands)),
                    args=operands,
                    attrs=attrs,
                    computation=current,
                )
            )
        if self.entry is None:
            raise ValueError("no ENTRY computation in the HLO text")
        self._shape = {i.name: i.shapes for ins in self.computations.values() for i in ins}
        # callers: computation -> [(calling instruction, role)] (role "body" for a while loop's body)
        self.callers: dict[str, list[tuple[Instruction, str]]] = {}
        self.trip_counts: dict[str, int] = {}  # while body -> trip count (1 when it cannot be read)
        for ins in self.computations.values():
            for i in ins:
                for role, target in _CALLEES.findall(i.attrs):
                    for callee in re.findall(r"%?([\w.\-]+)", target):
                        self.callers.setdefault(callee, []).append((i, role))
                if i.opcode == "while":
                    body = re.search(r"\bbody=%?([\w.\-]+)", i.attrs).group(1)
                    cond = re.search(r"\bcondition=%?([\w.\-]+)", i.attrs).group(1)
                    self.trip_counts[body] = self._trip_count(i, cond)

    def _trip_count(self, loop: Instruction, cond: str) -> int:
        """A while loop's trip count: XLA's ``known_trip_count`` when printed, else the constant its condition
        compares the counter against (a scan's ``i < n``), else 1."""
        m = re.search(r'"known_trip_count":\{"n":"(\d+)"', loop.attrs)
        if m:
            return int(m.group(1))
        consts = [
            int(i.args)
            for i in self.computations.get(cond, [])
            if i.opcode == "constant" and re.fullmatch(r"-?\d+", i.args.strip())
        ]
        return max(consts) if consts else 1

    def loops_of(self, computation: str) -> tuple[str, ...]:
        """The while bodies ``computation`` runs inside (itself included when it is one), innermost first."""
        out: list[str] = []
        seen: set[str] = set()
        todo = [computation]
        while todo:
            c = todo.pop()
            if c in seen:
                continue
            seen.add(c)
            for caller, role in self.callers.get(c, []):
                if role == "body" and c not in out:
                    out.append(c)
                todo.append(caller.computation)
        return tuple(out)

    def instructions(self) -> Iterable[Instruction]:
        for ins in self.computations.values():
            yield from ins

    def operand_shapes(self, i: Instruction) -> tuple[Array, ...]:
        return tuple(a for name in i.operands for a in self._shape.get(name, ()))

    def collectives(self) -> list[Collective]:
        out = []
        for i in self.instructions():
            kind = _COLLECTIVE_OPCODES.get(i.opcode)
            if kind is None:
                continue
            operands = self.operand_shapes(i)
            results = i.shapes
            if i.opcode.endswith("-start"):  # async start: result is (operands..., results..., [contexts])
                results = tuple(a for a in results if a.dtype not in ("u32", "s32") or a.dims) or results
                results = results[len(operands) : 2 * len(operands)] or results
            loops = self.loops_of(i.computation)
            out.append(
                Collective(
                    kind, i.name, results, operands, group_size(i.attrs), i.computation, loops,
                    math.prod(self.trip_counts.get(b, 1) for b in loops),
                )
            )  # fmt: skip
        return out

    def kernels(self) -> list[Kernel]:
        return [
            Kernel(i.name, i.shapes, self.operand_shapes(i), i.computation, self.loops_of(i.computation))
            for i in self.instructions()
            if i.opcode == "custom-call" and 'custom_call_target="tpu_custom_call"' in i.attrs
        ]

    def arrays(self) -> Iterable[tuple[Instruction, Array]]:
        """Every array every instruction produces (fused computations' included)."""
        for i in self.instructions():
            for a in i.shapes:
                yield i, a


def summary(collectives: Iterable[Collective]) -> dict[str, dict[str, float]]:
    """Per kind: call sites, executions per step (loop trip counts applied) and bytes moved per step (each
    execution's larger side, :attr:`Collective.bytes`)."""
    out: dict[str, dict[str, float]] = {}
    for c in collectives:
        s = out.setdefault(c.kind, {"sites": 0, "executions": 0, "bytes": 0.0})
        s["sites"] += 1
        s["executions"] += c.trips
        s["bytes"] += c.trips * c.bytes
    return out
