"""The import graph of ``scratchseg/`` has no cycle, and nothing imports torch, jax or tensorflow.

Read from the source with ``ast``, without importing anything: every import
statement counts, at module level and inside functions (a lazy import only
hides a cycle until the function runs). Edges go to the module an import
names: ``from .. import backend`` -> ``scratchseg.backend``, ``from . import x``
-> the submodule ``x`` where there is one (else the package itself, whose
``__init__`` defines ``x``), ``from .mod import name`` -> ``mod``. A package's
``__init__`` importing its submodules gives package -> submodule; a submodule
importing names from its package gives submodule -> package. (Importing
``a.b`` runs ``a/__init__`` first; that implicit parent edge is left out, or
every package with a submodule would be a cycle.) Imports under ``if
TYPE_CHECKING:`` never run and are skipped; ``importlib.import_module`` calls
are not seen.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "scratchseg"
FORBIDDEN = {"torch", "torchvision", "jax", "jaxlib", "flax", "tensorflow", "keras"}


def module_files(root, package):
    """{dotted module name: (path, is_package)} for every .py under ``root / package``."""
    found = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        found[".".join(parts)] = (path, is_package)
    return found


def _type_checking(test):
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def import_nodes(tree):
    """Every Import / ImportFrom in ``tree``, at any depth, except under ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        if isinstance(node, ast.If) and _type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def imported_modules(name, is_package, tree, known):
    """The modules that module ``name`` imports, as (target, line); ``known``: the modules that exist."""
    package = name if is_package else name.rpartition(".")[0]
    for node in import_nodes(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
            continue
        if node.level:
            base_parts = package.split(".")
            if node.level > 1:
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
            base = ".".join(base_parts + ([node.module] if node.module else []))
        else:
            base = node.module
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            yield (sub if sub in known else base), node.lineno


def import_graph(root=ROOT, package=PACKAGE):
    """{module: {imported internal module: first line}} for the modules of ``package``."""
    files = module_files(root, package)
    graph = {}
    for name, (path, is_package) in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        edges = graph.setdefault(name, {})
        for target, line in imported_modules(name, is_package, tree, files):
            if target in files and target != name:
                edges.setdefault(target, line)
    return graph


def find_cycles(graph):
    """One cycle (a list of modules, first == last) per strongly connected component that has one."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []
    for start in sorted(graph):  # Tarjan's algorithm, iteratively
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(component)
    return [_cycle_in(graph, component) for component in components]


def _cycle_in(graph, component):
    """A shortest cycle through the first module of ``component`` (breadth-first inside it)."""
    start = min(component)
    came_from = {start: None}
    queue = [start]
    for node in queue:
        for child in sorted(graph[node]):
            if child == start:  # back round: the path that reached node, then start again
                path = [node]
                while came_from[path[-1]] is not None:
                    path.append(came_from[path[-1]])
                return path[::-1] + [start]
            if child in component and child not in came_from:
                came_from[child] = node
                queue.append(child)
    raise AssertionError(f"no cycle through {start} in {sorted(component)}")  # pragma: no cover


def describe(graph, cycle):
    return "\n    ".join(f"{a} -> {b}  (line {graph[a][b]} of {a})" for a, b in zip(cycle, cycle[1:]))


def test_no_import_cycle():
    graph = import_graph()
    assert "scratchseg.autograd" in graph and "scratchseg.backend" in graph  # the sweep found the package
    cycles = find_cycles(graph)
    assert not cycles, "import cycle(s) in scratchseg/:\n  " + "\n  ".join(describe(graph, c) for c in cycles)


def test_nothing_imports_another_autograd():
    found = []
    for package in (PACKAGE, "kernels"):
        for name, (path, is_package) in module_files(ROOT, package).items():
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            for node in import_nodes(tree):
                if isinstance(node, ast.ImportFrom) and node.level:
                    continue
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
                found += [f"{path.relative_to(ROOT)}:{node.lineno} imports {n}" for n in names
                          if n.partition(".")[0] in FORBIDDEN]
    assert not found, "\n".join(found)


# ------------------------------------------------------------ the checks themselves
def _write(root, files):
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_resolution_rules_and_a_cycle_is_found(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "from .sub import thing\n",
        "pkg/backend.py": "",
        "pkg/sub/__init__.py": "from . import a\nfrom .b import helper\n",
        "pkg/sub/a.py": "from .. import backend\nfrom . import VERSION\n",
        "pkg/sub/b.py": "import os\nimport pkg.backend\n",
        "pkg/low.py": "def late():\n    from .sub import b\n",
        "pkg/typed.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .low import late\n",
    })
    graph = import_graph(tmp_path, "pkg")
    assert graph == {
        "pkg": {"pkg.sub": 1},
        "pkg.backend": {},
        "pkg.sub": {"pkg.sub.a": 1, "pkg.sub.b": 2},  # package -> its submodules
        "pkg.sub.a": {"pkg.backend": 1, "pkg.sub": 2},  # not pkg (__init__); VERSION is a name in pkg.sub
        "pkg.sub.b": {"pkg.backend": 2},
        "pkg.low": {"pkg.sub.b": 2},  # a function-local import counts
        "pkg.typed": {},
    }
    assert find_cycles(graph) == [["pkg.sub", "pkg.sub.a", "pkg.sub"]]
    # a lazy import deep inside a function, two modules round
    _write(tmp_path, {"pkg/sub/a.py": "from .. import backend\n", "pkg/backend.py": "def f():\n    if 1:\n        from .low import late\n"})
    cycles = find_cycles(import_graph(tmp_path, "pkg"))
    assert cycles == [["pkg.backend", "pkg.low", "pkg.sub.b", "pkg.backend"]], cycles
