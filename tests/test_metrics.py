"""Prometheus metrics (memckpt.metrics): fed by events, one exporter per node, a textfile.

Every scrape goes through a real HTTP client (urllib) and the Prometheus text parser.
"""

from __future__ import annotations

import logging
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

import memckpt
from memckpt import metrics
from memckpt.errors import ConfigError
from memckpt.settings import METRICS_PORT_ENV, METRICS_TEXTFILE_ENV
from memckpt.storage import events
from memckpt.storage.room import MemoryLimit, Room, shortfall
from multiproc import free_port, run_ranks

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """{(sample name, sorted labels): value} of a Prometheus text exposition."""
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            assert key not in out, f"sample {key} twice"
            out[key] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return parse(resp.read().decode())


def ev(event: str, **fields: Any) -> dict[str, Any]:
    return {"event": event, "time": fields.pop("time", 1000.0), **fields}


# -- events: in-process listeners -------------------------------------------------------------
def test_listeners_get_every_event_and_one_that_raises_never_breaks_the_emit(
    monkeypatch, tmp_path, caplog
):
    # Given a listener that raises and one that records, and the events file set
    monkeypatch.setenv("MEMCKPT_EVENTS_FILE", str(tmp_path / "events.jsonl"))
    seen: list[dict[str, Any]] = []

    def broken(doc):
        raise RuntimeError("listener bug")

    off_broken = events.subscribe(broken)
    off_seen = events.subscribe(lambda doc: seen.append(dict(doc)))
    try:
        # When an event is emitted
        with caplog.at_level(logging.WARNING, logger="memckpt.storage.events"):
            events.emit("saved", step=3, rank=0, job="j")
    finally:
        off_broken()
        off_seen()
    # Then the recording listener saw it, the error was logged, and the file has the line
    assert [(d["event"], d["step"], d["job"]) for d in seen] == [("saved", 3, "j")]
    assert "listener bug" in caplog.text
    assert [e["step"] for e in events.read_events(tmp_path / "events.jsonl")] == [3]
    # And after unsubscribing nothing more reaches it
    events.emit("saved", step=4, rank=0, job="j")
    assert len(seen) == 1


def test_listeners_get_events_without_the_events_file(monkeypatch):
    monkeypatch.delenv("MEMCKPT_EVENTS_FILE", raising=False)
    seen: list[str] = []
    off = events.subscribe(lambda doc: seen.append(doc["event"]))
    try:
        events.emit("loaded", step=1, rank=0)
    finally:
        off()
    assert seen == ["loaded"]


# -- the registry, from events ----------------------------------------------------------------
def test_saves_skips_non_finite_and_loads_become_counters_histograms_and_gauges():
    # Given the metrics of a process and the events of rank 1 of job "j"
    m = metrics.Metrics(clock=lambda: 2000.0)
    for step, blocking, background, nbytes in ((1, 0.002, 0.5, 1000), (2, 0.2, 1.5, 3000)):
        m.observe(ev("saved", job="j", rank=1, step=step, blocking_s=blocking,
                     background_s=background, nbytes=nbytes, replicated=False))  # fmt: skip
    m.observe(ev("skipped", job="j", rank=1, step=3, reason="rank 0 needs 2 GB; cgroup", own=False))
    m.observe(ev("skipped", job="j", rank=1, step=4, reason="needs 2 GB more in /dev/shm"))
    m.observe(ev("non_finite", job="j", rank=1, step=2, tensors=["w"]))
    m.observe(ev("loaded", job="j", rank=1, step=2, tier="peer", seconds=0.75))
    assert not m.observe(ev("saved", rank=1, step=9))  # no job: not counted
    assert not m.observe(ev("step", job="j", rank=1, step=9))  # not a metrics event
    # When the registry is collected
    get = m.registry.get_sample_value
    lr = {"job": "j", "rank": "1"}
    # Then each metric says what the events said
    assert get("memckpt_saves_total", lr) == 2
    assert get("memckpt_save_bytes_total", lr) == 4000
    assert get("memckpt_save_blocking_seconds_count", lr) == 2
    assert get("memckpt_save_blocking_seconds_sum", lr) == pytest.approx(0.202)
    assert get("memckpt_save_blocking_seconds_bucket", {**lr, "le": "0.005"}) == 1
    assert get("memckpt_save_blocking_seconds_bucket", {**lr, "le": "+Inf"}) == 2
    assert get("memckpt_save_background_seconds_sum", lr) == pytest.approx(2.0)
    assert get("memckpt_saves_skipped_total", {**lr, "reason": "other_rank"}) == 1
    assert get("memckpt_saves_skipped_total", {**lr, "reason": "no_space"}) == 1
    assert get("memckpt_non_finite_steps_total", lr) == 1
    assert get("memckpt_recoveries_total", {**lr, "source": "peer"}) == 1
    assert get("memckpt_recovery_seconds", lr) == 0.75
    assert get("memckpt_recovery_step", lr) == 2
    assert get("memckpt_newest_step", {**lr, "tier": "memory"}) == 2
    assert get("memckpt_last_save_timestamp_seconds", lr) == 1000.0
    # no replication or drain seen or expected: no lag reported
    assert get("memckpt_replication_lag_seconds", lr) is None
    assert get("memckpt_drain_lag_steps", lr) is None


