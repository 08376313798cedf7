"""Prometheus metrics of saves, loads and tiers (opt-in: ``pip install 'memckpt[metrics]'``).

:class:`Metrics` keeps what the events of ``memckpt.storage.events`` tell (state only, no
I/O) and renders it as metric families labelled ``job`` and ``rank``, through a
``CollectorRegistry`` of its own (never prometheus_client's global one).

A :class:`NodeExporter` is started per node runtime (one per job and process) when
``metrics_port=`` / ``MEMCKPT_METRICS_PORT`` or ``MEMCKPT_METRICS_TEXTFILE`` is set. The
ranks of one node share the job's tree, and that is how one exporter per node serves them
all (``JobLayout.peers_dir``, normally ``<base>/<job>/.peers``):

1. after each batch of events (events that come within ``FLUSH_DELAY_S`` of each other),
   every rank writes its own samples to ``metrics-rank-<r>.prom`` there (atomically);
2. the rank that holds the lock ``metrics.lock`` there (an flock: the first of the node's
   ranks to try) binds the HTTP port and serves its live samples merged with the other
   local ranks' files, one family per metric. The others try the lock again at each
   flush and every ``RETRY_S``: when the serving process ends, another one takes over;
3. with a textfile, each rank, after writing its own file, rewrites the textfile with the
   merge of every local rank's file (under ``metrics.write.lock``; temporary file, then
   rename), so the file always holds the newest samples of every rank of the node.

Events without a ``job`` field are counted for the job of this process's exporter with
that ``rank``, when there is exactly one.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from memckpt.errors import ConfigError, MemckptError
from memckpt.settings import METRICS_PORT_ENV, METRICS_TEXTFILE_ENV, get
from memckpt.storage import events
from memckpt.storage.safe_fs import read_regular, write_atomic

__all__ = [
    "BACKGROUND_BUCKETS",
    "BLOCKING_BUCKETS",
    "FLUSH_DELAY_S",
    "Metrics",
    "NodeExporter",
    "merge",
    "parse_address",
    "port_from_env",
    "rank_file_name",
    "skip_reason",
    "start",
]

log = logging.getLogger(__name__)

BLOCKING_BUCKETS: Final = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                           30.0, 60.0)  # fmt: skip
BACKGROUND_BUCKETS: Final = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
                             300.0, 600.0)  # fmt: skip
FLUSH_DELAY_S: Final = 0.05  # events this close together are written as one batch
RETRY_S: Final = 5.0  # how often a rank that does not serve tries to take the port over
COMMITS_KEPT: Final = 4096  # commit times kept per rank for the lag in seconds
MAX_RANK_FILE: Final = 8 << 20
SERVER_LOCK: Final = "metrics.lock"
WRITE_LOCK: Final = "metrics.write.lock"
_RANK_FILE = re.compile(r"^metrics-rank-(\d+)\.prom$")
LAGGING_TIERS: Final = ("replicated", "persisted")  # tiers behind memory, with a lag
INSTALL_HINT: Final = "pip install 'memckpt[metrics]'"


def rank_file_name(rank: int) -> str:
    return f"metrics-rank-{int(rank)}.prom"


def skip_reason(reason: str, own: bool = True) -> str:
    """The ``reason`` label of a skipped save: ``other_rank`` when another rank had no room
    (every rank skips the step), else what this rank lacked: ``memory_limit`` (the memory
    cgroup), ``limit_bytes``, or ``no_space`` (the tmpfs or its disk is full)."""
    if not own:
        return "other_rank"
    if "cgroup" in reason:
        return "memory_limit"
    if "limit_bytes leaves" in reason or "(limit_bytes)" in reason:
        return "limit_bytes"
    return "no_space"


def parse_address(value: int | str | None, what: str = "metrics_port") -> tuple[str, int] | None:
    """``(host, port)`` of ``PORT`` or ``HOST:PORT`` (host default: every interface)."""
    if value is None or value == "":
        return None
    host, _, port = str(value).strip().rpartition(":")
    try:
        number = int(port)
    except ValueError:
        number = -1
    if isinstance(value, bool) or not 0 < number < 65536:
        raise ConfigError(
            f"{what}={value!r} is not a port (1-65535, or HOST:PORT such as 127.0.0.1:9400)"
        )
    return (host.strip("[]") or "0.0.0.0", number)


def port_from_env(environ: Mapping[str, str] | None = None) -> str | None:
    """``MEMCKPT_METRICS_PORT`` when set (checked: ConfigError when it is not a port)."""
    value = get(METRICS_PORT_ENV, environ)
    if value is not None:
        parse_address(value, METRICS_PORT_ENV)
    return value


def _require() -> None:
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        raise ConfigError(
            f"metrics are on (metrics_port=, {METRICS_PORT_ENV} or {METRICS_TEXTFILE_ENV}) but "
            f"prometheus-client is not installed: {INSTALL_HINT}"
        ) from None


# -- the state the events build ----------------------------------------------------------------
@dataclass
class _Histogram:
    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)  # per bucket, not cumulative; last: +Inf
    total: float = 0.0

    def observe(self, value: float) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)
        i = next((i for i, b in enumerate(self.bounds) if value <= b), len(self.bounds))
        self.counts[i] += 1
        self.total += value

    def buckets(self) -> list[tuple[str, float]]:
        counts = self.counts or [0] * (len(self.bounds) + 1)
        out, seen = [], 0
        for bound, n in zip((*map(str, self.bounds), "+Inf"), counts, strict=True):
            seen += n
            out.append((bound, float(seen)))
        return out


@dataclass
class _Rank:
    """What the events said about one rank of one job."""

    saves: int = 0
    save_bytes: int = 0
    blocking: _Histogram = field(default_factory=lambda: _Histogram(BLOCKING_BUCKETS))
    background: _Histogram = field(default_factory=lambda: _Histogram(BACKGROUND_BUCKETS))
    skipped: dict[str, int] = field(default_factory=dict)
    non_finite: int = 0
    recoveries: dict[str, int] = field(default_factory=dict)
    recovery_s: float | None = None
    recovery_step: int | None = None
    last_save_time: float | None = None
    newest: dict[str, int] = field(default_factory=dict)  # tier -> newest step
    commits: deque[tuple[int, float]] = field(default_factory=lambda: deque(maxlen=COMMITS_KEPT))
    expected: set[str] = field(default_factory=set)  # lagging tiers the job writes to

    def reach(self, tier: str, step: int) -> None:
        self.newest[tier] = max(step, self.newest.get(tier, step))

    def lag(self, tier: str, now: float) -> tuple[int | None, float]:
        """(steps, seconds) ``tier`` is behind memory: the newest committed step less the
        tier's newest (None before the tier has one); the age of the oldest committed step
        the tier lacks (0 when it has them all)."""
        mark = self.newest.get(tier)
        steps = None
        if mark is not None and "memory" in self.newest:
            steps = max(0, self.newest["memory"] - mark)
        oldest = next((t for s, t in self.commits if mark is None or s > mark), None)
        return steps, (max(0.0, now - oldest) if oldest is not None else 0.0)


def _num(doc: Mapping[str, Any], key: str) -> float | None:
    value = doc.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


class Metrics:
    """The metrics of this process's ranks, fed event by event (:meth:`observe`).

    ``clock`` (unix seconds) dates the lags in seconds when they are collected.
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._ranks: dict[tuple[str, int], _Rank] = {}
        self._registry: Any = None

    @property
    def registry(self) -> Any:
        """A ``prometheus_client.CollectorRegistry`` (this instance's own) that collects it."""
        if self._registry is None:
            _require()
            from prometheus_client import CollectorRegistry

            registry = CollectorRegistry(auto_describe=False)
            registry.register(self)
            self._registry = registry
        return self._registry

    def _rank(self, job: str, rank: int) -> _Rank:
        key = (job, rank)
        r = self._ranks.get(key)
        if r is None:
            r = self._ranks[key] = _Rank()
        return r

    def expect(self, job: str, rank: int, tier: str) -> None:
        """The job writes to ``tier`` (``replicated`` or ``persisted``): report its lag in
        seconds from the first commit, before anything has reached it."""
        if tier not in LAGGING_TIERS:
            raise ValueError(f"tier {tier!r}: expected one of {LAGGING_TIERS}")
        with self._lock:
            self._rank(job, rank).expected.add(tier)

    def observe(self, doc: Mapping[str, Any], job: str | None = None) -> bool:
        """Count one event (as ``memckpt.storage.events`` emits it); False if not ours.

        ``job`` stands for the event's own ``job`` field when it has none.
        """
        kind = doc.get("event")
        job = doc.get("job", job)
        rank, step = doc.get("rank"), doc.get("step")
        if not isinstance(job, str) or not isinstance(rank, int) or isinstance(rank, bool):
            return False
        if kind not in ("saved", "skipped", "non_finite", "loaded", "replicated", "persisted"):
            return False
        at = _num(doc, "time") or self._clock()
        with self._lock:
            r = self._rank(job, rank)
            if kind == "skipped":
                label = skip_reason(str(doc.get("reason", "")), bool(doc.get("own", True)))
                r.skipped[label] = r.skipped.get(label, 0) + 1
                return True
            if kind == "non_finite":
                r.non_finite += 1
                return True
            if not isinstance(step, int) or isinstance(step, bool):
                return False
            if kind == "saved":
                self._saved(r, doc, step, at)
            elif kind == "loaded":
                tier = str(doc.get("tier", "memory"))
                r.recoveries[tier] = r.recoveries.get(tier, 0) + 1
                r.recovery_s = _num(doc, "seconds")
                r.recovery_step = step
                # the timeline goes on from the loaded step: later marks are abandoned
                r.newest = {t: min(s, step) for t, s in r.newest.items()}
                r.newest["memory"] = step
                while r.commits and r.commits[-1][0] > step:
                    r.commits.pop()
            else:
                r.reach(kind, step)
        return True

    @staticmethod
    def _saved(r: _Rank, doc: Mapping[str, Any], step: int, at: float) -> None:
        r.saves += 1
        r.save_bytes += int(_num(doc, "nbytes") or 0)
        blocking = _num(doc, "blocking_s")
        if blocking is not None:
            r.blocking.observe(blocking)
        background = _num(doc, "background_s")
        if background is not None:
            r.background.observe(background)
        r.last_save_time = at
        if step < r.newest.get("memory", step):  # a re-save after a load of an older step
            r.newest = {t: min(s, step) for t, s in r.newest.items()}
        r.newest["memory"] = step
        while r.commits and r.commits[-1][0] >= step:
            r.commits.pop()
        r.commits.append((step, at))
        if doc.get("replicated"):
            r.reach("replicated", step)

    # -- rendering -------------------------------------------------------------------------
    def collect(self) -> Iterator[Any]:
        """The metric families (prometheus_client's collector protocol)."""
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        now = self._clock()
        jr = ["job", "rank"]
        saves = CounterMetricFamily(
            "memckpt_saves", "Saves committed (every rank's vote said yes).", labels=jr
        )
        nbytes = CounterMetricFamily(
            "memckpt_save_bytes", "Tensor bytes of the committed saves (SaveResult.nbytes).",
            labels=jr,
        )  # fmt: skip
        blocking = HistogramMetricFamily(
            "memckpt_save_blocking_seconds",
            "Seconds a committed save blocked the caller (SaveResult.blocking_s).",
            labels=jr,
        )
        background = HistogramMetricFamily(
            "memckpt_save_background_seconds",
            "Seconds from the end of the blocking part to the global commit "
            "(SaveResult.total_s - blocking_s).",
            labels=jr,
        )
        last_save = GaugeMetricFamily(
            "memckpt_last_save_timestamp_seconds",
            "Unix time of the newest committed save.",
            labels=jr,
        )
        skipped = CounterMetricFamily(
            "memckpt_saves_skipped",
            "Saves skipped for lack of room, by reason (no_space, memory_limit, limit_bytes, "
            "other_rank).",
            labels=[*jr, "reason"],
        )
        non_finite = CounterMetricFamily(
            "memckpt_non_finite_steps",
            "Committed steps this rank saved holding NaN/Inf.",
            labels=jr,
        )
        newest = GaugeMetricFamily(
            "memckpt_newest_step",
            "Newest step per tier: memory (committed or loaded), replicated, persisted.",
            labels=[*jr, "tier"],
        )
        lag_gauges = {
            tier: (
                GaugeMetricFamily(
                    f"memckpt_{name}_lag_steps",
                    f"Newest committed step minus the newest {tier} step.",
                    labels=jr,
                ),
                GaugeMetricFamily(
                    f"memckpt_{name}_lag_seconds",
                    f"Age of the oldest committed step not yet {tier} (0: none).",
                    labels=jr,
                ),
            )
            for tier, name in (("replicated", "replication"), ("persisted", "drain"))
        }
        recoveries = CounterMetricFamily(
            "memckpt_recoveries",
            "Loads, by the tier the data came from (memory: this node; peer: another "
            "node's copy; persistent: the durable tier).",
            labels=[*jr, "source"],
        )
        recovery_s = GaugeMetricFamily(
            "memckpt_recovery_seconds", "Seconds the newest load took.", labels=jr
        )
        recovery_step = GaugeMetricFamily(
            "memckpt_recovery_step", "Step the newest load loaded.", labels=jr
        )
        with self._lock:
            for (job, rank), r in sorted(self._ranks.items()):
                lv = [job, str(rank)]
                if r.saves:
                    saves.add_metric(lv, r.saves)
                    nbytes.add_metric(lv, r.save_bytes)
                    blocking.add_metric(lv, r.blocking.buckets(), r.blocking.total)
                    background.add_metric(lv, r.background.buckets(), r.background.total)
                    if r.last_save_time is not None:
                        last_save.add_metric(lv, r.last_save_time)
                for reason, n in sorted(r.skipped.items()):
                    skipped.add_metric([*lv, reason], n)
                if r.non_finite:
                    non_finite.add_metric(lv, r.non_finite)
                for tier, step in sorted(r.newest.items()):
                    newest.add_metric([*lv, tier], step)
                for tier, (steps_g, seconds_g) in lag_gauges.items():
                    if tier not in r.expected and tier not in r.newest:
                        continue
                    steps, seconds = r.lag(tier, now)
                    if steps is not None:
                        steps_g.add_metric(lv, steps)
                    seconds_g.add_metric(lv, seconds)
                for source, n in sorted(r.recoveries.items()):
                    recoveries.add_metric([*lv, source], n)
                if r.recovery_s is not None:
                    recovery_s.add_metric(lv, r.recovery_s)
                if r.recovery_step is not None:
                    recovery_step.add_metric(lv, r.recovery_step)
        yield from (saves, nbytes, blocking, background, last_save, skipped, non_finite, newest)
        for pair in lag_gauges.values():
            yield from pair
        yield from (recoveries, recovery_s, recovery_step)

    def families(self, job: str, rank: int) -> list[Any]:
        """The families of one rank, only its samples (empty families left out)."""
        return _only(self.collect(), job, rank)

    def exposition(self, job: str, rank: int) -> bytes:
        """One rank's samples in the Prometheus text format."""
        return _render(self.families(job, rank))


