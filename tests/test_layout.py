"""The package's layout rules, read from the source: no import circle, the library apart from
its entry points and from theory/, and no module over 400 lines outside theory/."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "dpolab"


def _type_checking(node: ast.AST) -> bool:
    """`if TYPE_CHECKING:` (or `typing.TYPE_CHECKING`): imports for annotations only."""
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _runtime_nodes(tree: ast.AST):
    """Every node of `tree` but those under `if TYPE_CHECKING:` (never run, so never an
    import circle; their `else:` branch runs and is kept)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if _type_checking(node):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))


def _import_graph() -> dict[str, set[str]]:
    """dpolab module -> the dpolab modules it imports anywhere (module level or in a function)."""
    files = {}
    for f in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(f.relative_to(PACKAGE.parent).with_suffix("").parts)
        files[name.removesuffix(".__init__")] = f
    graph = {m: set() for m in files}
    for m, f in files.items():
        for node in _runtime_nodes(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            graph[m] |= {n for n in names if n in files and n not in (m, "dpolab")}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
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

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_circle():
    """The check below can fail: a -> b -> c -> a is one circle, d alone is none."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_circle_and_library_apart():
    """No import circle in dpolab/; no module but the entry point imports dpolab.cli; nothing
    outside theory/ imports theory/ (the CLI names theory modules as strings only)."""
    graph = _import_graph()
    assert _cycles(graph) == []
    assert sorted(m for m, deps in graph.items() if "dpolab.cli" in deps) == ["dpolab.__main__"]
    assert [m for m, deps in graph.items() if not m.startswith("dpolab.theory")
            and any(d.startswith("dpolab.theory") for d in deps)] == []


def test_annotation_imports_make_no_circle():
    """An import under `if TYPE_CHECKING:` is not an edge; one beside it, or in its `else:`,
    is: a module importing b for annotations only and b importing it back is no circle."""
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import b\n"
                     "else:\n    import c\nimport d\n")
    names = {a.name for n in _runtime_nodes(tree) if isinstance(n, ast.Import) for a in n.names}
    assert names == {"c", "d"}


def test_no_module_over_400_lines():
    """One idea per module: no module of dpolab/ and its subpackages (losses/, ...) outside
    theory/ passes 400 lines."""
    sizes = {str(f.relative_to(PACKAGE)): len(f.read_text().splitlines())
             for f in PACKAGE.rglob("*.py") if "theory" not in f.relative_to(PACKAGE).parts}
    assert "losses/registry.py" in sizes  # the subpackages are counted
    assert {k: v for k, v in sizes.items() if v > 400} == {}
