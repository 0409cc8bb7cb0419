"""Every import in src/otalign (imports inside functions included) points to its own layer or one below
(:data:`otalign.layers.LAYERS`), and no set of modules imports itself in a cycle."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import NamedTuple

import pytest

from otalign import layers

SRC = Path(__file__).parents[1] / "src"


class Import(NamedTuple):
    """``source`` imports ``target`` (both dotted otalign modules) at ``line`` of ``source``'s file; ``parent``:
    ``target`` is a package that import runs on the way to the module named."""

    source: str
    target: str
    line: int
    parent: bool = False


def module_files(src: Path = SRC) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under ``src/otalign`` (a package is its ``__init__``)."""
    files = {}
    for path in sorted((src / "otalign").rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        files[".".join(parts)] = path
    return files


def import_nodes(path: Path) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement of the file, at any depth (inside functions and classes too)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    return [node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))]


def imports(module: str, path: Path, modules: set[str]) -> list[Import]:
    """The otalign modules ``module`` imports anywhere in its file, relative imports resolved.

    ``from package import name`` imports ``package.name`` when that is a module, else ``package``. Importing
    ``a.b.c`` runs the packages ``a`` and ``a.b`` first, so they count too, except ``otalign`` and the packages
    holding ``module`` (they are initialised before it, and a package's ``__init__`` imports its own modules).
    """
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in import_nodes(path):
        if isinstance(node, ast.Import):
            found += [Import(module, alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module
            for alias in node.names:
                target = f"{origin}.{alias.name}"
                found.append(Import(module, target if target in modules else origin, node.lineno))
    found = [i for i in found if i.target.startswith("otalign.")]
    holding = {".".join(module.split(".")[:end]) for end in range(1, module.count(".") + 2)}
    parents = [
        Import(module, ".".join(i.target.split(".")[:end]), i.line, parent=True)
        for i in found
        for end in range(2, i.target.count(".") + 1)
    ]
    return list(dict.fromkeys(found + [p for p in parents if p.target not in holding]))


def import_graph(src: Path = SRC) -> list[Import]:
    files = module_files(src)
    return [i for module, path in files.items() for i in imports(module, path, set(files))]


def upward_imports(graph: list[Import]) -> list[str]:
    """One message per import of a higher layer than the importing module's."""
    names = [layer.name for layer in layers.LAYERS]
    return [
        f"{i.source} (line {i.line}, layer '{names[layers.rank(i.source)]}') imports {i.target} "
        f"(layer '{names[layers.rank(i.target)]}', higher)"
        for i in graph
        if not i.parent and layers.rank(i.target) > layers.rank(i.source)
    ]


def out_edges(graph: list[Import]) -> dict[str, list[Import]]:
    edges: dict[str, list[Import]] = {}
    for i in graph:
        edges.setdefault(i.source, []).append(i)
    return edges


def strongly_connected(graph: list[Import]) -> list[set[str]]:
    """The sets of modules that import each other in a cycle (Tarjan's strongly connected components)."""
    edges = out_edges(graph)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for edge in edges.get(node, []):
            if edge.target not in index:
                visit(edge.target)
                low[node] = min(low[node], low[edge.target])
            elif edge.target in stack:
                low[node] = min(low[node], index[edge.target])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
            if len(component) > 1 or any(e.target == node for e in edges.get(node, [])):
                components.append(set(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return components


def closed_path(component: set[str], edges: dict[str, list[Import]]) -> list[Import]:
    """A shortest cycle through the first module of ``component`` (breadth-first inside the component)."""
    start = min(component)
    came: dict[str, Import] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for edge in edges.get(node, []):
                if edge.target == start:
                    path = [edge]
                    while path[0].source != start:
                        path.insert(0, came[path[0].source])
                    return path
                if edge.target in component and edge.target not in came:
                    came[edge.target] = edge
                    following.append(edge.target)
        frontier = following
    raise AssertionError(f"no cycle through {start}")


def cycles(graph: list[Import]) -> list[str]:
    """One line per set of modules in a cycle: its shortest cycle through one module, and the set's size."""
    edges = out_edges(graph)
    lines = []
    for component in strongly_connected(graph):
        path = closed_path(component, edges)
        lines.append(
            " -> ".join(f"{i.source} (line {i.line})" for i in path)
            + f" -> {path[0].source}"
            + (f" [one of the cycles through {len(component)} modules]" if len(component) > len(path) else "")
        )
    return lines


def test_every_module_is_in_a_layer():
    unplaced = []
    for module in module_files():
        try:
            layers.rank(module)
        except KeyError:
            unplaced.append(module)
    assert not unplaced, f"modules in no row of otalign.layers.LAYERS: {unplaced}"


def forbidden_imports(src: Path = SRC) -> list[str]:
    """One message per import of a package the importing module's layer forbids (:attr:`Layer.forbids`)."""
    problems = []
    for module, path in module_files(src).items():
        layer = layers.LAYERS[layers.rank(module)]
        for node in import_nodes(path):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                names = [] if node.level else [node.module]
            for name in names:
                if name.split(".")[0] in layer.forbids:
                    problems.append(f"{module} (line {node.lineno}, layer '{layer.name}') imports {name}")
    return problems


def test_no_forbidden_package():
    problems = forbidden_imports()
    assert not problems, "imports a layer forbids:\n" + "\n".join(problems)


def test_no_upward_import():
    problems = upward_imports(import_graph())
    assert not problems, "imports of a higher layer:\n" + "\n".join(problems)


def test_no_import_cycle():
    found = cycles(import_graph())
    assert not found, "import cycles:\n" + "\n".join(found)


def test_the_walk_sees_relative_and_function_level_imports(tmp_path):
    """A planted upward import inside a function, written relatively, a two-module cycle and a forbidden package
    imported inside a function are all reported."""
    package = tmp_path / "otalign"
    (package / "ot").mkdir(parents=True)
    (package / "trainers").mkdir()
    (package / "__init__.py").write_text("")
    (package / "ot" / "__init__.py").write_text("")
    (package / "trainers" / "__init__.py").write_text("")
    (package / "ot" / "a.py").write_text("def f():\n    from ..trainers import rl\n    return rl\n")
    (package / "ot" / "b.py").write_text("from . import c\n")
    (package / "ot" / "c.py").write_text("import otalign.ot.b\n")
    (package / "trainers" / "rl.py").write_text("")
    (package / "ot" / "d.py").write_text("import torch\n\n\ndef f():\n    import transformers.modeling_utils\n")
    graph = import_graph(tmp_path)
    assert upward_imports(graph) == [
        "otalign.ot.a (line 2, layer 'ot') imports otalign.trainers.rl (layer 'trainers', higher)"
    ]
    assert cycles(graph) == ["otalign.ot.b (line 1) -> otalign.ot.c (line 1) -> otalign.ot.b"]
    assert forbidden_imports(tmp_path) == ["otalign.ot.d (line 5, layer 'ot') imports transformers.modeling_utils"]


@pytest.mark.parametrize("module", ["otalign.eval.analysis.coherence", "otalign.eval"])
def test_rank_is_by_longest_prefix(module):
    assert layers.LAYERS[layers.rank(module)].name == "eval"


def test_unknown_module_is_in_no_layer():
    with pytest.raises(KeyError, match="otalign.nowhere"):
        layers.rank("otalign.nowhere")


def test_the_design_document_shows_this_layer_table():
    design = (Path(__file__).parents[1] / "docs" / "design.md").read_text(encoding="utf-8")
    block = design.split("<!-- layers -->\n", 1)[1].split("<!-- /layers -->", 1)[0]
    assert block.strip() == layers.markdown().strip(), "docs/design.md's layer table is stale: paste markdown()"
