"""When the allocation ends: deadlines from the environment, an argument, or a signal."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Final

from memckpt import settings
from memckpt.errors import DeadlineFormatError

__all__ = [
    "DEADLINE_ENV_VARS",
    "MEMCKPT_DEADLINE_ENV",
    "MLP_DEADLINE_ENV",
    "Deadline",
    "coerce_deadline",
    "deadline_from_env",
    "earliest",
    "parse_deadline",
]

MLP_DEADLINE_ENV: Final = "MLP_CURRENT_CAPACITY_BLOCK_EXPIRATION_TIMESTAMP"
"""Set by the platform velastic targets: unix seconds at which the capacity block expires."""
MEMCKPT_DEADLINE_ENV: Final = settings.DEADLINE_ENV
"""memckpt's own: unix seconds, unix milliseconds or ISO-8601 with a UTC offset."""
DEADLINE_ENV_VARS: Final = (MLP_DEADLINE_ENV, MEMCKPT_DEADLINE_ENV)

# A number this large read as seconds would be after the year 5000; as milliseconds it is
# after 1973, so it can only be meant as milliseconds.
_MILLISECONDS_FROM: Final = 1e11
_TOO_LARGE: Final = 1e14

_EXPECTED: Final = (
    "expected unix seconds (1767225600), unix milliseconds (1767225600000) "
    "or ISO-8601 with a UTC offset (2026-01-01T00:00:00Z)"
)


@dataclass(frozen=True)
class Deadline:
    """A time by which the job will be stopped (unix seconds) and what announced it."""

    at_unix: float
    source: str

    def remaining_s(self, now_unix: float) -> float:
        """Seconds left at ``now_unix``; negative once the deadline has passed."""
        return self.at_unix - now_unix


def parse_deadline(text: str, source: str) -> float:
    """Unix seconds from seconds, milliseconds (values >= 1e11) or ISO-8601 with an offset.

    ``source`` names where the text came from (an environment variable) in the error.
    A time without an offset is rejected: read in the wrong zone it would be hours off.
    """
    stripped = text.strip()
    try:
        number = float(stripped)
    except ValueError:
        number = None
    if number is not None:
        if not math.isfinite(number) or number <= 0:
            raise DeadlineFormatError(f"{source}={text!r} is not a deadline: {_EXPECTED}")
        if number >= _TOO_LARGE:
            raise DeadlineFormatError(
                f"{source}={text!r} is too large for unix seconds or milliseconds: {_EXPECTED}"
            )
        return number / 1000.0 if number >= _MILLISECONDS_FROM else number
    iso = stripped[:-1] + "+00:00" if stripped[-1:] in ("Z", "z") else stripped
    try:
        moment = datetime.fromisoformat(iso)
    except ValueError:
        raise DeadlineFormatError(f"{source}={text!r} is not a deadline: {_EXPECTED}") from None
    if moment.tzinfo is None:
        raise DeadlineFormatError(
            f"{source}={text!r} has no UTC offset; add one such as Z or +02:00"
        )
    return moment.timestamp()


def coerce_deadline(value: float | str | datetime, name: str = "deadline") -> Deadline:
    """A Deadline from unix seconds, a string ``parse_deadline`` accepts, or an aware datetime.

    ``name`` is the argument's name in errors; the Deadline's source is "<name> argument".
    """
    source = f"{name} argument"
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise DeadlineFormatError(f"{name}={value!r} has no tzinfo; pass an aware datetime")
        return Deadline(value.timestamp(), source)
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise DeadlineFormatError(f"{name}={value!r} is not a deadline: {_EXPECTED}")
    return Deadline(parse_deadline(str(value), name), source)


def deadline_from_env(
    environ: Mapping[str, str], names: Iterable[str] = DEADLINE_ENV_VARS
) -> Deadline | None:
    """The earliest deadline among the set, non-empty variables in ``names``; None if none."""
    found = [
        Deadline(parse_deadline(environ[name], name), name)
        for name in names
        if environ.get(name, "").strip()
    ]
    return earliest(found)


def earliest(deadlines: Iterable[Deadline | None]) -> Deadline | None:
    """The deadline that comes first, ignoring None; None when there is none."""
    present = [d for d in deadlines if d is not None]
    return min(present, key=lambda d: d.at_unix) if present else None
