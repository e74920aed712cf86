"""tinyldm's import layering, read from the source with `ast` (nothing is imported): tinyldm/data
imports nothing from tinyldm/training, cli.py nothing from tinyldm, and the modules' imports form
no circle.

The circle check counts every import that runs: at module level and inside functions too (a lazy
import hides a circle rather than removing it); only `if TYPE_CHECKING:` blocks, which never run,
are left out. The layering checks count every import.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "tinyldm"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        isinstance(test, ast.Name) and test.id == "TYPE_CHECKING"
        or isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def import_nodes(tree: ast.AST, *, type_checking: bool):
    """The Import / ImportFrom nodes of a module, at any depth; those under `if TYPE_CHECKING:` only
    with `type_checking`."""
    stack = list(ast.iter_child_nodes(tree))
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif type_checking or not is_type_checking(node):
            stack.extend(ast.iter_child_nodes(node))


def imported_modules(name: str, path: Path, *, type_checking: bool = True) -> set[str]:
    """The names of the modules `name` imports (absolute, relative ones resolved); for `from P
    import x` the module P.x when it is one, else P."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in import_nodes(tree, type_checking=type_checking):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
            continue
        if node.level:
            base = package.split(".")
            base = base[: len(base) - (node.level - 1)]
            source = ".".join([*base, *([node.module] if node.module else [])])
        else:
            source = node.module
        for alias in node.names:
            out.add(f"{source}.{alias.name}" if f"{source}.{alias.name}" in MODULES else source)
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the tinyldm modules it imports when it runs."""
    return {name: {m for m in imported_modules(name, path, type_checking=False) if m in MODULES}
            for name, path in MODULES.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of the graph (its modules in order, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], node, nxt] if nxt in path else [node, nxt]
            if nxt not in state and (found := visit(nxt, [*path, node])):
                return found
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node, [])):
            return found
    return None


def test_data_imports_nothing_from_training():
    reaching = {name: sorted(m for m in imported_modules(name, path)
                             if m == "tinyldm.training" or m.startswith("tinyldm.training."))
                for name, path in MODULES.items() if name.startswith("tinyldm.data")}
    assert len(reaching) >= 8 and "tinyldm.data.order" in reaching
    assert {k: v for k, v in reaching.items() if v} == {}


def test_cli_imports_nothing_from_tinyldm():
    assert not {m for m in imported_modules("tinyldm.cli", MODULES["tinyldm.cli"])
                if m.startswith("tinyldm")}


def test_the_imports_form_no_circle():
    graph = import_graph()
    assert "tinyldm.files" in graph["tinyldm.data.latents"]  # the resolver sees absolute imports,
    assert "tinyldm.data.order" in graph["tinyldm.data.latent_batches"]  # relative ones,
    assert "tinyldm.memory" in graph["tinyldm.tools.sampling"]
    # ... and those inside functions (check_shapes builds the modules it checks)
    assert "tinyldm.autoencoder" in graph["tinyldm.checkpoint"]
    cycle = find_cycle(graph)
    assert cycle is None, f"import circle: {' -> '.join(cycle)}"


def test_the_circle_finder_finds_a_circle_and_resolves_imports(tmp_path):
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
    assert find_cycle({"a": {"a"}}) == ["a", "a"]
    # `from ..files import x` in tinyldm/data/latent_batches.py is tinyldm.files
    path = MODULES["tinyldm.data.latent_batches"]
    assert "tinyldm.files" in imported_modules("tinyldm.data.latent_batches", path)
    # a module imported by name from its package, in a function; a relative import; TYPE_CHECKING
    source = tmp_path / "fake.py"
    source.write_text("from typing import TYPE_CHECKING\n"
                      "from .data.order import shard\n"
                      "if TYPE_CHECKING:\n    from tinyldm.training import loop\n"
                      "def f():\n    from tinyldm import memory\n")
    assert imported_modules("tinyldm.fake", source, type_checking=False) == {
        "typing", "tinyldm.data.order", "tinyldm.memory"}
    assert "tinyldm.training.loop" in imported_modules("tinyldm.fake", source)
