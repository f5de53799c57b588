"""The package's structure (README, "How qtune is built"), read from the source's import statements, those inside
functions included: the face (cli, ui) over the verbs (qtune/commands/, one module each, never importing another)
over the library packages, which never import a verb or the terminal; and no import circle anywhere."""
from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

ROOT = REPO / "qtune"
FACE = {"cli", "__main__", "ui"}
# what may stand at the top of the package besides the face: run folders, atomic outputs, errors, checks, text
GROUND = {"__init__", "runs", "io", "errors", "integrity", "text"}
LIBRARY = {"config", "stages", "data", "modeling", "training", "inference", "evaluation", "export"}


def _modules() -> dict[str, Path]:
    """Every module as its dotted name below qtune (a package as its own name, from its __init__.py)."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts) or "__init__"] = path
    return out


def _imports(path: Path, known: set[str]) -> set[str]:
    """The qtune modules a file imports (top level or inside functions): `from qtune.a import b` is module a.b where
    that is a module, else a; `from qtune import b` is b. Imports for type checkers alone (under `if TYPE_CHECKING:`)
    never run and are not counted."""
    out = set()
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and isinstance(block.test, ast.Name) and block.test.id == "TYPE_CHECKING"
                   for stmt in block.body for n in ast.walk(stmt)}
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module != "qtune" and not node.module.startswith("qtune."):
                continue
            base = node.module.removeprefix("qtune").removeprefix(".")
            for alias in node.names:
                sub = f"{base}.{alias.name}" if base else alias.name
                out.add(sub if sub in known else base)
        elif isinstance(node, ast.Import):
            out |= {a.name.removeprefix("qtune.") for a in node.names if a.name.startswith("qtune.")}
    return out - {""}


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(path, set(mods)) - {name} for name, path in mods.items()}


def _part(name: str) -> str:
    return name.split(".")[0]


def test_every_module_stands_in_a_part():
    stray = [n for n in _modules() if "." not in n and n not in FACE | GROUND | LIBRARY | {"commands"}]
    assert not stray, f"modules outside the layout: {stray}"


def test_verbs_import_no_other_verb_and_the_library_no_verb_nor_terminal():
    broken = []
    for name, imported in _graph().items():
        for other in imported:
            if name.startswith("commands.") and other.startswith("commands.") and other != name:
                broken.append(f"verb {name} imports verb {other}")
            elif _part(name) not in FACE | {"commands"} and (_part(other) in FACE or _part(other) == "commands"):
                broken.append(f"library {name} imports {other}")
    assert not broken, "\n".join(broken)


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of more than one module."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circle_even_inside_functions():
    assert _circles(_graph()) == []


def test_the_rules_see_imports_inside_functions_and_circles(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from qtune import ui\n    from qtune.commands.merge import run\n"
                 "    import qtune.commands.train\n    from qtune.data import formats\n"
                 "if TYPE_CHECKING:\n    from qtune.config import schema\n")
    assert _imports(f, {"ui", "data.formats", "commands.merge", "commands.train"}) == {
        "ui", "commands.merge", "commands.train", "data.formats"}
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
