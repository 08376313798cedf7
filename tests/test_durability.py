"""Durability of a step, per step: local, replicated (k copies on distinct nodes), persisted.

The handle of every save says the tier reached, waits for one and calls back; events name
each tier reached; ``memckpt ls`` and ``memckpt status`` show it; the recipes' summary
names the newest step per tier.
"""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import memckpt
from memckpt.engine import drain
from memckpt.engine.drain import RemoteDrain
from memckpt.engine.handle import SaveHandle, SaveResult
from memckpt.errors import CommitError, InvalidNameError
from memckpt.recipes.reporting import describe_newest, newest_step_per_tier
from memckpt.storage.events import read_events
from memckpt.tools.cli import main as cli_main


def _state(step: int) -> dict[str, Any]:
    return {"w": torch.full((256,), float(step)), "step": step}


def _mgr(base: Path, **kw: Any) -> memckpt.CheckpointManager:
    kw.setdefault("keep_last", 3)
    return memckpt.CheckpointManager(base, "job", prefault=False, **kw)


def _cli_json(capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    capsys.readouterr()
    cli_main([*argv, "--json"])
    return json.loads(capsys.readouterr().out)


def _cli_text(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    capsys.readouterr()
    cli_main(list(argv))
    return capsys.readouterr().out


def test_handle_reaches_persisted_when_its_drain_verifies_the_step(shm_dir, tmp_path, monkeypatch):
    events_file = tmp_path / "events.jsonl"
    monkeypatch.setenv("MEMCKPT_EVENTS_FILE", str(events_file))
    persist = tmp_path / "persist"
    calls: list[tuple[int, str]] = []
    with _mgr(shm_dir, persist_every=2, persist_dir=persist) as m:
        # Given a step no drain is scheduled for
        h1 = m.save(1, _state(1))
        r1 = h1.wait()
        # Then it is local, and it never gets further: wait_for says so at once
        assert (r1.durability, r1.copies, h1.durability) == ("local", 1, "local")
        assert h1.wait_for("local", timeout=0)
        t0 = time.monotonic()
        assert h1.wait_for("persisted", timeout=30) is False
        assert h1.wait_for("replicated") is False  # no timeout: it cannot become replicated
        assert time.monotonic() - t0 < 5
        assert h1.persisted_to is None

        # When a drained step commits
        h2 = m.save(2, _state(2))
        h2.on_tier("persisted", lambda h: calls.append((h.step, threading.current_thread().name)))
        assert h2.wait().committed
        # Then it reaches persisted once the drain wrote it, verified, with where it went
        assert h2.wait_for("persisted", timeout=30)
        assert h2.durability == "persisted"
        assert h2.persisted_to == str(persist / "job" / "step-2")
        assert h2.wait_for("local", timeout=0) and h2.wait_for("replicated", timeout=0)
        deadline = time.monotonic() + 10
        while not calls and time.monotonic() < deadline:
            time.sleep(0.01)
        assert calls == [(2, "memckpt-durability_0")]  # once, off the save and drain threads
        # a callback for a tier already reached runs here, at once
        here: list[int] = []
        h2.on_tier("local", lambda h: here.append(h.step))
        assert here == [2]
        assert "durability=persisted" in repr(h2)
        m.save(3, _state(3)).wait()
        m.close(release_memory=False)

    got = [(e["event"], e.get("step"), e.get("where")) for e in read_events(events_file)]
    assert ("persisted", 2, str(persist / "job" / "step-2")) in got
    assert not [e for e in got if e[0] == "persisted" and e[1] != 2]
    assert not [e for e in got if e[0] == "replicated"]  # one node: nothing replicated


def test_ls_and_status_show_each_steps_durability(shm_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    persist = tmp_path / "persist"
    with _mgr(shm_dir, persist_every=2, persist_dir=persist) as m:
        for step in (1, 2, 3):
            m.save(step, _state(step)).wait()
        drain.wait_for_drains(timeout=30)
        m.close(release_memory=False)
    where = str(persist / "job" / "step-2")

    (job,) = _cli_json(capsys, "ls", str(shm_dir))
    tiers = {s["step"]: s["durability"] for s in job["steps"]}
    stamp = tiers[2]["persisted"]["unix"]
    assert tiers[2] == {"tier": "persisted", "copies": 1,
                        "persisted": {"where": where, "unix": stamp}}  # fmt: skip
    assert tiers[1] == tiers[3] == {"tier": "local", "copies": 1, "persisted": None}
    out = _cli_text(capsys, "ls", str(shm_dir))
    assert "durability" in out and "persisted" in out and "local" in out
    assert f"step 2: persisted to {where}" in out

    doc = _cli_json(capsys, "status", str(shm_dir))
    tiers = {s["step"]: s["durability"] for s in doc["steps"]}
    assert tiers[2]["tier"] == "persisted" and tiers[2]["persisted"]["where"] == where
    assert tiers[3] == {"tier": "local", "copies": 1, "persisted": None}
    out = _cli_text(capsys, "status", str(shm_dir))
    assert "durability" in out and f"step 2: persisted to {where}" in out

    # A record that names another manifest (a re-save, or a planted file) does not count
    record = shm_dir / "job" / "step-2" / "persisted.json"
    rec = json.loads(record.read_text())
    record.write_text(json.dumps({**rec, "manifest_checksum": rec["manifest_checksum"] ^ 1}))
    (job,) = _cli_json(capsys, "ls", str(shm_dir))
    assert {s["step"]: s["durability"]["tier"] for s in job["steps"]}[2] == "local"
    record.write_text("not json")
    doc = _cli_json(capsys, "status", str(shm_dir))
    assert {s["step"]: s["durability"]["tier"] for s in doc["steps"]}[2] == "local"


def test_a_failed_drain_never_reaches_persisted(shm_dir, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with _mgr(shm_dir, persist_every=1, persist_dir=blocker / "persist") as m:
        h = m.save(1, _state(1))
        assert h.wait().durability == "local"
        t0 = time.monotonic()
        assert h.wait_for("persisted", timeout=30) is False  # the drain failed: at once
        assert time.monotonic() - t0 < 10 and h.durability == "local"
        m.close(release_memory=False)


def test_unknown_tier_is_a_clear_error(shm_dir):
    with _mgr(shm_dir) as m:
        h = m.save(1, _state(1), blocking=True)
        with pytest.raises(InvalidNameError, match=r"'durable'.*local, replicated, persisted"):
            h.wait_for("durable")
        with pytest.raises(InvalidNameError):
            h.on_tier("memory", lambda _: None)


def test_a_skipped_save_reaches_no_tier(shm_dir):
    with _mgr(shm_dir, limit_bytes=1) as m:
        h = m.save(1, _state(1))
        r = h.wait()
        assert r.skipped and (r.durability, r.copies) == ("none", 0)
        assert h.durability == "none" and h.wait_for("local") is False


def test_handles_on_s3_reach_persisted_and_a_superseded_step_does_not(shm_dir, s3, monkeypatch):
    from memckpt.storage.remote import RemoteTier
    from s3_server import FAST_POLICY

    events_file = shm_dir / "events.jsonl"
    monkeypatch.setenv("MEMCKPT_EVENTS_FILE", str(events_file))
    with _mgr(shm_dir, persist_every=2, persist_dir=s3.url, persist_options=s3.options(),
              persist_policy=FAST_POLICY) as m:  # fmt: skip
        h2 = [m.save(s, _state(s)) for s in (1, 2)][-1]
        h2.wait()
        assert h2.wait_for("persisted", timeout=30)
        assert h2.persisted_to == f"{s3.url}/job/step-2"

        # a drain that waits behind a busy drain thread gives way to a newer step
        h3, h4 = m.save(3, _state(3)), None
        h3.wait()
        h4 = m.save(4, _state(4))
        h4.wait()
        remote = RemoteDrain(m.engine, RemoteTier(s3.url, "job", s3.options()), FAST_POLICY)
        drain.wait_for_drains(timeout=30)
        busy = threading.Event()
        drain._executor.submit(busy.wait, 30)
        try:
            remote.schedule(3)
            remote.schedule(4)  # step 3 was waiting: superseded
            t0 = time.monotonic()
            assert h3.wait_for("persisted", timeout=30) is False
            assert time.monotonic() - t0 < 5
        finally:
            busy.set()
        assert h4.wait_for("persisted", timeout=30) and h3.durability == "local"
        m.close(release_memory=False)
    persisted = [e for e in read_events(events_file) if e["event"] == "persisted"]
    assert {e["step"] for e in persisted} == {2, 4}
    assert all(e["rank"] == 0 and e["where"].startswith(s3.url) for e in persisted)


def test_an_unreachable_store_leaves_the_step_local(shm_dir, s3):
    from s3_server import FAST_POLICY

    s3.stop()
    with _mgr(shm_dir, persist_every=1, persist_dir=s3.url, persist_options=s3.options(),
              persist_policy=FAST_POLICY) as m:  # fmt: skip
        h = m.save(1, _state(1))
        h.wait()
        assert h.wait_for("persisted", timeout=60) is False
        assert h.durability == "local"
        m.close(release_memory=False)


@pytest.mark.timeout(180)
def test_two_nodes_replicated_then_persisted_and_status_counts_copies(shm_dir, tmp_path, capsys):
    from durability_workers import save_replicated_and_drained
    from multiproc import run_ranks

    persist = tmp_path / "persist"
    out = run_ranks(save_replicated_and_drained, 2, str(shm_dir), str(persist), [1, 2],
                    timeout=120)  # fmt: skip
    for rank in (0, 1):
        got = out[rank]
        # step 1: committed with a copy on each node
        assert got[1]["result"] == ("replicated", 2)
        assert got[1]["replicated"] is True and got[1]["persisted"] is False
        # step 2: drained; rank 1 learns it once the coordinator's manifest is there
        assert got[2]["result"][0] in ("replicated", "persisted") and got[2]["result"][1] == 2
        assert got[2]["persisted"] is True
        assert got[2]["now"] == ("persisted", 2, str(persist / "job" / "step-2"))

    n0, n1 = str(shm_dir / "node0"), str(shm_dir / "node1")
    doc = _cli_json(capsys, "status", n0, n1)
    tiers = {s["step"]: s["durability"] for s in doc["steps"]}
    assert tiers[1] == {"tier": "replicated", "copies": 2, "persisted": None}
    assert tiers[2]["tier"] == "persisted" and tiers[2]["copies"] == 2
    (job,) = _cli_json(capsys, "ls", n0, n1)
    assert {s["step"]: s["durability"]["tier"] for s in job["steps"]} == {
        1: "replicated",
        2: "persisted",
    }
    (job,) = _cli_json(capsys, "ls", n0)  # one node's tree alone: one copy of each here
    assert {s["step"]: s["durability"]["copies"] for s in job["steps"]} == {1: 1, 2: 1}
    # ranks 0 and 1 on a node of their own each wrote the record into their tree
    assert (shm_dir / "node0/job/step-2/persisted.json").exists()
    assert (shm_dir / "node1/job/step-2/persisted.json").exists()


def _done(step: int, durability: str, copies: int) -> SaveHandle:
    fut: concurrent.futures.Future[SaveResult] = concurrent.futures.Future()
    fut.set_result(SaveResult(step, 8, 8, 1, 0.0, 0.0, 0.0, 0.0, 0.0, "", durability=durability,
                              copies=copies))  # fmt: skip
    return SaveHandle(step, fut)


def test_recipe_summary_names_the_newest_step_per_tier():
    handles = [_done(10, "persisted", 2), _done(20, "replicated", 2), _done(30, "local", 1)]
    failed: concurrent.futures.Future[SaveResult] = concurrent.futures.Future()
    failed.set_exception(CommitError("no"))
    handles.append(SaveHandle(40, failed))
    newest = newest_step_per_tier(handles)
    assert newest == {"local": 30, "replicated": 20, "persisted": 10}
    assert newest_step_per_tier(handles, persistent_step=25)["persisted"] == 25
    assert newest_step_per_tier([]) == {"local": None, "replicated": None, "persisted": None}
    assert describe_newest(newest) == "local 30, replicated 20, persisted 10"
    # a handle made from a result alone: the result's tier is final
    assert handles[0].wait_for("persisted", timeout=0) and not handles[2].wait_for("replicated")
    assert handles[3].durability == "none"


@pytest.mark.timeout(120)
def test_training_summary_names_the_newest_step_per_tier(shm_dir):
    from memckpt.recipes.config import ConfigContainer
    from memckpt.recipes.train import train

    cfg = ConfigContainer()
    cfg.train.steps, cfg.train.micro_batch_size, cfg.train.progress = 8, 4, False
    cfg.model.kind, cfg.data.kind, cfg.data.num_samples = "mlp", "regression", 200
    cfg.model.mlp_hidden, cfg.model.mlp_layers = 16, 1
    cfg.checkpoint.job_id = "summary"
    cfg.checkpoint.memory.base_dir = str(shm_dir / "mem")
    cfg.checkpoint.memory.interval = 3
    cfg.checkpoint.persistent.dir = str(shm_dir / "persistent")
    cfg.checkpoint.persistent.interval = 5
    cfg.logger.metrics_file = str(shm_dir / "metrics.jsonl")

    result = train(cfg)

    # memory saves at 3, 6 and 8 (one node: none replicated), persistent ones at 5 and 8
    assert result.newest_by_tier == {"local": 8, "replicated": None, "persisted": 8}
    lines = (shm_dir / "metrics.jsonl").read_text().splitlines()
    (end,) = [d for d in map(json.loads, lines) if d.get("event") == "end"]
    assert end["newest_by_tier"] == result.newest_by_tier
