"""Replication's share of the network: a node-wide rate cap and a pause switch.

Replication shares the NICs with the training job's own collectives (the gradient
all-reduce). A :class:`TransferThrottle` sits in front of every chunk of replica
bytes a rank sends (pushes) or fetches back in the background (re-replication):

- **a cap**: a token bucket in the GCRA form (one "theoretical arrival time" that
  every chunk moves forward by ``nbytes / rate``), kept in an 8-byte file of the
  job's node tree and updated under ``flock``. Every process of the node (ranks are
  separate processes) draws from that one bucket, so the node as a whole stays
  under the cap whichever ranks are busy; a rank that re-replicates alone gets all
  of it. A chunk waits for its turn *before* its request starts, so the request
  itself runs at line rate and its deadline never pays for the cap.
- **a pause**: ``pause()``/``resume()`` (counted holds) stop new chunks from
  starting; a chunk in flight finishes. A transfer resumes with its next chunk,
  under the same transfer id: nothing is sent again. Without a cap, parts go in
  chunks only once the process has paused: until then nothing changes for a job
  that never pauses, and a part already in flight at the first pause finishes.
  A pause holds transfers for at most ``max_pause_s`` at a stretch, then lets them
  go with a warning, so a forgotten ``resume()`` (or a caller that waits for a
  commit while paused) is never stuck for good.

Reads on a load's critical path (``TransferClient.open_remote``) never go through
the throttle: training waits for them.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import math
import os
import re
import stat
import struct
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Final

from memckpt import settings
from memckpt.errors import (
    ConfigError,
    ConfigTypeError,
    StorageIOError,
    TransferError,
    UnsafePathError,
)

__all__ = [
    "BUCKET_FILE",
    "MAX_PAUSE_S",
    "MIN_BANDWIDTH",
    "NodeBucket",
    "TransferThrottle",
    "bandwidth_from_env",
    "format_rate",
    "parse_bandwidth",
]

log = logging.getLogger(__name__)

MIN_BANDWIDTH: Final = 1_000_000  # bytes/s: below this a typical replica takes hours
MAX_PAUSE_S: Final = 60.0  # below the receiver's 120 s reaping of idle partial transfers
BUCKET_FILE: Final = "bandwidth"  # in the job's .peers directory, next to the peer files
UNCAPPED_CHUNK: Final = 16 << 20  # pause granularity without a cap, once paused
_CHUNK_S = 0.01  # a capped chunk is 10 ms of the cap: the burst a node may send at once
_MIN_CHUNK = 64 << 10
_MAX_CHUNK = 16 << 20
# A slot this far ahead is no queue (a node's ranks reserve ~10 ms each, a few at a
# time) but garbage or another clock (a reboot, a container's time namespace): reset.
_STALE_S = 60.0
_SLOT = struct.Struct("<d")

_UNITS: Final[Mapping[str, int]] = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
}
_RATE_RE = re.compile(
    r"\s*(?P<num>(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*(?P<unit>[A-Za-z]*)\s*(?:/\s*s)?\s*"
)


def parse_bandwidth(value: object, what: str = "replication_bandwidth") -> int | None:
    """Bytes per second from a number or a string with a unit; None stays None (no cap).

    Strings: ``"100MB"`` (10^6), ``"1GiB"`` (2^30), ``"800 MB/s"``, ``"250000000"``.
    Units are bytes: ``"10Gb"`` (bits, in network speak) is refused rather than read
    as bytes. Raises ConfigError naming ``what`` for anything else, and for a rate
    below ``MIN_BANDWIDTH``.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigTypeError(
            f"{what} must be bytes per second (a number, or a string such as '100MB' or "
            f"'1GiB'), or None for no cap; got {type(value).__name__} {value!r}"
        )
    if isinstance(value, str):
        m = _RATE_RE.fullmatch(value)
        if m is None:
            raise ConfigError(
                f"{what}={value!r} is not a rate: write bytes per second as a number with "
                "an optional unit, e.g. '100MB' (10^6 bytes), '1GiB' (2^30), '500 MB/s'"
            )
        unit = m["unit"]
        if unit.endswith("b") and unit.lower() != "b":
            as_bytes = float(m["num"]) * _UNITS.get(unit.lower(), 1) / 8
            raise ConfigError(
                f"{what}={value!r}: '{unit}' reads as bits per second, and memckpt takes "
                f"bytes per second: write the unit with a capital B ({value.strip()} would "
                f"be {format_rate(as_bytes)})"
            )
        scale = _UNITS.get(unit.lower() or "b")
        if scale is None and unit.lower() in ("k", "m", "g", "t", "ki", "mi", "gi", "ti"):
            raise ConfigError(
                f"{what}={value!r}: '{unit}' is ambiguous; write {unit[0].upper()}B (powers "
                f"of 1000) or {unit[0].upper()}iB (powers of 1024) per second"
            )
        if scale is None:
            raise ConfigError(
                f"{what}={value!r}: unknown unit '{unit}'; use B, kB, MB, GB, TB (powers "
                "of 1000) or KiB, MiB, GiB, TiB (powers of 1024)"
            )
        rate = float(m["num"]) * scale
    else:
        rate = float(value)
    if not math.isfinite(rate) or rate < MIN_BANDWIDTH:
        raise ConfigError(
            f"{what}={value!r} is not a usable cap: it must be at least "
            f"{format_rate(MIN_BANDWIDTH)} (and finite); pass None (unset) for no cap"
        )
    return int(rate)


