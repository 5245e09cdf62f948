"""The folders stay honest to the architecture: no import runs upward, and there are no circles.

Every import in packq/ and interop/ (at module level or inside a function, but not under
``if TYPE_CHECKING:``, which never runs) is an edge between packq's modules. The layers, lowest
first, are listed below; a module may import its own layer or lower ones only, and the graph of
modules has no cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

#: lowest first; a module belongs to the last pattern it starts with
LAYERS = [
    ("packq.errors", "packq.core"),  # bit packing, the array-API core
    ("packq.formats",),  # tensor relayouts, dequantization, engines' conventions (array-API)
    ("packq._validate", "packq.backends"),  # which library runs the core and the formats, with fast paths
    ("packq._api", "packq"),  # the public functions (packq/__init__.py is "packq")
    ("packq.checkpoint.safetensors", "packq.checkpoint.files", "packq.checkpoint.progress", "packq.checkpoint.hub",
     "packq.checkpoint.model", "packq.checkpoint.zeros", "packq.checkpoint.job", "packq.checkpoint.guards"),  # checkpoint
    # I/O, what a job is, the guards a conversion runs under
    ("packq.checkpoint.formats", "packq.checkpoint.gguf_model"),  # what a checkpoint format's tensors mean
    ("packq.checkpoint.folder",),  # reading a Hugging Face folder (asks the formats which one it is)
    ("packq.checkpoint.containers",),  # how converted tensors sit on disk
    ("packq.checkpoint.convert", "packq.checkpoint.inspect", "packq.checkpoint.jax_loader", "packq.checkpoint",
     "packq.jax"),  # whole conversions, inspection, loading
    ("packq.interop",),  # torch hand-off
    ("packq.cli", "packq.__main__"),
]


def module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "interop":
        parts[0:1] = ["packq", "interop"]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer(name: str) -> int:
    best, rank = -1, -1
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (name == p or name.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), i
    assert rank >= 0, f"{name} is in no layer: add it to LAYERS"
    return rank


def imports(path: Path, modules: set[str]) -> set[str]:
    """The packq modules ``path`` imports when it runs (TYPE_CHECKING blocks excluded)."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pkg import submodule` imports the submodule; `from pkg import name` imports pkg itself
            subs = [f"{node.module}.{a.name}" for a in node.names]
            names = [s for s in subs if s in modules]
            if len(names) < len(subs):
                names.append(node.module)
        else:
            continue
        out |= {n for n in names if n in modules}
    return out


def graph() -> dict[str, set[str]]:
    files = [*(REPO / "packq").rglob("*.py"), *(REPO / "interop").rglob("*.py")]
    names = {module_name(f): f for f in files}
    return {name: imports(f, set(names)) - {name} for name, f in names.items()}


def test_no_import_runs_upward():
    upward = [f"{a} (layer {layer(a)}) imports {b} (layer {layer(b)})"
              for a, deps in sorted(graph().items()) for b in sorted(deps) if layer(b) > layer(a)]
    assert not upward, "\n".join(upward)


def test_no_import_circles():
    g = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    assert not cycles, cycles


def test_the_layers_name_every_module():
    for name in graph():
        layer(name)


def test_the_lazy_public_names_are_the_api():
    """packq/__init__.py names the public functions without importing them (PEP 562): the names must stay
    exactly those packq._api defines, or a new function would be missing from ``import packq``."""
    import packq
    import packq._api

    assert sorted(packq.__all__) == sorted(packq._api.__all__)
    assert all(getattr(packq, name) is getattr(packq._api, name) for name in packq.__all__)