def test_replication_and_drain_lag_in_steps_and_seconds():
    now = [0.0]
    m = metrics.Metrics(clock=lambda: now[0])
    m.expect("j", 0, "persisted")
    get = m.registry.get_sample_value
    lr = {"job": "j", "rank": "0"}
    # Given steps 10, 20, 30 committed at t=100, 200, 300; 10 and 20 replicated with them
    for step, t, rep in ((10, 100.0, True), (20, 200.0, True), (30, 300.0, False)):
        m.observe(ev("saved", job="j", rank=0, step=step, time=t, replicated=rep))
    now[0] = 350.0
    # Then replication is one save (10 steps) behind, for 50 s (step 30, committed at 300)
    assert get("memckpt_newest_step", {**lr, "tier": "replicated"}) == 20
    assert get("memckpt_replication_lag_steps", lr) == 10
    assert get("memckpt_replication_lag_seconds", lr) == 50
    # And the drain, expected but with nothing persisted yet: its age since the first commit
    assert get("memckpt_drain_lag_steps", lr) is None
    assert get("memckpt_drain_lag_seconds", lr) == 250
    # When another helper's events (without a job) say step 30 replicated and 20 persisted
    m.observe(ev("replicated", rank=0, step=30, copies=2), job="j")
    m.observe(ev("persisted", rank=0, step=20, where="s3://b/j"), job="j")
    # Then replication has caught up and the drain lags step 30's age
    assert get("memckpt_replication_lag_steps", lr) == 0
    assert get("memckpt_replication_lag_seconds", lr) == 0
    assert get("memckpt_newest_step", {**lr, "tier": "persisted"}) == 20
    assert get("memckpt_drain_lag_steps", lr) == 10
    assert get("memckpt_drain_lag_seconds", lr) == 50
    # And a load of step 20 (newer steps abandoned) resets memory's newest step
    m.observe(ev("loaded", job="j", rank=0, step=20, tier="persistent", seconds=1.0, time=400.0))
    assert get("memckpt_newest_step", {**lr, "tier": "memory"}) == 20
    assert get("memckpt_newest_step", {**lr, "tier": "replicated"}) == 20
    assert get("memckpt_drain_lag_steps", lr) == 0
    assert get("memckpt_drain_lag_seconds", lr) == 0


def test_skip_reason_labels_from_the_admission_messages():
    gb = 10**9
    tmpfs = shortfall(Room(2 * gb, gb, "/dev/shm"))
    cgroup = shortfall(Room(2 * gb, 10 * gb, "/dev/shm", MemoryLimit(4 * gb, 3 * gb, "/sys/x")))
    limit = shortfall(Room(2 * gb, 10 * gb, "/dev/shm", None, gb))
    assert tmpfs and cgroup and limit
    assert metrics.skip_reason(tmpfs) == "no_space"
    assert metrics.skip_reason(cgroup) == "memory_limit"
    assert metrics.skip_reason(limit) == "limit_bytes"
    assert metrics.skip_reason(limit, own=False) == "other_rank"


# -- configuration ------------------------------------------------------------------------------
def test_without_prometheus_client_metrics_are_a_config_error_naming_the_extra(
    monkeypatch, shm_dir
):
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # import fails
    with pytest.raises(ConfigError, match=r"pip install 'memckpt\[metrics\]'"):
        metrics.start(shm_dir, "job", 0, 1, port=free_port())
    monkeypatch.setenv(METRICS_PORT_ENV, str(free_port()))
    with pytest.raises(ConfigError, match=r"pip install 'memckpt\[metrics\]'"):
        memckpt.CheckpointManager(shm_dir, "job", prefault=False)


