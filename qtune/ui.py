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


def status(message: str):
    return console.status(message) if is_terminal() else _Null()


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def show_data_stats(stats: dict, path, cache_hit: bool) -> None:
    from rich.table import Table

    table = Table(title=f"prepared data ({'cache hit' if cache_hit else 'new'}): {path}", title_justify="left")
    for col in ("split / source", "format", "examples", "kept", "tokens", "trainable"):
        table.add_column(col, justify="left" if col in ("split / source", "format") else "right")
    for split in ("train", "eval"):
        s = stats.get(split)
        if not s:
            continue
        for p in s["per_source"]:
            table.add_row(f"{split}: {p['source']}", ", ".join(f"{k} {v}" for k, v in p["formats"].items()),
                          str(p["examples"]), str(p["kept"]), f"{p['tokens']:,}", f"{p['trainable_tokens']:,}")
        table.add_row(f"[bold]{split} total[/]", "", str(s["examples"]), str(s["kept"]), f"{s['tokens']:,}",
                      f"{s['trainable_tokens']:,}")
        table.add_section()
    console.print(table)
    for split in ("train", "eval"):
        s = stats.get(split)
        if s:
            L = s["length"]
            pack = (f", packed into {s['packed_rows']} rows of {s['max_length']} ({s['packing_efficiency']:.0%} full)"
                    if "packed_rows" in s else "")
            console.print(f"{split}: length p50 {L['p50']} / p90 {L['p90']} / p99 {L['p99']} / max {L['max']}; "
                          f"truncated {s['truncated']}, dropped (no trainable token) {s['dropped_no_trainable']}{pack}")
    if stats.get("rejected"):
        console.print(f"[yellow]{stats['rejected']} bad records skipped[/] (see {path}/rejects.jsonl)")


def show_preview(shown, counts, rejected: int) -> None:
    from rich.panel import Panel
    from rich.text import Text

    for where, fmt, segments in shown:
        text = Text()
        for s, trainable in segments:
            text.append(s, style="bold green" if trainable else "dim")
        console.print(Panel(text, title=f"{where} ({fmt})", subtitle="green = trained on, dim = context",
                            title_align="left"))
    for path, n in counts:
        console.print(f"{path}: {n} records")
    if rejected:
        console.print(f"[yellow]{rejected} bad records would be skipped[/]")
