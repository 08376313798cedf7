"""Hostile-network and fault probes: the audit's checks, rerun, with one summary table.

    python benchmarks/probes.py [--quick] [--json] [--only NAME[,NAME]] [--dir /dev/shm]
    python benchmarks/probes.py --table saved.json     # the table of a saved --json run

Each probe drives memckpt's own APIs with the hostile inputs of its tests (imported
from ``tests/``), at audit scale, on 127.0.0.1 and a scratch directory under --dir:

- hostile:  600 idle + 64 trickling connections without the secret held against a
            TransferServer while put / get / streaming loads run through it
            (``tests/test_transport_hardening.py``: ``_Hostile``);
- slow:     a peer trickling its handshake, and one trickling data after it
            (``_TricklingPeer``): the push and the fetch fail within their deadlines
            and the circuit breaker skips the peer;
- fuzz:     ~4,000 random and mutated frames (before and after authentication) sent to
            a live TransferServer: each must be answered with ERROR or a close, the
            server must log no unexpected exception, keep its threads and descriptors
            bounded and still serve an authenticated client afterwards;
- crash:    SIGKILL at every ``memckpt.storage.faults.FAULT_POINTS`` of a save and of a
            re-save, and at random instants (``tests/crash_worker.py``); after each, a
            restart must load the newest complete step bit-exactly;
- objects:  crafted object files with valid checksums (``tests/test_hostile_objects.py``
            and seeded mutations of their index and skeleton): every reader refuses each
            quickly with CorruptCheckpointError (UnsupportedValueError for a global that
            is not allowed), within bounded memory; the manager falls back to step 1;
- soak:     N saves of one CheckpointManager with injected failures (votes that say no
            or raise, saves over ``limit_bytes``, unsupported values) and restarts; the
            newest committed step must load bit-exactly, no partial object may be
            visible, and descriptors, threads and tmpfs bytes must stay bounded.

- tree:     the job tree is untrusted (issue 20): one thing planted per check, each
            must be refused: a DCP bytes item and a Lightning ``last.ckpt`` whose pickle
            would run code, step directories that are symlinks out of the job (gc,
            retention, delete_job, a save), a directory inside an old step, an empty
            Lightning job id, FIFOs as manifest and object, a manifest linked to
            /dev/zero, a tampered newest manifest before ``gc --keep 1``, ENOSPC after the
            vote, job ids of the form ``step-N``, a DCP ``.metadata`` with Enum members
            pickled by name, and job roots that are world-writable, symlinked or owned by
            another user (that one as root only).

--quick runs every probe at a small scale (under a minute). Exit status 1 when any
probe found a failure; the failures are listed under the table (and in --json).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import gc
import importlib
import io
import json
import logging
import os
import random
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
import warnings
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

import memckpt
from memckpt.engine.save_transaction import Ballot, single_rank_vote
from memckpt.errors import (
    CollectiveError,
    CommitError,
    CorruptCheckpointError,
    InsufficientSpaceError,
    TransferError,
    UnsupportedValueError,
)
from memckpt.storage.faults import FAULT_POINTS
from memckpt.storage.reader import ObjectReader, load_object, verify_object_bytes
from memckpt.storage.store import CheckpointStore
from memckpt.tools.tables import emit_json, print_table
from memckpt.transport.client import TransferClient
from memckpt.transport.protocol import (
    HEADER,
    HEADER_SIZE,
    MAGIC,
    MAX_UNAUTHENTICATED,
    MessageType,
    ObjectRef,
    decode_header,
)
from memckpt.transport.server import TransferServer

TESTS = Path(__file__).resolve().parents[1] / "tests"
LOOPBACK = "127.0.0.1"
FAST_S = 2.0  # a crafted object must be refused within this (as the tests require)
PEAK_ALLOC = 64 << 20  # and without allocating more than this (tracemalloc)


def from_tests(name: str) -> ModuleType:
    """A module of the test suite (its helpers), importable as the tests import each other."""
    if str(TESTS) not in sys.path:
        sys.path.insert(0, str(TESTS))
    return importlib.import_module(name)


@dataclasses.dataclass(frozen=True)
class Sizes:
    idle: int
    trickling: int
    load_rounds: int
    fuzz_frames: int
    fault_points: tuple[str, ...]
    resave_points: tuple[str, ...]
    random_kills: int
    generated_objects: int
    fallback_objects: int
    soak_saves: int


FULL = Sizes(idle=600, trickling=64, load_rounds=10, fuzz_frames=4000, fault_points=FAULT_POINTS,
             resave_points=tuple(p for p in FAULT_POINTS if p != "mid_retention"),
             random_kills=53, generated_objects=40, fallback_objects=8,
             soak_saves=300)  # fmt: skip
QUICK = Sizes(idle=100, trickling=16, load_rounds=2, fuzz_frames=400,
              fault_points=("mid_stage", "after_local_commit", "mid_retention"),
              resave_points=("after_vote",), random_kills=2, generated_objects=6,
              fallback_objects=2, soak_saves=40)  # fmt: skip


@dataclasses.dataclass
class Result:
    """One probe's row of the table, with its details for --json."""

    probe: str
    tried: str
    count: int = 0
    figure: str = ""
    failures: list[str] = dataclasses.field(default_factory=list)
    details: dict[str, Any] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0

    @property
    def outcome(self) -> str:
        return "ok" if not self.failures else f"FAILED ({len(self.failures)})"

    def check(self, cond: bool, failure: str) -> bool:
        if not cond:
            self.failures.append(failure)
        return cond


# -- resources ----------------------------------------------------------------------------
def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def tmpfs_bytes(root: Path) -> int:
    """Bytes allocated by the files under ``root`` (sparse holes not counted)."""
    total = 0
    for d, _, files in os.walk(root):
        for f in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.stat(os.path.join(d, f)).st_blocks * 512
    return total


