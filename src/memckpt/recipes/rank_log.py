"""Each rank's log file: its line format, the line a failing rank leaves, reading it back.

The recipes' entry point appends every log record of rank r to
``$MEMCKPT_LOG_DIR/rank<r>.log`` (``attach``). When training raises, it logs one
line ``rank <r> failed: <ErrorType>: <first line of the message>`` (``failure_message``)
followed by the traceback. ``memckpt run`` then reads the logs back
(``first_failure``, pure apart from reading the files): the earliest such line of
the run says why the run failed; without one, the earliest ERROR line.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DATE_FORMAT",
    "RankFailure",
    "attach",
    "failure_message",
    "first_failure",
    "line_format",
    "parse_failures",
]

DATE_FORMAT = "%Y-%m-%dT%H:%M:%S"
_LINE = re.compile(
    r"^(?P<time>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}) \[rank (?P<rank>\d+)\] "
    r"(?P<level>[A-Z]+) (?P<name>\S+): (?P<message>.*)$"
)
_FAILED = re.compile(r"^rank \d+ failed: (?P<why>.*)$")


def line_format(rank: int | str) -> str:
    """The format of a rank's log lines: local time to the millisecond, rank, level, logger."""
    return f"%(asctime)s.%(msecs)03d [rank {rank}] %(levelname)s %(name)s: %(message)s"


def attach(directory: str | Path, rank: int | str) -> logging.Handler:
    """Append every log record of this process to ``<directory>/rank<rank>.log``."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path / f"rank{rank}.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter(line_format(rank), DATE_FORMAT))
    logging.getLogger().addHandler(handler)
    return handler


def failure_message(rank: int | str, error: BaseException) -> str:
    """``rank <r> failed: <ErrorType>: <first line of the message>``: one line."""
    text = str(error).strip().splitlines()
    return f"rank {rank} failed: {type(error).__name__}" + (f": {text[0]}" if text else "")


@dataclass(frozen=True)
class RankFailure:
    """A line that says why a rank failed, and where it is."""

    rank: int
    why: str  # "<ErrorType>: <message>", or an ERROR line's message
    time: float  # unix time of the line
    failed: bool = True  # a failure_message line (False: another ERROR line)
    log: Path | None = None


def parse_failures(lines: Iterable[str], *, since: float = 0.0) -> list[RankFailure]:
    """Failure lines (``failure_message``) and other ERROR lines logged at or after ``since``.

    A traceback's own lines do not match the line format and are skipped.
    """
    out: list[RankFailure] = []
    for line in lines:
        m = _LINE.match(line.rstrip("\n"))
        if m is None or m["level"] not in ("ERROR", "CRITICAL"):
            continue
        stamp = datetime.datetime.strptime(m["time"], f"{DATE_FORMAT}.%f").timestamp()
        if stamp < since:
            continue
        f = _FAILED.match(m["message"])
        why = f["why"] if f is not None else m["message"]
        out.append(RankFailure(int(m["rank"]), why, stamp, failed=f is not None))
    return out


def first_failure(directory: str | Path, *, since: float = 0.0) -> RankFailure | None:
    """The earliest failure line of any ``rank<r>.log`` under ``directory`` since ``since``;
    without one, the earliest ERROR line; None when there is neither."""
    found: list[RankFailure] = []
    for path in sorted(Path(directory).glob("rank*.log")):
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                lines = f.readlines()
        except OSError:
            continue
        found += [dataclasses.replace(p, log=path) for p in parse_failures(lines, since=since)]
    return min(found, key=lambda p: (not p.failed, p.time), default=None)
