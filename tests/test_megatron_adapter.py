"""The Megatron-Core adapter: dist_checkpointing save and load through memckpt's memory tier."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import pathlib
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

pytest.importorskip(
    "megatron.core.dist_checkpointing", reason="megatron-core is not installed (memckpt[megatron])"
)

from megatron.core import dist_checkpointing as dc
from megatron.core.dist_checkpointing import ShardedObject
from megatron.core.dist_checkpointing.core import CheckpointingException
from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

from megatron_workers import (
    SHAPES,
    check_loaded,
    load_cols,
    save_rows,
    sharded_state,
    two_nodes,
)
from memckpt.adapters import megatron as mm
from memckpt.adapters.megatron.items import CHUNKS_BLOB, step_metadata
from memckpt.engine.handle import SaveHandle
from memckpt.errors import ConfigError, CorruptCheckpointError, MemckptError, UnsupportedValueError
from memckpt.storage.manifest import ObjectDigest, new_manifest
from multiproc import free_port, run_ranks


@pytest.fixture
def one_rank():
    """A one-rank gloo process group in this process (Megatron asks for ranks)."""
    dist.init_process_group(
        "gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{free_port()}"
    )
    try:
        yield
    finally:
        mm.close()
        dist.destroy_process_group()


def _no_cuda(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    for name in ("synchronize", "current_device", "current_stream", "set_device", "Stream",
                 "Event", "_lazy_init"):  # fmt: skip

        def called(*a: object, _n: str = name, **k: object) -> None:
            calls.append(_n)
            raise AssertionError(f"torch.cuda.{_n} called for CPU tensors")

        monkeypatch.setattr(torch.cuda, name, called)
    return calls


def test_one_rank_round_trip_with_objects_and_reshard_never_touches_cuda(
    shm_dir, one_rank, monkeypatch
):
    calls = _no_cuda(monkeypatch)
    # Given nothing in memory, find-latest says so: the caller loads its regular checkpoint
    assert mm.latest_checkpoint(shm_dir, "job") is None
    # When a step is saved through the async request, run here as Megatron's save() would
    state = sharded_state(0, 1, 3, "rows")
    cid = mm.checkpoint_id(shm_dir, "job", 3)
    request = mm.save(state, cid, mm.MemoryAsyncSaveStrategy())
    state["w"].data.fill_(-1.0)  # the caller's tensors change once save() returns
    request.execute_sync()
    # Then the step directory is a Megatron checkpoint directory, and it loads bit-exact
    names = sorted(p.name for p in Path(cid).iterdir())
    assert names == ["common.pt", "manifest.json", "metadata.json", "rank-0.mck"], names
    assert json.loads((Path(cid) / "metadata.json").read_text())["sharded_backend"] == "memckpt"
    latest = mm.latest_checkpoint(shm_dir, "job")
    assert latest == cid
    strategy = mm.MemoryLoadShardedStrategy()
    check_loaded(dc.load(sharded_state(0, 1, 0, "rows", empty=True), latest, strategy),
                 0, 1, 3, "rows")  # fmt: skip
    check_loaded(dc.load(sharded_state(0, 1, 0, "cols", empty=True), latest, strategy),
                 0, 1, 3, "cols")  # fmt: skip
    # Megatron's own metadata calls find our load strategy through metadata.json
    assert dc.load_common_state_dict(latest)["iteration"] == 3
    check_loaded(dc.load(sharded_state(0, 1, 0, "rows", empty=True), latest), 0, 1, 3, "rows")
    tensors = dc.load_tensors_metadata(latest)
    assert {k: tuple(v.global_shape) for k, v in tensors.items()} == SHAPES
    assert "obj/shard_0_1" in load_sharded_metadata(latest)
    assert calls == []


def test_a_strategy_with_other_options_is_refused_at_first_use_until_close(shm_dir, one_rank):
    """docs/megatron.md: a later strategy whose options differ from the open runtime's is
    refused (when it first saves), naming both values; mm.close(base, job) lets it open."""
    mm.save(sharded_state(0, 1, 1, "rows"), mm.checkpoint_id(shm_dir, "job", 1),
            mm.MemoryAsyncSaveStrategy(), async_sharded_save=False)  # fmt: skip
    other = mm.MemoryAsyncSaveStrategy(keep_last=5)  # constructing it opens nothing
    with pytest.raises(MemckptError, match=r"open in this process with keep_last=2.*asks for 5"):
        mm.save(sharded_state(0, 1, 2, "rows"), mm.checkpoint_id(shm_dir, "job", 2), other,
                async_sharded_save=False)  # fmt: skip
    mm.close(shm_dir, "job")
    mm.save(sharded_state(0, 1, 2, "rows"), mm.checkpoint_id(shm_dir, "job", 2), other,
            async_sharded_save=False)  # fmt: skip
    assert mm.latest_checkpoint(shm_dir, "job") == mm.checkpoint_id(shm_dir, "job", 2)


def test_regular_checkpoints_are_refused_by_the_memory_load_strategy():
    strategy = mm.MemoryLoadShardedStrategy()
    with pytest.raises(CheckpointingException, match="Megatron's own strategy"):
        strategy.check_backend_compatibility("torch_dist")
    with pytest.raises(CheckpointingException, match="version 2"):
        strategy.check_version_compatibility(2)


class Touch:
    """Unpickling it creates ``path``: stands for any code a planted pickle would run."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        return (pathlib.Path.touch, (self.path,))