class Peaks:
    """Samples ``gauges`` every ``period`` s on a thread until the block ends; keeps maxima."""

    def __init__(self, gauges: dict[str, Callable[[], int]], period: float = 0.05) -> None:
        self.gauges, self.period = gauges, period
        self.peak = {k: g() for k, g in gauges.items()}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="probe-peaks", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            for k, g in self.gauges.items():
                with contextlib.suppress(Exception):  # a gauge racing a close
                    self.peak[k] = max(self.peak[k], g())

    def __enter__(self) -> Peaks:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def settle(cond: Callable[[], bool], timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


class UnexpectedErrors(logging.Handler):
    """Records memckpt log lines that carry a traceback (``log.exception``): errors no
    handler expected, such as the transfer server's catch-all."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            exc = record.exc_info[1]
            self.records.append(f"{record.name}: {record.getMessage()}: {exc!r}"[:400])

    @contextlib.contextmanager
    def watching(self, logger: str = "memckpt") -> Iterator[UnexpectedErrors]:
        log = logging.getLogger(logger)
        log.addHandler(self)
        try:
            yield self
        finally:
            log.removeHandler(self)


# -- shared setup -------------------------------------------------------------------------
def save_steps(base: Path, steps: range, numel: int) -> dict[int, tuple[Path, dict[str, Any]]]:
    """Save ``steps`` of a ``numel``-float state as rank 0 of job "job"; (object path, state)."""
    out = {}
    with memckpt.CheckpointManager(base, "job", keep_last=len(steps), prefault=False) as m:
        for s in steps:
            g = torch.Generator().manual_seed(s)
            sd = {"w": torch.randn(numel, generator=g), "step": s}
            m.save(s, sd, blocking=True)
            out[s] = (base / "job" / f"step-{s}" / "rank-0.mck", sd)
    return out


# -- 1. hostile connections ---------------------------------------------------------------
def probe_hostile(work: Path, sz: Sizes) -> Result:
    hardening = from_tests("test_transport_hardening")
    r = Result(
        "hostile",
        f"{sz.idle} idle + {sz.trickling} trickling connections without the "
        f"secret, held during {sz.load_rounds} x (put, get, streaming load) of 8 MiB",
    )
    objs = save_steps(work / "a", range(1, sz.load_rounds + 1), 2 << 20)
    store_b = CheckpointStore(work / "b", "job", rank=1)
    store_c = CheckpointStore(work / "c", "job", rank=0)
    server = TransferServer(store_b, hardening.SECRET, timeout_s=5.0)
    addr = (LOOPBACK, server.port)
    client = TransferClient("job", hardening.SECRET, timeout_s=5.0, retries=2, backoff_s=0.05)
    hostile = None
    threads0, fds0 = threading.active_count(), fd_count()
    times: dict[str, list[float]] = {"put": [], "get": [], "stream": []}
    try:
        gauges = {"unauthenticated": lambda: server.connection_counts()[0],
                  "threads": threading.active_count}  # fmt: skip
        with Peaks(gauges) as peaks:
            hostile = hardening._Hostile(addr, idle=sz.idle, trickling=sz.trickling)
            time.sleep(1.0)  # the trickling ones send a byte or two
            for step, (src, sd) in objs.items():
                ref = ObjectRef("job", step, 0)
                t0 = time.monotonic()
                client.put(addr, ref, src)
                t1 = time.monotonic()
                path, _ = client.get(addr, ref, store_c)
                t2 = time.monotonic()
                dest = {"w": torch.zeros_like(sd["w"]), "step": 0}
                with client.open_remote(addr, ref) as remote:
                    load_object(remote, dest)
                t3 = time.monotonic()
                for k, v in zip(times, (t1 - t0, t2 - t1, t3 - t2)):
                    times[k].append(v)
                r.check(torch.equal(load_object(path)["w"], sd["w"]), f"step {step}: get differs")
                r.check(torch.equal(dest["w"], sd["w"]), f"step {step}: streaming load differs")
            threads_held = threading.active_count() - threads0
            reopened = hostile.reopened
    finally:
        if hostile is not None:
            hostile.close()
        client.close()
        server.close()
        store_b.close()
        store_c.close()
    evicted = server.stats["evicted"]
    slowest = {k: max(v) for k, v in times.items()}
    r.count = sz.idle + sz.trickling + reopened
    r.check(max(slowest.values()) < 10, f"an operation took {max(slowest.values()):.1f}s (< 10)")
    r.check(peaks.peak["unauthenticated"] <= MAX_UNAUTHENTICATED,
            f"{peaks.peak['unauthenticated']} unauthenticated connections held")  # fmt: skip
    r.check(evicted >= sz.idle + sz.trickling - MAX_UNAUTHENTICATED, f"only {evicted} evicted")
    r.check(threads_held < 64, f"{threads_held} more threads while held")
    threads_back = settle(lambda: threading.active_count() <= threads0, 10)
    r.check(threads_back, f"{threading.active_count() - threads0} threads left after")
    r.check(settle(lambda: fd_count() <= fds0, 5), f"{fd_count() - fds0} descriptors left after")
    r.figure = (f"slowest put {slowest['put']:.2f}s, get {slowest['get']:.2f}s, stream "
                f"{slowest['stream']:.2f}s; {evicted} evicted, <= "
                f"{peaks.peak['unauthenticated']} held; +{threads_held} threads")  # fmt: skip
    r.details = {"seconds": times, "evicted": evicted, "reopened": reopened,
                 "peak_unauthenticated": peaks.peak["unauthenticated"],
                 "peak_threads_over_baseline": peaks.peak["threads"] - threads0,
                 "threads_over_baseline_while_held": threads_held}  # fmt: skip
    return r


# -- 2. slow peers ------------------------------------------------------------------------
def probe_slow(work: Path, sz: Sizes) -> Result:
    hardening = from_tests("test_transport_hardening")
    r = Result("slow", "push to a peer trickling its handshake (twice: breaker); fetch from "
               "a peer trickling data")  # fmt: skip
    ((src, _),) = save_steps(work / "a", range(7, 8), 1 << 14).values()
    store_b = CheckpointStore(work / "b", "job", rank=1)
    store_c = CheckpointStore(work / "c", "job", rank=0)
    server = TransferServer(store_b, hardening.SECRET, timeout_s=2.0)
    ref = ObjectRef("job", 7, 0)
    closers: list[Callable[[], None]] = [store_c.close, store_b.close, server.close]
    try:
        # a push to an endpoint sending one byte every 0.5 s: 2 attempts of a 1 s deadline
        peer = hardening._TricklingPeer(period=0.5)
        closers.append(peer.close)
        client = TransferClient("job", hardening.SECRET, timeout_s=1.0, connect_timeout_s=1.0,
                                retries=1, backoff_s=0.05, breaker_failures=2,
                                breaker_cooloff_s=30)  # fmt: skip
        closers.append(client.close)
        push_s, push_err = _timed_failure(lambda: client.put(peer.addr, ref, src), 10)
        bound = min(client.call_bound_s(src.stat().st_size), 3.5)
        r.check(push_s < bound, f"push to a trickling peer took {push_s:.1f}s (bound {bound})")
        r.check("missed its deadline" in push_err, f"push error: {push_err[:200]}")
        skip_s, skip_err = _timed_failure(lambda: client.put(peer.addr, ref, src), 5)
        r.check(skip_s < 0.2 and "skipped: peer" in skip_err, f"not skipped: {skip_err[:200]}")
        r.check(client.put((LOOPBACK, server.port), ref, src) > 0, "healthy peer not served")
        # a fetch whose data arrives a byte every 0.2 s: 1 s + 1 MiB at 1 MiB/s per attempt
        data_peer = hardening._TricklingPeer(period=0.2, secret=hardening.SECRET)
        closers.append(data_peer.close)
        fetcher = TransferClient("job", hardening.SECRET, timeout_s=1.0, retries=1,
                                 backoff_s=0.05, min_throughput=1 << 20)  # fmt: skip
        closers.append(fetcher.close)
        fetch_s, fetch_err = _timed_failure(lambda: fetcher.get(data_peer.addr, ref, store_c), 15)
        r.check(3.5 < fetch_s < 6.0, f"fetch from a trickling peer took {fetch_s:.1f}s (3.5-6)")
        r.check("missed its deadline of 2.0s" in fetch_err, f"fetch error: {fetch_err[:200]}")
        r.check(list(store_c.pool.dir.glob("*.buf")) == [], "the failed fetch left a buffer")
    finally:
        for close in reversed(closers):
            close()
    r.count = 3
    r.figure = (
        f"push failed in {push_s:.2f}s (bound {bound:.1f}s), next skipped in "
        f"{skip_s * 1000:.1f} ms; fetch failed in {fetch_s:.2f}s (2 x 2.0s deadline)"
    )
    r.details = {"push_s": push_s, "push_bound_s": bound, "skip_s": skip_s, "fetch_s": fetch_s,
                 "push_error": push_err, "fetch_error": fetch_err}  # fmt: skip
    return r


def _timed_failure(call: Callable[[], Any], limit: float) -> tuple[float, str]:
    """Run ``call`` on a thread; (seconds until it raised TransferError, its message)."""
    out: dict[str, Any] = {"error": "it did not fail"}

    def run() -> None:
        t0 = time.monotonic()
        try:
            call()
        except TransferError as e:
            out["error"] = str(e)
        except Exception as e:  # reported as a failure of the probe, not raised
            out["error"] = f"{type(e).__name__}: {e}"
        out["s"] = time.monotonic() - t0

    t = threading.Thread(target=run, name="probe-slow-call", daemon=True)
    t.start()
    t.join(timeout=limit)
    return out.get("s", float("inf")), out["error"]


# -- 3. frame fuzz --------------------------------------------------------------------------
HOSTILE_VALUES: list[Any] = [-1, 0, 2**63, 2**64, 1 << 48, 1.5, True, None, "", "../../etc",
                             "job/../x", "x" * 5000, [], {}, [1, 2], "\u0000", "zz" * 16,
                             "00" * 15]  # fmt: skip
BAD_BODIES = [b"{not json", b"\xff\xfe{}", b"[1, 2]", b'"text"', b'{"x": NaN}', b"",
              b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}", b"{" * 600,
              b'{"job_id": "job", "job_id": 1}']  # fmt: skip
TYPES = [int(t) for t in MessageType] + [0, 12, 200, 255]


def _frame(mtype: int, payload: Any, *, version: int = 1, flags: int = 0) -> bytes:
    body = json.dumps(payload).encode() if not isinstance(payload, bytes) else payload
    return HEADER.pack(MAGIC, version, mtype, flags, len(body)) + body


class FrameFuzzer:
    """Seeded random and mutated frames, each to send on a fresh connection.

    Pre-authentication cases mutate a HELLO; post-authentication ones (sent after a real
    handshake) mutate PING, LIST, GET, ranged GET and PUT-with-data requests.
    """

    def __init__(self, rng: random.Random, object_total: int) -> None:
        self.rng, self.total = rng, object_total

    def _bases(self, authed: bool) -> list[tuple[int, dict[str, Any], bytes]]:
        rng = self.rng
        if not authed:
            hello = {"job_id": "job", "rank": 9, "client_nonce": rng.randbytes(32).hex()}
            return [(MessageType.HELLO, hello, b"")]
        n = rng.choice([1, 64, 4096])
        put = {"job_id": "job", "step": 8, "rank": 0, "offset": rng.choice([0, 4096]),
               "nbytes": n, "total": 1 << 16, "transfer": rng.randbytes(16).hex()}  # fmt: skip
        data = HEADER.pack(MAGIC, 1, MessageType.DATA, 0, n) + rng.randbytes(n)
        off = rng.randrange(self.total)
        return [(MessageType.PING, {}, b""), (MessageType.LIST, {"job_id": "job"}, b""),
                (MessageType.GET, {"job_id": "job", "step": 7, "rank": 0}, b""),
                (MessageType.GET, {"job_id": "job", "step": 7, "rank": 0, "offset": off,
                                   "nbytes": rng.randrange(self.total - off + 1)}, b""),
                (MessageType.PUT, put, data)]  # fmt: skip

    def case(self, authed: bool) -> tuple[str, bytes]:
        """(mutation name, bytes to send)."""
        rng = self.rng
        mtype, payload, tail = rng.choice(self._bases(authed))
        frame = _frame(mtype, payload) + tail
        kind = rng.choice(["random-bytes", "bit-flips", "header-field", "truncated",
                           "trailing-garbage", "field-value", "field-dropped", "field-added",
                           "bad-json", "length-lie", "type-swap", "pipelined",
                           "data-lie"])  # fmt: skip
        if kind == "random-bytes":
            out = rng.randbytes(rng.randint(0, 600))
            if rng.random() < 0.5:  # a valid magic gets the bytes past the first check
                out = MAGIC + bytes([1]) + out
        elif kind == "bit-flips":
            b = bytearray(frame)
            for _ in range(rng.randint(1, 8)):
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
            out = bytes(b)
        elif kind == "header-field":
            b = bytearray(frame)
            field = rng.choice(["magic", "version", "type", "flags", "length"])
            if field == "magic":
                b[0:4] = rng.randbytes(4)
            elif field == "version":
                b[4] = rng.choice([0, 2, 255])
            elif field == "type":
                b[5] = rng.choice(TYPES)
            elif field == "flags":
                struct.pack_into("!H", b, 6, rng.randint(1, 0xFFFF))
            else:
                struct.pack_into("!Q", b, 8, rng.choice([0, 2**16, 2**20 + 1, 2**63, 2**64 - 1]))
            out = bytes(b)
        elif kind == "truncated":
            out = frame[: rng.randrange(len(frame))]
        elif kind == "trailing-garbage":
            out = frame + rng.randbytes(rng.randint(1, 300))
        elif kind in ("field-value", "field-dropped", "field-added") and payload:
            p = dict(payload)
            key = rng.choice(sorted(p))
            if kind == "field-value":
                p[key] = rng.choice(HOSTILE_VALUES)
            elif kind == "field-dropped":
                del p[key]
            else:
                p[rng.choice(["x", key + "_", "y" * 300])] = rng.choice(HOSTILE_VALUES)
            out = _frame(mtype, p) + tail
        elif kind == "bad-json":
            out = _frame(mtype, rng.choice(BAD_BODIES)) + tail
        elif kind == "length-lie":
            body = json.dumps(payload).encode()
            lie = max(0, len(body) + rng.choice([-5, -1, 1, 5, 1 << 20, 1 << 40]))
            out = HEADER.pack(MAGIC, 1, mtype, 0, lie) + body + tail
        elif kind == "type-swap":
            out = _frame(rng.choice(TYPES), payload) + tail
        elif kind == "pipelined":
            _, other = self.case(authed)
            out = frame + other
        elif kind == "data-lie" and tail:
            n = len(tail) - HEADER_SIZE
            lie = rng.choice([0, n + 1, n * 2, 1 << 40])
            out = _frame(mtype, payload) + HEADER.pack(MAGIC, 1, MessageType.DATA, 0, lie) + \
                tail[HEADER_SIZE:]  # fmt: skip
        else:  # a mutation that does not apply to this base: send it whole but cut short
            kind, out = "truncated", frame[: max(0, len(frame) - 1)]
        return kind, out


def _reply_types(sock: socket.socket, limit_s: float) -> tuple[list[str], bool]:
    """The frame types the server sent until it closed; True if it did not close in time."""
    buf = bytearray()
    end = time.monotonic() + limit_s
    hung = False
    while len(buf) < 4 << 20:
        left = end - time.monotonic()
        if left <= 0:
            hung = True
            break
        sock.settimeout(left)
        try:
            chunk = sock.recv(1 << 16)
        except TimeoutError:
            hung = True
            break
        except OSError:  # reset: closed
            break
        if not chunk:
            break
        buf += chunk
    types, pos = [], 0
    while pos + HEADER_SIZE <= len(buf):
        try:
            head = decode_header(bytes(buf[pos : pos + HEADER_SIZE]))
        except memckpt.ProtocolError:
            types.append("garbled")
            break
        types.append(head.type.name)
        pos += HEADER_SIZE + head.length
    return types, hung


def probe_fuzz(work: Path, sz: Sizes, seed: int, budget_s: float) -> Result:
    hardening = from_tests("test_transport_hardening")
    r = Result("fuzz", "random and mutated frames (13 mutations of HELLO, PING, LIST, GET, "
               "PUT+DATA), one per connection, half after a real handshake")  # fmt: skip
    objs = save_steps(work / "a", range(7, 10), 1 << 14)
    store_b = CheckpointStore(work / "b", "job", rank=1)
    store_c = CheckpointStore(work / "c", "job", rank=0)
    server = TransferServer(store_b, hardening.SECRET, timeout_s=2.0, transfer_timeout_s=1.0)
    addr = (LOOPBACK, server.port)
    client = TransferClient("job", hardening.SECRET, timeout_s=5.0, retries=1, backoff_s=0.05)
    outcomes: collections.Counter[str] = collections.Counter()
    by_kind: dict[str, collections.Counter[str]] = {}
    hung: list[str] = []
    watch = UnexpectedErrors()
    fds0 = threads0 = 0
    try:
        src7 = objs[7][0]
        client.put(addr, ObjectRef("job", 7, 0), src7)  # the object GETs ask for
        total = src7.stat().st_size
        fuzzer = FrameFuzzer(random.Random(seed), total)
        threads0, fds0 = threading.active_count(), fd_count()
        end = time.monotonic() + budget_s
        gauges = {"threads": threading.active_count, "fds": fd_count,
                  "connections": lambda: sum(server.connection_counts())}  # fmt: skip
        with watch.watching(), Peaks(gauges) as peaks:
            for i in range(sz.fuzz_frames):
                if time.monotonic() > end:
                    r.failures.append(f"time budget of {budget_s:.0f}s spent after {i} frames")
                    break
                authed = i % 2 == 1
                kind, data = fuzzer.case(authed)
                sock = hardening._authed(addr) if authed else socket.create_connection(addr, 5)
                try:
                    with contextlib.suppress(OSError):  # the server may close first
                        sock.sendall(data)
                        sock.shutdown(socket.SHUT_WR)
                    types, stuck = _reply_types(sock, 5.0)
                finally:
                    sock.close()
                got = ("hung" if stuck else "error" if "ERROR" in types else
                       "answered" if types else "closed")  # fmt: skip
                outcomes[got] += 1
                by_kind.setdefault(kind, collections.Counter())[got] += 1
                r.count += 1
                if stuck:
                    hung.append(f"{kind} ({'after' if authed else 'before'} auth): "
                                f"{data[:48].hex()}")  # fmt: skip
        # Then the server still serves: ping, a push and a fetch, bit-exact
        src9, sd9 = objs[9]
        ok = client.ping(addr) == 1
        ok = ok and client.put(addr, ObjectRef("job", 9, 0), src9) > 0
        path, _ = client.get(addr, ObjectRef("job", 9, 0), store_c)
        ok = ok and torch.equal(load_object(path)["w"], sd9["w"])
        r.check(ok, "the server did not serve an authenticated client after the fuzz")
        client.close()  # its pooled connection would count as one the server still holds
        drained = settle(lambda: server.connection_counts() == (0, 0)
                         and server.pending_transfers() == 0, 10)  # fmt: skip
        r.check(drained, f"after the fuzz: connections {server.connection_counts()}, "
                f"{server.pending_transfers()} transfers pending")  # fmt: skip
        leftover = settle(lambda: not list(store_b.pool.dir.glob("*.buf")), 5)
        r.check(leftover, "partial replica buffers left in the pool")
        r.check(settle(lambda: threading.active_count() <= threads0 + 1, 5),
                f"{threading.active_count() - threads0} threads left after the fuzz")  # fmt: skip
        r.check(settle(lambda: fd_count() <= fds0 + 2, 5), f"{fd_count() - fds0} fds left")
    finally:
        client.close()
        server.close()
        store_b.close()
        store_c.close()
    r.check(not hung, f"{len(hung)} connection(s) not closed 5 s after the client's EOF")
    for rec in watch.records:
        r.failures.append(f"unexpected exception in the server: {rec}")
    rejected = outcomes["error"] + outcomes["closed"]
    r.figure = (f"{rejected} rejected ({outcomes['error']} ERROR, {outcomes['closed']} close), "
                f"{outcomes['answered']} valid ones answered, {outcomes['hung']} hung; "
                f"{len(watch.records)} unexpected exceptions; peak +"
                f"{peaks.peak['threads'] - threads0} threads, +{peaks.peak['fds'] - fds0} fds; "
                "served after")  # fmt: skip
    r.details = {"outcomes": dict(outcomes), "by_mutation": {k: dict(v) for k, v in
                 by_kind.items()}, "hung": hung[:20], "server_stats": dict(server.stats),
                 "peak_threads_over_baseline": peaks.peak["threads"] - threads0,
                 "peak_fds_over_baseline": peaks.peak["fds"] - fds0,
                 "peak_connections": peaks.peak["connections"]}  # fmt: skip
    return r


# -- 4. SIGKILL during saves ------------------------------------------------------------------
def probe_crash(work: Path, sz: Sizes, seed: int, budget_s: float) -> Result:
    crash = from_tests("test_crash_safety")
    defects = from_tests("test_load_and_resave_invariants")
    worker, zoo = from_tests("crash_worker"), from_tests("zoo")
    r = Result("crash", f"SIGKILL at {len(sz.fault_points)} fault points of a save, "
               f"{len(sz.resave_points)} of a re-save, {sz.random_kills} random instants; "
               "then restart, load, save")  # fmt: skip
    end = time.monotonic() + budget_s
    recovered: collections.Counter[str] = collections.Counter()
    kills = 0
    for point in sz.fault_points:  # first save of step 2 after a complete step 1
        d = work / f"point-{point}"
        d.mkdir()
        try:
            proc = crash._run_worker(d, 1, 2, {"MEMCKPT_FAULT_POINT": point,
                                               "MEMCKPT_FAULT_STEP": "2"})  # fmt: skip
            if not r.check(proc.returncode == -signal.SIGKILL,
                           f"{point}: exit {proc.returncode}: {proc.stderr[-300:]}"):  # fmt: skip
                continue
            kills += 1
            allowed = ({1} if point in crash.BEFORE_LOCAL_COMMIT else
                       {2} if point == "mid_retention" else {1, 2})  # fmt: skip
            step = crash._assert_recoverable(d, allowed)
            recovered[f"step {step}"] += 1
        except (AssertionError, subprocess.TimeoutExpired, memckpt.MemckptError) as e:
            r.failures.append(f"kill at {point}: {type(e).__name__}: {e}"[:400])
        finally:
            shutil.rmtree(d, ignore_errors=True)
    for point in sz.resave_points:  # step 2 committed (keep_last=1), saved again with new data
        d = work / f"resave-{point}"
        d.mkdir()
        try:
            first = defects._run_worker(d, 1, 2, 0)
            if not r.check(first.returncode == 0, f"re-save setup: {first.stderr[-300:]}"):
                continue
            proc = defects._run_worker(d, 2, 2, 1, {"MEMCKPT_FAULT_POINT": point,
                                                    "MEMCKPT_FAULT_STEP": "2"})  # fmt: skip
            if not r.check(proc.returncode == -signal.SIGKILL,
                           f"re-save {point}: exit {proc.returncode}"):  # fmt: skip
                continue
            kills += 1
            with memckpt.CheckpointManager(d, "job", keep_last=1) as m:
                assert m.latest() == 2, f"latest() is {m.latest()}, expected 2"
                salt = 1 if point in defects.RESAVE_NEW else 0
                zoo.assert_same(m.load(), worker.state_for(2, salt))
            assert not list((d / "job").glob("step-*/*.prev")), "a .prev copy was left"
            recovered["re-save"] += 1
        except (AssertionError, subprocess.TimeoutExpired, memckpt.MemckptError) as e:
            r.failures.append(f"kill during re-save at {point}: {type(e).__name__}: {e}"[:400])
        finally:
            shutil.rmtree(d, ignore_errors=True)
    rng = random.Random(seed)
    d = work / "random"
    d.mkdir()
    trials = 0
    try:
        for trial in range(sz.random_kills):
            if time.monotonic() > end:
                r.failures.append(f"time budget of {budget_s:.0f}s spent after {trial} trials")
                break
            first_step = trial * 1000
            try:
                _kill_at_random_instant(d, first_step, rng.uniform(0.0, 0.3), crash.WORKER)
                kills += 1
                trials += 1
                step = crash._assert_recoverable(d, set(range(0, first_step + 10_101)))
                assert step >= first_step, f"restart found step {step} < {first_step}"
                recovered["random"] += 1
            except (AssertionError, TimeoutError, memckpt.MemckptError) as e:
                r.failures.append(f"random kill {trial}: {type(e).__name__}: {e}"[:400])
    finally:
        shutil.rmtree(d, ignore_errors=True)
    r.count = kills
    n_rec = sum(recovered.values())
    r.check(n_rec == kills, f"{kills - n_rec} kills not followed by a bit-exact recovery")
    r.figure = (f"{kills} SIGKILLs, {n_rec} restarts loaded the newest complete step "
                f"bit-exactly and saved again ({recovered['step 1']} at step 1, "
                f"{recovered['step 2']} at step 2, {recovered['re-save']} re-saves, "
                f"{recovered['random']} random)")  # fmt: skip
    r.details = {"kills": kills, "recovered": dict(recovered), "random_trials": trials}
    return r


def _kill_at_random_instant(base: Path, first: int, delay: float, worker: str) -> None:
    """Start a worker saving steps ``first``..; SIGKILL it ``delay`` s after its first save."""
    proc = subprocess.Popen([sys.executable, worker, str(base), str(first), str(first + 10_000)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        if not ready:
            raise TimeoutError(f"the worker saved nothing in 60 s (step {first})")
        line = proc.stdout.readline().decode().strip()
        assert line == str(first), f"worker printed {line!r}, expected {first}"
        time.sleep(delay)
    finally:
        proc.kill()
        proc.wait(timeout=30)
        if proc.stdout is not None:
            proc.stdout.close()


# -- 5. crafted objects -----------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Read:
    """One reader's answer to one object: how it ended, in how long, with what peak memory."""

    reader: str
    kind: str  # returned | corrupt | unsupported | <other exception type>
    seconds: float
    peak: int
    names_object: bool
    message: str = ""


def _read(name: str, fn: Callable[[], Any], obj: Path) -> Read:
    tracemalloc.start()
    t0 = time.perf_counter()
    kind, msg = "returned", ""
    try:
        out = fn()
        if isinstance(out, list) and out:  # verify() reports damage as a list
            kind, msg = "damaged", str(out[0])
    except CorruptCheckpointError as e:
        kind, msg = "corrupt", str(e)
    except UnsupportedValueError as e:
        kind, msg = "unsupported", str(e)
    except Exception as e:  # any other type is a finding, reported with its message
        kind, msg = type(e).__name__, str(e)
    finally:
        took = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return Read(name, kind, took, peak, str(obj) in msg, msg[:300])


def _readers(obj: Path) -> dict[str, Callable[[], Any]]:
    def open_() -> None:
        with ObjectReader(obj):
            pass

    def verify() -> Any:
        with ObjectReader(obj) as r:
            return r.verify()

    readers: dict[str, Callable[[], Any]] = {
        "ObjectReader": open_,
        "load_object": lambda: load_object(obj),
        "verify": verify,
    }
    st = obj.stat()
    if st.st_blocks * 512 >= st.st_size:  # a sparse file is not read into memory
        readers["verify_object_bytes"] = lambda: verify_object_bytes(
            memoryview(obj.read_bytes()), str(obj)
        )
    return readers


INDEX_VALUES: list[Any] = [
    -1,
    0,
    1,
    2**31,
    2**63,
    2**64,
    1.5,
    True,
    None,
    "",
    "x",
    "uint8",
    "cuda:99",
    "../x",
    [],
    {},
    [[]],
    [-1],
    [2**62, 2**62],
    [0] * 100,
]
INDEX_TOP = ["format", "job_id", "step", "rank", "world_size", "chunk_size", "created_unix",
             "extra", "tensors"]  # fmt: skip


def _mutate_index(rng: random.Random) -> Callable[[dict[str, Any]], None]:
    def edit(doc: dict[str, Any]) -> None:
        if rng.random() < 0.35:
            key = rng.choice(INDEX_TOP)
            if rng.random() < 0.2:
                doc.pop(key, None)
            else:
                doc[key] = rng.choice(INDEX_VALUES)
        else:
            t = rng.choice(doc["tensors"])
            i = rng.randrange(len(t))
            if rng.random() < 0.15:
                del t[i:]
            else:
                t[i] = rng.choice(INDEX_VALUES)

    return edit


def _mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    how = rng.choice(["flip", "truncate", "insert", "splice"])
    if how == "flip":
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] = rng.randrange(256)
    elif how == "truncate":
        del b[rng.randrange(1, len(b)) :]
    elif how == "insert":
        i = rng.randrange(len(b))
        b[i:i] = rng.randbytes(rng.randint(1, 16))
    else:
        i, j = sorted(rng.randrange(len(b)) for _ in range(2))
        b[i:i] = b[j : j + rng.randint(1, 32)]
    return bytes(b)


