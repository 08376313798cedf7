"""memckpt.adapters.nvrx: NVRx's local checkpointing interface on memckpt, checked against NVRx."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from memckpt.adapters.nvrx import (
    DEFAULT_SESSION_JOB,
    AsyncCallsQueue,
    BasicTensorAwareStateDict,
    CliqueReplicationStrategy,
    LazyCliqueReplicationStrategy,
    LocalCheckpointManager,
    TensorAwareStateDict,
)
from memckpt.errors import (
    CheckpointNotFoundError,
    InsufficientSpaceError,
    InvalidNameError,
    ReplicationConfigError,
    UnsupportedValueError,
)
from multiproc import run_ranks
from nvrx_workers import (
    SESSION,
    nvrx_available,
    rank_state,
    restart_all,
    save_all,
)

warnings.filterwarnings("ignore", category=UserWarning)

HERE = Path(__file__).parent
needs_nvrx = pytest.mark.skipif(not nvrx_available(), reason="nvidia_resiliency_ext not installed")


class ListStateDict(TensorAwareStateDict):
    """A custom TensorAwareStateDict: tensors in a flat list beside a name."""

    def __init__(self, name: str, tensors: list[torch.Tensor]) -> None:
        self.name = name
        self._tensors: list[torch.Tensor] | None = tensors
        self.restored = False

    def pop_tensors(self) -> list[torch.Tensor]:
        out, self._tensors = self._tensors or [], None
        return out

    @property
    def tensors(self) -> list[torch.Tensor]:
        return list(self._tensors or [])

    @property
    def is_hollow(self) -> bool:
        return self._tensors is None

    def insert_tensors(self, tensor_data) -> None:  # type: ignore[no-untyped-def]
        self._tensors = list(tensor_data)

    def init_tensors(self) -> None:
        self._tensors = []

    def copy_tensors_to_cpu(self, non_blocking: bool = False) -> None:
        pass

    def restore_tensor_device(self, non_blocking: bool = True) -> None:
        self.restored = True


def test_nothing_saved_finds_minus_one_and_load_refuses(shm_dir):
    with LocalCheckpointManager(shm_dir) as mgr:
        assert mgr.find_latest() == -1
        with pytest.raises(CheckpointNotFoundError, match="find_latest"):
            mgr.load()


def test_save_leaves_the_callers_object_whole_and_load_returns_its_values(shm_dir):
    state = rank_state(0, 3)
    ta = BasicTensorAwareStateDict(state)
    weight = state["model"]["w"]
    with LocalCheckpointManager(shm_dir, "run-1") as mgr:
        mgr.save(ta, 3)
        assert not ta.is_hollow and ta.state_dict is state and state["model"]["w"] is weight
        assert mgr.find_latest() == 3
        loaded, ckpt_part_id = mgr.load()
    assert ckpt_part_id == (3, 0, "run-1")
    assert isinstance(loaded, BasicTensorAwareStateDict) and not loaded.is_hollow
    assert torch.equal(loaded.state_dict["model"]["w"], weight)
    assert loaded.state_dict["optim"][1] == {"lr": 0.1}
    assert (shm_dir / "run-1" / "step-3").is_dir()


def test_an_iteration_not_newer_than_the_latest_is_refused(shm_dir):
    with LocalCheckpointManager(shm_dir) as mgr:
        mgr.save(BasicTensorAwareStateDict({"x": torch.ones(2)}), 5)
        assert mgr.find_latest() == 5
        with pytest.raises(ValueError, match="newer checkpoint"):
            mgr.save(BasicTensorAwareStateDict({"x": torch.ones(2)}), 5)
        with pytest.raises(InvalidNameError):
            LocalCheckpointManager(shm_dir).save(BasicTensorAwareStateDict({}), -1)


def test_session_id_names_the_job_directory(shm_dir):
    with LocalCheckpointManager(shm_dir) as mgr:
        mgr.save(BasicTensorAwareStateDict({"x": torch.ones(2)}), 1)
    assert (shm_dir / DEFAULT_SESSION_JOB / "step-1").is_dir()
    with pytest.raises(InvalidNameError, match="session_id 'a/b'"):
        LocalCheckpointManager(shm_dir, "a/b")
    with pytest.raises(UnsupportedValueError, match="root_local_ckpt_dir"):
        LocalCheckpointManager(123)  # refused at construction, not at the first collective


def test_hollow_or_plain_state_dicts_are_refused(shm_dir):
    ta = BasicTensorAwareStateDict({"x": torch.ones(2)})
    ta.pop_tensors()
    with LocalCheckpointManager(shm_dir) as mgr:
        with pytest.raises(UnsupportedValueError, match="hollow"):
            mgr.save(ta, 1)
        with pytest.raises(UnsupportedValueError, match="BasicTensorAwareStateDict"):
            mgr.save({"x": torch.ones(2)}, 1)  # type: ignore[arg-type]


def test_basic_state_dict_keeps_nvrx_protocol_semantics():
    state = {"a": torch.arange(3.0), "n": [torch.ones(2), 7]}
    ta = BasicTensorAwareStateDict(state)
    tensors = ta.pop_tensors()
    assert ta.is_hollow and len(tensors) == 2
    ta.insert_tensors(tensors)
    assert not ta.is_hollow and ta.state_dict["a"] is tensors[0]
    ta.pop_tensors()
    ta.init_tensors()
    assert ta.state_dict["n"][0].shape == (2,) and ta.state_dict["n"][1] == 7
    ta.copy_tensors_to_cpu()
    ta.restore_tensor_device()
    assert all(t.device.type == "cpu" for t in ta.tensors)


def test_custom_state_dict_loads_only_when_its_class_is_allowed(shm_dir):
    with LocalCheckpointManager(shm_dir) as mgr:
        mgr.save(ListStateDict("opt", [torch.arange(4.0), torch.ones(3)]), 2)
        assert mgr.find_latest() == 2
        with pytest.raises(UnsupportedValueError, match=r"ListStateDict.*LocalCheckpointManager"):
            mgr.load()
    with LocalCheckpointManager(shm_dir, safe_globals=[ListStateDict]) as mgr:
        assert mgr.find_latest() == 2
        loaded, _ = mgr.load()
    assert isinstance(loaded, ListStateDict) and loaded.name == "opt" and loaded.restored
    assert torch.equal(loaded.tensors[0], torch.arange(4.0))


@needs_nvrx
def test_nvrxs_own_basic_state_dict_is_stored_as_ours(shm_dir):
    from nvrx_workers import CPUBasicTensorAwareStateDict  # NVRx's class, minus its CUDA check

    with LocalCheckpointManager(shm_dir) as mgr:
        mgr.save(CPUBasicTensorAwareStateDict({"x": torch.arange(3.0)}), 1)
        assert mgr.find_latest() == 1
        loaded, _ = mgr.load()  # no safe_globals needed
    assert isinstance(loaded, BasicTensorAwareStateDict)
    assert torch.equal(loaded.state_dict["x"], torch.arange(3.0))


def test_async_save_finalizes_through_our_queue(shm_dir):
    queue = AsyncCallsQueue()
    with LocalCheckpointManager(shm_dir) as mgr:
        ta = BasicTensorAwareStateDict(rank_state(0, 4))
        req = mgr.save(ta, 4, is_async=True)
        assert queue.schedule_async_request(req) == 0
        assert queue.maybe_finalize_async_calls(blocking=True) == [0]
        assert queue.get_num_unfinalized_calls() == 0
        assert mgr.find_latest() == 4
        # a request also runs to its end on its own
        mgr.save(BasicTensorAwareStateDict(rank_state(0, 6)), 6, is_async=True).execute_sync()
        assert mgr.find_latest() == 6


def test_a_failed_async_save_raises_from_finalize_and_keeps_the_previous(shm_dir):
    queue = AsyncCallsQueue()
    with LocalCheckpointManager(shm_dir, limit_bytes=3 << 20, prefault=False) as mgr:
        mgr.save(BasicTensorAwareStateDict({"x": torch.ones(16)}), 1)
        with pytest.raises(InsufficientSpaceError):  # a synchronous save raises
            mgr.save(BasicTensorAwareStateDict({"x": torch.ones(1 << 20)}), 2)
        req = mgr.save(BasicTensorAwareStateDict({"x": torch.ones(1 << 20)}), 3, is_async=True)
        queue.schedule_async_request(req)
        with pytest.raises(InsufficientSpaceError):
            queue.maybe_finalize_async_calls(blocking=True)
        assert mgr.find_latest() == 1


def test_a_strategy_that_is_not_memckpts_is_refused(shm_dir):
    with pytest.raises(UnsupportedValueError, match="from_replication_params"):
        LocalCheckpointManager(shm_dir, repl_strategy=object())


def test_lazy_clique_strategy_is_built_when_the_runtime_opens(shm_dir):
    lazy = LazyCliqueReplicationStrategy(replication_jump=1, replication_factor=1)
    with LocalCheckpointManager(shm_dir, repl_strategy=lazy) as mgr:
        assert mgr.repl_strategy is lazy
        assert mgr.find_latest() == -1
        assert mgr.repl_strategy == CliqueReplicationStrategy(1, 1)


def test_clique_jump_that_does_not_fit_the_world_fails_at_construction():
    with pytest.raises(ReplicationConfigError, match="divisible"):
        CliqueReplicationStrategy.from_replication_params(3, 2, world_size=4)
    s = CliqueReplicationStrategy.from_replication_params(2, 2, world_size=4)
    assert s.spec == "clique:2:2" and s.cliques(4) == ((0, 2), (1, 3))
    # without GPUs the default jump is the ranks per node (1 in a single process), not 0
    assert CliqueReplicationStrategy.from_replication_params(world_size=2).replication_jump == 1
    with pytest.raises(ReplicationConfigError, match="from_replication_params"):
        CliqueReplicationStrategy(object())  # type: ignore[arg-type]  # NVRx took a group


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_and_cpu_tensors_come_back_on_their_devices(shm_dir):
    state = {"gpu": torch.arange(8.0, device="cuda"), "cpu": torch.ones(3)}
    with LocalCheckpointManager(shm_dir) as mgr:
        mgr.save(BasicTensorAwareStateDict(state), 1)
        assert mgr.find_latest() == 1
        loaded, _ = mgr.load()
    assert loaded.state_dict["gpu"].is_cuda and torch.equal(loaded.state_dict["gpu"], state["gpu"])
    assert loaded.state_dict["cpu"].device.type == "cpu"


@pytest.mark.slow
def test_guide_integration_example_runs_unchanged(shm_dir):
    def run(last: int) -> dict:
        out = subprocess.run(
            [sys.executable, str(HERE / "nvrx_guide_example.py"), str(shm_dir), str(last)],
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        return json.loads(out.stdout.strip().splitlines()[-1])

    first = run(10)
    assert first["found"] is None and first["saved"] == 10
    second = run(15)
    assert second["found"] == [10, [10, 0, ""], first["weight_sum"]]


# -- the same script against NVRx and memckpt: 4 ranks on 2 simulated nodes ----------------
def _poison_replica(path: Path, rank: int, iteration: int) -> None:
    """Write a NaN over the first weight of ``rank``'s part inside a replica file."""
    raw = rank_state(rank, iteration)["model"]["w"].numpy().tobytes()
    data = bytearray(path.read_bytes())
    at = data.find(raw[:64])
    assert at >= 0, f"tensor bytes not found in {path}"
    data[at : at + 4] = struct.pack("<f", float("nan"))
    path.write_bytes(bytes(data))