@dataclasses.dataclass
class Point:
    """A harmless user class in a ShardedObject."""

    x: int
    y: int


def _save_object(base: Path, step: int, data: object) -> str:
    state = sharded_state(0, 1, step, "rows")
    state["obj"] = ShardedObject("obj", data, (1,), (0,))
    cid = mm.checkpoint_id(base, "job", step)
    mm.save(state, cid, mm.MemoryAsyncSaveStrategy(), async_sharded_save=False)
    return cid


def _load_object(cid: str, strategy: mm.MemoryLoadShardedStrategy) -> object:
    return dc.load(sharded_state(0, 1, 0, "rows", empty=True), cid, strategy)["obj"]


def _failure(err: BaseException) -> BaseException:
    (failure,) = err.failures.values()  # type: ignore[attr-defined]
    return failure[0] if isinstance(failure, tuple) else failure  # (error, traceback)


def test_weights_only_load_refuses_a_planted_sharded_object_and_runs_nothing(
    shm_dir, one_rank, tmp_path
):
    # Given a step whose ShardedObject unpickles into a call that creates a file
    marker = tmp_path / "ran"
    cid = _save_object(shm_dir, 1, Touch(marker))
    assert mm.latest_checkpoint(shm_dir, "job") == cid
    # When it is loaded with the weights-only option, Then it is refused by name
    from torch.distributed.checkpoint.api import CheckpointException

    with pytest.raises(CheckpointException) as err:
        _load_object(cid, mm.MemoryLoadShardedStrategy(weights_only=True))
    failure = _failure(err.value)
    assert isinstance(failure, UnsupportedValueError), failure
    assert "obj/shard_0_1" in str(failure) and cid in str(failure)
    assert "MemoryLoadShardedStrategy(weights_only=True, safe_globals=" in str(failure)
    assert not marker.exists()


def test_sharded_objects_load_as_with_torch_dist_unless_weights_only(shm_dir, one_rank):
    # docs/megatron.md, Trust: unrestricted by default; weights_only=True with safe_globals
    cid = _save_object(shm_dir, 2, Point(1, 2))
    mm.latest_checkpoint(shm_dir, "job")
    assert _load_object(cid, mm.MemoryLoadShardedStrategy()) == Point(1, 2)
    from torch.distributed.checkpoint.api import CheckpointException

    with pytest.raises(CheckpointException) as err:
        _load_object(cid, mm.MemoryLoadShardedStrategy(weights_only=True))
    assert "Point" in str(_failure(err.value))
    strict = mm.MemoryLoadShardedStrategy(weights_only=True, safe_globals=[Point])
    assert _load_object(cid, strict) == Point(1, 2)
    # plain data passes the weights-only load without any opt-in
    cid = _save_object(shm_dir, 3, {"rank": 0, "step": 3})
    mm.latest_checkpoint(shm_dir, "job")
    strict = mm.MemoryLoadShardedStrategy(weights_only=True)
    check_loaded(dc.load(sharded_state(0, 1, 0, "rows", empty=True), cid, strict), 0, 1, 3, "rows")
    with pytest.raises(ConfigError, match="weights_only=True"):
        mm.MemoryLoadShardedStrategy(safe_globals=[Point])