def bandwidth_from_env(environ: Mapping[str, str] | None = None) -> int | None:
    """The cap ``MEMCKPT_REPLICATION_BANDWIDTH`` sets (bytes/s), or None when unset."""
    raw = settings.get(settings.REPLICATION_BANDWIDTH_ENV, environ)
    return parse_bandwidth(raw, settings.REPLICATION_BANDWIDTH_ENV)


def format_rate(rate: float) -> str:
    """``20.0 MB/s``: bytes per second for messages."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if rate >= scale:
            return f"{rate / scale:.1f} {unit}/s"
    return f"{rate:.0f} B/s"


class NodeBucket:
    """A token bucket shared by every process that opens the same file (GCRA).

    The file holds one float: the monotonic time at which the node's next byte may
    go. ``reserve(n)`` moves it ``n / rate`` forward under an exclusive ``flock`` and
    returns the time the caller's slot starts, when it may send: reservations get
    consecutive slots, so the node sends at most ``rate`` bytes per second plus one
    chunk, however many processes and threads ask. ``CLOCK_MONOTONIC`` is one clock
    for the whole machine, and a process killed while holding the lock releases it.
    Without ``path`` the bucket lives in this process only.

    Every process of the node must be given the same ``rate`` (each applies its own).
    """

    def __init__(self, rate: float, path: str | os.PathLike[str] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self.rate = float(rate)
        self.path = Path(path) if path is not None else None
        self.clock = clock
        self._lock = threading.Lock()  # flock does not order the threads of one process
        self._tat = 0.0
        self._fd: int | None = None
        if self.path is not None:
            self._fd = _open_bucket_file(self.path)

    def reserve(self, nbytes: int) -> float:
        """The clock time at which ``nbytes`` may be sent; they count against the rate."""
        with self._lock:
            fd = self._fd
            if fd is None:
                tat = self._tat = self._advance(self._tat, nbytes)
                return tat - nbytes / self.rate
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                raw = os.pread(fd, _SLOT.size, 0)
                old = _SLOT.unpack(raw)[0] if len(raw) == _SLOT.size else 0.0
                tat = self._advance(old, nbytes)
                os.pwrite(fd, _SLOT.pack(tat), 0)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        return tat - nbytes / self.rate

    def _advance(self, tat: float, nbytes: int) -> float:
        now = self.clock()
        if not math.isfinite(tat) or tat > now + _STALE_S:
            tat = now  # garbage, or a slot written under another clock
        return max(tat, now) + nbytes / self.rate

    def close(self) -> None:
        with self._lock:
            fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


def _open_bucket_file(path: Path) -> int:
    """The bucket file, created 0600 if absent; never a symlink or anything but a file."""
    path.parent.mkdir(mode=0o700, exist_ok=True)
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UnsafePathError(f"{path}: the bandwidth bucket is a symlink; refusing it") from e
        raise StorageIOError(f"cannot open the node's bandwidth bucket {path}: {e}") from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafePathError(f"{path}: the bandwidth bucket is not a regular file")
        if st.st_uid != os.geteuid():
            raise UnsafePathError(
                f"{path}: the bandwidth bucket belongs to uid {st.st_uid}, not to this job's "
                f"user ({os.geteuid()}); remove it"
            )
    except BaseException:
        os.close(fd)
        raise
    return fd


class TransferThrottle:
    """What a rank's background transfers ask before each chunk: may it go now?

    ``wait_turn(nbytes)`` blocks while paused (at most ``max_pause_s`` at a stretch),
    then until the node's bucket grants the bytes. Thread-safe; ``close()`` wakes
    every waiter with a TransferError. One per process and job (the node runtime's).

    Args:
        rate: the node's cap in bytes per second; None for no cap (pausing still works).
        bucket_path: the file that shares the bucket between the node's processes;
            None keeps it in this process (every process then sends up to ``rate``).
        max_pause_s: longest stretch a pause holds transfers back.
    """

    def __init__(
        self,
        rate: int | None = None,
        *,
        bucket_path: str | os.PathLike[str] | None = None,
        max_pause_s: float = MAX_PAUSE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate = rate
        self.max_pause_s = max_pause_s
        self.clock = clock
        self.bucket = NodeBucket(rate, bucket_path, clock) if rate is not None else None
        self._cond = threading.Condition()
        self._holds = 0
        self._paused_at: float | None = None
        self._held_before = 0.0  # seconds of earlier pause stretches, each capped
        self._warned = False
        self._closed = False
        self._pausable = False  # paused at least once: uncapped parts go in chunks too

    @property
    def chunk_bytes(self) -> int | None:
        """Bytes per request: ~10 ms of the cap (64 KiB to 16 MiB); without a cap 16 MiB
        once this process has paused, else None (a part goes whole, as without a throttle)."""
        if self.rate is None:
            return UNCAPPED_CHUNK if self._pausable else None
        size = int(self.rate * _CHUNK_S) & ~4095
        return max(_MIN_CHUNK, min(_MAX_CHUNK, size))

    # -- pause ------------------------------------------------------------------------------
    def pause(self) -> None:
        """Hold new chunks until the matching ``resume()`` (holds are counted)."""
        with self._cond:
            self._holds += 1
            self._pausable = True  # from now on parts go in chunks a pause can stop between
            if self._holds == 1:
                self._paused_at = self.clock()
                self._warned = False
                log.debug("replication paused")

    def resume(self) -> None:
        """Give back one hold; the last one lets transfers go on where they stopped."""
        with self._cond:
            if self._holds == 0:
                log.debug("resume without a pause: nothing to do")
                return
            self._holds -= 1
            if self._holds == 0:
                self._end_stretch_locked()
                self._cond.notify_all()

    def resume_all(self) -> int:
        """Drop every hold (closing); returns how many there were."""
        with self._cond:
            holds, self._holds = self._holds, 0
            if holds:
                self._end_stretch_locked()
                self._cond.notify_all()
            return holds

    def _end_stretch_locked(self) -> None:
        if self._paused_at is not None:
            self._held_before += min(self.clock() - self._paused_at, self.max_pause_s)
            self._paused_at = None
        log.debug("replication resumed")

    @property
    def paused(self) -> bool:
        with self._cond:
            return self._holds > 0

    def held_s(self) -> float:
        """Seconds pauses have held transfers back so far (each stretch counts up to
        ``max_pause_s``): what a wait for a transfer adds to its bound."""
        with self._cond:
            now = self.clock()
            current = 0.0 if self._paused_at is None else now - self._paused_at
            return self._held_before + min(current, self.max_pause_s)

    # -- the gate -----------------------------------------------------------------------------
    def wait_turn(self, nbytes: int, what: str = "transfer") -> float:
        """Block until ``nbytes`` may be sent or fetched; returns the seconds waited."""
        t0 = self.clock()
        with self._cond:
            while self._holds and not self._closed:
                assert self._paused_at is not None
                left = self._paused_at + self.max_pause_s - self.clock()
                if left <= 0:
                    if not self._warned:
                        self._warned = True
                        log.warning(
                            "replication has been paused for %gs, the longest a pause holds "
                            "it: %s goes on (call resume_replication() after the phase that "
                            "needs the network)", self.max_pause_s, what,
                        )  # fmt: skip
                    break
                self._cond.wait(left)
            self._check_open(what)
        if self.bucket is not None and nbytes > 0:
            at = self.bucket.reserve(nbytes)
            with self._cond:
                while (left := at - self.clock()) > 0 and not self._closed:
                    self._cond.wait(left)
                self._check_open(what)
        return self.clock() - t0

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise TransferError(f"{what}: the transfer throttle is closed (shutting down)")

    def close(self) -> None:
        """Wake every waiter (they raise TransferError) and release the bucket file."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self.bucket is not None:
            with contextlib.suppress(OSError):
                self.bucket.close()

    def describe(self) -> str:
        """``20.0 MB/s, shared by the node's processes``, for logs."""
        if self.rate is None or self.bucket is None:
            return "no cap"
        where = "shared by the node's processes" if self.bucket.path else "this process only"
        return f"{format_rate(self.rate)}, {where}"
