"""Draining committed memory checkpoints to persistent storage, in the background.

One thread per process writes drains in the order they were scheduled; the engine
keeps a draining step from retention until its drain ends. A drain is per rank: each
rank writes its own part from its node's copy, and the coordinator (rank 0) writes
the file that makes the destination loadable last, once every rank's part is there
(``wait_for_parts``), so a partial drain never looks complete.

``drain_objects`` is the format for ``CheckpointManager(persist_every=K)``: the step's
objects and manifest as a memckpt tree on a disk or shared filesystem, loadable with
``CheckpointManager(persist_dir, job_id)``. The DCP adapter drains to a plain DCP
directory with the same machinery.

``RemoteDrain`` drains the same objects and manifest to an object store
(``memckpt.storage.remote``) without ever stalling training:

- bounded lag: at most one step uploads and one waits; a newer step replaces the waiting
  one (the step being uploaded finishes, unless it is retrying: a retry gives way);
- each upload is retried with capped exponential backoff and jitter (``backoff_delay``),
  each attempt bounded by ``DrainPolicy.attempt_timeout_s``;
- a ``Circuit`` stops trying a dead endpoint (or refused credentials) for
  ``DrainPolicy.circuit_open_s``: drains in that time are skipped, saves go on;
- a step is persisted once every rank's object is verified where it landed and the
  coordinator's manifest is uploaded last; older half-uploaded steps are then removed.

What a step's parts and commit marker are is the tier's: ``RemoteTier`` stores memckpt's
objects and manifest, the DCP adapter's subclass DCP's ``__<rank>_0.distcp`` files and
``.metadata``; the retries, circuit and lag above are the same for both.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import random
import shutil
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from memckpt import ids
from memckpt.engine.save_engine import SaveEngine
from memckpt.errors import (
    CheckpointNotFoundError,
    ConfigError,
    CorruptCheckpointError,
    MemckptError,
)
from memckpt.storage.manifest import StepManifest, write_manifest
from memckpt.storage.remote import RemoteTier, is_permanent, resolve_location
from memckpt.storage.safe_fs import open_regular
from memckpt.storage.store import CheckpointStore, load_step_manifest, object_digest, step_dirs

__all__ = [
    "PART_WAIT_S",
    "Circuit",
    "DrainPolicy",
    "RemoteDrain",
    "await_commit",
    "backoff_delay",
    "check_persist",
    "drain_objects",
    "drained_committed",
    "finish_drains",
    "schedule_drain",
    "stop_waiting_for_parts",
    "wait_for_drains",
    "wait_for_parts",
]

log = logging.getLogger(__name__)

PART_WAIT_S = 600.0
_executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="memckpt-drain")
_remote_drains: weakref.WeakSet[RemoteDrain] = weakref.WeakSet()  # for finish_drains
# bumped by stop_waiting_for_parts: a drain scheduled before it stops waiting for parts
_gave_up = [0, ""]  # [generation, why]
_scheduled = threading.local()  # .generation: _gave_up[0] when the running drain was scheduled


def stop_waiting_for_parts(why: str) -> None:
    """A rank is closing after a failure (a peer died, training raised): the drains of
    this process that wait for other ranks' parts stop waiting now, since those ranks may
    be gone. Their step is not persisted (memory keeps it); a wait for a part that was
    going to arrive costs one persisted step, never a hang at exit (the drain thread is
    joined then, and a part wait lasts up to ``DrainPolicy.part_wait_s``). Drains
    scheduled afterwards, e.g. by a next job in the same process, are not affected."""
    _gave_up[0] += 1
    _gave_up[1] = why


def _give_up_check(generation: int, what: str) -> None:
    if _gave_up[0] != generation:
        raise MemckptError(f"{what}: stopped waiting for the other ranks' parts ({_gave_up[1]})")


def check_persist(
    persist_every: object, persist_dir: object, *, remote_ok: bool = True
) -> Path | str | None:
    """``persist_every`` needs an integer >= 1 and a ``persist_dir`` (ConfigError otherwise).

    Returns ``persist_dir`` resolved (``memckpt.storage.remote.resolve_location``): a local
    Path, or an object-store URL (refused with ``remote_ok=False``); None when not given.
    """
    where = None
    if persist_dir is not None:
        if not isinstance(persist_dir, (str, os.PathLike)):
            raise ConfigError(f"persist_dir must be a path or a URL, got {persist_dir!r}")
        where = resolve_location(persist_dir)
        if isinstance(where, str) and not remote_ok:
            raise ConfigError(
                f"persist_dir {persist_dir!r}: this API drains to a local or shared "
                "filesystem path only; object-store URLs are not supported here yet"
            )
    if persist_every is None:
        return where
    if not isinstance(persist_every, int) or isinstance(persist_every, bool) or persist_every < 1:
        raise ConfigError(f"persist_every must be an integer >= 1, got {persist_every!r}")
    if persist_dir is None:
        raise ConfigError("persist_every needs a persist_dir to drain to")
    return where


def schedule_drain(
    engine: SaveEngine,
    step: int,
    fn: Callable[[], None],
    what: str,
    *,
    committed: Callable[[], bool] | None = None,
) -> concurrent.futures.Future[None]:
    """Run ``fn`` on the drain thread; ``step`` is kept from retention until it ends.

    ``committed()`` says whether the step is loadable at the destination ``what`` (its
    commit marker is there): once ``fn`` has written this rank's part, the step's handle
    reaches ``persisted`` when it is (``await_commit``). Without it the outcome is not
    known here, and the handle does not reach ``persisted``.
    """
    engine.set_draining(step, True)
    generation = _gave_up[0]

    def run() -> None:
        t0 = time.perf_counter()
        _scheduled.generation = generation
        try:
            try:
                fn()
            except Exception:
                log.exception("rank %d: drain of step %d to %s failed", engine.store.rank, step,
                              what)  # fmt: skip
                engine.note_not_persisted(step, "its drain failed")
                raise
            log.info("rank %d: drained step %d to %s in %.2fs", engine.store.rank, step, what,
                     time.perf_counter() - t0)  # fmt: skip
            if committed is None:
                engine.note_not_persisted(step, "this drain cannot tell when it is committed")
            else:
                await_commit(engine, step, committed, what, timeout=2 * PART_WAIT_S)
        finally:
            _scheduled.generation = None
            engine.set_draining(step, False)

    return _executor.submit(run)


def await_commit(
    engine: SaveEngine,
    step: int,
    committed: Callable[[], bool],
    where: str,
    *,
    timeout: float,
    poll_s: float = 0.1,
) -> None:
    """Report ``step`` persisted at ``where`` (``engine.note_persisted``) once
    ``committed()``: the coordinator's commit marker is there.

    The coordinator writes the marker itself, so it is checked here at once; another
    rank's part lands before the marker, so, if not yet, a watcher thread of its own (the
    drain thread never waits) checks again, each wait doubling up to 5 s, until the
    marker is there, ``timeout`` seconds pass, or a newer step is reported persisted
    (after one last look): then the step is reported not persisted.
    """
    if _is_committed(committed, step, where):
        engine.note_persisted(step, where)
        return

    def watch() -> None:
        deadline, delay = time.monotonic() + timeout, poll_s
        while True:
            newest = engine.newest_persisted
            give_up = time.monotonic() > deadline or (newest is not None and newest > step)
            if _is_committed(committed, step, where):
                engine.note_persisted(step, where)
                return
            if give_up:
                engine.note_not_persisted(step, f"its commit marker did not appear at {where}")
                return
            time.sleep(delay)
            delay = min(5.0, delay * 2)

    threading.Thread(target=watch, name=f"memckpt-commit-watch-{step}", daemon=True).start()


def _is_committed(committed: Callable[[], bool], step: int, where: str) -> bool:
    try:
        return bool(committed())
    except Exception as e:  # a probe: unreachable or refused for now, look again later
        log.debug("cannot tell whether step %d is committed at %s: %s", step, where, e)
        return False


def drained_committed(dest_base: Path, job_id: str, step: int) -> bool:
    """Whether ``step``'s manifest (the coordinator writes it last) is in the drained tree."""
    try:
        return load_step_manifest(ids.JobLayout(dest_base, job_id), step) is not None
    except CorruptCheckpointError:
        return False