def probe_objects(work: Path, sz: Sizes, seed: int) -> Result:
    ho = from_tests("test_hostile_objects")
    r = Result(
        "objects",
        "objects with valid checksums, hostile content (the tests' crafts, "
        "seeded index/skeleton mutations) x every reader; some via the manager",
    )
    pristine = ho._save(work / "pristine")
    rng = random.Random(seed)
    # (name, craft, what each reader must answer: a set of kinds allowed per reader)
    refuse = {"corrupt"}
    cases: list[tuple[str, Callable[[Path], None], dict[str, set[str]]]] = []
    for name, craft in ho.INDEX_CRAFTS.items():
        cases.append((f"index:{name}", craft, {"*": refuse}))
    # opening reads the header and index only; the skeleton is checked by the other readers
    opened = {"returned", "corrupt"}
    for name, value in ho.SKELETON_CRAFTS.items():
        cases.append((f"skeleton:{name}", _skeleton_craft(ho, value),
                      {"ObjectReader": opened, "*": refuse}))  # fmt: skip
    deque_range = ho.Calls(collections.deque, range(2**62), 1)
    cases.append(
        (
            "skeleton:deque-of-range",
            _skeleton_craft(ho, deque_range),
            {"ObjectReader": opened, "load_object": {"unsupported"}, "*": refuse},
        )
    )
    # globals the loader does not allow: load refuses them; the structure checks never call them
    cases.append(("skeleton:torch._dynamo-global", _raw_skeleton(ho, b"\x80\x05\x8c\x05torch"
                                                                 b"\x8c\x07_dynamo\x93."),
                  {"load_object": {"unsupported"}, "*": opened}))  # fmt: skip
    np = importlib.import_module("numpy")
    reconstruct = np.ndarray.__reduce__(np.zeros(0))[0]
    crash = ho.Calls(reconstruct, np.ndarray, (0,), b"b",
                     state=(1, (1000,), np.dtype("O"), False, [1, 2]))  # fmt: skip
    cases.append(("skeleton:numpy-setstate", _raw_skeleton(ho, ho.skeleton_of({"a": crash})),
                  {"load_object": {"unsupported"}, "*": {"returned"}}))  # fmt: skip
    gen_index = sz.generated_objects // 2
    for i in range(gen_index):
        edit = _mutate_index(rng)
        cases.append((f"generated-index:{i}", lambda p, e=edit: ho.edit_index(p, e),
                      {"*": {"corrupt", "returned", "damaged"}}))  # fmt: skip
    for i in range(sz.generated_objects - gen_index):
        cases.append(
            (
                f"generated-skeleton:{i}",
                _skeleton_mutation(ho, random.Random(rng.random())),
                {"*": {"corrupt", "unsupported", "returned", "damaged"}},
            )
        )
    kinds: collections.Counter[str] = collections.Counter()
    slowest, peak, reads = 0.0, 0, 0
    per_case: dict[str, list[dict[str, Any]]] = {}
    for i, (name, craft, rules) in enumerate(cases):
        d = work / f"case-{i}"
        try:
            shutil.copytree(pristine, d / "job", ignore=shutil.ignore_patterns(".pool"))
            obj = d / "job" / "step-2" / "rank-0.mck"
            craft(obj)
            answers = [_read(rn, fn, obj) for rn, fn in _readers(obj).items()]
        except Exception as e:
            r.failures.append(f"{name}: crafting or reading failed: {type(e).__name__}: {e}")
            continue
        finally:
            shutil.rmtree(d, ignore_errors=True)
        r.count += 1
        per_case[name] = [dataclasses.asdict(a) for a in answers]
        for a in answers:
            reads += 1
            kinds[a.kind] += 1
            slowest, peak = max(slowest, a.seconds), max(peak, a.peak)
            allowed = rules.get(a.reader, rules["*"])
            r.check(a.kind in allowed, f"{name}: {a.reader} -> {a.kind} (expected "
                    f"{'/'.join(sorted(allowed))}): {a.message}")  # fmt: skip
            r.check(
                a.kind != "corrupt" or a.names_object,
                f"{name}: {a.reader}'s error does not name the object: {a.message}",
            )
            r.check(a.seconds < FAST_S, f"{name}: {a.reader} took {a.seconds:.2f}s")
            r.check(a.peak < PEAK_ALLOC, f"{name}: {a.reader} allocated {a.peak >> 20} MiB")
    fell_back = _fallbacks(ho, work, sz.fallback_objects, r)
    r.count += sz.fallback_objects
    other = sum(v for k, v in kinds.items() if k not in READ_KINDS)
    r.figure = (f"{r.count} files, {reads} reads: {kinds['corrupt']} CorruptCheckpointError, "
                f"{kinds['unsupported']} UnsupportedValueError, "
                f"{kinds['returned'] + kinds['damaged']} accepted (still valid, or not read by "
                f"that reader), {other} other; slowest {slowest * 1000:.0f} ms, peak "
                f"{peak / (1 << 20):.1f} MiB; manager fell back to step 1: "
                f"{fell_back}/{sz.fallback_objects}")  # fmt: skip
    r.details = {"reads": dict(kinds), "slowest_s": slowest, "peak_bytes": peak,
                 "cases": per_case, "fallback_ok": fell_back}  # fmt: skip
    return r


