"""The DCP writer drains to an S3-compatible server in DCP's own layout, and restarts from it.

A moto S3 server on 127.0.0.1 (the ``s3`` fixture); memckpt and torch reach it as they reach
AWS or MinIO, through s3fs with an endpoint URL and credentials.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

import memckpt
from memckpt.adapters.dcp import (
    MemoryStorageReader,
    MemoryStorageWriter,
    checkpoint_id,
    close,
    latest_checkpoint,
)
from memckpt.engine.drain import wait_for_drains
from multiproc import free_port, run_ranks

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

from s3_server import FAST_POLICY, S3

warnings.filterwarnings("ignore", category=UserWarning)


@pytest.fixture
def world_of_one():
    """A gloo world of 1 in this process (what ``dcp.async_save`` needs), torn down after."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                            world_size=1)  # fmt: skip
    try:
        yield
    finally:
        close()
        dist.destroy_process_group()


def _state(rank: int, step: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(rank * 1000 + step)
    return {
        f"w{rank}": torch.randn(64, 256, generator=g),  # each rank's own keys
        f"b{rank}": torch.randn(1000, generator=g).to(torch.bfloat16),
        f"ids{rank}": torch.randint(0, 1 << 40, (333,), generator=g),
        "meta": {"step": step, "tag": f"s{step}"},  # the same on every rank
    }


def _blank(rank: int) -> dict[str, Any]:
    want = _state(rank, 0)
    return {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else {"step": -1, "tag": ""}
            for k, v in want.items()}  # fmt: skip


def _same(got: dict[str, Any], want: dict[str, Any]) -> bool:
    for k, v in want.items():
        if isinstance(v, torch.Tensor):
            if got[k].dtype != v.dtype or not torch.equal(got[k], v):
                return False
        elif got[k] != v:
            return False
    return True


def _writer(s3: S3, **kw: Any) -> MemoryStorageWriter:
    return MemoryStorageWriter(persist_dir=s3.url, persist_options=s3.options(),
                               persist_policy=FAST_POLICY, **kw)  # fmt: skip


def _fs(s3: S3) -> Any:
    import s3fs

    return s3fs.S3FileSystem(endpoint_url=s3.endpoint, skip_instance_cache=True)


def _listing(s3: S3) -> dict[str, list[str]]:
    """{step dir: its files} under the persist_dir on the server."""
    fs, root = _fs(s3), s3.url.removeprefix("s3://")
    fs.invalidate_cache()
    if not fs.exists(root):
        return {}
    return {
        d.rsplit("/", 1)[-1]: sorted(f.rsplit("/", 1)[-1] for f in fs.ls(d, detail=False))
        for d in sorted(fs.ls(root, detail=False))
    }


def _save_steps(shm: Path, s3: S3, steps: range, *, rank: int = 0, async_from: int = 10**9) -> None:
    for step in steps:
        cid = checkpoint_id(shm, "job", step)
        writer = _writer(s3, keep_last=1, persist_every=2)
        if step >= async_from:
            dcp.async_save(_state(rank, step), checkpoint_id=cid, storage_writer=writer).result(60)
        else:
            dcp.save(_state(rank, step), checkpoint_id=cid, storage_writer=writer)
        wait_for_drains(timeout=60)  # each drain ends before the next (else it gives way)


def test_drained_steps_load_with_plain_torch_and_no_memckpt(shm_dir, s3, world_of_one):
    _save_steps(shm_dir, s3, range(1, 7), async_from=5)  # dcp.save, then dcp.async_save
    listing = _listing(s3)
    assert sorted(listing) == ["step-2", "step-4", "step-6"]
    assert {".metadata", "__0_0.distcp"} <= set(listing["step-6"])
    # the end of training: the newest step is in the store, so the memory tier goes
    close(shm_dir, "job", release_memory=True)
    assert not (shm_dir / "job").exists()
    torch.save(_state(0, 6), shm_dir / "want.pt")
    script = textwrap.dedent(f"""
        import sys, torch, torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader
        want = torch.load({str(shm_dir / "want.pt")!r})
        for how in ("reader", "checkpoint_id"):
            got = {{k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else
                   {{"step": -1, "tag": ""}} for k, v in want.items()}}
            if how == "reader":
                reader = FsspecReader({s3.url + "/step-6"!r}, endpoint_url={s3.endpoint!r})
                dcp.load(got, storage_reader=reader)
            else:  # torch picks its fsspec reader; the endpoint from the environment
                dcp.load(got, checkpoint_id={s3.url + "/step-6"!r})
            assert got["meta"] == want["meta"], how
            for k, v in want.items():
                if isinstance(v, torch.Tensor):
                    assert got[k].dtype == v.dtype and torch.equal(got[k], v), (how, k)
        assert "memckpt" not in sys.modules
        print("ok")
    """)
    env = {**os.environ, "AWS_ENDPOINT_URL": s3.endpoint}
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", script], capture_output=True,
                          text=True, timeout=120, cwd="/", env=env)  # fmt: skip
    assert proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_memory_wiped_restart_finds_and_loads_the_drained_step(shm_dir, s3, world_of_one):
    _save_steps(shm_dir, s3, range(1, 6))  # steps 2 and 4 drained; 5 only in memory
    opts = {"persist_dir": s3.url, "persist_options": s3.options()}
    # memory has the newest step: the tier rule names memory
    assert latest_checkpoint(shm_dir, "job", **opts) == checkpoint_id(shm_dir, "job", 5)
    close()
    shutil.rmtree(shm_dir / "job")  # a fresh cluster: the memory tier is gone
    latest = latest_checkpoint(shm_dir, "job", **opts)
    assert latest == f"{s3.url}/step-4"
    got = _blank(0)
    dcp.load(got, checkpoint_id=latest, storage_reader=MemoryStorageReader(**opts))
    assert _same(got, _state(0, 4))
    # without persist_dir a restart sees nothing, as before
    assert latest_checkpoint(shm_dir, "job") is None


