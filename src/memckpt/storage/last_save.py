"""Each rank's last save, recorded in its node's tree for ``memckpt status``.

A skipped save leaves no step behind, and a replication rate lives only in a save's
result: so after every save (committed, skipped or failed) a rank writes
``<job>/.peers/last-save-rank-<r>.json`` with what happened. ``memckpt status`` reads
them back as untrusted input: regular files only (no symlinks, no FIFOs), at most
64 KiB, each field type-checked; a record that fails any check is ignored.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Final

from memckpt.errors import CorruptCheckpointError
from memckpt.ids import JobLayout, validate_rank
from memckpt.storage.safe_fs import is_real_dir, read_regular, write_atomic

__all__ = ["LAST_SAVE_PREFIX", "read_last_saves", "record_last_save"]

log = logging.getLogger(__name__)

LAST_SAVE_PREFIX: Final = "last-save-rank-"
_MAX_BYTES: Final = 64 << 10
# field -> accepted types (bool is not a number here)
_FIELDS: Final[dict[str, tuple[type, ...]]] = {
    "step": (int,),
    "outcome": (str,),
    "reason": (str, type(None)),
    "unix": (int, float),
    "nbytes": (int,),
    "blocking_s": (int, float),
    "total_s": (int, float),
    "replication_bytes": (int,),
    "replication_s": (int, float),
}
OUTCOMES: Final = ("committed", "skipped", "failed")


def _path(layout: JobLayout, rank: int) -> Path:
    return layout.peers_dir / f"{LAST_SAVE_PREFIX}{validate_rank(rank)}.json"


def record_last_save(
    layout: JobLayout,
    rank: int,
    step: int,
    outcome: str,
    *,
    reason: str | None = None,
    nbytes: int = 0,
    blocking_s: float = 0.0,
    total_s: float = 0.0,
    replication_bytes: int = 0,
    replication_s: float = 0.0,
) -> None:
    """Write ``rank``'s last-save record; never raises (a status aid, not a checkpoint)."""
    doc = {
        "step": int(step), "outcome": outcome, "reason": reason, "unix": time.time(),
        "nbytes": int(nbytes), "blocking_s": float(blocking_s), "total_s": float(total_s),
        "replication_bytes": int(replication_bytes), "replication_s": float(replication_s),
    }  # fmt: skip
    try:
        if not layout.root.is_dir():
            return  # the job's tree is gone (deleted by hand, or released): nothing to note
        with contextlib.suppress(FileExistsError):
            os.mkdir(layout.peers_dir, 0o700)
        if is_real_dir(layout.peers_dir):  # never write through a planted link
            write_atomic(_path(layout, rank), json.dumps(doc).encode(), tag=f"r{rank}")
    except (OSError, ValueError) as e:
        log.debug("rank %d: cannot record the last save: %s", rank, e)


def _valid(doc: Any) -> dict[str, Any] | None:
    if not isinstance(doc, dict):
        return None
    out: dict[str, Any] = {}
    for name, types in _FIELDS.items():
        value = doc.get(name)
        if isinstance(value, bool) or not isinstance(value, types):
            return None
        out[name] = value
    if out["outcome"] not in OUTCOMES or out["step"] < 0:
        return None
    return out


def read_last_saves(job_dir: str | os.PathLike[str]) -> dict[int, dict[str, Any]]:
    """The valid last-save records of a node's job tree, by rank (missing: not there)."""
    out: dict[int, dict[str, Any]] = {}
    try:
        peers = JobLayout(Path(job_dir).parent, Path(job_dir).name).peers_dir
        names = sorted(os.listdir(peers))
    except (OSError, ValueError):
        return out
    for name in names:
        if not (name.startswith(LAST_SAVE_PREFIX) and name.endswith(".json")):
            continue
        digits = name[len(LAST_SAVE_PREFIX) : -len(".json")]
        if not digits.isdigit():
            continue
        try:
            raw = read_regular(peers / name, _MAX_BYTES, "last-save record")
            doc = _valid(json.loads(raw)) if raw is not None else None
        except (CorruptCheckpointError, OSError, ValueError) as e:
            log.debug("ignoring %s: %s", peers / name, e)
            continue
        if doc is not None:
            out[int(digits)] = doc
    return out