READ_KINDS = {"corrupt", "unsupported", "returned", "damaged"}


def _skeleton_craft(ho: ModuleType, value: Any) -> Callable[[Path], None]:
    return lambda p: ho.replace_skeleton(p, {"w": value})


def _raw_skeleton(ho: ModuleType, skeleton: bytes) -> Callable[[Path], None]:
    def craft(p: Path) -> None:
        s = ho.read_object(p)
        ho.write_object(p, dataclasses.replace(s, skeleton=skeleton))

    return craft


def _skeleton_mutation(ho: ModuleType, rng: random.Random) -> Callable[[Path], None]:
    def craft(p: Path) -> None:
        s = ho.read_object(p)
        ho.write_object(p, dataclasses.replace(s, skeleton=_mutate_bytes(s.skeleton, rng)))

    return craft


def _fallbacks(ho: ModuleType, work: Path, n: int, r: Result) -> int:
    """Steps 1 and 2 saved, step 2 crafted: the manager must load step 1 and refuse step 2."""
    ok = 0
    for name, craft in list(ho.FALLBACK_CRAFTS.items())[:n]:
        d = work / f"fallback-{name}"
        try:
            job = ho._save(d)
            craft(job / "step-2" / "rank-0.mck")
            t0 = time.perf_counter()
            with memckpt.CheckpointManager(d, "job") as m:
                out = m.load()
                info = m.last_load
                try:
                    m.load(step=2)
                    refused = False
                except CorruptCheckpointError:
                    refused = True
            took = time.perf_counter() - t0
            good = (info.step == 1 and info.fell_back_from == (2,) and refused
                    and torch.equal(out["w"], torch.full((1000,), 1.0)) and took < 10)  # fmt: skip
            ok += r.check(
                good,
                f"fallback {name}: step {info.step}, fell back from "
                f"{info.fell_back_from}, step 2 refused {refused}, {took:.1f}s",
            )
        except Exception as e:
            r.failures.append(f"fallback {name}: {type(e).__name__}: {e}"[:400])
        finally:
            shutil.rmtree(d, ignore_errors=True)
    return ok


