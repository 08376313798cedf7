"""Progress events for tools that watch a training process from outside.

When ``MEMCKPT_EVENTS_FILE`` names a file, memckpt appends one JSON object per line
to it (``{"event", "time", "pid", ...}``): ``saved`` when a memory checkpoint is
globally committed, ``loaded`` when one is loaded. ``memckpt simulate-preemption``
reads them to report saved and resumed steps. Without the variable nothing is written.
Writes are single ``O_APPEND`` writes, so lines from several ranks never interleave.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

from memckpt.errors import CorruptCheckpointError
from memckpt.settings import EVENTS_FILE_ENV
from memckpt.storage.safe_fs import open_regular

__all__ = ["EVENTS_FILE_ENV", "emit", "read_events"]

log = logging.getLogger(__name__)


def emit(event: str, **fields: Any) -> None:
    """Append an event line if ``MEMCKPT_EVENTS_FILE`` is set; never raises."""
    path = os.environ.get(EVENTS_FILE_ENV)
    if not path:
        return
    doc = {"event": event, "time": time.time(), "pid": os.getpid(), **fields}
    line = (json.dumps(doc, default=str) + "\n").encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
    except OSError as e:
        log.warning("cannot append event to %s: %s", path, e)


def read_events(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The events in ``path``, oldest first; a torn last line is skipped."""
    out: list[dict[str, Any]] = []
    try:
        fd = open_regular(path, "event log")
    except CorruptCheckpointError as e:
        log.warning("not reading events: %s", e)
        return out
    if fd is None:
        return out
    try:
        with os.fdopen(fd, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    doc = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(doc, dict) and "event" in doc:
                    out.append(doc)
    except OSError as e:
        log.warning("stopped reading events at %s: %s", path, e)
    return out