@pytest.mark.parametrize("bad", ["http", "0", "70000", "host:"])
def test_a_port_that_is_not_one_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="not a port"):
        metrics.parse_address(bad)


def test_metrics_are_off_without_a_port_or_textfile(monkeypatch, shm_dir):
    monkeypatch.delenv(METRICS_TEXTFILE_ENV, raising=False)
    assert metrics.start(shm_dir, "job", 0, 1) is None
    assert metrics.parse_address("127.0.0.1:9400") == ("127.0.0.1", 9400)
    assert metrics.parse_address(9400) == ("0.0.0.0", 9400)


# -- one exporter per node ----------------------------------------------------------------------
def _exporter(m: metrics.Metrics, rank: int, peers: Path, port: int, textfile: Path | None):
    e = metrics.NodeExporter(m, job="job", rank=rank, world_size=2, peers_dir=peers,
                             address=("127.0.0.1", port), textfile=textfile)  # fmt: skip
    e.start()
    return e


def test_local_ranks_share_one_port_and_a_survivor_takes_it_over(shm_dir):
    # Given two ranks of one node (two registries, as in two processes) and one port
    peers, port, textfile = shm_dir / ".peers", free_port(), shm_dir / "node.prom"
    m0, m1 = metrics.Metrics(), metrics.Metrics()
    m0.observe(ev("saved", job="job", rank=0, step=5, blocking_s=0.1, nbytes=100))
    m1.observe(ev("saved", job="job", rank=1, step=5, blocking_s=0.3, nbytes=300))
    m1.observe(ev("saved", job="other", rank=1, step=5, nbytes=7))  # another job: not served
    e0 = _exporter(m0, 0, peers, port, textfile)
    e1 = _exporter(m1, 1, peers, port, textfile)
    try:
        # Then the first to start serves, the other writes its samples for it
        assert e0.serving and not e1.serving
        got = scrape(port)
        assert value(got, "memckpt_save_bytes_total", job="job", rank="0") == 100
        assert value(got, "memckpt_save_bytes_total", job="job", rank="1") == 300
        assert not [k for k in got if ("job", "other") in k[1]]
        # And the textfile holds both ranks, parseable
        in_file = parse(textfile.read_text())
        assert value(in_file, "memckpt_save_blocking_seconds_sum", job="job", rank="1") == 0.3
        assert value(in_file, "memckpt_save_bytes_total", job="job", rank="0") == 100
        # When rank 0's process ends, rank 1 takes the port over at its next flush
        m0.observe(ev("saved", job="job", rank=0, step=6, nbytes=50))
        e0.close()
        e1.flush()
        assert e1.serving
        got = scrape(port)
        assert value(got, "memckpt_save_bytes_total", job="job", rank="0") == 150
        assert value(got, "memckpt_newest_step", job="job", rank="1", tier="memory") == 5
    finally:
        e0.close()
        e1.close()


def test_a_manager_exports_its_saves_skips_and_non_finite_steps(monkeypatch, shm_dir):
    # Given a manager with a metrics port and a textfile (the variables, as any API reads them)
    port = free_port()
    monkeypatch.setenv(METRICS_PORT_ENV, f"127.0.0.1:{port}")
    monkeypatch.setenv(METRICS_TEXTFILE_ENV, str(shm_dir / "{job}.prom"))
    with memckpt.CheckpointManager(shm_dir / "mem", "job", limit_bytes=8 << 20,
                                   prefault=False) as m:  # fmt: skip
        # When it saves, once holding NaN, then a state over its limit_bytes
        ok = m.save(1, {"w": torch.ones(1000)}).wait()
        nan = m.save(2, {"w": torch.full((1000,), float("nan"))}).wait()
        big = m.save(3, {"w": torch.ones(4 << 20)}).wait()
        assert big.skipped and not nan.step_finite
        got = scrape(port)
    # Then the endpoint said what the results say
    lr = {"job": "job", "rank": "0"}
    assert value(got, "memckpt_saves_total", **lr) == 2
    assert value(got, "memckpt_save_bytes_total", **lr) == ok.nbytes + nan.nbytes
    assert value(got, "memckpt_save_blocking_seconds_sum", **lr) == pytest.approx(
        ok.blocking_s + nan.blocking_s
    )
    assert value(got, "memckpt_non_finite_steps_total", **lr) == 1
    assert value(got, "memckpt_saves_skipped_total", **lr, reason="limit_bytes") == 1
    assert value(got, "memckpt_newest_step", **lr, tier="memory") == 2
    # And the textfile, written at close, too
    in_file = parse((shm_dir / "job.prom").read_text())
    assert value(in_file, "memckpt_saves_skipped_total", **lr, reason="limit_bytes") == 1
    assert value(in_file, "memckpt_saves_total", **lr) == 2


