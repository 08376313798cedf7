"""Terminal output shared by the ``memckpt`` subcommands: tables, sizes, JSON, exit codes.

Every command ends with one of three exit codes: ``EXIT_OK`` (0), ``EXIT_DAMAGE`` (1:
damage found; for ``status`` also: nothing can be recovered; for ``demo``: the demo
failed) and ``EXIT_USAGE`` (2: a bad argument, path, job or step, or a command that
could not run). Under ``--json`` an error is one JSON document on stdout,
``{"error": "...", "kind": "...", "exit": N}``, with the same exit code.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from typing import Any, Final

from memckpt.errors import MemckptError

__all__ = [
    "CHECKED_HEADERS",
    "EXIT_DAMAGE",
    "EXIT_OK",
    "EXIT_USAGE",
    "CommandError",
    "emit_json",
    "error_document",
    "human_bytes",
    "print_table",
]

CHECKED_HEADERS: Final = (
    "checked: headers, indexes, non-tensor parts and manifests (fast); the tensor data "
    "was not re-hashed: {how} does that"
)
"""What a command that reads no tensor data says it checked (``how``: what re-hashes it)."""

EXIT_OK: Final = 0
EXIT_DAMAGE: Final = 1
EXIT_USAGE: Final = 2


class CommandError(MemckptError):
    """What the operator asked for cannot be done as asked (path, job, step, option).

    The message says what is wrong and what to do; the command exits ``EXIT_USAGE``.
    """


def error_document(message: str, kind: str, code: int) -> dict[str, Any]:
    """The JSON form of an error: ``{"error": message, "kind": kind, "exit": code}``."""
    return {"error": message, "kind": kind, "exit": code}


def human_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)  # pragma: no cover


def print_table(
    title: str, columns: Sequence[str], rows: list[Sequence[Any]], whole: Sequence[str] = ()
) -> None:
    """Print a table to stdout (rich); cells are text, never rich markup (paths hold ``[``).

    Nothing is cut short: a long cell folds; the columns in ``whole`` (paths) fold last.
    Piped or captured (not a terminal, no ``COLUMNS``), tables are up to 160 columns wide,
    so a row stays one line for grep and logs.
    """
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    t = Table(title=escape(title))
    for c in columns:
        t.add_column(escape(c), overflow="fold", no_wrap=c in whole)
    for r in rows:
        t.add_row(*[escape(str(x)) for x in r])
    wide = not sys.stdout.isatty() and not os.environ.get("COLUMNS")
    Console(width=160 if wide else None).print(t)


def emit_json(doc: Any) -> None:
    print(json.dumps(doc, indent=2, default=str))
