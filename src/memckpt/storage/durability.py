"""How durable a step is: the tiers, and the record a node keeps of a step's persistence.

The tiers, weakest first: ``local`` (one copy of every rank's data, in the node-local
memory tier), ``replicated`` (k >= 2 copies of every rank's data, on k distinct nodes),
``persisted`` (the whole step verified on the persistent tier: a directory or a URL).
``none``: not committed (running, skipped, failed), or no copy of some rank is left.

When this rank's drain learns a step is persisted, the engine writes a record of it into
the step's directory on the node (``<job>/step-<N>/persisted.json``: the manifest checksum
it persisted, where, when), so that ``memckpt ls`` and ``memckpt status`` can tell a
persisted step without reaching the store. The tree is untrusted: a record counts only
when it parses and names the checksum of the step's manifest as it is now; it says what
a drain reported, not what the store holds today.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from memckpt import ids
from memckpt.errors import CorruptCheckpointError, InvalidNameError
from memckpt.storage.safe_fs import read_regular, write_atomic

__all__ = [
    "LOCAL",
    "NONE",
    "PERSISTED",
    "REPLICATED",
    "TIERS",
    "PersistedRecord",
    "check_tier",
    "describe",
    "read_persisted_record",
    "tier_of",
    "tier_rank",
    "write_persisted_record",
]

log = logging.getLogger(__name__)

NONE: Final = "none"
LOCAL: Final = "local"
REPLICATED: Final = "replicated"
PERSISTED: Final = "persisted"
TIERS: Final = (LOCAL, REPLICATED, PERSISTED)
"""Weakest first; a step that reached a tier counts as having reached the weaker ones."""

_MAX_RECORD_BYTES: Final = 16384


def check_tier(tier: object) -> str:
    """``tier`` if it names a tier, else InvalidNameError listing them."""
    if tier not in TIERS:
        raise InvalidNameError(f"unknown durability tier {tier!r}: use one of {', '.join(TIERS)}")
    return str(tier)


def tier_rank(tier: str) -> int:
    """0 for ``none``, then 1, 2, 3 from ``local`` to ``persisted``."""
    return 0 if tier == NONE else TIERS.index(tier) + 1


def tier_of(copies: int, persisted: bool) -> str:
    """A committed step's tier from the copies of its least-held rank and its persistence."""
    if persisted:
        return PERSISTED
    if copies >= 2:
        return REPLICATED
    return LOCAL if copies == 1 else NONE


def describe(tier: str, copies: int) -> str:
    """For a table cell: ``local``, ``replicated (2 copies)``, ``persisted`` or ``-``."""
    if tier == REPLICATED:
        return f"replicated ({copies} copies)"
    return "-" if tier == NONE else tier


@dataclass(frozen=True)
class PersistedRecord:
    """A drain's report that the step with this manifest is persisted at ``where``."""

    step: int
    manifest_checksum: int
    where: str
    unix: float

    def as_dict(self) -> dict[str, object]:
        return {"where": self.where, "unix": self.unix}


def _path(job_dir: Path, step: int) -> Path:
    return ids.JobLayout(job_dir.parent, job_dir.name).persisted_record_path(step)


def write_persisted_record(
    job_dir: str | os.PathLike[str], step: int, manifest_checksum: int, where: str
) -> bool:
    """Record in this node's tree that ``step`` (with this manifest) is persisted at ``where``.

    Never raises: a step directory gone (retention) or unwritable only loses the record
    (logged at DEBUG). Returns whether the record is there.
    """
    root = Path(job_dir)
    path = _path(root, step)
    manifest = ids.JobLayout(root.parent, root.name).manifest_path(step)
    doc = {"step": step, "manifest_checksum": manifest_checksum, "where": where,
           "unix": time.time()}  # fmt: skip
    try:
        if not manifest.exists():
            return False
        write_atomic(path, json.dumps(doc).encode(), tag="persisted.")
        if manifest.exists():
            return True
        # retention took the step apart meanwhile: leave no directory holding only this
        path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            path.parent.rmdir()
    except OSError as e:
        log.debug("no persisted record for step %d in %s: %s", step, root, e)
    return False


def read_persisted_record(
    job_dir: str | os.PathLike[str], step: int, manifest_checksum: int | None
) -> PersistedRecord | None:
    """The record of ``step`` in one node's tree when it names ``manifest_checksum``.

    None when there is none, it does not parse, or it is about another manifest (a
    re-save of the step, or a planted file); never raises.
    """
    if manifest_checksum is None:
        return None
    root = Path(job_dir)
    path = _path(root, step)
    try:
        raw = read_regular(path, _MAX_RECORD_BYTES, "persisted record")
        if raw is None:
            return None
        doc = json.loads(raw)
        rec = PersistedRecord(int(doc["step"]), int(doc["manifest_checksum"]),
                              str(doc["where"]), float(doc["unix"]))  # fmt: skip
    except (OSError, CorruptCheckpointError, ValueError, TypeError, KeyError) as e:
        log.warning("ignoring %s: %s", path, e)
        return None
    if rec.step != step or rec.manifest_checksum != manifest_checksum:
        return None
    return rec