def _manifest(*chunks: object) -> object:
    blobs = {CHUNKS_BLOB.format(rank=r): json.dumps(c).encode() for r, c in enumerate(chunks)}
    objects = {r: ObjectDigest(1, 1) for r in range(2)}
    return new_manifest("job", 1, 2, objects, blobs)


@pytest.mark.parametrize(
    ("rank0", "rank1", "error"),
    [
        ([["w", [0], [2], [4], "torch.float32"]], None, "no chunk list of rank 1"),
        ([["w", [0], [2], [4], "torch.float32"]], "x", "not a list"),
        ([["w", [3], [2], [4], "torch.float32"]], [], "does not fit"),
        ([["w", [0], [2], [4], "torch.evil"]], [], "unknown dtype"),
        (
            [["w", [0], [2], [4], "torch.float32"]],
            [["w", [2], [2], [4], "torch.int8"]],
            "in another's",
        ),
        ([["w", [0], [2], [4], "torch.float32"]], [["w"]], "both tensors and objects"),
        ([["w", [0], 2, [4], "torch.float32"]], [], "malformed"),
    ],
)
def test_damaged_chunk_lists_are_refused_by_name(rank0, rank1, error):
    blobs = [rank0] if rank1 is None else [rank0, rank1]
    m = _manifest(*blobs)
    with pytest.raises(CorruptCheckpointError, match=error):
        step_metadata(m, "job step 1")


def test_chunk_lists_of_all_ranks_make_dcp_metadata():
    m = _manifest([["w", [0, 0], [2, 3], [4, 3], "torch.bfloat16"], ["obj/shard_0_2"]],
                  [["w", [2, 0], [2, 3], [4, 3], "torch.bfloat16"], ["obj/shard_1_2"]])  # fmt: skip
    md = step_metadata(m, "x").state_dict_metadata
    assert sorted(md) == ["obj/shard_0_2", "obj/shard_1_2", "w"]
    assert md["w"].size == torch.Size([4, 3]) and md["w"].properties.dtype == torch.bfloat16
    assert [tuple(c.offsets) for c in md["w"].chunks] == [(0, 0), (2, 0)]


def test_save_handle_runs_callbacks_once_done():
    fut: concurrent.futures.Future = concurrent.futures.Future()
    handle = SaveHandle(4, fut)
    seen: list[int] = []
    handle.add_done_callback(lambda h: seen.append(h.step))
    assert seen == []
    fut.set_result(None)
    handle.add_done_callback(lambda h: seen.append(h.step * 10))  # already done: at once
    assert seen == [4, 40]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_two_nodes_async_queue_failed_save_fallback_and_node_loss(shm_dir, tmp_path):
    out = run_ranks(two_nodes, 2, str(shm_dir), str(tmp_path / "regular"), timeout=200)
    for rank, r in out.items():
        # every node holds Megatron's files of every committed step, not only rank 0's
        for step in (10, 20, 30):
            assert {"common.pt", "metadata.json"} <= set(r[f"files_{step}"]), (rank, r)
        assert r["steps"] == ["step-20", "step-30"], r["steps"]  # keep_last=2
        assert "injected: the tmpfs write failed" in r["failed_40"], r["failed_40"]
        assert not r["step_40_left"]
        # node 1 holds its rank's object and rank 0's replica again (pairwise)
        want = {"common.pt", "metadata.json", "manifest.json", "rank-0.mck", "rank-1.mck"}
        assert want <= set(r["recovered_files"]), (rank, r["recovered_files"])
        assert r["common"] == 30


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_four_rank_save_loads_into_two_ranks_on_other_axes(shm_dir):
    assert run_ranks(save_rows, 4, str(shm_dir), timeout=150) == dict.fromkeys(range(4), True)
    assert run_ranks(load_cols, 2, str(shm_dir), 4, timeout=150) == {0: True, 1: True}
