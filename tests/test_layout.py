"""The layout shows the architecture and keeps its arrows one way (docs/DESIGN.md "Module map"):
node -> dicom_io, models; inside node, cli -> server -> ops -> ingest, delivery -> jobs -> settings,
wire; no import loop between modules, lazy imports inside functions included."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("node", "dicom_io", "models", "sim")

# Within node/: each part may import the parts to its right only (and itself).
NODE_LAYERS = [("cli",), ("server",), ("ops",), ("ingest", "delivery"), ("jobs",), ("wire",), ("settings",)]


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return "dipnode." + ".".join(parts)


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the dipnode modules it imports (anywhere in the file, lazy imports included)."""
    modules = {module_name(p, root): p for top in PACKAGES for p in (root / top).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            edges |= {t for t in targets if t in modules and t != name}
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _part(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if parts[1] == "node" and len(parts) > 2 else None


def test_no_import_loop() -> None:
    assert cycles(import_graph()) == []


def test_packages_import_one_way() -> None:
    bad = []
    for src, targets in import_graph().items():
        top = src.split(".")[1]
        for dst in targets:
            to = dst.split(".")[1]
            if top in ("dicom_io", "models") and to in ("node", "sim"):
                bad.append(f"{src} -> {dst}")
            if top == "dicom_io" and to == "models" or top == "models" and to == "dicom_io":
                bad.append(f"{src} -> {dst}")
            a, b = _part(src), _part(dst)
            if a and b and a != b:
                rank = {p: i for i, layer in enumerate(NODE_LAYERS) for p in layer}
                if rank[b] <= rank[a]:
                    bad.append(f"{src} -> {dst}")
    assert bad == []