def _only(families: Iterable[Any], job: str, rank: int | None = None) -> list[Any]:
    """Copies of ``families`` holding only the samples of ``job`` (and ``rank``)."""
    from prometheus_client.core import Metric

    out = []
    for fam in families:
        keep = [
            s
            for s in fam.samples
            if s.labels.get("job") == job and (rank is None or s.labels.get("rank") == str(rank))
        ]
        if keep:
            m = Metric(fam.name, fam.documentation, fam.type, fam.unit)
            m.samples = keep
            out.append(m)
    return out


def merge(*family_lists: Iterable[Any]) -> list[Any]:
    """One family per metric name, holding the samples of every list (in order)."""
    from prometheus_client.core import Metric

    out: dict[str, Any] = {}
    for families in family_lists:
        for fam in families:
            m = out.get(fam.name)
            if m is None:
                m = out[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
            m.samples.extend(fam.samples)
    return list(out.values())


class _Families:
    def __init__(self, collect: Callable[[], Iterable[Any]]) -> None:
        self.collect = collect


def _render(families: Iterable[Any]) -> bytes:
    from prometheus_client import generate_latest

    fams = list(families)
    return generate_latest(_Families(lambda: fams))  # type: ignore[arg-type]


def _open_lock(path: Path) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)


# -- one node's exporter --------------------------------------------------------------------
class NodeExporter:
    """One rank's exporter of one job: its rank file, and the node's HTTP port and textfile.

    See the module docstring for how the node's ranks share one port. Start with
    :func:`start`; :meth:`close` writes the last samples and frees the port.
    """

    def __init__(
        self,
        metrics: Metrics,
        *,
        job: str,
        rank: int,
        world_size: int,
        peers_dir: Path,
        address: tuple[str, int] | None,
        textfile: Path | None,
    ) -> None:
        self.metrics = metrics
        self.job = job
        self.rank = rank
        self.world_size = world_size
        self.dir = Path(peers_dir)
        self.address = address
        self.textfile = textfile
        self.port: int | None = None  # the port this process serves, when it does
        self._server: Any = None
        self._server_lock_fd: int | None = None
        self._flush_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = False
        self._warned: set[str] = set()
        self._thread: threading.Thread | None = None

    @property
    def serving(self) -> bool:
        """Whether this process serves the node's HTTP endpoint."""
        return self._server is not None

    def start(self) -> None:
        self.dir.mkdir(mode=0o700, exist_ok=True)
        if self.address is not None:
            self._server_lock_fd = _open_lock(self.dir / SERVER_LOCK)
        try:  # replaces the samples a previous run of this rank left in its file
            self.flush()
        except OSError as e:  # metrics never stop a job: the flusher tries again
            log.warning("rank %d: cannot write the metrics of job %s in %s: %s", self.rank,
                        self.job, self.dir, e)  # fmt: skip
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"memckpt-metrics-r{self.rank}")  # fmt: skip
        self._thread.start()

    def expect(self, tier: str) -> None:
        """This rank's data goes to ``tier`` (``replicated``, ``persisted``): see Metrics."""
        self.metrics.expect(self.job, self.rank, tier)

    def notify(self) -> None:
        """An event of this rank was counted: write the files soon (a batch)."""
        self._wake.set()

    def _run(self) -> None:
        while not self._stop:
            retry = self.address is not None and not self.serving
            woke = self._wake.wait(RETRY_S if retry else None)
            if self._stop:
                return
            if woke:
                time.sleep(FLUSH_DELAY_S)  # let the rest of the batch come
                self._wake.clear()
            try:
                self.flush()
            except Exception:
                log.warning("rank %d: writing the metrics of job %s failed", self.rank, self.job,
                            exc_info=True)  # fmt: skip

    def flush(self) -> None:
        """Write this rank's file and the node's textfile now; take the port if free."""
        with self._flush_lock:
            own = self.metrics.exposition(self.job, self.rank)
            write_atomic(self.dir / rank_file_name(self.rank), own, tag=f"{threading.get_ident()}.")
            if self.address is not None and not self.serving:
                self._try_serve()
            if self.textfile is not None:
                self._write_textfile()

    def _warn_once(self, key: str, msg: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(msg, *args)

    def _try_serve(self) -> None:
        assert self._server_lock_fd is not None and self.address is not None
        try:
            fcntl.flock(self._server_lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return  # another rank of this node serves
        from prometheus_client import CollectorRegistry, start_http_server

        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Families(self.node_families))
        host, port = self.address
        try:
            self._server, _ = start_http_server(port, host, registry)
        except OSError as e:
            self._warn_once("bind", "rank %d: cannot serve the metrics of job %s on %s:%d (%s); "
                            "retrying every %gs", self.rank, self.job, host, port, e,
                            RETRY_S)  # fmt: skip
            return
        self.port = self._server.server_port
        log.info("rank %d: serving the metrics of job %s on this node at http://%s:%d/metrics",
                 self.rank, self.job, host, self.port)  # fmt: skip

    def _rank_files(self, skip: int | None = None) -> list[list[Any]]:
        """The families in the local ranks' files (this job's samples of each file's rank)."""
        from prometheus_client.parser import text_string_to_metric_families

        out = []
        try:
            names = sorted(os.listdir(self.dir))
        except OSError as e:
            self._warn_once("list", "cannot list %s: %s", self.dir, e)
            return out
        for name in names:
            m = _RANK_FILE.match(name)
            if m is None or int(m.group(1)) == skip or int(m.group(1)) >= self.world_size:
                continue
            try:
                data = read_regular(self.dir / name, MAX_RANK_FILE, "metrics file")
                if data is None:
                    continue
                fams = list(text_string_to_metric_families(data.decode("utf-8", "replace")))
            except (OSError, MemckptError, ValueError) as e:
                log.warning("skipping the metrics file %s: %s", self.dir / name, e)
                continue
            out.append(_only(fams, self.job, int(m.group(1))))
        return out

    def node_families(self) -> list[Any]:
        """This rank's live samples and the other local ranks' files, merged."""
        return merge(self.metrics.families(self.job, self.rank), *self._rank_files(self.rank))

    def _write_textfile(self) -> None:
        assert self.textfile is not None
        fd = _open_lock(self.dir / WRITE_LOCK)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            data = _render(merge(*self._rank_files()))
            try:
                write_atomic(self.textfile, data, tag=f"{threading.get_ident()}.")
            except OSError as e:
                self._warn_once("textfile", "rank %d: cannot write the metrics textfile %s: %s",
                                self.rank, self.textfile, e)  # fmt: skip
        finally:
            os.close(fd)  # releases the flock

    def close(self) -> None:
        """Write the last samples, stop serving (another local rank may take over)."""
        _forget(self)
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:
            self.flush()
        except Exception as e:
            log.warning("rank %d: last write of the metrics of job %s failed: %s", self.rank,
                        self.job, e)  # fmt: skip
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._server_lock_fd is not None:
            os.close(self._server_lock_fd)
            self._server_lock_fd = None


# -- the process's metrics --------------------------------------------------------------------
_lock = threading.Lock()
_metrics: Metrics | None = None
_exporters: list[NodeExporter] = []
_unsubscribe: Callable[[], None] | None = None


def _on_event(doc: Mapping[str, Any]) -> None:
    metrics = _metrics
    if metrics is None:
        return
    with _lock:
        exporters = list(_exporters)
    job = doc.get("job")
    if job is None:  # events of helpers that do not name the job: the one job of this rank
        jobs = {e.job for e in exporters if e.rank == doc.get("rank")}
        job = jobs.pop() if len(jobs) == 1 else None
    mine = [e for e in exporters if e.job == job]
    if mine and metrics.observe(doc, job):
        for e in mine:
            e.notify()


def _forget(exporter: NodeExporter) -> None:
    global _unsubscribe
    with _lock:
        if exporter in _exporters:
            _exporters.remove(exporter)
        if not _exporters and _unsubscribe is not None:
            _unsubscribe()
            _unsubscribe = None


def start(
    peers_dir: str | os.PathLike[str],
    job: str,
    rank: int,
    world_size: int,
    *,
    port: int | str | None = None,
    environ: Mapping[str, str] | None = None,
) -> NodeExporter | None:
    """This rank's exporter of ``job``, started; None when metrics are off.

    On when ``port`` (``PORT`` or ``HOST:PORT``) is given or ``MEMCKPT_METRICS_TEXTFILE``
    is set (``{job}`` in it is replaced). ConfigError when prometheus-client is missing.
    """
    global _metrics, _unsubscribe
    address = parse_address(port)
    textfile = get(METRICS_TEXTFILE_ENV, environ)
    if address is None and textfile is None:
        return None
    _require()
    with _lock:
        if _metrics is None:
            _metrics = Metrics()
        metrics = _metrics
    exporter = NodeExporter(
        metrics, job=job, rank=rank, world_size=world_size, peers_dir=Path(peers_dir),
        address=address, textfile=Path(textfile.replace("{job}", job)) if textfile else None,
    )  # fmt: skip
    exporter.start()
    with _lock:
        _exporters.append(exporter)
        if _unsubscribe is None:
            _unsubscribe = events.subscribe(_on_event)
    return exporter
