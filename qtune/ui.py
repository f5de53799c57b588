"""Everything Rich: error lines, tables, progress. Library code never imports rich directly."""
from __future__ import annotations

import sys

from rich.console import Console
from rich.markup import escape

err_console = Console(stderr=True, highlight=False, soft_wrap=True)
console = Console(highlight=False)


def print_error(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {escape(message)}")


def print_warning(message: str) -> None:
    err_console.print(f"[yellow]warning:[/] {escape(message)}")


def info(message: str) -> None:
    console.print(message)


def is_terminal() -> bool:
    return sys.stdout.isatty()


def human_bytes(n: float | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def files_table(title: str, files: list[tuple[str, int | None]]) -> None:
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    table.add_column("file")
    table.add_column("size", justify="right")
    for name, size in files:
        table.add_row(name, human_bytes(size))
    total = sum(s or 0 for _, s in files)
    table.add_section()
    table.add_row(f"{len(files)} files", human_bytes(total), style="bold")
    console.print(table)
