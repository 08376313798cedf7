"""The first save writes its buffer cold (pwrite from the tensors, no zero-fill, no mapping
first); the buffer then serves later saves like any pre-faulted one."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import memckpt
from memckpt.storage.format import HEADER_SIZE
from memckpt.storage.pool import Buffer, BufferPool
from memckpt.storage.writer import ObjectLayout, _unwritten_pages
from test_full_disk import _can_mount_private_tmpfs
from zoo import LOAD_NON_FINITE, assert_same, make_zoo

WORKER = str(Path(__file__).with_name("cold_save_worker.py"))


@pytest.fixture(autouse=True)
def _zoo_holds_nan(monkeypatch):
    monkeypatch.setenv(*next(iter(LOAD_NON_FINITE.items())))


@pytest.fixture
def cold_writes(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Saves may take fresh buffers; returns the paths of the buffers written cold.

    Patching ``acquire`` keeps these tests independent of whether the save
    transaction passes ``cold_ok`` itself.
    """
    monkeypatch.setattr(
        BufferPool, "acquire", functools.partialmethod(BufferPool.acquire, cold_ok=True)
    )
    written: list[Path] = []
    map_written = Buffer.map_written

    def spy(self: Buffer) -> None:
        written.append(self.path)
        map_written(self)

    monkeypatch.setattr(Buffer, "map_written", spy)
    return written


def _no_holes(path: Path) -> bool:
    st = path.stat()
    return st.st_blocks * 512 >= st.st_size


@pytest.mark.parametrize("blocking", [True, False], ids=["blocking", "async"])
def test_first_save_on_an_empty_dir_is_cold_and_round_trips_bit_exactly(
    shm_dir, cold_writes, blocking
):
    # Given every dtype, 0-d, empty, strided, expanded, conj and neg-bit tensors
    zoo = make_zoo()
    zoo["neg_bit"] = torch.randn(3, dtype=torch.complex64).conj().imag
    assert zoo["neg_bit"].is_neg()
    with memckpt.CheckpointManager(shm_dir, "job", keep_last=2) as m:
        # When it is the first save of the job
        m.save(1, zoo, blocking=blocking).wait()
        # Then the buffer was written cold, leaves no hole, and loads back bit-exactly
        assert len(cold_writes) == 1
        assert _no_holes(m.store.object_path(1, 0))
        assert_same(zoo, m.load())


def test_a_buffer_written_cold_serves_later_saves(shm_dir, cold_writes):
    states = [{"w": torch.randn(3 << 20), "b": torch.arange(i + 5.0)} for i in range(5)]
    with memckpt.CheckpointManager(shm_dir, "job", keep_last=1) as m:
        # Given a first save written cold, and later saves alternating blocking and async
        for step, state in enumerate(states):
            m.save(step, state, blocking=step % 2 == 0).wait()
            # Then each one loads back exactly
            assert_same(state, m.load())
        # and only the first buffer was written cold: the others were reused or pre-faulted
        assert len(cold_writes) == 1
        assert m.store.pool.wait_prefault(30)
        assert len(list(m.store.pool.dir.iterdir())) + 1 <= 3
        assert all(_no_holes(p) for p in m.store.pool.dir.iterdir())


def test_acquire_waits_for_the_background_prefault_instead_of_allocating_twice(tmp_path):
    pool = BufferPool(tmp_path / "pool", rank=0)
    try:
        # Given a pre-fault started in the background from a size hint
        fut = pool.prefault_in_background(8 << 20)
        # When a save asks for a buffer of that size at once
        buf = pool.acquire(8 << 20, cold_ok=True)
        # Then it gets the pre-faulted buffer, not a second (fresh) one
        assert not buf.fresh and buf.mapping is not None
        assert fut.result(timeout=30) is None
        assert len(list(pool.dir.iterdir())) == 1
        pool.give_back(buf)
    finally:
        pool.close()


def test_a_fresh_buffer_given_back_unwritten_is_deleted(tmp_path):
    pool = BufferPool(tmp_path / "pool", rank=0)
    try:
        buf = pool.acquire(1 << 20, cold_ok=True)
        assert buf.fresh and buf.path.exists()
        pool.give_back(buf)  # a failed cold write
        assert not buf.path.exists() and pool.owned_bytes() == 0
    finally:
        pool.close()


def test_only_the_header_and_tail_pages_are_reserved_before_a_cold_write():
    # Given tensors of 10 bytes, none, and 3 pages, packed after the header
    layout = ObjectLayout((), (HEADER_SIZE, HEADER_SIZE + 64, HEADER_SIZE + 64), (10, 0, 3 * 4096),
                          HEADER_SIZE + 64 + 3 * 4096)  # fmt: skip
    # Then the pages without a tensor byte are the header's and those after the data
    tail = (HEADER_SIZE + 4 * 4096, 8 * 4096)
    assert _unwritten_pages(layout, 8 * 4096) == [(0, HEADER_SIZE), tail]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["blocking", "async"])
def test_cold_save_on_a_full_tmpfs_fails_cleanly_and_keeps_the_previous(tmp_path, mode):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if not _can_mount_private_tmpfs(mnt):
        pytest.skip("cannot mount a tmpfs in a private mount namespace (needs root)")
    # Given a 24 MiB tmpfs that another job fills while a 12 MiB cold save is being written
    script = f"mount -t tmpfs -o size=24m none {mnt} && exec {sys.executable} {WORKER} {mnt} {mode}"
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        capture_output=True, text=True, timeout=100,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )  # fmt: skip
    # Then the process survives (no SIGBUS) and the save fails naming the path and the space
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["error"] and str(mnt) in report["error"] and "free" in report["error"]
    # and the part-written buffer is gone, its pages freed
    assert report["pool_files"] == [] and report["free_mib"] >= 16
    # and the previous checkpoint stays and loads, and later saves work
    assert report["latest"] == 1 and report["previous_intact"]
    assert report["after"] == 3 and report["after_intact"]


def test_a_pool_opened_while_a_closed_pool_prefaults_adopts_no_vanishing_file(
    shm_dir: Path,
) -> None:
    # Given a pool closed while it pre-faults a spare buffer in the background
    old = BufferPool(shm_dir / "pool", 0)
    old.prefault_in_background(128 << 20)
    old.close()
    # When a new pool of the same rank opens the directory at once
    new = BufferPool(shm_dir / "pool", 0)
    # Then once the old pre-fault has ended, its file is gone and every buffer the new
    # pool adopted still exists
    assert old.wait_prefault(60)
    assert all(b.path.exists() for b in new._free)
    assert list((shm_dir / "pool").glob("rank-0.*.buf")) == [b.path for b in new._free]
    new.close()