def test_a_half_uploaded_step_is_invisible_and_the_next_drain_removes_it(shm_dir, s3, world_of_one):
    _save_steps(shm_dir, s3, range(1, 5))  # steps 2 and 4 drained
    fs, root = _fs(s3), s3.url.removeprefix("s3://")
    fs.rm_file(f"{root}/step-4/.metadata")  # a crash before the commit marker
    fs.pipe_file(f"{root}/step-5/__0_0.distcp", b"half a rank file")  # a crash mid-upload
    close()
    shutil.rmtree(shm_dir / "job")
    opts = {"persist_dir": s3.url, "persist_options": s3.options()}
    latest = latest_checkpoint(shm_dir, "job", **opts)
    assert latest == f"{s3.url}/step-2"
    got = _blank(0)
    dcp.load(got, checkpoint_id=latest, storage_reader=MemoryStorageReader(**opts))
    assert _same(got, _state(0, 2))
    # the job goes on from step 2; the drain of step 6 removes the leftovers below it
    _save_steps(shm_dir, s3, range(3, 7))
    assert sorted(_listing(s3)) == ["step-2", "step-4", "step-6"]  # step 4 drained again
    _save_steps(shm_dir, s3, range(7, 9))
    fs.rm_file(f"{root}/step-6/.metadata")
    _save_steps(shm_dir, s3, range(9, 11))
    assert sorted(_listing(s3)) == ["step-10", "step-2", "step-4", "step-8"]


