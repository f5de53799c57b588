"""docs/config.md, generated from the schema: every config key with its type, default and the comment beside it.

The schema's dataclasses (qtune/config/schema.py) give the keys, types and defaults; the comments next to each field
(on its line, or the lines just above it) and each class's docstring give the words. `reference_markdown()` returns
the page; `python -m qtune.config.reference` writes docs/config.md, and a test fails when the two differ.
"""
from __future__ import annotations

import ast
import dataclasses
import io
import sys
import tokenize
import typing
from enum import Enum
from pathlib import Path

from omegaconf import MISSING

from qtune.config import schema
from qtune.config.compose import GROUPS, group_options

HEADER = """\
# Configuration reference

Generated from `qtune/config/schema.py` by `python -m qtune.config.reference` (a test fails when this page and the
schema differ); do not edit by hand.

Every verb composes `conf/config.yaml`: one option per group (`model=qwen3_8b`, `quant=nf4`, `lora=r64`, …), then any
`group.key=value` override. The defaults below are the schema's; an option file may set some of them (for example
`quant=nf4` sets `quant.method=nf4`, `model=qwen3_8b` sets every `model.*` key). `qtune <verb> --cfg <overrides>`
prints the resolved config. A key that does not exist, a value of the wrong type and a choice outside those listed
fail in one line before anything loads.
"""


def _comments(source: str) -> dict[int, str]:
    """Line number -> the text of the comment on that line."""
    out = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            out[tok.start[0]] = tok.string.lstrip("#").strip()
    return out


def _field_notes(source: str) -> dict[str, dict[str, str]]:
    """Class name -> field name -> its comment: the comment block just above the field, then the one on its lines."""
    lines = source.splitlines()
    comments = _comments(source)
    notes: dict[str, dict[str, str]] = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        fields = notes.setdefault(node.name, {})
        for stmt in node.body:
            if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                continue
            above = []
            n = stmt.lineno - 1
            while n >= 1 and lines[n - 1].strip().startswith("#"):
                above.insert(0, comments[n])
                n -= 1
            beside = [comments[n] for n in range(stmt.lineno, (stmt.end_lineno or stmt.lineno) + 1) if n in comments]
            fields[stmt.target.id] = " ".join(above + beside)
    return notes


def _type_name(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:
        rest = [a for a in args if a is not type(None)]
        return " or ".join(_type_name(a) for a in rest) + " or null"
    if origin in (list, typing.List):
        return f"list of {_type_name(args[0])}"
    if origin in (dict, typing.Dict):
        return f"map {_type_name(args[0])} → {_type_name(args[1])}"
    if isinstance(tp, type) and issubclass(tp, Enum):
        return " | ".join(m.value for m in tp)
    if dataclasses.is_dataclass(tp):
        return tp.__name__
    return {str: "str", int: "int", float: "float", bool: "bool"}.get(tp, getattr(tp, "__name__", str(tp)))


def _value(v) -> str:
    if isinstance(v, Enum):
        return v.value
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_value(x)}" for k, x in v.items()) + "}"
    return str(v)


def _default(f: dataclasses.Field, prefix: str) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "required"
    if isinstance(value, str) and value == MISSING:
        return "set by `model=`" if prefix.startswith("model.") else "required"
    return f"`{_value(value)}`".replace("|", "\\|")


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _rows(cls, prefix: str, notes, hints_of) -> list[str]:
    rows = []
    hints = hints_of(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            continue  # a nested section gets its own table
        rows.append(f"| `{key}` | {_cell(_type_name(tp))} | {_default(f, prefix)} | {_cell(notes.get(cls.__name__, {}).get(f.name, ''))} |")
    return rows


def _section(cls, prefix: str, title: str, notes, hints_of, options: list[str] | None) -> list[str]:
    out = [f"## {title}", ""]
    doc = (cls.__doc__ or "").strip()
    if doc and not doc.startswith(cls.__name__ + "("):  # dataclasses write a signature where no docstring is
        out += [" ".join(doc.split()), ""]
    if options:
        out += ["Options: " + ", ".join(f"`{o}`" for o in options) + ".", ""]
    out += ["| key | type | default | meaning |", "|---|---|---|---|", *_rows(cls, prefix, notes, hints_of), ""]
    hints = hints_of(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += _section(tp, f"{prefix}{f.name}.", f"`{prefix}{f.name}`", notes, hints_of, None)
        elif typing.get_origin(tp) in (list, typing.List) and dataclasses.is_dataclass(typing.get_args(tp)[0]):
            item = typing.get_args(tp)[0]
            out += _section(item, f"{prefix}{f.name}[].", f"`{prefix}{f.name}[]` (each entry)", notes, hints_of, None)
    return out


def reference_markdown() -> str:
    """The whole of docs/config.md."""
    notes = _field_notes(Path(schema.__file__).read_text())
    namespace = vars(schema)

    def hints_of(cls):
        return typing.get_type_hints(cls, globalns=namespace)

    root = hints_of(schema.Config)
    out = [HEADER]
    top = [f for f in dataclasses.fields(schema.Config) if not dataclasses.is_dataclass(root[f.name])]
    out += ["## Top level", "", "| key | type | default | meaning |", "|---|---|---|---|"]
    out += [f"| `{f.name}` | {_cell(_type_name(root[f.name]))} | {_default(f, '')} | "
            f"{_cell(notes['Config'].get(f.name, ''))} |" for f in top]
    out.append("")
    for f in dataclasses.fields(schema.Config):
        tp = root[f.name]
        if dataclasses.is_dataclass(tp):
            options = group_options(f.name) if f.name in GROUPS else None
            out += _section(tp, f"{f.name}.", f"`{f.name}`", notes, hints_of, options)
    return "\n".join(out).rstrip("\n") + "\n"


def main() -> None:
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[2] / "docs" / "config.md"
    target.write_text(reference_markdown())
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
