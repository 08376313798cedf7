"""The DCP adapter: dcp.save / async_save / load through memckpt, resharding, export."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

import memckpt
from dcp_workers import async_modes, fsdp_load, fsdp_save, rank_state, round_trip, wipe_and_recover
from memckpt.adapters.dcp import (
    MemoryStorageReader,
    MemoryStorageWriter,
    checkpoint_id,
    close,
    export,
    latest_checkpoint,
    parse_checkpoint_id,
)
from multiproc import run_ranks

warnings.filterwarnings("ignore", category=UserWarning)


@pytest.fixture(autouse=True)
def _close_runtimes():
    yield
    close()


def _model_state(seed: int) -> dict:
    torch.manual_seed(seed)
    m = torch.nn.Linear(8, 4)
    opt = torch.optim.AdamW(m.parameters())
    m(torch.randn(2, 8)).sum().backward()
    opt.step()
    return {"model": m.state_dict(), "optim": opt.state_dict(), "extra": {"step": seed}}


def test_checkpoint_ids_name_base_job_and_step(tmp_path):
    cid = checkpoint_id(tmp_path, "job-7", 40)
    assert cid == str(tmp_path / "job-7" / "step-40")
    assert parse_checkpoint_id(cid) == (tmp_path, "job-7", 40)
    with pytest.raises(memckpt.InvalidNameError, match="must end in step-<N>"):
        parse_checkpoint_id(tmp_path / "job-7" / "latest")


def test_single_process_round_trip_in_place(shm_dir):
    assert latest_checkpoint(shm_dir, "job") is None
    state = _model_state(1)
    cid = checkpoint_id(shm_dir, "job", 1)
    dcp.save(state, checkpoint_id=cid, storage_writer=MemoryStorageWriter())
    assert latest_checkpoint(shm_dir, "job") == cid
    dest = _model_state(2)
    dcp.load(dest, checkpoint_id=cid, storage_reader=MemoryStorageReader())
    for k, v in state["model"].items():
        assert torch.equal(dest["model"][k], v)
    assert torch.equal(dest["optim"]["state"][0]["exp_avg"], state["optim"]["state"][0]["exp_avg"])
    assert dest["extra"] == {"step": 1}
    # the step manifest carries DCP's .metadata: any node can plan a load
    m = memckpt.storage.manifest.read_manifest(Path(cid) / "manifest.json")
    assert ".metadata" in m.blobs and m.world_size == 1


@pytest.mark.timeout(120)
def test_two_ranks_save_and_load_with_retention(shm_dir):
    assert run_ranks(round_trip, 2, str(shm_dir), None, timeout=90) == {0: True, 1: True}


@pytest.mark.timeout(150)
def test_node_memory_wiped_before_load_is_read_from_the_peer(shm_dir):
    assert run_ranks(wipe_and_recover, 2, str(shm_dir), timeout=120) == {0: True, 1: True}


@pytest.mark.timeout(240)
def test_async_save_with_thread_and_process_executors(shm_dir):
    out = run_ranks(async_modes, 2, str(shm_dir), timeout=200)
    assert out == {r: {"thread": True, "process": True, "stager": True} for r in (0, 1)}


@pytest.mark.timeout(240)
@pytest.mark.parametrize(("saved", "loaded"), [(4, 2), (4, 3), (2, 4)])
def test_fsdp2_state_resharded_from_memory_is_bit_exact(shm_dir, saved, loaded):
    ref = str(shm_dir / "reference.pt")
    run_ranks(fsdp_save, saved, str(shm_dir), ref, timeout=180)
    assert run_ranks(fsdp_load, loaded, str(shm_dir), ref, timeout=180) == dict.fromkeys(
        range(loaded), True
    )


def test_export_loads_with_plain_dcp_in_a_process_without_memckpt(shm_dir):
    state = _model_state(3)
    cid = checkpoint_id(shm_dir, "job", 3)
    dcp.save(state, checkpoint_id=cid, storage_writer=MemoryStorageWriter())
    out = export(cid, shm_dir / "exported")
    torch.save(state["model"], shm_dir / "want.pt")
    script = textwrap.dedent(f"""
        import sys, torch, torch.distributed.checkpoint as dcp
        want = torch.load({str(shm_dir / "want.pt")!r})
        got = {{"model": {{k: torch.zeros_like(v) for k, v in want.items()}}}}
        dcp.load(got, storage_reader=dcp.FileSystemReader({str(out)!r}))
        assert "memckpt" not in sys.modules
        assert all(torch.equal(got["model"][k], v) for k, v in want.items())
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", script], capture_output=True,
                          text=True, timeout=120, cwd="/")  # fmt: skip
    assert proc.stdout.strip() == "ok", proc.stderr


def test_cli_export_writes_a_dcp_directory(shm_dir):
    from memckpt.tools.cli import main

    state = _model_state(4)
    dcp.save(state, checkpoint_id=checkpoint_id(shm_dir, "job", 4),
             storage_writer=MemoryStorageWriter())  # fmt: skip
    close()
    assert main(["export", str(shm_dir / "job"), "--to", str(shm_dir / "out")]) == 0
    got = {"model": {k: torch.zeros_like(v) for k, v in state["model"].items()}}
    dcp.load(got, storage_reader=dcp.FileSystemReader(shm_dir / "out"))
    assert all(torch.equal(got["model"][k], v) for k, v in state["model"].items())