def test_a_rank_file_is_verified_by_its_digest_not_only_its_size(shm_dir, s3, world_of_one):
    import json

    from memckpt.adapters.dcp import _RemoteDcpSteps

    _save_steps(shm_dir, s3, range(1, 3))
    tier = _RemoteDcpSteps(s3.url, s3.options())
    path = tier.file_path(2, "__0_0.distcp")
    index = json.loads(tier.fs.cat_file(tier.file_path(2, ".__0_0.index")))
    tier._verify_file(path, "step-2", index["size"], index["xxh3_64"])  # as uploaded
    raw = bytearray(tier.fs.cat_file(path))
    raw[len(raw) // 2] ^= 0x01  # one flipped bit, the same size
    tier.fs.pipe_file(path, bytes(raw))
    with pytest.raises(memckpt.CorruptCheckpointError, match="not the one uploaded"):
        tier._verify_file(path, "step-2", index["size"], index["xxh3_64"])


class _Opaque:
    """A value a weights-only load refuses."""


def test_a_local_persist_dir_restarts_the_same_way_and_bytes_stay_weights_only(shm_dir):
    persist = shm_dir / "disk"
    for step in (1, 2):
        state = {**_state(0, step), "opaque": _Opaque()} if step == 1 else _state(0, step)
        writer = MemoryStorageWriter(persist_every=1, persist_dir=persist)
        dcp.save(state, checkpoint_id=checkpoint_id(shm_dir, "job", step), storage_writer=writer)
        wait_for_drains(timeout=60)
    close()
    shutil.rmtree(shm_dir / "job")
    latest = latest_checkpoint(shm_dir, "job", persist_dir=persist)
    assert latest == str(persist / "step-2")
    got = _blank(0)
    dcp.load(got, checkpoint_id=latest, storage_reader=MemoryStorageReader(persist_dir=persist))
    assert _same(got, _state(0, 2))
    from torch.distributed.checkpoint.api import CheckpointException

    with pytest.raises((CheckpointException, memckpt.UnsupportedValueError), match="weights-only"):
        dcp.load({**_blank(0), "opaque": None}, checkpoint_id=str(persist / "step-1"),
                 storage_reader=MemoryStorageReader(persist_dir=persist))  # fmt: skip
    close()


def test_unknown_scheme_or_misplaced_options_are_config_errors_at_construction(shm_dir):
    for make in (
        lambda: MemoryStorageWriter(persist_every=1, persist_dir="foo://x"),
        lambda: MemoryStorageReader(persist_dir="foo://x"),
        lambda: latest_checkpoint(shm_dir, "job", persist_dir="foo://x"),
    ):
        with pytest.raises(memckpt.ConfigError, match="'foo'"):
            make()
    with pytest.raises(memckpt.ConfigError, match="persist_options"):
        MemoryStorageReader(persist_dir=shm_dir / "disk", persist_options={"key": "k"})
    assert not list(shm_dir.iterdir())  # nothing created, no local "foo:" directory


def _two_ranks(rank: int, world_size: int, base: str, url: str, options: dict[str, Any]) -> bool:
    opts = {"persist_dir": url, "persist_options": options}
    for step in (1, 2):
        dcp.save(_state(rank, step), checkpoint_id=checkpoint_id(base, "job", step),
                 storage_writer=MemoryStorageWriter(persist_every=2, persist_policy=FAST_POLICY,
                                                    **opts))  # fmt: skip
    wait_for_drains(timeout=60)
    dist.barrier()  # rank 0's drain commits the step after every rank's file is there
    close()
    if rank == 0:
        shutil.rmtree(Path(base) / "job")
    dist.barrier()
    latest = latest_checkpoint(base, "job", **opts)
    assert latest == f"{url}/step-2", latest
    got = {**_blank(0), **_blank(1)}
    dcp.load(got, checkpoint_id=latest, storage_reader=MemoryStorageReader(**opts))
    close()
    return _same(got, {**_state(0, 2), **_state(1, 2)})


@pytest.mark.timeout(180)
def test_two_ranks_drain_in_dcp_layout_and_restart_from_the_store(shm_dir, s3):
    out = run_ranks(_two_ranks, 2, str(shm_dir), s3.url, s3.options(), timeout=150)
    assert out == {0: True, 1: True}
    listing = _listing(s3)
    assert sorted(listing) == ["step-2"]
    assert {".metadata", "__0_0.distcp", "__1_0.distcp"} <= set(listing["step-2"])