def _replica_of_rank3_on_node0(base: Path, impl: str) -> Path:
    if impl == "nvrx":  # rank 1 holds rank 3's replica: <root>/<session>/<holder>/iter_..._3
        return base / impl / "node0" / SESSION / "1" / "iter_0000030_3_local.pt"
    return base / impl / "node0" / SESSION / "step-30" / "rank-3.mck"


@pytest.mark.slow
def test_same_script_against_nvrx_and_memckpt(shm_dir):
    """Save 10, 20, 30 on 2 nodes x 2 ranks; node 1 loses its memory; restart and load.

    Each phase runs the script once per implementation in the same ranks (NVRx's side
    is skipped when it is not installed). ``corrupt`` is a copy of the saved trees where,
    after the node loss, the replica of rank 3 on node 0 holds a NaN.
    """
    impls = ["memckpt", "nvrx"] if nvrx_available() else ["memckpt"]
    base, corrupt = shm_dir / "a", shm_dir / "b"
    saved = run_ranks(save_all, 4, str(base), impls, timeout=120)
    for rank, by_impl in saved.items():
        # without GPUs the default jump counts the ranks on this rank's node
        assert by_impl.pop("default_jump") == 2, (rank, by_impl)
        for impl, out in by_impl.items():
            assert out["first_latest"] == -1 and out["latest"] == 30, (impl, rank, out)
            # 10 through memckpt's AsyncCallsQueue, 20 through NVRx's (persistent=False)
            assert out["after_async"] == [([0], 10), ([0], 20)][: len(impls)], (impl, rank)
            # NVRx's replication pops the caller's tensors: its state dicts stay hollow
            assert out["hollow_after_save"] == [impl == "nvrx"] * 3, (impl, rank, out)
    shutil.copytree(base, corrupt)
    for impl in impls:
        for b in (base, corrupt):
            shutil.rmtree(b / impl / "node1")  # node 1 (ranks 2, 3) loses its memory
        _poison_replica(_replica_of_rank3_on_node0(corrupt, impl), 3, 30)

    restarted = run_ranks(restart_all, 4, str(base), str(corrupt), impls, timeout=120)
    for rank, by_impl in restarted.items():
        for impl, both in by_impl.items():
            out = both["clean"]
            # NVRx without a replication strategy cannot see copies on other nodes; memckpt
            # reads where the copies are, whatever strategy (if any) the reader names
            want = -1 if impl == "nvrx" else 30
            assert out["latest_without_replication"] == want, (impl, rank, out)
            assert out["latest"] == 30, (impl, rank, out)
            assert out["ckpt_part_id"] == (30, rank, SESSION), (impl, rank, out)
            assert out["equal"] and not out["has_nan"], (impl, rank, out)
        ours = by_impl["memckpt"]["clean"]  # ranks 2 and 3 read their parts from clique peers
        assert ours["fetched"] == (rank >= 2), (rank, ours)
        assert ours["source_rank"] == (rank - 2 if rank >= 2 else rank), (rank, ours)

    for impl in impls:
        poisoned = {rank: by_impl[impl]["poisoned"] for rank, by_impl in restarted.items()}
        assert all(out["latest"] == 30 for out in poisoned.values()), (impl, poisoned)
        if impl == "nvrx":
            # NVRx trusts the replica: rank 3 silently gets the NaN (cf. NVRx issue #349)
            assert poisoned[3]["has_nan"] and not poisoned[3]["equal"], poisoned[3]
        else:  # the checksum catches it on rank 3; no rank returns the damaged iteration
            assert all(out.get("error") == "CheckpointNotFoundError" for out in poisoned.values())
            assert "damaged" in poisoned[3]["message"], poisoned[3]


