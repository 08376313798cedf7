"""The durable tier on an S3-compatible server: drain, verify, restore, and outages.

A moto S3 server runs on 127.0.0.1 in the test process; memckpt reaches it exactly as it
reaches AWS or MinIO, through s3fs with an endpoint URL and credentials.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import memckpt
from memckpt.engine import drain
from memckpt.engine.drain import Circuit, DrainPolicy, backoff_delay
from memckpt.storage.remote import RemoteTier

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

from s3_server import FAST_POLICY, S3


def _state(step: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(step)
    return {
        "w": torch.randn(64, 1024, generator=g),
        "b": torch.randn(1000, generator=g).to(torch.bfloat16),
        "ids": torch.randint(0, 1 << 40, (333,), generator=g),
        "step": step,
    }


def _mgr(base: Path, s3: S3, **kw: Any) -> memckpt.CheckpointManager:
    kw.setdefault("persist_options", s3.options())
    kw.setdefault("persist_policy", FAST_POLICY)
    return memckpt.CheckpointManager(base, "job", keep_last=1, prefault=False,
                                     persist_dir=s3.url, **kw)  # fmt: skip


def _tier(s3: S3) -> RemoteTier:
    return RemoteTier(s3.url, "job", s3.options())


def _assert_same(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert got.keys() == want.keys()
    for k, v in want.items():
        if isinstance(v, torch.Tensor):
            assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
        else:
            assert got[k] == v


def test_drain_to_s3_and_restore_bit_exact_with_memory_gone(shm_dir, s3):
    with _mgr(shm_dir, s3, persist_every=2) as m:
        for step in range(1, 5):
            m.save(step, _state(step)).wait()
        drain.wait_for_drains(timeout=30)
    assert _tier(s3).persisted_steps() == [2, 4]
    # the newest step is persisted: a normal end gave the memory tier back
    assert not (shm_dir / "job").exists()
    with _mgr(shm_dir, s3) as m:
        got = m.load()
        assert m.last_load.tier == "persistent" and m.last_load.step == 4
        _assert_same(got, _state(4))


def test_unknown_or_missing_scheme_is_a_config_error_at_construction(shm_dir):
    with pytest.raises(memckpt.ConfigError, match="'nosuch'"):
        memckpt.CheckpointManager(shm_dir, "job", persist_dir="nosuch://bucket/x")
    if importlib.util.find_spec("gcsfs") is None:  # known to fsspec, not installed
        with pytest.raises(memckpt.ConfigError, match="gcsfs"):
            memckpt.CheckpointManager(shm_dir, "job", persist_every=1, persist_dir="gs://b/x")
    from memckpt.adapters.dcp import MemoryStorageWriter

    with pytest.raises(memckpt.ConfigError, match="'nosuch'"):
        MemoryStorageWriter(persist_every=1, persist_dir="nosuch://bucket/x")
    assert not list(shm_dir.glob("*:*"))  # nothing created as a local "s3:" directory


def test_wrong_credentials_log_one_clear_error_and_saves_go_on(shm_dir, s3, monkeypatch, caplog):
    from moto import settings

    monkeypatch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # the server checks keys
    caplog.set_level(logging.DEBUG, logger="memckpt")
    opts = s3.options(key="AKIAWRONGWRONGWRONG0", secret="wrong")
    with _mgr(shm_dir, s3, persist_every=1, persist_options=opts) as m:
        for step in range(1, 6):
            t0 = time.perf_counter()
            h = m.save(step, _state(step))
            assert time.perf_counter() - t0 < 2.0  # the call never waits for the store
            assert h.wait().committed
        drain.wait_for_drains(timeout=30)
        assert m.latest() == 5
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    assert "credentials" in errors[0].getMessage() and s3.url in errors[0].getMessage()
    monkeypatch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", float("inf"))
    assert _tier(s3).step_dirs() == []
    assert (shm_dir / "job" / "step-5").exists()  # nothing persisted: memory is kept


def test_server_down_mid_run_then_back_the_next_drain_succeeds(shm_dir, s3):
    with _mgr(shm_dir, s3, persist_every=1) as m:
        m.save(1, _state(1)).wait()
        drain.wait_for_drains(timeout=30)
        s3.stop()
        t0 = time.perf_counter()
        assert m.save(2, _state(2)).wait().committed
        assert time.perf_counter() - t0 < 5.0  # the save does not wait for the drain
        drain.wait_for_drains(timeout=30)
        s3.restart()
        time.sleep(FAST_POLICY.circuit_open_s)  # the circuit lets a probe through
        m.save(3, _state(3)).wait()
        drain.wait_for_drains(timeout=30)
    assert _tier(s3).persisted_steps() == [1, 3]  # step 2 was never persisted
    shutil.rmtree(shm_dir / "job", ignore_errors=True)
    with _mgr(shm_dir, s3) as m:
        _assert_same(m.load(), _state(3))
        assert m.last_load.tier == "persistent"


def test_half_uploaded_step_is_invisible_and_cleaned_by_the_next_drain(shm_dir, s3):
    with _mgr(shm_dir, s3, persist_every=2) as m:
        for step in (1, 2):
            m.save(step, _state(step)).wait()
        drain.wait_for_drains(timeout=30)
    tier = _tier(s3)
    # a crash after uploading step 3's object, before its manifest
    tier.fs.pipe_file(tier.object_path(3, 0), b"half an object")
    assert tier.step_dirs() == [2, 3] and tier.persisted_steps() == [2]
    shutil.rmtree(shm_dir / "job", ignore_errors=True)
    with _mgr(shm_dir, s3, persist_every=2) as m:
        _assert_same(m.load(), _state(2))  # step 3 does not exist for a restart
        for step in (3, 4):
            m.save(step, _state(step)).wait()
        drain.wait_for_drains(timeout=30)
    assert tier.step_dirs() == [2, 4] and tier.persisted_steps() == [2, 4]


def test_a_newer_step_supersedes_a_queued_one_and_gives_it_back_to_retention(shm_dir, s3):
    gate = drain._executor.submit(time.sleep, 1.0)  # hold the drain thread
    with _mgr(shm_dir, s3, persist_every=1) as m:
        for step in (1, 2, 3):
            m.save(step, _state(step)).wait()
        # keep_last=1: step 2 was kept while it waited, step 1 went once step 2 replaced it
        assert not (shm_dir / "job" / "step-1").exists()
        assert (shm_dir / "job" / "step-2").exists()
        gate.result()
        drain.wait_for_drains(timeout=30)
    assert _tier(s3).persisted_steps() == [3]  # 1 and 2 gave way without an upload


def test_backoff_is_capped_exponential_with_jitter_and_the_circuit_half_opens():
    p = DrainPolicy(backoff_s=1.0, backoff_cap_s=8.0)
    assert [backoff_delay(n, p, 0.999999) for n in (1, 2, 3, 4, 5)] == pytest.approx(
        [1, 2, 4, 8, 8], rel=1e-5
    )
    assert backoff_delay(3, p, 0.0) == 2.0  # jitter keeps at least half the delay
    now = [0.0]
    c = Circuit(after=2, open_s=10, clock=lambda: now[0])
    assert not c.failure() and c.state() == "closed"
    assert c.failure() and c.state() == "open"
    now[0] = 10.0
    assert c.state() == "half-open"
    assert c.failure() and c.state() == "open"  # a failed probe re-opens at once
    now[0] = 20.0
    assert c.success() and c.state() == "closed"
    assert Circuit(after=5, open_s=1, clock=lambda: 0.0).failure(permanent=True)