def test_persist_every_drains_in_the_background_to_a_plain_dcp_directory(shm_dir):
    persist = shm_dir / "persistent"
    for step in (1, 2, 3, 4):
        dcp.save(rank_state(0, step), checkpoint_id=checkpoint_id(shm_dir, "job", step),
                 storage_writer=MemoryStorageWriter(keep_last=1, persist_every=2,
                                                    persist_dir=persist))  # fmt: skip
    from memckpt.engine.drain import wait_for_drains

    wait_for_drains(timeout=60)
    assert sorted(p.name for p in persist.iterdir()) == ["step-2", "step-4"]
    got = rank_state(0, 0)
    dcp.load(got, storage_reader=dcp.FileSystemReader(persist / "step-4"))
    assert torch.equal(got["w0"], rank_state(0, 4)["w0"]) and got["meta"]["step"] == 4
    # the end of training: step 4, the newest, is persisted, so the memory is given back
    from memckpt.adapters.dcp import close

    close(shm_dir, "job", release_memory=True)
    assert not (shm_dir / "job").exists()


def test_release_memory_keeps_a_memory_tier_whose_newest_step_is_not_persisted(shm_dir):
    from memckpt.adapters.dcp import close

    persist = shm_dir / "persistent"
    for step in (2, 3):
        dcp.save(rank_state(0, step), checkpoint_id=checkpoint_id(shm_dir, "job", step),
                 storage_writer=MemoryStorageWriter(persist_every=2,
                                                    persist_dir=persist))  # fmt: skip
    close(shm_dir, "job", release_memory=True)
    assert (shm_dir / "job" / "step-3").exists()


def test_flipped_byte_never_loads_silently(shm_dir):
    cid = checkpoint_id(shm_dir, "job", 1)
    dcp.save(rank_state(0, 1), checkpoint_id=cid, storage_writer=MemoryStorageWriter())
    obj = Path(cid) / "rank-0.mck"
    raw = bytearray(obj.read_bytes())
    raw[4096 + 100] ^= 0x10  # a byte of the first tensor
    obj.write_bytes(bytes(raw))
    from torch.distributed.checkpoint.api import CheckpointException

    with pytest.raises(CheckpointException) as err:
        dcp.load(rank_state(0, 0), checkpoint_id=cid, storage_reader=MemoryStorageReader())
    (failure,) = err.value.failures.values()
    failure = failure[0] if isinstance(failure, tuple) else failure  # (error, traceback)
    assert isinstance(failure, memckpt.CorruptCheckpointError), failure
    assert "checksum mismatch" in str(failure)


def test_a_failed_save_is_caught_by_the_except_docs_dcp_md_shows(shm_dir):
    # docs/dcp.md, "When a save fails": CheckpointException is a BaseException
    from torch.distributed.checkpoint.api import CheckpointException

    assert not issubclass(CheckpointException, Exception)
    state = {"w": torch.randn(1 << 16)}
    writer = MemoryStorageWriter(limit_bytes=1 << 12)  # the buffers cannot fit: out of space
    caught = None
    try:
        dcp.save(state, checkpoint_id=checkpoint_id(shm_dir, "job", 1), storage_writer=writer)
    except (Exception, CheckpointException) as e:
        caught = e
    assert isinstance(caught, CheckpointException), caught
    (failure,) = caught.failures.values()
    failure = failure[0] if isinstance(failure, tuple) else failure  # (error, traceback)
    assert isinstance(failure, memckpt.InsufficientSpaceError), failure
    assert latest_checkpoint(shm_dir, "job") is None


_KILL_SCRIPT = textwrap.dedent("""
    import sys, warnings, torch, torch.distributed.checkpoint as dcp
    warnings.filterwarnings("ignore")
    from memckpt.adapters.dcp import MemoryStorageWriter, checkpoint_id
    base = sys.argv[1]
    for step in (1, 2):
        g = torch.Generator().manual_seed(step)
        dcp.save({"w": torch.randn(1 << 20, generator=g), "step": step},
                 checkpoint_id=checkpoint_id(base, "job", step),
                 storage_writer=MemoryStorageWriter(keep_last=1))
""")


@pytest.mark.timeout(240)
@pytest.mark.parametrize("point", ["mid_stage", "before_local_commit", "after_vote",
                                   "after_manifest"])  # fmt: skip
def test_kill_during_dcp_save_never_exposes_a_partial_step(shm_dir, point):
    proc = subprocess.run(
        [sys.executable, "-c", _KILL_SCRIPT, str(shm_dir)],
        env={**os.environ, "MEMCKPT_FAULT_POINT": point, "MEMCKPT_FAULT_STEP": "2"},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    latest = latest_checkpoint(shm_dir, "job")
    want_step = 2 if point == "after_manifest" else 1
    assert latest == checkpoint_id(shm_dir, "job", want_step)
    got = {"w": torch.zeros(1 << 20), "step": 0}
    dcp.load(got, checkpoint_id=latest, storage_reader=MemoryStorageReader())
    g = torch.Generator().manual_seed(want_step)
    assert torch.equal(got["w"], torch.randn(1 << 20, generator=g)) and got["step"] == want_step
