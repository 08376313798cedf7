"""Progress events, for listeners in this process and tools that watch it from outside.

Each event is one dict (``{"event", "time", "pid", ...}``): ``saved`` when a memory
checkpoint is globally committed, ``skipped`` when a save was skipped, ``non_finite`` when
a committed step held NaN/Inf, ``loaded`` when one is loaded, ``replicated`` and
``persisted`` when a step reached a peer node or the durable tier. Events of the engine
carry ``job`` and ``rank``.

In-process listeners (:func:`subscribe`; ``memckpt.metrics`` is one) get every event, on
the thread that emits it: they must be quick, and one that raises is logged and never
breaks the save or load that emitted. When ``MEMCKPT_EVENTS_FILE`` names a file, memckpt
also appends each event as one JSON line to it; ``memckpt simulate-preemption`` reads them
to report saved and resumed steps. Without the variable no file is written. Writes are
single ``O_APPEND`` writes, so lines from several ranks never interleave.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import types
from collections.abc import Callable, Mapping
from typing import Any

from memckpt.errors import CorruptCheckpointError
from memckpt.settings import EVENTS_FILE_ENV
from memckpt.storage.safe_fs import open_regular

__all__ = ["EVENTS_FILE_ENV", "Listener", "emit", "read_events", "subscribe", "unsubscribe"]

log = logging.getLogger(__name__)

Listener = Callable[[Mapping[str, Any]], None]
"""Called with each event (a read-only mapping) on the thread that emits it."""

_listeners: tuple[Listener, ...] = ()  # replaced, never mutated: emit reads it without a lock
_listeners_lock = threading.Lock()


def subscribe(listener: Listener) -> Callable[[], None]:
    """Call ``listener(event)`` for every event this process emits; returns the unsubscribe."""
    global _listeners
    with _listeners_lock:
        _listeners = (*_listeners, listener)
    return lambda: unsubscribe(listener)


def unsubscribe(listener: Listener) -> None:
    """Stop calling ``listener`` (a listener subscribed twice is removed once)."""
    global _listeners
    with _listeners_lock:
        found = list(_listeners)
        if listener in found:
            found.remove(listener)
        _listeners = tuple(found)


def emit(event: str, **fields: Any) -> None:
    """Tell the listeners, and append an event line if ``MEMCKPT_EVENTS_FILE`` is set.

    Never raises: a listener's error and a failed write are logged.
    """
    path = os.environ.get(EVENTS_FILE_ENV)
    listeners = _listeners
    if not path and not listeners:
        return
    doc = {"event": event, "time": time.time(), "pid": os.getpid(), **fields}
    if listeners:
        view = types.MappingProxyType(doc)
        for listener in listeners:
            try:
                listener(view)
            except Exception:  # a listener must never break the save or load that emits
                log.warning("event listener %r failed on a %r event", listener, event,
                            exc_info=True)  # fmt: skip
    if not path:
        return
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