# -- 6. soak --------------------------------------------------------------------------------
SOAK_FAULTS = {"vote-no": 0.08, "vote-raises": 0.04, "over-limit": 0.05, "unsupported": 0.03}
EXPECTED_ERROR = {
    "vote-no": CommitError,
    "vote-raises": CollectiveError,
    "over-limit": InsufficientSpaceError,
    "unsupported": UnsupportedValueError,
}


def probe_soak(work: Path, sz: Sizes, seed: int, budget_s: float) -> Result:
    worker, zoo = from_tests("crash_worker"), from_tests("zoo")
    keep_last, restart_every = 2, 100 if sz.soak_saves >= 200 else 20
    r = Result("soak", f"{sz.soak_saves} saves of 4 MiB, keep_last={keep_last}, limit_bytes 24 "
               "MiB; injected: vote no, vote raises, over the limit, unsupported value; a "
               f"restart every {restart_every}")  # fmt: skip
    rng = random.Random(seed)
    plan: dict[int, str] = {}
    for step in range(sz.soak_saves):
        x = rng.random()
        for fault, p in SOAK_FAULTS.items():
            if x < p:
                plan[step] = fault
                break
            x -= p

    def vote(step: int, ballot: Ballot) -> list[Ballot]:
        fault = plan.get(step)
        if fault == "vote-no":
            return [ballot, Ballot(1, False, "injected: rank 1 ran out of memory")]
        if fault == "vote-raises":
            raise CollectiveError(f"injected: commit vote for step {step} timed out")
        return list(single_rank_vote(step, ballot))

    job = work / "job"

    def open_manager() -> memckpt.CheckpointManager:
        return memckpt.CheckpointManager(work, "job", keep_last=keep_last,
                                         limit_bytes=24 << 20, vote=vote)  # fmt: skip

    committed: list[int] = []
    outcomes: collections.Counter[str] = collections.Counter()
    dead: list[weakref.ref[torch.Tensor]] = []
    failed_handles: list[memckpt.SaveHandle] = []
    restarts = 0
    before = after = peak = {"fds": 0, "threads": 0, "tmpfs": 0}
    newest, exact, alive = None, False, -1
    end = time.monotonic() + budget_s
    m = open_manager()
    try:
        for step in range(sz.soak_saves):
            if time.monotonic() > end:
                r.failures.append(f"time budget of {budget_s:.0f}s spent after {step} saves")
                break
            fault = plan.get(step, "none")
            state = worker.state_for(step)
            if fault == "over-limit":
                state["extra"] = torch.zeros(8 << 20)  # 32 MiB: over limit_bytes
            elif fault == "unsupported":
                state["extra"] = torch.zeros(4, 4).to_sparse()
            if fault != "none":
                dead.append(weakref.ref(state["w"]))
            handle = None
            try:
                handle = m.save(step, state)
                handle.wait(timeout=60)
                got = "committed"
            except Exception as e:
                got = type(e).__name__
                if handle is not None:  # the caller keeps failed handles around
                    failed_handles.append(handle)
            del state
            outcomes[f"{fault}: {got}"] += 1
            if fault == "none":
                if r.check(got == "committed", f"step {step}: clean save ended {got}"):
                    committed.append(step)
            else:
                r.check(got == EXPECTED_ERROR[fault].__name__,
                        f"step {step}: {fault} ended {got}")  # fmt: skip
                visible = sorted(p.name for p in job.glob(f"step-{step}*"))
                visible += [p.name for p in (job / f"step-{step}").glob("*")]
                r.check(not visible, f"step {step} failed ({fault}) but left {visible}")
            newest = committed[-1] if committed else None
            r.check(m.latest() == newest, f"after step {step}: latest() {m.latest()} != {newest}")
            if step == 10:
                before = {"fds": fd_count(), "threads": threading.active_count(),
                          "tmpfs": tmpfs_bytes(job)}  # fmt: skip
            if step >= 10:
                now = {"fds": fd_count(), "threads": threading.active_count(),
                       "tmpfs": tmpfs_bytes(job)}  # fmt: skip
                peak = {k: max(peak[k], v) for k, v in now.items()}
            if step and step % restart_every == 0 and newest is not None:
                m.close()
                m = open_manager()
                restarts += 1
                r.check(m.latest() == newest, f"restart at {step}: latest() {m.latest()}")
                zoo.assert_same(m.load(), worker.state_for(newest))
        m.engine.wait_idle()
        after = {"fds": fd_count(), "threads": threading.active_count(),
                 "tmpfs": tmpfs_bytes(job)}  # fmt: skip
        newest = committed[-1]
        r.check(m.latest() == newest, f"end: latest() {m.latest()} != {newest}")
        try:
            zoo.assert_same(m.load(), worker.state_for(newest))
            exact = True
        except AssertionError as e:
            exact = r.check(False, f"end: step {newest} does not load bit-exactly: {e}")
        _check_tree(r, job, committed[-keep_last:])
        gc.collect()
        alive = sum(1 for w in dead if w() is not None)
        r.check(alive == 0, f"{alive} of {len(dead)} failed saves' states still alive while "
                f"the caller holds {len(failed_handles)} failed handles")  # fmt: skip
    finally:
        m.close()
    for k, tol in {"fds": 4, "threads": 2}.items():
        r.check(after[k] <= before[k] + tol, f"{k} grew from {before[k]} to {after[k]}")
    r.check(peak["tmpfs"] <= (24 << 20) + (1 << 20),
            f"tmpfs held {peak['tmpfs']} bytes, over limit_bytes")  # fmt: skip
    failed = sum(v for k, v in outcomes.items() if not k.startswith("none"))
    mib = 1 << 20
    r.count = sum(outcomes.values())
    r.figure = (f"{len(committed)} committed, {failed} failed as injected, {restarts} restarts; "
                f"newest step {newest} bit-exact{'' if exact else ' NOT'}; fds "
                f"{before['fds']}->{after['fds']} (max {peak['fds']}), threads "
                f"{before['threads']}->{after['threads']} (max {peak['threads']}), tmpfs "
                f"{before['tmpfs'] / mib:.0f}->{after['tmpfs'] / mib:.0f} MiB "
                f"(max {peak['tmpfs'] / mib:.0f})")  # fmt: skip
    r.details = {"outcomes": dict(outcomes), "committed": len(committed), "restarts": restarts,
                 "before": before, "after": after, "peak": peak,
                 "failed_saves_holding_tensors": alive,
                 "failed_handles_held": len(failed_handles)}  # fmt: skip
    return r


