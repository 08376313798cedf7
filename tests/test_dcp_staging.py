"""dcp.async_save stages through memckpt: one copy, into the memory tier, nothing after.

The writer is DCP's stager (``AsyncStager``): ``stage`` copies the state dict into the
rank's pool buffer and returns views of it; the save commits those bytes in place, in
this process (THREAD executor) or in DCP's daemon (PROCESS), which maps the same file.
"""

from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.staging import AsyncStager

from dcp_workers import fsdp_async_save, staged_async_saves
from memckpt.adapters.dcp import (
    MemoryStorageReader,
    MemoryStorageWriter,
    checkpoint_id,
    close,
)
from memckpt.engine.staging import StagedView, StagingArea, find_staged
from memckpt.ids import JobLayout
from memckpt.storage.pool import return_borrowed
from memckpt.storage.statedict import FlatStateDict
from multiproc import run_ranks

warnings.filterwarnings("ignore", category=UserWarning)


@pytest.fixture(autouse=True)
def _close_runtimes():
    yield
    close()


class _Recording(MemoryStorageWriter):
    """Keeps the staged save, which the background save takes from the writer."""

    def stage(self, state_dict):
        out = super().stage(state_dict)
        self.staged_save = self._staged
        return out


def _state(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    w = torch.randn(64, 32, generator=g)
    return {"model": {"w": w, "tied": w, "b": torch.arange(5) + step},
            "optim": [torch.randn(7, generator=g), {"lr": 0.1 * step}], "step": step}  # fmt: skip


def _blank() -> dict:
    return {"model": {"w": torch.zeros(64, 32), "tied": torch.zeros(64, 32),
                      "b": torch.zeros(5, dtype=torch.long)},
            "optim": [torch.zeros(7), {"lr": 0.0}], "step": 0}  # fmt: skip


def _equal(a: dict, b: dict) -> bool:
    return (torch.equal(a["model"]["w"], b["model"]["w"])
            and torch.equal(a["model"]["tied"], b["model"]["w"])
            and torch.equal(a["model"]["b"], b["model"]["b"])
            and torch.equal(a["optim"][0], b["optim"][0])
            and a["optim"][1] == b["optim"][1] and a["step"] == b["step"])  # fmt: skip


def test_the_writer_is_dcps_stager_and_async_save_returns_a_plain_future(shm_dir):
    writer = MemoryStorageWriter()
    assert isinstance(writer, AsyncStager) and writer.should_synchronize_after_execute
    fut = dcp.async_save(_state(1), checkpoint_id=checkpoint_id(shm_dir, "job", 1),
                         storage_writer=writer, no_dist=True)  # fmt: skip
    assert type(fut).__name__ == "Future"  # not an AsyncSaveResponse: fut.result() works
    fut.result(timeout=60)


def test_thread_executor_saves_the_values_of_when_async_save_returned(shm_dir):
    for step in (1, 2, 3):
        state = _state(step)
        fut = dcp.async_save(state, checkpoint_id=checkpoint_id(shm_dir, "job", step),
                             storage_writer=MemoryStorageWriter(keep_last=1),
                             no_dist=True)  # fmt: skip
        with torch.no_grad():  # the loop goes on and changes every tensor at once
            state["model"]["w"].fill_(-1.0)
            state["model"]["b"].fill_(-1)
            state["optim"][0].fill_(-1.0)
        state["optim"][1]["lr"] = -1.0
        fut.result(timeout=60)
        got = _blank()
        dcp.load(got, checkpoint_id=checkpoint_id(shm_dir, "job", step),
                 storage_reader=MemoryStorageReader(), no_dist=True)  # fmt: skip
        assert _equal(got, _state(step))


def test_staged_bytes_are_committed_in_place_without_a_second_buffer(shm_dir):
    # Given a job whose pool is warm (two saves made its buffers)
    for step in (1, 2):
        dcp.async_save(_state(step), checkpoint_id=checkpoint_id(shm_dir, "job", step),
                       storage_writer=MemoryStorageWriter(keep_last=1),
                       no_dist=True).result(timeout=60)  # fmt: skip
    writer = _Recording(keep_last=1)
    # When async_save stages step 3
    fut = dcp.async_save(_state(3), checkpoint_id=checkpoint_id(shm_dir, "job", 3),
                         storage_writer=writer, no_dist=True)  # fmt: skip
    staged = writer.staged_save
    assert staged is not None and staged.txn is not None
    inode = os.fstat(staged.txn.buf.fd).st_ino
    fut.result(timeout=60)
    # Then the committed object is the very file stage() copied into
    assert os.stat(Path(checkpoint_id(shm_dir, "job", 3)) / "rank-0.mck").st_ino == inode


def test_staged_views_pickle_as_handles_to_the_buffer_not_as_bytes(shm_dir):
    area = StagingArea.open(JobLayout(shm_dir, "job"), 0)
    t = torch.randn(1 << 16)
    staged, views = area.stage(FlatStateDict(["t"], [t], b""))
    assert isinstance(views[0], StagedView) and torch.equal(views[0], t)
    raw = pickle.dumps(views[0])
    assert len(raw) < 1024  # (path, inode, offset, dtype, shape): 256 KiB of data stay put
    assert staged.buf.path.name.endswith(".staged")  # handed over: no pool adopts it
    back = pickle.loads(raw)  # what DCP's daemon gets: a view of the same tmpfs file
    assert torch.equal(back, t)
    borrowed = find_staged([back])
    assert borrowed is not None and borrowed.buf.borrowed
    assert os.fstat(borrowed.buf.fd).st_ino == os.fstat(staged.buf.fd).st_ino
    del back
    return_borrowed(borrowed.buf)  # the committer gives it back: the owner takes it again
    assert not any(p.name.endswith(".staged") for p in (shm_dir / "job" / ".pool").iterdir())


def test_a_planner_value_that_is_not_a_staged_view_is_copied_instead(shm_dir):
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

    class Doubling(DefaultSavePlanner):  # resolves new tensors, not views of the stage
        def resolve_data(self, write_item):
            data = super().resolve_data(write_item)
            return data * 2 if isinstance(data, torch.Tensor) else data

    state = {"w": torch.ones(100)}
    fut = dcp.async_save(state, checkpoint_id=checkpoint_id(shm_dir, "job", 1),
                         storage_writer=MemoryStorageWriter(), planner=Doubling(),
                         no_dist=True)  # fmt: skip
    fut.result(timeout=60)
    got = {"w": torch.zeros(100)}
    dcp.load(got, checkpoint_id=checkpoint_id(shm_dir, "job", 1),
             storage_reader=MemoryStorageReader(), no_dist=True)  # fmt: skip
    assert torch.equal(got["w"], torch.full((100,), 2.0))


def test_non_finite_values_staged_by_async_save_are_flagged(shm_dir):
    from memckpt.storage.manifest import read_manifest

    state = {"w": torch.tensor([1.0, float("nan")]), "ok": torch.ones(3)}
    fut = dcp.async_save(state, checkpoint_id=checkpoint_id(shm_dir, "job", 1),
                         storage_writer=MemoryStorageWriter(), no_dist=True)  # fmt: skip
    fut.result(timeout=60)
    m = read_manifest(Path(checkpoint_id(shm_dir, "job", 1)) / "manifest.json")
    assert not m.finite


def test_async_save_without_room_fails_with_the_reason_and_keeps_nothing(shm_dir):
    from torch.distributed.checkpoint.api import CheckpointException

    writer = MemoryStorageWriter(limit_bytes=1 << 12)  # no buffer fits
    fut = dcp.async_save({"w": torch.randn(1 << 16)}, checkpoint_id=checkpoint_id(
        shm_dir, "job", 1), storage_writer=writer, no_dist=True)  # fmt: skip
    with pytest.raises(CheckpointException, match=r"not saved|no space|limit"):
        fut.result(timeout=60)
    assert not (Path(checkpoint_id(shm_dir, "job", 1)) / "manifest.json").exists()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", ["thread", "process"])
def test_two_ranks_save_the_values_of_when_async_save_returned(shm_dir, mode):
    saves = 4
    out = run_ranks(staged_async_saves, 2, str(shm_dir), mode, saves, timeout=240)
    for r in (0, 1):
        assert out[r]["loaded"] == [True] * saves, out[r]
        assert out[r]["in_place"] == [True] * saves, out[r]
        assert out[r]["futures"] == ["Future"] * saves
        # buffers cycle: the pool stops growing once the first saves made it warm
        # (keep_last=1: the committed one, the one staged, a pre-faulted spare per rank)
        assert max(out[r]["pool_sizes"][1:]) <= 2 * 3, out[r]["pool_sizes"]
        assert out[r]["left_staged"] == []


@pytest.mark.timeout(300)
@pytest.mark.parametrize("mode", ["thread", "process"])
def test_fsdp2_dtensor_state_is_staged_and_saved_as_it_was(shm_dir, mode):
    assert run_ranks(fsdp_async_save, 2, str(shm_dir), mode, timeout=240) == {0: True, 1: True}


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("sync", [True, False])
def test_cuda_tensors_are_copied_into_the_registered_buffer(shm_dir, sync):  # pragma: no cover
    writer = _Recording(keep_last=1, synchronize_after_stage=sync)
    for step in (1, 2, 3):
        state = {"w": torch.randn(1 << 20, device="cuda"), "b": torch.arange(10, device="cuda")}
        want = {k: v.cpu() for k, v in state.items()}
        fut = dcp.async_save(state, checkpoint_id=checkpoint_id(shm_dir, "job", step),
                             storage_writer=writer, no_dist=True)  # fmt: skip
        if not sync:
            writer.synchronize_staging()  # what the caller does before changing the tensors
        staged = writer.staged_save
        assert staged is not None and staged.txn is not None
        assert staged.txn.buf.cuda_registered  # the D2H copies land in the pinned mapping
        state["w"].fill_(-1.0)  # on the training stream, right after
        state["b"].fill_(-1)
        fut.result(timeout=60)
        got = {k: torch.zeros_like(v, device="cuda") for k, v in want.items()}
        dcp.load(got, checkpoint_id=checkpoint_id(shm_dir, "job", step),
                 storage_reader=MemoryStorageReader(), no_dist=True)  # fmt: skip
        assert torch.equal(got["w"].cpu(), want["w"]) and torch.equal(got["b"].cpu(), want["b"])


def test_another_writer_passed_as_async_stager_stages_for_the_save(shm_dir):
    state = _state(1)
    fut = dcp.async_save(state, checkpoint_id=checkpoint_id(shm_dir, "job", 1),
                         storage_writer=MemoryStorageWriter(),
                         async_stager=MemoryStorageWriter(), no_dist=True)  # fmt: skip
    with torch.no_grad():
        state["model"]["w"].fill_(-1.0)
    getattr(fut, "upload_completion", fut).result(timeout=60)
    got = _blank()
    dcp.load(got, checkpoint_id=checkpoint_id(shm_dir, "job", 1),
             storage_reader=MemoryStorageReader(), no_dist=True)  # fmt: skip
    assert _equal(got, _state(1))
