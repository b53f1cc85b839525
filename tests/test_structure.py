"""The package's import graph: no cycles, no imports up the layers, no private names
imported from another module."""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1] / "msa"

# lower layers never import higher ones
LAYERS = [
    ("msa.config", "msa.varlen", "msa.lengths", "msa._meter"),
    ("msa.ops",),
    ("msa.functional", "msa.layout"),
    ("msa.nn", "msa.inference", "msa.distributed", "msa.integrations", "msa.eval",
     "msa.demo"),
    ("msa.bench", "msa.cli", "msa.__main__"),
]


def _module(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports():
    """``{module: [(imported module, [names])]}`` of every msa import (relative resolved)."""
    out = {}
    for path in ROOT.rglob("*.py"):
        mod = _module(path)
        package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
        edges = []
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[:len(base) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.startswith("msa"):
                    edges.append((target, [a.name for a in node.names]))
            elif isinstance(node, ast.Import):
                edges += [(a.name, []) for a in node.names if a.name.startswith("msa")]
        out[mod] = edges
    return out


def _layer(mod: str) -> int:
    for i, group in enumerate(LAYERS):
        if any(mod == g or mod.startswith(g + ".") for g in group):
            return i
    return -1                                       # the package root re-exports


def test_no_imports_up_the_layers():
    bad = [(m, t) for m, edges in _imports().items() for t, _ in edges
           if _layer(m) >= 0 and _layer(t) > _layer(m)]
    assert not bad, bad


def test_no_private_names_from_other_modules():
    bad = [(m, t, n) for m, edges in _imports().items() for t, names in edges
           for n in names if n.startswith("_") and t != m and not n.startswith("__")]
    assert not bad, bad


def test_no_import_cycles():
    graph = {m: {t for t, names in edges} | {f"{t}.{n}" for t, names in edges for n in names}
             for m, edges in _imports().items()}
    graph = {m: {t for t in ts if t in graph and t != m and not m.startswith(t + ".")}
             for m, ts in graph.items()}
    state = {}

    def visit(m, stack):
        state[m] = 1
        for t in graph[m]:
            if state.get(t) == 1:
                raise AssertionError(f"import cycle: {' -> '.join(stack + [m, t])}")
            if not state.get(t):
                visit(t, stack + [m])
        state[m] = 2
    for m in graph:
        if not state.get(m):
            visit(m, [])