def wait_for_drains(timeout: float | None = None) -> None:
    """Wait until every drain scheduled so far in this process has ended."""
    _executor.submit(lambda: None).result(timeout)


def finish_drains() -> bool:
    """At a job's end: wait for every drain scheduled so far, at most the longest
    ``DrainPolicy.close_wait_s`` of the process's remote drains (unbounded when there are
    only local drains). Past it, remote drains in flight are abandoned (their steps are
    not persisted; memory keeps them) and this returns False once the drain thread is
    free again. True when every drain ended by itself."""
    waits = [d.policy.close_wait_s for d in list(_remote_drains)]
    try:
        wait_for_drains(max(waits) if waits else None)
        return True
    except concurrent.futures.TimeoutError:
        pass
    log.warning("drains still running after %gs; abandoning them (DrainPolicy.close_wait_s)",
                max(waits))  # fmt: skip
    for d in list(_remote_drains):
        d.abandon()
    wait_for_drains()
    return False


def wait_for_parts(paths: Sequence[Path], timeout: float = PART_WAIT_S) -> None:
    """Wait until every path exists (other ranks' parts on a shared filesystem)."""
    deadline = time.monotonic() + timeout
    generation = getattr(_scheduled, "generation", None)
    generation = _gave_up[0] if generation is None else generation
    for p in paths:
        while not p.exists():
            _give_up_check(generation, str(p))
            if time.monotonic() > deadline:
                raise MemckptError(f"{p} did not appear within {timeout:.0f}s; a rank's drain "
                                   "failed or its node cannot reach the destination")  # fmt: skip
            time.sleep(0.05)


