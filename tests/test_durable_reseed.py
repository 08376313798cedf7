"""A step restored from the durable tier is put back into the memory tier (re-seeded).

So a second failure right after the restart recovers from memory and peers, even when the
durable tier is gone by then; ``memckpt ls`` shows the step.
"""

from __future__ import annotations

import json
import shutil
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


def _state(step: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(step)
    return {"w": torch.randn(128, 256, generator=g), "b": torch.randn(77, generator=g).half(),
            "step": step}  # fmt: skip


def _same(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert got.keys() == want.keys()
    for k, v in want.items():
        if isinstance(v, torch.Tensor):
            assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
        else:
            assert got[k] == v


def _s3_mgr(base: Path, s3: S3, **kw: Any) -> memckpt.CheckpointManager:
    return memckpt.CheckpointManager(base, "job", keep_last=1, prefault=False,
                                     persist_dir=s3.url, persist_options=s3.options(),
                                     persist_policy=FAST_POLICY, **kw)  # fmt: skip


def _ls(capsys: pytest.CaptureFixture[str], job: Path) -> list[dict[str, Any]]:
    """The steps ``memckpt ls --json`` lists for the job's tree."""
    capsys.readouterr()
    code = cli_main(["ls", str(job), "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0
    return doc[0]["steps"]


def test_restore_from_s3_reseeds_memory_and_a_restart_without_the_store_loads_it(
    shm_dir, s3, capsys
):
    # Given steps 2 and 4 drained to S3, and the memory tier given back at the normal end
    with _s3_mgr(shm_dir, s3, persist_every=2) as m:
        for step in range(1, 5):
            m.save(step, _state(step)).wait()
        drain.wait_for_drains(timeout=30)
    assert not (shm_dir / "job").exists()
    # When a fresh cluster restores: step 4 comes from S3 and goes back into memory
    m = _s3_mgr(shm_dir, s3)
    got = m.load()
    assert m.last_load.tier == "persistent" and m.last_load.step == 4
    _same(got, _state(4))
    m.wait()  # the re-seed's commit vote runs in the background
    assert m.store.committed_steps() == [4]
    assert not list(shm_dir.glob(".memckpt-restore-*"))  # the download was moved, not left
    m.close(release_memory=False)  # a failure right after the restart
    listed = _ls(capsys, shm_dir / "job")
    assert [(s["step"], s["ranks"]) for s in listed] == [(4, [0])]
    assert listed[0]["durability"]["tier"] == "persisted"  # it is still in the store
    # and the store is wiped before the next restart
    tier = RemoteTier(s3.url, "job", s3.options())
    tier.fs.rm(tier._root(), recursive=True)
    assert tier.persisted_steps() == []
    # Then the restart loads step 4 from memory
    with _s3_mgr(shm_dir, s3) as m:
        got = m.load()
        assert m.last_load.tier == "memory" and m.last_load.step == 4
        _same(got, _state(4))


def test_restore_from_a_local_persist_dir_reseeds_memory_and_the_server_may_be_down(
    shm_dir, tmp_path
):
    durable = tmp_path / "durable"
    with memckpt.CheckpointManager(shm_dir, "job", keep_last=1, persist_every=3,
                                   persist_dir=durable) as m:  # fmt: skip
        for step in (3, 6):
            m.save(step, _state(step)).wait()
    assert not (shm_dir / "job").exists()
    with memckpt.CheckpointManager(shm_dir, "job", persist_dir=durable) as m:
        dest = _state(0)
        m.load(state_dict=dest)
        assert m.last_load.tier == "persistent" and m.last_load.step == 6
        m.wait()
        assert m.store.committed_steps() == [6]
        m.close(release_memory=False)
    # the durable copy is untouched (copied, not moved), and a restart without it loads memory
    assert (durable / "job" / "step-6" / "rank-0.mck").is_file()
    shutil.rmtree(durable)
    with memckpt.CheckpointManager(shm_dir, "job", persist_dir=durable) as m:
        dest = _state(0)
        m.load(state_dict=dest)
        assert m.last_load.tier == "memory" and m.last_load.step == 6
        _same(dest, _state(6))


def test_a_reseeded_step_is_not_drained_again_and_newer_saves_go_on(shm_dir, tmp_path):
    durable = tmp_path / "durable"
    with memckpt.CheckpointManager(shm_dir, "job", keep_last=1, persist_every=2,
                                   persist_dir=durable) as m:  # fmt: skip
        m.save(2, _state(2)).wait()
    manifest = durable / "job" / "step-2" / "manifest.json"
    before = manifest.stat().st_mtime_ns
    with memckpt.CheckpointManager(shm_dir, "job", keep_last=1, persist_every=2,
                                   persist_dir=durable) as m:  # fmt: skip
        m.load()
        m.wait()
        assert m.store.committed_steps() == [2]
        drain.wait_for_drains(timeout=30)
        assert manifest.stat().st_mtime_ns == before  # not drained a second time
        assert m.save(4, _state(4)).wait().committed
        drain.wait_for_drains(timeout=30)
    assert (durable / "job" / "step-4" / "manifest.json").is_file()


@pytest.mark.slow
def test_two_ranks_reseed_with_replicas_and_a_lost_node_recovers_from_its_peer(shm_dir):
    from multiproc import run_ranks
    from reseed_workers import restore, save_and_drain

    durable = shm_dir / "durable"
    base = shm_dir / "mem"
    # Given 2 nodes (1 rank each) that drained steps 1 and 2, and a fresh cluster
    run_ranks(save_and_drain, 2, str(base), str(durable), [1, 2], timeout=90)
    shutil.rmtree(base)
    # When a fresh cluster restores from the durable tier
    out = run_ranks(restore, 2, str(base), str(durable), True, timeout=90)
    assert all(o["tier"] == "persistent" and o["step"] == 2 for o in out.values()), out
    # Then each node holds step 2 committed, its own rank's object and its peer's replica
    assert all(o["committed"] == [2] and o["held"] == [0, 1] for o in out.values()), out
    # and after the durable tier and node 1's memory are lost, rank 1 reads its peer's copy
    shutil.rmtree(durable)
    shutil.rmtree(base / "node1")
    out = run_ranks(restore, 2, str(base), str(durable), True, timeout=90)
    assert all(o["tier"] == "memory" and o["step"] == 2 for o in out.values()), out
    assert out[0]["fetched"] == 0 and out[1]["fetched"] > 0
