"""Replication's bandwidth cap and pause, measured on 127.0.0.1 with a real transfer server.

Rates are measured over a few MB at caps of 10-20 MB/s: the cap holds within 10 %
above; below, a busy 2-core machine may wake a sleeping sender late, so the floor
is looser.
"""

from __future__ import annotations

import logging
import struct
import threading
import time
from pathlib import Path

import pytest
import torch

import memckpt
from memckpt.errors import ConfigError, MemckptError, TransferError, UnsafePathError
from memckpt.storage.format import read_header
from memckpt.storage.store import CheckpointStore
from memckpt.transport.bandwidth import NodeBucket, TransferThrottle, parse_bandwidth
from memckpt.transport.client import TransferClient
from memckpt.transport.protocol import ObjectRef, generate_secret
from memckpt.transport.server import TransferServer
from multiproc import run_ranks

SECRET = generate_secret()
MB = 1_000_000
SIZE = 6 << 20  # tensor bytes of each saved object (the object is a little larger)


@pytest.fixture
def peer(shm_dir):
    """Node A holds two saved objects of rank 0 (steps 7 and 8); node B (rank 1) serves."""
    with memckpt.CheckpointManager(shm_dir / "a", "job", prefault=False) as m:
        for step in (7, 8):
            m.save(step, {"w": torch.randn(SIZE // 4)}, blocking=True)
    store_b = CheckpointStore(shm_dir / "b", "job", rank=1)
    server = TransferServer(store_b, SECRET, timeout_s=5.0)
    src = {s: shm_dir / "a" / "job" / f"step-{s}" / "rank-0.mck" for s in (7, 8)}
    sizes = {}
    for step, path in src.items():
        with open(path, "rb") as f:  # the object's bytes: its file may be longer
            sizes[step] = read_header(f.fileno(), str(path)).end
    try:
        yield {"server": server, "addr": ("127.0.0.1", server.port), "src": src,
               "size": sizes[7], "sizes": sizes, "dir": shm_dir}  # fmt: skip
    finally:
        server.close()
        store_b.close()


def _client(throttle: TransferThrottle | None, **kw) -> TransferClient:
    return TransferClient("job", SECRET, rank=0, throttle=throttle, **kw)


def _replica(p, step: int = 7) -> Path:
    return p["dir"] / "b" / "job" / f"step-{step}" / "rank-0.mck"


def _push(client: TransferClient, p, step: int = 7) -> float:
    """Push one object; returns the seconds it took."""
    t0 = time.perf_counter()
    sent = client.put(p["addr"], ObjectRef("job", step, 0), p["src"][step])
    assert sent == p["sizes"][step]
    return time.perf_counter() - t0


def _wait_for(cond, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out waiting"
        time.sleep(0.005)


# -- the cap ---------------------------------------------------------------------------------
def test_capped_push_runs_at_the_cap(peer):
    # Given a node cap of 20 MB/s
    cap = 20 * MB
    with _client(TransferThrottle(cap)) as c:
        # When a ~6 MB replica is pushed
        took = _push(c, peer)
    # Then it arrived whole, at the cap: not above it, and not far below
    assert _replica(peer).exists()
    rate = peer["size"] / took
    assert 0.8 * cap <= rate <= 1.1 * cap, f"{rate / MB:.1f} MB/s under a cap of 20 MB/s"


def test_ranks_of_a_node_share_one_cap(peer, shm_dir):
    # Given two ranks of one node: two processes' throttles on the node's one bucket file
    cap, bucket = 20 * MB, shm_dir / "a" / "job" / ".peers" / "bandwidth"
    throttles = [TransferThrottle(cap, bucket_path=bucket) for _ in range(2)]
    clients = [_client(t) for t in throttles]
    # When both push a replica at the same time
    t0 = time.perf_counter()
    threads = [threading.Thread(target=_push, args=(c, peer, s))
               for c, s in zip(clients, (7, 8), strict=True)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = time.perf_counter() - t0
    for c, t in zip(clients, throttles, strict=True):
        c.close()
        t.close()
    # Then the node as a whole stayed under the cap (each rank alone would take all of it)
    assert _replica(peer, 7).exists() and _replica(peer, 8).exists()
    rate = sum(peer["sizes"].values()) / took
    assert 0.8 * cap <= rate <= 1.1 * cap, f"node sent {rate / MB:.1f} MB/s under a 20 MB/s cap"


def test_capped_fetch_runs_at_the_cap(peer, shm_dir):
    # Given a replica on node B
    with _client(None) as fast:
        _push(fast, peer)
    store_c = CheckpointStore(shm_dir / "c", "job", rank=0)
    cap = 20 * MB
    try:
        with _client(TransferThrottle(cap)) as c:
            # When a capped rank fetches it back (re-replication)
            t0 = time.perf_counter()
            path, got = c.get(peer["addr"], ObjectRef("job", 7, 0), store_c)
            took = time.perf_counter() - t0
    finally:
        store_c.close()
    # Then it came at the cap
    assert got == peer["size"] and path.name == "rank-0.mck"
    assert 0.8 * cap <= got / took <= 1.1 * cap, f"{got / took / MB:.1f} MB/s"


def test_capped_push_is_not_cut_by_its_deadline(peer):
    # Given deadlines that a push at full speed meets easily but a capped one would not
    # (0.3 s + size / 64 MiB/s is ~0.4 s; at 4 MB/s the push takes ~1.6 s)
    cap = 4 * MB
    with _client(TransferThrottle(cap), timeout_s=0.3, retries=0) as c:
        assert c.attempt_bound_s(peer["size"]) < peer["size"] / cap
        # When it is pushed under the cap
        took = _push(c, peer)
        # Then it is slow on purpose, not failed; and the call's bound counts the cap
        assert took >= 0.9 * peer["size"] / cap
        assert c.call_bound_s(peer["size"]) > peer["size"] / cap
    assert _replica(peer).exists()
    assert peer["server"].stats["refused_parts"] == 0


# -- pause and resume --------------------------------------------------------------------------
def test_pause_holds_bytes_back_and_resume_goes_on_where_it_stopped(peer):
    # Given a push under way (slowed by a cap so that the test can catch it midway)
    throttle = TransferThrottle(10 * MB)
    stats = peer["server"].stats
    with _client(throttle) as c:
        t = threading.Thread(target=_push, args=(c, peer))
        t.start()
        _wait_for(lambda: stats["bytes_in"] >= 1 << 20)
        # When replication is paused mid-object
        throttle.pause()
        time.sleep(0.1)  # the chunk in flight lands
        held = stats["bytes_in"]
        time.sleep(0.5)
        # Then no byte moves while paused, and the replica is not there yet
        assert stats["bytes_in"] == held < peer["size"]
        assert not _replica(peer).exists()
        # When it resumes, the push completes
        throttle.resume()
        t.join(timeout=10)
    assert not t.is_alive() and _replica(peer).exists()
    # ... from where it stopped: one transfer, and no byte sent twice
    assert stats["bytes_in"] == peer["size"]
    assert stats["puts"] == 1 and stats["refused_parts"] == 0


def test_pause_before_a_push_sends_nothing_until_resume(peer):
    # Given replication paused, with no cap
    throttle = TransferThrottle()
    throttle.pause()
    with _client(throttle) as c:
        # When a push starts
        t = threading.Thread(target=_push, args=(c, peer))
        t.start()
        time.sleep(0.4)
        # Then nothing is sent until resume, and then all of it
        assert peer["server"].stats["bytes_in"] == 0
        throttle.resume()
        t.join(timeout=10)
    assert _replica(peer).exists()


def test_pauses_are_counted(peer):
    throttle = TransferThrottle()
    throttle.pause()
    throttle.pause()
    throttle.resume()
    assert throttle.paused  # one hold is left
    throttle.resume()
    throttle.resume()  # one too many: ignored
    assert not throttle.paused


def test_a_pause_holds_transfers_at_most_max_pause_s(peer, caplog):
    # Given a pause nobody resumes, with a short limit
    throttle = TransferThrottle(max_pause_s=0.3)
    throttle.pause()
    with caplog.at_level(logging.WARNING), _client(throttle) as c:
        # When a push runs
        took = _push(c, peer)
    # Then it waited out the limit, went on, and said why
    assert 0.3 <= took < 5
    assert _replica(peer).exists()
    assert "paused for 0.3s, the longest a pause holds" in caplog.text


def test_closing_wakes_a_paused_transfer(peer):
    throttle = TransferThrottle()
    throttle.pause()
    errors: list[BaseException] = []

    def push() -> None:
        try:
            _push(c, peer)
        except TransferError as e:
            errors.append(e)

    with _client(throttle, retries=0) as c:
        t = threading.Thread(target=push)
        t.start()
        time.sleep(0.1)
        throttle.close()
        t.join(timeout=5)
    assert not t.is_alive()
    assert errors and "throttle is closed" in str(errors[0])


# -- configuration -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "rate"),
    [
        ("100MB", 100 * MB),
        ("1GiB", 1 << 30),
        ("2.5 MiB/s", int(2.5 * (1 << 20))),
        ("800 MB/s", 800 * MB),
        ("250000000", 250 * MB),
        ("1e9", 10**9),
        ("5kB", None),  # below the floor: raises
        (20 * MB, 20 * MB),
        (None, None),
    ],
)
def test_bandwidth_units(text, rate):
    if rate is None and text is not None:
        with pytest.raises(ConfigError, match="at least"):
            parse_bandwidth(text)
        return
    assert parse_bandwidth(text) == rate


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("fast", "not a rate"),
        ("10Gb", "bits per second"),
        ("-5MB", "not a rate"),
        ("0", "at least"),
        ("5 parsecs", "unknown unit"),
        ("100M", "ambiguous; write MB"),
        ("inf", "not a rate"),
        ("1e400", "at least"),
        (0.5, "at least"),
        (True, "bytes per second"),
        ([100], "bytes per second"),
    ],
)
def test_bad_bandwidth_is_a_clear_config_error(value, says):
    with pytest.raises(ConfigError, match=says) as e:
        parse_bandwidth(value)
    assert "replication_bandwidth" in str(e.value)


def test_manager_refuses_a_bad_bandwidth_before_opening_anything(shm_dir):
    with pytest.raises(ConfigError, match="replication_bandwidth='lots'"):
        memckpt.CheckpointManager(shm_dir, "job", replication_bandwidth="lots")
    assert not (shm_dir / "job").exists()


def test_environment_variable_sets_the_cap_and_the_argument_wins(shm_dir, monkeypatch):
    monkeypatch.setenv("MEMCKPT_REPLICATION_BANDWIDTH", "50MB")
    with memckpt.CheckpointManager(shm_dir / "env", "job", prefault=False) as m:
        assert m.runtime.throttle.rate == 50 * MB
        assert m.runtime.options.replication_bandwidth == 50 * MB
    with memckpt.CheckpointManager(shm_dir / "arg", "job", prefault=False,
                                   replication_bandwidth="20MB") as m:  # fmt: skip
        assert m.runtime.throttle.rate == 20 * MB


def test_bad_environment_variable_names_itself(shm_dir, monkeypatch):
    monkeypatch.setenv("MEMCKPT_REPLICATION_BANDWIDTH", "10Gb")
    with pytest.raises(ConfigError, match=r"MEMCKPT_REPLICATION_BANDWIDTH='10Gb'.*bits"):
        memckpt.CheckpointManager(shm_dir, "job", prefault=False)


def test_two_caps_for_one_job_in_a_process_are_refused(shm_dir):
    with memckpt.CheckpointManager(shm_dir, "job", prefault=False, replication_bandwidth="1GB"):
        with pytest.raises(MemckptError, match="replication_bandwidth=1000000000 where this "
                                               "call asks for 2000000000"):  # fmt: skip
            memckpt.CheckpointManager(shm_dir, "job", prefault=False, replication_bandwidth="2GB")
        # the same cap in other words is the same setting
        memckpt.CheckpointManager(shm_dir, "job", prefault=False,
                                  replication_bandwidth=10**9).close()  # fmt: skip


def test_manager_pause_is_counted_and_shared_by_the_jobs_managers(shm_dir):
    with memckpt.CheckpointManager(shm_dir, "job", prefault=False) as a, \
         memckpt.CheckpointManager(shm_dir, "job", prefault=False) as b:  # fmt: skip
        with a.replication_paused():
            assert b.runtime.throttle.paused
            b.pause_replication()
        assert a.runtime.throttle.paused  # b's hold is still there
        b.resume_replication()
        assert not a.runtime.throttle.paused


# -- two simulated nodes, end to end -------------------------------------------------------------
def _capped_then_paused(rank: int, world: int, base: str) -> dict:
    node = Path(base) / f"node{rank}"
    sd = {"w": torch.randn(SIZE // 4, generator=torch.Generator().manual_seed(rank))}
    with memckpt.CheckpointManager(node, "job", prefault=False, replication="pairwise",
                                   node_id=f"node{rank}", transfer_host="127.0.0.1",
                                   timeout_s=60) as m:  # fmt: skip
        capped = m.save(1, sd).wait()
        m.pause_replication()
        h = m.save(2, sd)
        time.sleep(0.8)
        done_while_paused = h.done()
        m.resume_replication()
        resumed = h.wait()
        rate = m.runtime.throttle.rate
    return {"capped": (capped.replicated, capped.replication_bytes, capped.replication_s),
            "resumed": (resumed.replicated, resumed.replication_s),
            "done_while_paused": done_while_paused, "rate": rate}  # fmt: skip


@pytest.mark.slow
def test_two_nodes_replicate_under_the_environment_cap_and_wait_for_a_pause(shm_dir):
    # Given two nodes of one rank each, capped at 20 MB/s by the environment variable
    out = run_ranks(_capped_then_paused, 2, str(shm_dir), timeout=90,
                    env={"MEMCKPT_REPLICATION_BANDWIDTH": "20MB"})  # fmt: skip
    for rank, r in out.items():
        assert r["rate"] == 20 * MB
        # Then a save replicates at the cap
        ok, nbytes, seconds = r["capped"]
        assert ok and nbytes >= SIZE
        rate = nbytes / seconds
        assert 0.7 * 20 * MB <= rate <= 1.1 * 20 * MB, f"rank {rank}: {rate / MB:.1f} MB/s"
        # and a save replicated while paused commits only after the resume, replicated
        assert not r["done_while_paused"]
        ok, seconds = r["resumed"]
        assert ok and seconds >= 0.8


# -- the node's bucket, without a network ---------------------------------------------------------
class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_processes_of_a_node_get_consecutive_slots_from_one_file(shm_dir):
    # Given two processes' views of the node's bucket (two opens of one file), at 1 MB/s
    clock, path = FakeClock(), shm_dir / ".peers" / "bandwidth"
    a, b = NodeBucket(MB, path, clock), NodeBucket(MB, path, clock)
    # When each reserves 0.5 MB at the same instant, then a again
    # Then the slots follow one another: 0.5 s apart, whichever process asks
    assert [a.reserve(MB // 2), b.reserve(MB // 2), a.reserve(MB // 2)] == [1000.0, 1000.5, 1001.0]
    # and after an idle while, the next slot starts now (no credit saved up)
    clock.now = 2000.0
    assert b.reserve(MB // 2) == 2000.0
    a.close()
    b.close()


def test_a_slot_far_ahead_in_the_file_is_reset_not_waited_for(shm_dir):
    # Given a bucket file left with a slot an hour ahead (another clock, or garbage)
    clock, path = FakeClock(), shm_dir / ".peers" / "bandwidth"
    path.parent.mkdir()
    path.write_bytes(struct.pack("<d", clock.now + 3600))
    bucket = NodeBucket(MB, path, clock)
    # When a chunk asks for its slot, Then it starts now
    assert bucket.reserve(1000) == clock.now
    bucket.close()


def test_the_bucket_file_is_never_a_symlink(shm_dir):
    (shm_dir / ".peers").mkdir()
    (shm_dir / "elsewhere").write_bytes(b"")
    (shm_dir / ".peers" / "bandwidth").symlink_to(shm_dir / "elsewhere")
    with pytest.raises(UnsafePathError, match="symlink"):
        NodeBucket(MB, shm_dir / ".peers" / "bandwidth")
