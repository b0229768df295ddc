"""The layers of docs/DESIGN.md ("Layers"), enforced: no import runs up a layer, no import cycle.

Also a structure report (lines, long functions, big files, cycles, upward imports) of any checkout:

    python tests/test_layers.py [ROOT]      # ROOT: a checkout (default: this one)

Modules of the top-level folders ``samplers/``, ``evals/``, ``tokenizers_vq/`` are named as installed
(``genmod.samplers`` ...), so an older checkout that imported them by their bare names is measured on
the same map. Imports are read from the source (``ast``), at any depth of a file, lazy ones included.
"""

from __future__ import annotations

import ast
import json
import pathlib
import sys

import pytest

MAPPED = {"samplers": "genmod.samplers", "evals": "genmod.evals", "tokenizers_vq": "genmod.tokenizers_vq"}
PACKAGE_ROOTS = ("genmod", *MAPPED)

# Layer of a module = the value of its longest matching prefix (docs/DESIGN.md, "Layers").
LAYERS = {
    "genmod.core": 0, "genmod.nn": 0, "genmod.data": 0,
    "genmod.samplers": 1, "genmod.tokenizers_vq": 1, "genmod.evals": 1,
    "genmod.train": 2, "genmod.pipelines": 2, "genmod.families": 2, "genmod.presets": 2,
    "genmod.flow": 3, "genmod.var": 3, "genmod.causalfusion": 3, "genmod.diffusion_forcing": 3,
    "genmod.latentlm": 3, "genmod.tokenizer": 3,
    "genmod.cli": 4, "genmod.importers": 4, "genmod.sampling": 4, "genmod.demo": 4, "genmod.evals.cli": 4,
}
LAYER_NAMES = ["foundation", "building blocks", "machinery", "families", "entry points"]


def canonical(name: str) -> str:
    head, _, rest = name.partition(".")
    if head in MAPPED:
        return MAPPED[head] + ("." + rest if rest else "")
    return name


def layer_of(module: str) -> int:
    if module == "genmod":  # the package face: its version, nothing else
        return 0
    parts = module.split(".")
    for i in range(len(parts), 1, -1):
        prefix = ".".join(parts[:i])
        if prefix in LAYERS:
            return LAYERS[prefix]
    raise KeyError(f"{module}: no layer in LAYERS")


def modules(root: pathlib.Path) -> dict[str, pathlib.Path]:
    """Every package module under ``root``: canonical dotted name -> file."""
    found = {}
    for top in PACKAGE_ROOTS:
        for path in sorted((root / top).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[canonical(".".join(parts))] = path
    return found


def imports_of(name: str, path: pathlib.Path, known: dict) -> set[str]:
    """Package modules that ``name`` imports (absolute and relative, at any depth in the file)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            candidates = [canonical(alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = canonical(node.module or "")
            candidates = [f"{module}.{alias.name}" for alias in node.names] + [module]
        else:
            continue
        for candidate in candidates:
            while candidate and candidate not in known:
                candidate = candidate.rpartition(".")[0]
            if candidate and candidate != name:
                targets.add(candidate)
                break
    return targets


def import_graph(root: pathlib.Path) -> dict[str, set[str]]:
    known = modules(root)
    return {name: imports_of(name, path, known) for name, path in known.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), ignoring package faces (__init__)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    edges = {m: {t for t in ts if not _is_face(t, graph)} for m, ts in graph.items() if not _is_face(m, graph)}

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
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
                out.append(sorted(component))

    sys.setrecursionlimit(10000)
    for v in edges:
        if v not in index:
            visit(v)
    return out


def _is_face(module: str, graph) -> bool:
    """A package ``__init__`` that re-exports its submodules: importing through it is not a dependency of its own."""
    return any(other.startswith(module + ".") for other in graph)


def upward_imports(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """(importer, imported) pairs where the imported module stands on a higher layer."""
    return sorted((m, t) for m, ts in graph.items() for t in ts if layer_of(t) > layer_of(m))


def function_lengths(root: pathlib.Path) -> list[tuple[int, str]]:
    rows = []
    for name, path in modules(root).items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                rows.append((node.end_lineno - node.lineno + 1, f"{name}:{node.name}"))
    return sorted(rows, reverse=True)


def report(root: pathlib.Path) -> dict:
    files = modules(root)
    graph = import_graph(root)
    lengths = function_lengths(root)
    line_counts = {name: len(path.read_text().splitlines()) for name, path in files.items()}
    return {
        "package_lines": sum(line_counts.values()),
        "modules": len(files),
        "files_over_400_lines": sorted(name for name, n in line_counts.items() if n > 400),
        "largest_function": {"lines": lengths[0][0], "name": lengths[0][1]},
        "functions_over_55_lines": len([n for n, _ in lengths if n > 55]),
        "import_cycles": cycles(graph),
        "upward_imports": [f"{a} -> {b}" for a, b in upward_imports(graph)],
    }


# ---------------------------------------------------------------------------------------------
# the tests
REPO = pathlib.Path(__file__).resolve().parents[1]


def test_every_module_stands_on_a_layer():
    layers = {name: layer_of(name) for name in modules(REPO)}  # raises for a module no layer names
    assert set(layers.values()) == set(range(len(LAYER_NAMES)))  # and every layer holds modules


def test_no_import_runs_up_the_layers():
    assert upward_imports(import_graph(REPO)) == []


def test_no_import_cycles():
    assert cycles(import_graph(REPO)) == []


def test_code_imports_the_installed_names_only():
    """``samplers``, ``evals`` and ``tokenizers_vq`` install as ``genmod.*``: a bare import would load a second copy."""
    bare = []
    for folder in ("genmod", *MAPPED, "tests", "scripts", "benchmarks"):
        for path in sorted((REPO / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                    [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
                bare += [f"{path.relative_to(REPO)}: {n}" for n in names if n.split(".")[0] in MAPPED]
    assert bare == []


def test_pyproject_installs_every_package_folder():
    tomllib = pytest.importorskip("tomllib")

    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {}
    for top in PACKAGE_ROOTS:
        for init in (REPO / top).rglob("__init__.py"):
            folders[canonical(".".join(init.parent.relative_to(REPO).parts))] = init.parent
    assert sorted(setuptools["packages"]) == sorted(folders)
    for package, folder in setuptools["package-dir"].items():
        assert (REPO / folder / "__init__.py").is_file(), package


if __name__ == "__main__":
    root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else pathlib.Path(__file__).resolve().parents[1])
    print(json.dumps(report(root), indent=2))
