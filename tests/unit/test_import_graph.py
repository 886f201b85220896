"""The package's import graph: layered, acyclic, no private names across modules, no imports hidden in functions.

Every module of ``llama32_jax`` is parsed with ``ast`` (imports inside functions included). An import names the
module it reads: ``from llama32_jax.a import b`` is an edge to ``llama32_jax.a.b`` when that is a module, else to
``llama32_jax.a``. The layers are the data below, lowest first; a module may import its own layer and the ones
below it, never one above. A package's ``__init__`` is a module of its own: the two facades (``configs``,
``sharding``) re-export their submodules for users, so library modules import the submodules instead.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "llama32_jax"

# Lowest first. A module belongs to the entry that equals it or is its longest dotted prefix.
LAYERS = [
    ["llama32_jax.errors", "llama32_jax.dims"],
    ["llama32_jax.configs"],
    ["llama32_jax.sharding.plan", "llama32_jax.sharding.distributed", "llama32_jax.sharding.tpu"],
    ["llama32_jax.quant"],
    ["llama32_jax.nn", "llama32_jax.kernels", "llama32_jax.inputs", "llama32_jax.sharding.placement"],
    ["llama32_jax.models"],
    ["llama32_jax.sharding.apply", "llama32_jax.sharding", "llama32_jax.checkpoint"],
    ["llama32_jax.inference"],
    ["llama32_jax.api", "llama32_jax.convert", "llama32_jax.batch"],  # batch drives an api.Model through the engine
    ["llama32_jax.training"],  # a run's base model is an api.Model; nothing in the library imports training
    ["llama32_jax"],  # the package's own __init__ only
]

# Imports of llama32_jax modules inside functions, each with its reason: (importing module, imported module).
LOCAL_IMPORTS_ALLOWED: dict[tuple[str, str], str] = {}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str) -> list[tuple[str, str, bool]]:
    """``(imported module, imported name or "", inside a function)`` for every llama32_jax import of ``name``."""
    out: list[tuple[str, str, bool]] = []
    path = MODULES[name]
    is_package = path.name == "__init__.py"

    def visit(node: ast.AST, local: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                out.extend((a.name, "", local) for a in child.names if a.name.split(".")[0] == "llama32_jax")
            elif isinstance(child, ast.ImportFrom):
                module = child.module or ""
                if child.level:  # relative: resolve against this module's package
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[: len(base) - child.level + 1]
                    module = ".".join([*base, module] if module else base)
                if module.split(".")[0] == "llama32_jax":
                    for alias in child.names:
                        sub = f"{module}.{alias.name}"
                        out.append((sub, "", local) if sub in MODULES else (module, alias.name, local))
            visit(child, inner)

    visit(ast.parse(path.read_text()), False)
    return out


GRAPH = {name: _imports(name) for name in MODULES}


def _layer(module: str) -> int:
    if module == "llama32_jax":
        return len(LAYERS) - 1
    best, layer = "", -1
    for i, entries in enumerate(LAYERS[:-1]):
        for entry in entries:
            if (module == entry or module.startswith(entry + ".")) and len(entry) > len(best):
                best, layer = entry, i
    return layer


def test_every_module_has_a_layer():
    assert [m for m in MODULES if _layer(m) < 0] == []


def test_no_upward_imports():
    bad = [
        f"{m} (layer {_layer(m)}) imports {dep} (layer {_layer(dep)})"
        for m, deps in GRAPH.items()
        for dep, _, _ in deps
        if dep in MODULES and _layer(dep) > _layer(m)
    ]
    assert bad == []


def test_imports_name_existing_modules():
    assert [(m, dep) for m, deps in GRAPH.items() for dep, _, _ in deps if dep not in MODULES] == []


def test_no_import_cycles():
    edges = {m: sorted({dep for dep, _, _ in deps if dep in MODULES and dep != m}) for m, deps in GRAPH.items()}
    # Tarjan's strongly connected components; any component with more than one module is a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in edges:
        if v not in index:
            connect(v)
    assert cycles == []


def test_no_private_names_across_modules():
    bad = [
        f"{m} imports {name} from {dep}"
        for m, deps in GRAPH.items()
        for dep, name, _ in deps
        if dep != m and (name.startswith("_") or any(p.startswith("_") and p != "__init__" for p in dep.split(".")))
    ]
    assert bad == []


def test_no_function_local_imports_of_the_package():
    bad = [
        f"{m} imports {dep} inside a function"
        for m, deps in GRAPH.items()
        for dep, _, local in deps
        if local and (m, dep) not in LOCAL_IMPORTS_ALLOWED
    ]
    assert bad == []


@pytest.mark.parametrize("package", sorted(m for m, p in MODULES.items() if p.name == "__init__.py"))
def test_each_package_says_what_lives_there(package):
    doc = ast.get_docstring(ast.parse(MODULES[package].read_text()))
    assert doc, f"{package}/__init__.py has no docstring"
