"""The package's import graph has no circle, and its top level stays small.

Every ``import`` and ``from ... import`` in ``smoe_ds/`` counts, also the ones inside functions:
an import moved into a function to dodge a circle is still a circle in the design."""

from __future__ import annotations

import ast
from pathlib import Path

import smoe_ds

PACKAGE = Path(smoe_ds.__file__).parent
MAX_TOP_LEVEL_MODULES = 12


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """{module: the smoe_ds modules it imports}. ``from smoe_ds.pkg import name`` counts as an
    import of ``smoe_ds.pkg.name`` where that is a module, else of ``smoe_ds.pkg``."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name in modules}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    edges.add(sub if sub in modules else node.module)
        graph[name] = {e for e in edges if e in modules and e != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None (depth-first search, three colours)."""
    state, stack = {}, []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_module_of_smoe_ds_imports_itself_through_others():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_top_level_holds_the_commands_and_a_few_shared_modules_only():
    top = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")
    assert len(top) <= MAX_TOP_LEVEL_MODULES, top


# The command modules: smoe-train, smoe-finetune, smoe-evaluate, smoe-convert, smoe-generate, smoe-hf-convert.
COMMANDS = {f"smoe_ds.{name}" for name in ("train", "finetune", "evaluate", "convert", "generate", "hf_convert")}


def test_commands_import_the_library_and_nothing_imports_a_command():
    """A command module parses its arguments and calls the library; what another module needs
    lives in the library, so that the commands stay thin."""
    graph = import_graph()
    assert COMMANDS <= set(graph), sorted(COMMANDS - set(graph))
    importers = {m: sorted(graph[m] & COMMANDS) for m in graph if m not in COMMANDS and graph[m] & COMMANDS}
    assert not importers, importers
