"""The package's one rule of structure (README, Development): verb modules import library modules and `ui`, never
each other; library modules never import `ui`, the CLI or a verb. Read from the source's import statements."""
from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

VERBS = {"download", "prepare", "inspect_moe", "train", "merge", "chat", "serve", "eval", "sweep"}
FACE = {"cli", "__main__", "ui"}


def _imports(path: Path) -> set[str]:
    """The qtune modules a file imports (top level or inside functions), as names below qtune."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "qtune":
                out |= {a.name for a in node.names}
            elif node.module.startswith("qtune."):
                out.add(node.module.removeprefix("qtune."))
        elif isinstance(node, ast.Import):
            out |= {a.name.removeprefix("qtune.") for a in node.names if a.name.startswith("qtune.")}
    return out


def _modules():
    root = REPO / "qtune"
    for path in sorted(root.rglob("*.py")):
        yield ".".join(path.relative_to(root).with_suffix("").parts), path


def test_verbs_import_no_other_verb_and_the_library_no_verb_nor_terminal():
    broken = []
    for name, path in _modules():
        top = name.split(".")[0]
        for imported in _imports(path):
            first = imported.split(".")[0]
            if top in VERBS and first in VERBS and first != top:
                broken.append(f"verb {name} imports verb {imported}")
            elif top not in VERBS | FACE and (first in VERBS or first in FACE):
                broken.append(f"library {name} imports {imported}")
    assert not broken, "\n".join(broken)


def test_the_rule_sees_imports_inside_functions(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from qtune import ui\n    from qtune.merge import merge\n    import qtune.train\n")
    assert _imports(f) == {"ui", "merge", "train"}
