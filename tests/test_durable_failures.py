"""The durable tier under real failures: a server killed mid-upload, a slow link, gc.

The server is moto's S3 (the ``s3`` fixture); a TCP proxy written here sits between memckpt
and it where a test needs to see, slow down or cut the bytes on the wire. memckpt reaches the
proxy as it would reach any S3 endpoint: an ``endpoint_url`` and credentials.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import memckpt
from memckpt.engine import drain
from memckpt.storage.remote import RemoteTier
from memckpt.tools.cli import main as cli_main

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

from s3_server import FAST_POLICY, S3


class Proxy:
    """A TCP proxy on 127.0.0.1 to ``port``: counts the bytes sent upstream, caps their rate
    (bytes/s, shared by every connection; None: no cap), and can cut every connection."""

    def __init__(self, port: int, rate: float | None = None) -> None:
        self.upstream, self.rate = port, rate
        self.sent = 0
        self._lock = threading.Lock()
        self._next = time.monotonic()
        self._socks: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.upstream), timeout=2)
                server.settimeout(None)
            except OSError:
                client.close()  # the server is down: the client sees the connection drop
                continue
            with self._lock:
                self._socks += [client, server]
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pace(self, n: int) -> None:
        with self._lock:
            self.sent += n
            if self.rate is None:
                return
            now = time.monotonic()
            self._next = max(self._next, now) + n / self.rate
            wait = self._next - now
        time.sleep(wait)

    def _pump(self, src: socket.socket, dst: socket.socket, upstream: bool) -> None:
        try:
            while data := src.recv(16 << 10):
                if upstream:
                    self._pace(len(data))
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        """Drop every open connection, as a dying server does."""
        with self._lock:
            socks, self._socks = self._socks, []
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        self.cut()


@pytest.fixture
def proxied(s3: S3) -> Iterator[tuple[S3, Proxy]]:
    proxy = Proxy(s3.port)
    try:
        yield s3, proxy
    finally:
        proxy.close()


def _state(step: int, mib: int) -> dict[str, Any]:
    return {"w": torch.full((mib << 18,), float(step)), "step": step}  # mib MiB of float32


def _mgr(base: Path, s3: S3, endpoint: str, **kw: Any) -> memckpt.CheckpointManager:
    kw.setdefault("persist_policy", FAST_POLICY)
    return memckpt.CheckpointManager(base, "job", keep_last=1, prefault=False, persist_dir=s3.url,
                                     persist_options=s3.options(endpoint_url=endpoint),
                                     **kw)  # fmt: skip


def _tier(s3: S3) -> RemoteTier:
    return RemoteTier(s3.url, "job", s3.options())


def _memory_steps(base: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in (base / "job").glob("step-*"))


def test_server_killed_mid_upload_training_goes_on_and_a_newer_step_persists_later(
    shm_dir, proxied
):
    s3, proxy = proxied
    killed = threading.Event()
    sent_at_kill: list[int] = []

    def kill_once_bytes_flow() -> None:
        deadline = time.monotonic() + 30
        while proxy.sent < 8 << 20 and time.monotonic() < deadline:  # mid-way through 64 MiB
            time.sleep(0.005)
        sent_at_kill.append(proxy.sent)
        s3.stop()
        proxy.cut()
        killed.set()

    proxy.rate = 32e6  # 64 MiB takes ~2 s: the kill lands mid-upload
    with _mgr(shm_dir, s3, proxy.endpoint, persist_every=1) as m:
        threading.Thread(target=kill_once_bytes_flow, daemon=True).start()
        m.save(1, _state(1, 64)).wait()
        assert killed.wait(30) and sent_at_kill[0] < 64 << 20  # cut mid-upload
        for step in (2, 3, 4):  # training goes on while the store is gone
            t0 = time.perf_counter()
            h = m.save(step, _state(step, 64))
            assert time.perf_counter() - t0 < 2.0
            assert h.wait().committed
        drain.wait_for_drains(timeout=60)
        s3.restart()
        proxy.rate = None
        assert _tier(s3).persisted_steps() == []  # the step cut mid-upload is not there
        time.sleep(FAST_POLICY.circuit_open_s)  # the circuit lets a probe through
        m.save(5, _state(5, 64)).wait()
        drain.wait_for_drains(timeout=60)
        tier = _tier(s3)
        assert tier.persisted_steps() == [5]
        assert tier.step_dirs() == [5]  # whatever landed of the killed upload is gone
    with _mgr(shm_dir / "fresh", s3, s3.endpoint) as m:
        got = m.load()
        assert m.last_load.tier == "persistent" and got["step"] == 5
        assert torch.equal(got["w"], _state(5, 64)["w"])


def test_a_throttled_store_never_blocks_saves_and_the_lag_stays_bounded(shm_dir, proxied):
    s3, proxy = proxied
    proxy.rate = 8e6  # 8 MB/s: a 4 MiB step takes ~0.5 s to upload, it is saved every 0.1 s
    most_in_memory = 0
    blocking = []
    with _mgr(shm_dir, s3, proxy.endpoint, persist_every=1) as m:
        for step in range(1, 21):
            t0 = time.perf_counter()
            h = m.save(step, _state(step, 4))
            blocking.append(time.perf_counter() - t0)
            assert h.wait().committed
            # kept: keep_last=1, plus at most one step uploading and one waiting
            most_in_memory = max(most_in_memory, len(_memory_steps(shm_dir)))
            time.sleep(0.1)
        t0 = time.perf_counter()
        m.close()
        closing = time.perf_counter() - t0
    persisted = _tier(s3).persisted_steps()
    assert max(blocking) < 1.0, blocking
    assert most_in_memory <= 3
    assert persisted[-1] == 20  # the newest step is persisted by close()
    assert 2 <= len(persisted) <= 12, persisted  # superseded steps were never uploaded
    assert closing < 10.0  # close waits for at most one upload and one waiting step
    assert not (shm_dir / "job").exists()  # and then gave the memory back


def test_gc_removes_half_uploaded_and_old_persisted_steps_from_the_store(shm_dir, s3, capsys):
    with _mgr(shm_dir, s3, s3.endpoint, persist_every=1) as m:
        for step in (1, 3, 4):
            m.save(step, _state(step, 1)).wait()
            drain.wait_for_drains(timeout=30)  # each one persisted, none superseded
    assert not (shm_dir / "job").exists()  # persisted: the memory tier was given back
    tier = _tier(s3)
    for step in (2, 5):  # crashes after an object landed, before the manifest
        tier.fs.pipe_file(tier.object_path(step, 0), b"half an object")
    assert tier.step_dirs() == [1, 2, 3, 4, 5] and tier.persisted_steps() == [1, 3, 4]
    # the path names base_dir/job_id: with the memory tier gone, its name is the job
    base = ["gc", str(shm_dir / "job"), "--persist-dir", s3.url,
            "--persist-option", f"endpoint_url={s3.endpoint}", "--json"]  # fmt: skip

    assert cli_main([*base, "--persist-keep-last", "2", "--dry-run"]) == 0
    doc = json.loads(capsys.readouterr().out)["persist"]
    assert doc["half_uploaded"] == [2] and doc["expired"] == [1] and doc["job"] == "job"
    assert tier.step_dirs() == [1, 2, 3, 4, 5]  # a dry run deletes nothing

    # step 5 is newer than the newest persisted step: an upload may be running, so it
    # stays until it is older than the grace period
    assert cli_main([*base, "--persist-keep-last", "2"]) == 0
    doc = json.loads(capsys.readouterr().out)["persist"]
    assert doc["half_uploaded"] == [2] and doc["expired"] == [1]
    assert tier.step_dirs() == [3, 4, 5] and tier.persisted_steps() == [3, 4]

    assert cli_main([*base, "--persist-grace", "0"]) == 0
    doc = json.loads(capsys.readouterr().out)["persist"]
    assert doc["half_uploaded"] == [5] and doc["expired"] == []
    assert tier.step_dirs() == [3, 4] and tier.persisted_steps() == [3, 4]
    with _mgr(shm_dir, s3, s3.endpoint) as m:
        assert m.load()["step"] == 4


def test_store_gc_plan_spares_uploads_in_flight_and_the_newest_finite_step():
    from memckpt.storage.remote import plan_store_gc

    plan = plan_store_gc([1, 2, 3, 4, 5, 6], [1, 3, 4], ages_s={5: 10.0, 6: None}, grace_s=60)
    assert plan.half_uploaded == (2,) and plan.expired == ()  # 5: too young; 6: age unknown
    plan = plan_store_gc([1, 2, 3, 4, 5, 6], [1, 3, 4], ages_s={5: 61.0}, grace_s=60)
    assert plan.half_uploaded == (2, 5)
    assert plan_store_gc([5], [], grace_s=0).half_uploaded == (5,)
    # keep_last=1 with the newest step saved holding NaN: the newest finite one stays too
    plan = plan_store_gc([1, 3, 4], [1, 3, 4], keep_last=1, non_finite=[4])
    assert plan.expired == (1,)
    with pytest.raises(memckpt.ConfigError, match="--persist-keep-last"):
        plan_store_gc([1], [1], keep_last=0)


def test_close_abandons_a_hung_drain_after_close_wait_s_and_keeps_memory(shm_dir, s3):
    # Given a store that accepts connections and never answers (a hung storage target)
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(16)
    endpoint = f"http://127.0.0.1:{hung.getsockname()[1]}"
    slow_client = {"config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 60,
                                     "read_timeout": 60}}  # fmt: skip
    policy = drain.DrainPolicy(attempts=4, backoff_s=0.05, attempt_timeout_s=600,
                               close_wait_s=1.0)  # fmt: skip
    try:
        t0 = time.monotonic()
        with memckpt.CheckpointManager(
            shm_dir, "job", keep_last=1, prefault=False, persist_every=1, persist_dir=s3.url,
            persist_options={"endpoint_url": endpoint, "skip_instance_cache": True,
                             **slow_client},
            persist_policy=policy,
        ) as m:  # fmt: skip
            h = m.save(1, {"w": torch.ones(1000)})
            assert h.wait().committed
        # Then close() returned after about close_wait_s, not after 4 x 600 s
        assert time.monotonic() - t0 < 20
        assert h.durability != "persisted" and not h.wait_for("persisted", timeout=0)
        # and the step is still in memory: a restart loads it
        with memckpt.CheckpointManager(shm_dir, "job") as m:
            assert torch.equal(m.load()["w"], torch.ones(1000))
    finally:
        hung.close()