@pytest.mark.slow
def test_two_nodes_serve_metrics_equal_to_their_save_results(shm_dir):
    from metrics_workers import save_load_and_scrape

    # Given two nodes (one rank each, pairwise replication), each with its port and textfile
    ports = {0: free_port(), 1: free_port()}
    env = {r: {METRICS_PORT_ENV: str(ports[r]),
               METRICS_TEXTFILE_ENV: str(shm_dir / f"node{r}.prom")} for r in (0, 1)}  # fmt: skip
    # When each saves steps 1-3, loads the newest, and scrapes its node's endpoint
    out = run_ranks(save_load_and_scrape, 2, str(shm_dir), [1, 2, 3], env_per_rank=env,
                    timeout=120)  # fmt: skip
    for rank, got in out.items():
        results = got["results"]
        assert all(r["committed"] and r["replicated"] for r in results)
        assert got["content_type"].startswith("text/plain")
        scraped = parse(got["scraped"])
        lr = {"job": "job", "rank": str(rank)}
        # Then every value equals what the SaveResults and the LoadInfo say
        assert value(scraped, "memckpt_saves_total", **lr) == 3
        assert value(scraped, "memckpt_save_bytes_total", **lr) == sum(r["nbytes"] for r in results)
        assert sum(r["nbytes"] for r in results) == 3 * got["nbytes"]
        assert value(scraped, "memckpt_save_blocking_seconds_sum", **lr) == pytest.approx(
            sum(r["blocking_s"] for r in results)
        )
        assert value(scraped, "memckpt_save_blocking_seconds_count", **lr) == 3
        assert value(scraped, "memckpt_save_background_seconds_sum", **lr) == pytest.approx(
            sum(r["total_s"] - r["blocking_s"] for r in results)
        )
        assert value(scraped, "memckpt_newest_step", **lr, tier="memory") == 3
        assert value(scraped, "memckpt_newest_step", **lr, tier="replicated") == 3
        assert value(scraped, "memckpt_replication_lag_steps", **lr) == 0
        assert value(scraped, "memckpt_replication_lag_seconds", **lr) == 0
        assert value(scraped, "memckpt_recoveries_total", **lr, source="memory") == 1
        assert value(scraped, "memckpt_recovery_step", **lr) == got["loaded"]["step"] == 3
        assert value(scraped, "memckpt_recovery_seconds", **lr) == pytest.approx(
            got["loaded"]["seconds"]
        )
        # each node serves its own ranks only
        assert {dict(k[1]).get("rank") for k in scraped} == {str(rank)}
        # And the node's textfile (written at close) parses to the same saves
        in_file = parse(got["textfile"])
        assert value(in_file, "memckpt_saves_total", **lr) == 3
        assert value(in_file, "memckpt_save_bytes_total", **lr) == sum(r["nbytes"] for r in results)


def test_a_drained_job_exports_its_persisted_step_and_drain_lag(monkeypatch, shm_dir):
    # Given a job that drains every 2nd step to a directory, with metrics on
    port = free_port()
    monkeypatch.setenv(METRICS_PORT_ENV, f"127.0.0.1:{port}")
    with memckpt.CheckpointManager(shm_dir / "mem", "job", persist_every=2,
                                   persist_dir=shm_dir / "disk", prefault=False) as m:  # fmt: skip
        # When steps 1-3 are saved and the drain of step 2 ends
        for step in (1, 2, 3):
            m.save(step, {"w": torch.ones(1000) * step}).wait()
        m.wait()
        lr = {"job": "job", "rank": "0"}
        deadline = time.monotonic() + 10
        while True:
            got = scrape(port)
            if value(got, "memckpt_newest_step", **lr, tier="persisted") == 2:
                break
            assert time.monotonic() < deadline, f"no persisted step in {sorted(got)}"
            time.sleep(0.05)
    # Then the drain is one step behind memory, since step 3's commit
    assert value(got, "memckpt_newest_step", **lr, tier="memory") == 3
    assert value(got, "memckpt_drain_lag_steps", **lr) == 1
    assert 0 < value(got, "memckpt_drain_lag_seconds", **lr) < 60
    # and without replication no replication lag is reported
    assert value(got, "memckpt_replication_lag_seconds", **lr) is None
