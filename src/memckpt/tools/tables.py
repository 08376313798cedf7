"""Terminal output shared by the ``memckpt`` subcommands: tables, sizes, JSON."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

__all__ = ["emit_json", "human_bytes", "print_table"]


def human_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)  # pragma: no cover


def print_table(title: str, columns: Sequence[str], rows: list[Sequence[Any]]) -> None:
    """Print a table to stdout (rich)."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    for c in columns:
        t.add_column(c)
    for r in rows:
        t.add_row(*[str(x) for x in r])
    Console().print(t)


def emit_json(doc: Any) -> None:
    print(json.dumps(doc, indent=2, default=str))