def _copy_durably(src: Path, dest: Path) -> None:
    tmp = dest.with_name(f".{dest.name}.tmp")
    fd = open_regular(src, "object")
    if fd is None:
        raise CheckpointNotFoundError(f"{src}: no object to drain")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)  # a leftover, or a link planted there: never written through
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    out_fd = os.open(tmp, flags, 0o644)
    with os.fdopen(fd, "rb") as fin, os.fdopen(out_fd, "wb") as fout:
        shutil.copyfileobj(fin, fout, 16 << 20)
        fout.flush()
        os.fsync(fout.fileno())
    os.replace(tmp, dest)


def drain_objects(store: CheckpointStore, step: int, dest_base: Path, coordinator: bool) -> None:
    """Copy this rank's object of ``step`` to ``dest_base/<job>/step-<N>/``; the coordinator
    then writes the manifest once every rank's object is there."""
    manifest = store.manifest(step)
    if manifest is None:
        raise CheckpointNotFoundError(f"step {step} has no manifest on this node")
    dest = ids.JobLayout(dest_base, store.job_id)
    dest.step_dir(step).mkdir(parents=True, exist_ok=True)
    _copy_durably(store.object_path(step, store.rank), dest.object_path(step, store.rank))
    if coordinator:
        wait_for_parts([dest.object_path(step, r) for r in range(manifest.world_size)])
        write_manifest(dest.manifest_path(step), manifest, tag="drain.")


def persisted_steps(dest_base: Path, job_id: str) -> list[int]:
    """Steps drained completely to ``dest_base/<job>/`` (the manifest is written last), sorted."""
    layout = ids.JobLayout(dest_base, job_id)
    out = []
    for step in step_dirs(layout):
        try:
            m = load_step_manifest(layout, step)
        except CorruptCheckpointError as err:
            log.warning("ignoring drained step %d: %s", step, err)
            continue
        if m is not None:
            out.append(step)
    return sorted(out)


def persisted_object(dest_base: Path, job_id: str, step: int, rank: int) -> tuple[Path, int]:
    """(path, world size that saved it) of ``rank``'s drained object of ``step``, checked
    against the drained manifest's digest; CheckpointNotFoundError or CorruptCheckpointError."""
    layout = ids.JobLayout(dest_base, job_id)
    m = load_step_manifest(layout, step)
    if m is None:
        raise CheckpointNotFoundError(f"{layout.step_dir(step)}: no drained manifest")
    if rank not in m.objects:
        return layout.object_path(step, rank), m.world_size
    path = layout.object_path(step, rank)
    found = object_digest(path)
    if found is None or found[1] != m.objects[rank].digest:
        raise CorruptCheckpointError(f"{path}: not the object the drained manifest names")
    return path, m.world_size


