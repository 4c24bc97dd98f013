"""The package's import graph (issue 27): no import cycle inside d3_plugin, and no import from a lower layer
into a higher one. Read from the source with `ast` (nothing is imported), lazy imports inside functions
included; modules loaded by name (`importlib.import_module`: the registry's built-ins, the CLI's commands)
are not imports here. A module importing its own parent package (`from . import register_model`) is not an
edge: the parent is always loaded first."""
import ast
from pathlib import Path
from typing import Dict, List, Set, Tuple

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "d3_plugin"

# Lowest first. A module may import its own layer and the layers below; the first name under d3_plugin
# (a module or a subpackage) places it. Cycles inside a layer are caught by the cycle test.
LAYERS: List[Tuple[str, Tuple[str, ...]]] = [
    ("ground: values, files, numerics, devices", ("errors", "checks", "files", "precision", "sam", "shipped", "devices")),
    ("data and models", ("data", "models")),
    ("BackdoorBench's files, the registry, evaluation", ("record_io", "registry", "evaluation", "adversarial")),
    ("the training loop", ("training",)),
    ("what algorithms share", ("probe", "gic")),
    ("algorithms: defenses, D3, attacks, analyses", ("d3", "d3_targets", "defenses", "attacks", "auxiliary",
                                                     "analysis")),
    ("one defense run", ("bench",)),
    ("harnesses and the BackdoorBench adapter", ("compare", "grid", "demo", "backdoorbench")),
    ("front ends and the package's face", ("commands", "cli", "__init__")),
]

def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES: Dict[str, Path] = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported(module: str, path: Path, node: ast.AST) -> List[str]:
    """The d3_plugin modules one import statement names (a name that is no module: its package)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = ".".join(package[:len(package) - node.level + 1] + [node.module or ""]).strip(".") if node.level \
        else node.module
    return [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]


def nearest_module(name: str) -> str:
    while name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def import_graph() -> Dict[str, Set[str]]:
    graph: Dict[str, Set[str]] = {module: set() for module in MODULES}
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for name in imported(module, path, node):
                    target = nearest_module(name)
                    if target in MODULES and target != module and not module.startswith(target + "."):
                        graph[module].add(target)
    return graph


def layer_of(module: str) -> int:
    first = module.split(".")[1] if "." in module else "__init__"
    for index, (_, names) in enumerate(LAYERS):
        if first in names:
            return index
    raise AssertionError(f"{module} is in no layer of LAYERS; add it where it belongs")


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    found: List[List[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def upward(graph: Dict[str, Set[str]]) -> Set[Tuple[str, str]]:
    return {(a, b) for a, targets in graph.items() for b in targets if layer_of(b) > layer_of(a)}


def test_the_graph_is_read():
    graph = import_graph()
    assert "d3_plugin.registry" in graph["d3_plugin.d3"]
    assert "d3_plugin.data" in graph["d3_plugin.attacks.base"]  # `from ..data import ImageSet`


def test_every_module_has_a_layer():
    for module in MODULES:
        layer_of(module)


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_no_import_from_a_lower_layer_into_a_higher_one():
    found = upward(import_graph())
    names = {index: name for index, (name, _) in enumerate(LAYERS)}
    unexpected = [f"{a} ({names[layer_of(a)]}) imports {b} ({names[layer_of(b)]})"
                  for a, b in sorted(found)]
    assert not unexpected, "upward imports:\n" + "\n".join(unexpected)


@pytest.mark.parametrize("graph, expected", [({"a": {"b"}, "b": {"a"}, "c": set()}, [["a", "b"]]),
                                             ({"a": {"b"}, "b": {"c"}, "c": set()}, [])])
def test_cycles_are_found(graph, expected):
    assert cycles(graph) == expected