def _check_tree(r: Result, job: Path, kept: list[int]) -> None:
    """Only the kept steps are visible, each complete and intact; nothing half-written."""
    markers = [p.name for p in job.glob("step-*.writing.*")] + [
        str(p.relative_to(job)) for p in job.glob("step-*/*.prev")
    ]
    r.check(not markers, f"left behind: {markers}")
    steps = sorted(int(p.name.removeprefix("step-")) for p in job.glob("step-*") if p.is_dir())
    r.check(steps == kept, f"step directories {steps}, expected {kept}")
    for s in steps:
        names = sorted(p.name for p in (job / f"step-{s}").iterdir())
        r.check(names == ["manifest.json", "rank-0.mck"], f"step {s} holds {names}")
        with ObjectReader(job / f"step-{s}" / "rank-0.mck") as reader:
            r.check(reader.verify() == [], f"step {s} is damaged")


# -- tree: planted files in an untrusted job tree -------------------------------------------


class _Evil:
    """Unpickling it creates ``marker``: proof that a reader ran a checkpoint's code."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.marker, "w"))


def _evil_bytes(marker: Path) -> bytes:
    buf = io.BytesIO()
    torch.save(_Evil(marker), buf)
    return buf.getvalue()


def _within(seconds: float, fn: Callable[[], Any]) -> Any:
    """fn() on a daemon thread; AssertionError when it blocks longer than ``seconds``."""
    return from_tests("test_trust_boundary")._within(seconds, fn)


def _tree_manager(base: Path, keep_last: int = 3) -> memckpt.CheckpointManager:
    return memckpt.CheckpointManager(base, "job", keep_last=keep_last, prefault=False)


def _tree_saves(base: Path, steps: list[int], keep_last: int = 3) -> None:
    m = _tree_manager(base, keep_last)
    try:
        for s in steps:
            m.save(s, {"w": torch.full((256,), float(s)), "step": s}, blocking=True)
    finally:
        m.close()


def _tree_latest(base: Path) -> int | None:
    m = _tree_manager(base)
    try:
        return m.latest()
    finally:
        m.close()


def _victim(d: Path) -> Path:
    v = d / "victim"
    v.mkdir()
    for name in ("manifest.json", "rank-0.mck", "notes.txt"):
        (v / name).write_text("not memckpt's")
    return v


def _intact(v: Path) -> bool:
    return sorted(p.name for p in v.iterdir()) == ["manifest.json", "notes.txt", "rank-0.mck"]


def _refused(fn: Callable[[], Any], *kinds: type[BaseException]) -> str:
    try:
        fn()
    except kinds as e:
        cause = getattr(e, "failures", None)  # DCP's CheckpointException: rank -> error
        first = next(iter(cause.values())) if isinstance(cause, dict) and cause else e
        first = first[0] if isinstance(first, tuple) else first  # (error, traceback)
        return f"{type(first).__name__}: {str(first)[:90]}"
    raise AssertionError("accepted")


def _check_dcp_bytes(d: Path) -> str:
    import torch.distributed.checkpoint as dcp

    from memckpt.adapters.dcp import MemoryStorageReader, MemoryStorageWriter, latest_checkpoint

    marker = d / "ran"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"w": torch.ones(4), "extra": _Evil(marker)},
                 checkpoint_id=f"{d}/job/step-1", storage_writer=MemoryStorageWriter(),
                 no_dist=True)  # fmt: skip
        cid = latest_checkpoint(d, "job")
        into: dict[str, Any] = {"w": torch.zeros(4), "extra": None}
        why = _refused(lambda: dcp.load(into, checkpoint_id=cid,
                                        storage_reader=MemoryStorageReader(), no_dist=True),
                       BaseException)  # fmt: skip
    assert not marker.exists() and into["extra"] is None, "the planted pickle ran"
    return why


def _check_lightning_ckpt(d: Path) -> str:
    try:
        from memckpt.adapters.lightning.checkpoint_dict import persistent_step
    except ImportError as e:
        return f"skipped (lightning: {e})"
    marker = d / "ran"
    (d / "last.ckpt").write_bytes(_evil_bytes(marker))
    why = _refused(lambda: persistent_step(d / "last.ckpt"), Exception)
    assert not marker.exists(), "the planted pickle ran"
    return why


def _check_symlink_gc(d: Path) -> str:
    from memckpt.tools.catalog import gc_job

    _tree_saves(d, [5, 6])
    v = _victim(d)
    (d / "job" / "step-1").symlink_to(v)
    deleted = gc_job(d / "job", keep=1)
    assert _intact(v), "gc deleted through the link"
    return f"gc deleted {deleted}; the linked directory is untouched"


def _check_symlink_retention(d: Path) -> str:
    v = _victim(d)
    _tree_saves(d, [1])
    (d / "job" / "step-0").symlink_to(v)
    _tree_saves(d, [2, 3, 4], keep_last=1)
    assert _intact(v), "retention deleted through the link"
    return "retention passed over the link"


def _check_symlink_delete_job(d: Path) -> str:
    from memckpt import ids
    from memckpt.storage.store import delete_job

    v = _victim(d)
    _tree_saves(d, [1])
    (d / "job" / "step-9").symlink_to(v)
    (d / "job" / "user-file").write_text("mine")
    delete_job(ids.JobLayout(d, "job"))
    assert _intact(v), "delete_job deleted through the link"
    assert (d / "job" / "user-file").exists(), "delete_job deleted a user's file"
    return "only memckpt's entries deleted; the link's target and a user file stay"


def _check_symlink_save(d: Path) -> str:
    v = _victim(d)
    (d / "job").mkdir(mode=0o700)
    (d / "job" / "step-1").symlink_to(v)
    _tree_saves(d, [1])
    assert _intact(v), "the save wrote through the link"
    return "the link was replaced by a real step directory"


def _check_subdir(d: Path) -> str:
    m = _tree_manager(d, keep_last=1)
    try:
        m.save(1, {"w": torch.ones(4)}, blocking=True)
        (d / "job" / "step-1" / "sub").mkdir()
        for s in (2, 3):
            m.save(s, {"w": torch.ones(4)}).wait()
        assert m.latest() == 3
    finally:
        m.close()
    return "later saves committed; the old step went with its subdirectory"


def _check_lightning_job_id(d: Path) -> str:
    try:
        from memckpt.adapters.lightning.tier import split_base_container
    except ImportError as e:
        return f"skipped (lightning: {e})"
    return _refused(lambda: split_base_container(f"{d}/"), memckpt.MemckptError)


def _fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def _check_fifo(d: Path, name: str) -> str:
    _tree_saves(d, [1, 2])
    _fifo(d / "job" / "step-2" / name)
    latest = _within(20, lambda: _tree_latest(d))
    assert latest == 1, f"latest() = {latest}"
    return "latest() = 1 at once (step 2 passed over)"


def _check_dev_zero(d: Path) -> str:
    _tree_saves(d, [1, 2])
    path = d / "job" / "step-2" / "manifest.json"
    path.unlink()
    path.symlink_to("/dev/zero")
    tracemalloc.start()
    try:
        latest = _within(20, lambda: _tree_latest(d))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert latest == 1 and peak < PEAK_ALLOC, f"latest {latest}, peak {peak} bytes"
    return f"latest() = 1, peak allocation {peak / (1 << 20):.1f} MiB"


def _check_tampered_gc(d: Path) -> str:
    from memckpt.storage.manifest import StepManifest, read_manifest, write_manifest
    from memckpt.tools.catalog import gc_job

    _tree_saves(d, [1, 2, 3])
    path = d / "job" / "step-3" / "manifest.json"
    m = read_manifest(path)
    write_manifest(path, StepManifest("other", m.step, m.world_size, m.objects, m.blobs))
    deleted = gc_job(d / "job", keep=1)
    latest = _tree_latest(d)
    assert latest == 2, f"after gc latest() = {latest}"
    return f"gc --keep 1 deleted {deleted}; latest() = 2"


def _check_enospc_after_vote(d: Path) -> str:
    from memckpt.storage import safe_fs

    class NoSpaceOs:
        def __getattr__(self, name: str) -> Any:
            if name == "write":

                def write(fd: int, data: Any) -> int:
                    raise OSError(28, "No space left on device")

                return write
            return getattr(os, name)

    m = _tree_manager(d)
    try:
        m.save(1, {"w": torch.ones(4)}, blocking=True)
        real = safe_fs.os
        safe_fs.os = NoSpaceOs()  # type: ignore[assignment]
        try:
            h = m.save(2, {"w": torch.ones(4)})
            why = _refused(h.wait, InsufficientSpaceError)
        finally:
            safe_fs.os = real
        m.save(3, {"w": torch.ones(4)}, blocking=True)
        assert m.latest() == 3
    finally:
        m.close()
    return why + "; the next save committed"


def _check_step_job_id(d: Path) -> str:
    return _refused(lambda: memckpt.CheckpointManager(d, "step-5"), memckpt.InvalidNameError)


def _check_enum_by_name(d: Path) -> str:
    import pickletools

    from torch.distributed.checkpoint.metadata import MetadataIndex
    from torch.distributed.checkpoint.planner import WriteItemType

    from memckpt.storage.statedict import restore_state_dict

    # what CPython 3.11.2 writes for an Enum member: getattr(WriteItemType, 'TENSOR')
    def by_name(cls: type, member: str) -> bytes:
        name = member.encode()
        glob = f"c{cls.__module__}\n{cls.__qualname__}\n".encode()
        return (b"\x80\x02cbuiltins\ngetattr\n" + glob + b"X" + struct.pack("<I", len(name))
                + name + b"\x86R.")  # fmt: skip

    raw = by_name(WriteItemType, "TENSOR")
    pickletools.dis(raw, out=io.StringIO())  # a well-formed pickle
    value = restore_state_dict(raw, lambda i: torch.empty(0), [WriteItemType, MetadataIndex])
    assert value is WriteItemType.TENSOR, f"got {value!r}"
    bad = by_name(WriteItemType, "__subclasses__")  # not a member: refused
    why = _refused(
        lambda: restore_state_dict(bad, lambda i: torch.empty(0), [WriteItemType]), Exception
    )
    return f"by-name member accepted; getattr on anything else refused ({why[:60]})"


def _check_root(d: Path) -> str:
    from memckpt.errors import ConfigError

    shown = []
    open_root = d / "a" / "job"
    open_root.mkdir(parents=True)
    open_root.chmod(0o777)
    shown.append(_refused(lambda: _tree_manager(d / "a"), ConfigError).split(": ", 2)[-1][:70])
    (d / "b").mkdir()
    (d / "b" / "job").symlink_to(d / "a")
    shown.append(_refused(lambda: _tree_manager(d / "b"), ConfigError).split(": ", 2)[-1][:70])
    if os.geteuid() == 0:
        other = d / "c" / "job"
        other.mkdir(parents=True)
        other.chmod(0o755)
        os.chown(other, 65534, 65534)
        shown.append(_refused(lambda: _tree_manager(d / "c"), ConfigError).split(": ", 2)[-1][:70])
    return " | ".join(shown)


TREE_CHECKS: dict[str, Callable[[Path], str]] = {
    "dcp bytes item runs code": _check_dcp_bytes,
    "lightning last.ckpt runs code": _check_lightning_ckpt,
    "gc through a symlinked step": _check_symlink_gc,
    "retention through a symlinked step": _check_symlink_retention,
    "delete_job through a symlinked step": _check_symlink_delete_job,
    "save through a symlinked step": _check_symlink_save,
    "directory inside an old step": _check_subdir,
    "empty Lightning job id": _check_lightning_job_id,
    "FIFO as manifest.json": lambda d: _check_fifo(d, "manifest.json"),
    "FIFO as rank-0.mck": lambda d: _check_fifo(d, "rank-0.mck"),
    "manifest.json -> /dev/zero": _check_dev_zero,
    "gc after a tampered manifest": _check_tampered_gc,
    "ENOSPC after the vote": _check_enospc_after_vote,
    "job id step-5": _check_step_job_id,
    "DCP .metadata enum by name": _check_enum_by_name,
    "job root not private or not ours": _check_root,
}


def probe_tree(work: Path) -> Result:
    r = Result("tree", "plant one hostile entry per check in a job tree")
    for i, (name, check) in enumerate(TREE_CHECKS.items()):
        d = work / f"c{i}"
        d.mkdir()
        try:
            r.details[name] = check(d)
        except Exception as e:
            r.failures.append(f"{name}: {type(e).__name__}: {e}"[:300])
            r.details[name] = f"FAILED: {e}"[:200]
        finally:
            shutil.rmtree(d, ignore_errors=True)
    r.count = len(TREE_CHECKS)
    r.figure = f"{r.count - len(r.failures)}/{r.count} refused as designed"
    return r


# -- main ---------------------------------------------------------------------------------
PROBES = ("hostile", "slow", "fuzz", "crash", "objects", "soak", "tree")


def run_probe(name: str, work: Path, sz: Sizes, seed: int, quick: bool) -> Result:
    d = work / name
    d.mkdir()
    budget = 60.0 if quick else 270.0  # per probe: every loop is also bounded in count
    t0 = time.monotonic()
    try:
        if name == "hostile":
            r = probe_hostile(d, sz)
        elif name == "slow":
            r = probe_slow(d, sz)
        elif name == "fuzz":
            r = probe_fuzz(d, sz, seed, budget)
        elif name == "crash":
            r = probe_crash(d, sz, seed, budget)
        elif name == "objects":
            r = probe_objects(d, sz, seed)
        elif name == "tree":
            r = probe_tree(d)
        else:
            r = probe_soak(d, sz, seed, budget)
    except Exception as e:
        r = Result(name, "(the probe itself failed)")
        r.failures.append(f"{type(e).__name__}: {e}"[:600])
    finally:
        shutil.rmtree(d, ignore_errors=True)
    r.seconds = time.monotonic() - t0
    return r


def print_summary(doc: dict[str, Any]) -> None:
    """The summary table of a run (``doc`` as --json prints it), then each failure."""
    rows = [(r["probe"], r["tried"], r["count"], r["outcome"], r["figure"]) for r in doc["results"]]
    if not sys.stdout.isatty():  # a log or a file: room for the figures (rich reads it)
        os.environ.setdefault("COLUMNS", "160")
    print_table(f"memckpt probes ({doc['mode']}, seed {doc['seed']}, {doc['seconds']:.0f}s, load "
                f"{doc['load_before']:.2f}->{doc['load_after']:.2f})",
                ["probe", "what was tried", "count", "outcome", "figure"], rows)  # fmt: skip
    for r in doc["results"]:
        if r["probe"] == "tree":  # one line per planted entry: what refused it
            for check, answer in r["details"].items():
                print(f"tree: {check}: {answer}")
        for f in r["failures"]:
            print(f"{r['probe']}: {f}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="every probe at a small scale")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--table", metavar="FILE", help="print the table of a saved --json run")
    p.add_argument("--only", default=",".join(PROBES), help=f"comma-separated of {PROBES}")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--dir", default="/dev/shm", help="scratch directory (a tmpfs)")
    p.add_argument("-v", "--verbose", action="store_true", help="show memckpt's log")
    a = p.parse_args()
    if a.table:
        doc = json.loads(Path(a.table).read_text())
        print_summary(doc)
        return 1 if any(r["failures"] for r in doc["results"]) else 0
    chosen = [n.strip() for n in a.only.split(",") if n.strip()]
    unknown = sorted(set(chosen) - set(PROBES))
    if unknown:
        p.error(f"unknown probe(s) {unknown}; choose from {PROBES}")
    logging.basicConfig(level=logging.INFO if a.verbose else logging.CRITICAL)
    torch.set_num_threads(1)
    sz = QUICK if a.quick else FULL
    load = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="memckpt-probes-", dir=a.dir))
    t0 = time.monotonic()
    results = []
    try:
        for name in chosen:
            results.append(run_probe(name, work, sz, a.seed, a.quick))
            if not a.json:
                print(f"{name}: {results[-1].outcome} in {results[-1].seconds:.1f}s",
                      file=sys.stderr, flush=True)  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
    doc = {
        "mode": "quick" if a.quick else "full",
        "seed": a.seed,
        "seconds": time.monotonic() - t0,
        "load_before": load,
        "load_after": os.getloadavg()[0],
        "results": [{**dataclasses.asdict(r), "outcome": r.outcome} for r in results],
    }
    if a.json:
        emit_json(doc)
    else:
        print_summary(doc)
    return 1 if any(r.failures for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