def test_a_persist_dir_url_drains_to_s3_and_a_node_with_memory_lost_loads_it(shm_dir, s3):
    from memckpt.engine import drain

    durable = {"persist_dir": s3.url, "persist_options": s3.options()}
    # Given iterations 2 and 3 saved, 2 drained to S3 (persist_every=2)
    with LocalCheckpointManager(shm_dir, "run-1", persist_every=2, **durable) as mgr:
        for it in (2, 3):
            mgr.save(BasicTensorAwareStateDict(rank_state(0, it)), it)
        drain.wait_for_drains(timeout=30)
    # When the node's memory is lost and the job restarts with the same arguments
    shutil.rmtree(shm_dir / "run-1")
    with LocalCheckpointManager(shm_dir, "run-1", **durable) as mgr:
        # Then the persisted iteration is found and loads, verified
        assert mgr.find_latest() == 2
        loaded, ckpt_part_id = mgr.load()
        assert mgr.manager.last_load.tier == "persistent"
    assert ckpt_part_id == (2, 0, "run-1")
    assert torch.equal(loaded.state_dict["model"]["w"], rank_state(0, 2)["model"]["w"])


def test_an_unknown_persist_scheme_is_a_config_error_at_construction(shm_dir):
    from memckpt.errors import ConfigError

    with pytest.raises(ConfigError, match="'nosuch'"):
        LocalCheckpointManager(shm_dir, "run-1", persist_every=1, persist_dir="nosuch://b/x")
    with pytest.raises(ConfigError, match="persist_options apply to a persist_dir URL"):
        LocalCheckpointManager(shm_dir, persist_dir=shm_dir / "d", persist_options={"a": 1})
    assert not list(shm_dir.glob("*:*")) and not (shm_dir / "run-1").exists()
