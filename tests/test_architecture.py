"""The layers point one way (docs/architecture.md): every import of every module, those inside
functions included, read from the source with `ast`, checked against the allowed package edges,
and the module graph checked for cycles."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ALLOWED = {
    "core": set(),
    "data": {"core"},
    "merging": {"data", "core"},
    "fitness": {"data", "core"},
    "evolve": {"merging", "fitness", "data", "core"},
    "zoo": {"merging", "fitness", "data", "core"},
    "service": {"evolve", "zoo", "merging", "fitness", "data", "core"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """The modules of ours that a file imports (a `from package import name` that names a
    submodule counts as that submodule)."""
    mod, is_pkg = module_name(path), path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = mod.split(".") if is_pkg else mod.split(".")[:-1]
                package = package[: len(package) - node.level + 1]
                target = ".".join(package + ([node.module] if node.module else []))
            else:
                target = node.module
            found.add(target)
            found |= {f"{target}.{a.name}" for a in node.names}
    return {m for m in found if m.split(".")[0] in ALLOWED}


def graph() -> dict[str, set[str]]:
    files = [p for pkg in ALLOWED for p in (ROOT / pkg).rglob("*.py")]
    modules = {module_name(p): p for p in files}
    return {m: {t for t in imports(p) if t in modules and t != m} for m, p in modules.items()}


def test_packages_import_only_the_layers_below():
    wrong = sorted(f"{m} -> {t}" for m, ts in graph().items() for t in ts
                   if t.split(".")[0] != m.split(".")[0] and t.split(".")[0] not in ALLOWED[m.split(".")[0]])
    assert wrong == []


def strongly_connected(g: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm; components of more than one module are import cycles."""
    index, low, stack, on, out, n = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = n[0]
        n[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(g[v]):
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
            out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_cycles():
    assert sorted(map(len, strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}))) == [1, 3]


def test_no_import_cycles():
    """A package importing its own submodules (`__init__` re-exports) is not counted: the cycle
    a package and its modules form is Python's normal layout."""
    g = graph()
    g = {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in g.items()}
    assert [c for c in strongly_connected(g) if len(c) > 1] == []


def test_every_layer_is_packaged_and_shipped():
    """Each package of ALLOWED is installed (pyproject's packages.find) and copied into the image
    (docker/Dockerfile): a new layer left out of either would import in the tests and fail on install."""
    import re
    import tomllib

    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    assert sorted(p.rstrip("*") for p in include) == sorted(ALLOWED)
    copied = re.findall(r"^COPY (\w+) \./\1$", (ROOT / "docker" / "Dockerfile").read_text(), re.M)
    assert sorted(copied) == sorted(ALLOWED)