# -- draining to an object store ------------------------------------------------------------

_T = TypeVar("_T")


@dataclass(frozen=True)
class DrainPolicy:
    """How hard a remote drain tries. Seconds throughout.

    ``attempts`` per upload (the first try included); the n-th retry waits
    ``backoff_delay(n)``; ``attempt_timeout_s`` bounds one attempt (one object or the
    manifest); ``part_wait_s`` bounds the coordinator's wait for the other ranks' objects;
    ``circuit_after`` failed drains in a row open the circuit for ``circuit_open_s``.
    ``close_wait_s`` bounds how long a closing job waits for its drains in flight: then
    they are abandoned (the step is not persisted, memory keeps it) so a dead or hung
    store never holds the end of a job.
    """

    attempts: int = 4
    backoff_s: float = 1.0
    backoff_cap_s: float = 30.0
    attempt_timeout_s: float = 900.0
    part_wait_s: float = PART_WAIT_S
    poll_s: float = 0.2
    circuit_after: int = 3
    circuit_open_s: float = 300.0
    close_wait_s: float = 120.0

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.circuit_after < 1:
            raise ConfigError(f"DrainPolicy needs attempts and circuit_after >= 1: {self}")
        if min(self.backoff_s, self.backoff_cap_s, self.circuit_open_s) < 0:
            raise ConfigError(f"DrainPolicy needs non-negative delays: {self}")
        if min(self.attempt_timeout_s, self.part_wait_s, self.poll_s, self.close_wait_s) <= 0:
            raise ConfigError(f"DrainPolicy needs positive timeouts: {self}")


def backoff_delay(retry: int, policy: DrainPolicy, rand: float) -> float:
    """Seconds before retry number ``retry`` (1, 2, ...): capped exponential, with jitter.

    ``rand`` in [0, 1) picks a point in the upper half of the capped delay, so ranks that
    failed together do not retry together.
    """
    capped = min(policy.backoff_cap_s, policy.backoff_s * 2 ** (retry - 1))
    return capped * (0.5 + rand / 2)


