"""Plain-text formatting shared by the terminal (ui) and the files qtune writes (summaries): sizes and numbers."""
from __future__ import annotations


def human_bytes(n: float | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def num(x) -> str:
    """A loss or metric with four decimals; '-' where there is none."""
    return "-" if x is None else f"{x:.4f}"
