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