class Circuit:
    """Closed, open or half-open over one destination's drains (clock injected).

    ``after`` failed drains in a row, or one refusal that retrying cannot help, open it
    for ``open_s``; then one probe drain is let through (half-open): its success closes
    the circuit, its failure opens it again.
    """

    def __init__(
        self, after: int, open_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.after, self.open_s, self.clock = after, open_s, clock
        self.failures = 0
        self.opened_at: float | None = None

    def state(self) -> str:
        """The circuit now: "closed", "open" or "half-open" (a probe may go)."""
        if self.opened_at is None:
            return "closed"
        return "half-open" if self.clock() - self.opened_at >= self.open_s else "open"

    def success(self) -> bool:
        """Record a drain that succeeded; True when it closed an open circuit."""
        was_open = self.opened_at is not None
        self.failures, self.opened_at = 0, None
        return was_open

    def failure(self, permanent: bool = False) -> bool:
        """Record a failed drain; True when this opened (or re-opened) the circuit."""
        self.failures += 1
        if permanent or self.failures >= self.after or self.opened_at is not None:
            self.opened_at = self.clock()
            return True
        return False


class _Superseded(Exception):
    """A newer step is waiting: this one gives way."""


class _Abandoned(_Superseded):
    """The job is closing and its wait for drains ran out (``DrainPolicy.close_wait_s``)."""


def _call_with_timeout(
    fn: Callable[[], _T], timeout: float, what: str, stop: threading.Event | None = None
) -> _T:
    """``fn()`` on its own thread, abandoned (left to finish in the background) after
    ``timeout`` seconds with TimeoutError, or as soon as ``stop`` is set (_Abandoned): a
    hung connection never holds the drain, nor the end of the job."""
    out: list[_T] = []
    err: list[BaseException] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as e:
            err.append(e)

    t = threading.Thread(target=run, name="memckpt-drain-attempt", daemon=True)
    t.start()
    deadline = time.monotonic() + timeout
    while t.is_alive() and time.monotonic() < deadline:
        if stop is not None and stop.is_set():
            raise _Abandoned(f"{what} abandoned: the job is closing")
        t.join(min(0.1, max(0.0, deadline - time.monotonic())))
    if t.is_alive():
        raise TimeoutError(f"{what} did not finish within {timeout:.0f}s")
    if err:
        raise err[0]
    return out[0]


class RemoteDrain:
    """Drains of one job's committed steps to a ``RemoteTier`` (see the module docstring).

    ``schedule(step)`` is the engine's after-commit hook: it returns at once. The work runs
    on the process's drain thread (``wait_for_drains`` waits for it). Every rank drains the
    same steps and uploads its own part (``tier.upload_part``, verified); rank 0 (the
    coordinator) waits for every rank's part (``tier.has_part``), then uploads the commit
    marker (``tier.commit``), then removes older half-uploaded steps.
    """

    def __init__(
        self, engine: SaveEngine, tier: RemoteTier, policy: DrainPolicy | None = None
    ) -> None:
        self.engine, self.tier = engine, tier
        self.policy = policy or DrainPolicy()
        self.circuit = Circuit(self.policy.circuit_after, self.policy.circuit_open_s)
        self._lock = threading.Lock()
        self._waiting: int | None = None
        self._newer = threading.Event()  # a step is waiting: a retrying drain gives way
        self._abandon = threading.Event()  # the job is closing and stopped waiting for us
        self._generation = _gave_up[0]  # stop_waiting_for_parts since: see _wait_for_parts
        self._last_error = ""
        self._rand = random.Random()
        _remote_drains.add(self)

    def abandon(self) -> None:
        """Stop this job's drain in flight now (at close, past ``close_wait_s``): the
        attempt running is left to finish in the background, nothing is retried, and the
        step is not persisted. Drains scheduled later run as usual."""
        self._abandon.set()
        self._newer.set()

    @property
    def rank(self) -> int:
        return self.engine.store.rank

    def schedule(self, step: int) -> None:
        """Queue ``step``; a step still waiting is superseded (and given back to retention)."""
        self.engine.set_draining(step, True)
        self._generation = _gave_up[0]
        with self._lock:
            old, self._waiting = self._waiting, step
            self._newer.set()
        if old is not None:
            self.engine.set_draining(old, False)
            self.engine.note_not_persisted(old, f"superseded by step {step}")
            log.info("rank %d: drain of step %d to %s superseded by step %d", self.rank, old,
                     self.tier.where(), step)  # fmt: skip
        _executor.submit(self._run_waiting)

    def _run_waiting(self) -> None:
        with self._lock:
            step, self._waiting = self._waiting, None
            self._newer.clear()
            self._abandon.clear()
        if step is None:
            return  # taken by the run of a newer schedule
        try:
            self._run(step)
        finally:
            self.engine.set_draining(step, False)

    def _run(self, step: int) -> None:
        state = self.circuit.state()
        if state == "open":
            log.debug("rank %d: step %d not drained: the circuit to %s is open", self.rank,
                      step, self.tier.where())  # fmt: skip
            self.engine.note_not_persisted(step, "the circuit to its store is open")
            return
        t0 = time.perf_counter()
        try:
            self._drain(step, attempts=1 if state == "half-open" else self.policy.attempts)
        except _Abandoned as e:
            log.warning("rank %d: step %d not persisted to %s: %s (after close_wait_s=%gs); "
                        "memory keeps it", self.rank, step, self.tier.where(), e,
                        self.policy.close_wait_s)  # fmt: skip
            self.engine.note_not_persisted(step, "its drain was abandoned at close")
            return
        except _Superseded:
            if self._abandon.is_set():
                log.warning("rank %d: step %d not persisted to %s: the job closed before "
                            "its drain ended (close_wait_s=%gs); memory keeps it", self.rank,
                            step, self.tier.where(), self.policy.close_wait_s)  # fmt: skip
                self.engine.note_not_persisted(step, "its drain was abandoned at close")
                return
            log.info("rank %d: drain of step %d gave way to a newer step", self.rank, step)
            self.engine.note_not_persisted(step, "its drain gave way to a newer step")
            return
        except Exception as e:
            self._failed(step, e)
            self.engine.note_not_persisted(step, "its drain failed")
            return
        where = self.tier.where(step)
        if self.rank == 0:  # the coordinator uploaded the commit marker, verified
            self.engine.note_persisted(step, where)
        else:
            p = self.policy
            await_commit(self.engine, step, lambda: self.tier.committed(step), where,
                         timeout=p.part_wait_s + p.attempts * p.attempt_timeout_s,
                         poll_s=p.poll_s)  # fmt: skip
        if self.circuit.success():
            log.info("rank %d: %s reachable again", self.rank, self.tier.where())
        self._last_error = ""
        log.info("rank %d: drained step %d to %s in %.2fs", self.rank, step,
                 self.tier.where(step), time.perf_counter() - t0)  # fmt: skip

    def _failed(self, step: int, e: BaseException) -> None:
        permanent = is_permanent(e)
        opened = self.circuit.failure(permanent)
        text = f"{type(e).__name__}: {str(e).rstrip('.')}"
        hint = ""
        if isinstance(e, PermissionError):
            hint = (" The store refused the credentials: check AWS_ACCESS_KEY_ID / "
                    "AWS_SECRET_ACCESS_KEY / AWS_PROFILE (or persist_options), and the "
                    "bucket's permissions.")  # fmt: skip
        pause = (f" Drains to it pause for {self.policy.circuit_open_s:g}s; training "
                 "goes on." if opened else " Training goes on.")  # fmt: skip
        if text != self._last_error:
            self._last_error = text
            log.error("rank %d: step %d not persisted to %s: %s.%s%s", self.rank, step,
                      self.tier.where(), text, hint, pause)  # fmt: skip
        else:
            log.debug("rank %d: step %d not persisted (same error): %s", self.rank, step, text)

    def _drain(self, step: int, attempts: int) -> None:
        store = self.engine.store
        manifest = store.manifest(step)
        if manifest is None:
            raise CheckpointNotFoundError(f"step {step} has no manifest on this node")
        self._retry(lambda: self.tier.upload_part(store, manifest),
                    f"upload of {self.tier.where(step, store.rank)}", attempts)  # fmt: skip
        if store.rank != 0:
            return
        self._wait_for_parts(manifest)
        self._retry(lambda: self.tier.commit(manifest),
                    f"upload of {self.tier.where(step)}/{self.tier.marker}", attempts)  # fmt: skip
        try:
            self.tier.clean_leftovers(below=step)
        except Exception as e:  # a leftover stays until the next drain
            log.warning("rank 0: could not remove half-uploaded steps from %s: %s",
                        self.tier.where(), e)  # fmt: skip

    def _retry(self, op: Callable[[], None], what: str, attempts: int) -> None:
        for attempt in range(1, attempts + 1):
            try:
                _call_with_timeout(op, self.policy.attempt_timeout_s, what, self._abandon)
                return
            except _Superseded:
                raise
            except Exception as e:
                if is_permanent(e) or attempt == attempts:
                    raise
                delay = backoff_delay(attempt, self.policy, self._rand.random())
                log.warning("rank %d: %s failed (%s: %s); retry %d/%d in %.1fs", self.rank,
                            what, type(e).__name__, e, attempt, attempts - 1,
                            delay)  # fmt: skip
                if self._newer.wait(delay):
                    raise _Superseded from e

    def _wait_for_parts(self, manifest: StepManifest) -> None:
        step, deadline = manifest.step, time.monotonic() + self.policy.part_wait_s
        todo, generation = set(manifest.objects), self._generation
        while todo:
            todo -= {r for r in todo if self.tier.has_part(manifest, r)}
            if not todo:
                return
            _give_up_check(generation, self.tier.where(step))
            if time.monotonic() > deadline:
                raise MemckptError(
                    f"{self.tier.where(step)}: ranks {sorted(todo)} did not upload their "
                    f"parts within {self.policy.part_wait_s:.0f}s; their drains failed "
                    "or their nodes cannot reach the store"
                )
            if self._newer.wait(self.policy.poll_s):
                raise _Superseded
