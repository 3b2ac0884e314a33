"""The package's shape: no import circle, no arrow back up, one definition of each list.

The imports are read from the source (every ``import``, at the top or inside a function), not
from ``sys.modules``, so a lazy import that would close a circle counts as one. A registry's
package discovering its files (``import_submodules``) is not an import: it is how a new file
is found without being listed.
"""
import ast
import subprocess
import sys

import pytest
from conftest import REPO

SRC = REPO / "src"
# the building blocks: each may use only itself, the blocks before it here, and these base modules
BASE = {"okd.errors", "okd.registry", "okd.losses", "okd.distributed", "okd.ema"}
BLOCKS = ("okd.data", "okd.models", "okd.methods")
ENTRY_POINTS = {"okd.cli", "okd.plan", "okd.preflight", "okd.report", "okd.__main__"}


def module_name(path):
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph():
    """{module: the okd modules its source imports}."""
    files = {module_name(p): p for p in (SRC / "okd").rglob("*.py")}
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for alias in node.names:  # "from . import x": x may be a module or a name
                    deps.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in files else target)
            elif isinstance(node, ast.Import):
                deps.update(alias.name for alias in node.names)
        graph[name] = {d for d in deps if d in files and d != name}
    return graph


def cycles(graph):
    found, state, stack = [], {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                found.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_the_walker_sees_a_circle_and_a_lazy_import():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert cycles(graph) == [["a", "b", "c", "a"]]
    assert "okd.build" in import_graph()["okd.estimate"]  # imported inside probe_speed only


def test_no_import_circle_in_the_package():
    assert cycles(import_graph()) == []


@pytest.mark.parametrize("block", BLOCKS)
def test_building_blocks_do_not_import_upwards(block):
    graph = import_graph()
    allowed = BASE | set(BLOCKS[: BLOCKS.index(block) + 1])
    if block == "okd.methods":
        allowed.discard("okd.data")  # a method sees tensors, not datasets
    bad = {m: sorted(d for d in deps if not any(d == a or d.startswith(a + ".") for a in allowed))
           for m, deps in graph.items() if m == block or m.startswith(block + ".")}
    assert {m: d for m, d in bad.items() if d} == {}


def test_nothing_imports_an_entry_point():
    graph = import_graph()
    users = {m: sorted(k for k, deps in graph.items() if m in deps) for m in ENTRY_POINTS}
    assert users == {m: (["okd.__main__"] if m == "okd.cli" else []) for m in ENTRY_POINTS}


def test_the_paper_table_is_the_one_list_of_methods_and_backbones():
    from okd.methods import METHODS
    from okd.models import BACKBONES
    from okd.paper import BACKBONE_ROWS, TABLE_METHODS

    assert TABLE_METHODS == ("vanilla", "dml", "cl", "one", "ffl", "okddip", "kdcl", "pcl")
    assert set(TABLE_METHODS) <= set(METHODS.names()) and set(BACKBONE_ROWS) <= set(BACKBONES.names())
    out = subprocess.run([sys.executable, "-m", "okd.paper", "--methods"], capture_output=True, text=True,
                         env={"PYTHONPATH": str(SRC)}, check=True).stdout
    assert out.split() == list(TABLE_METHODS)
    script = (REPO / "run_table.sh").read_text()
    assert "okd.paper --methods" in script and "okd.paper --backbones" in script
    assert "resnet110" not in script and "okddip" not in script  # the lists are not written out again
    from okd.paper import ALL_METHODS

    # every registered method has a column in the report, in order of publication after PCL's table
    assert set(ALL_METHODS) == set(METHODS.names()) and ALL_METHODS[:8] == TABLE_METHODS
    out = subprocess.run([sys.executable, "-m", "okd.paper", "--all-methods"], capture_output=True, text=True,
                         env={"PYTHONPATH": str(SRC)}, check=True).stdout
    assert out.split() == list(ALL_METHODS) and "okd.paper --all-methods" in script
