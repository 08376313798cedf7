"""Rank bodies for the NVRx adapter tests: one script, run against NVRx or against memckpt.

``impl`` picks the implementation: ``"nvrx"`` imports ``nvidia_resiliency_ext``'s local
checkpointing (with the CPU shims below), ``"memckpt"`` imports ``memckpt.adapters.nvrx``.
Everything else in a scenario is the same code.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist

warnings.filterwarnings("ignore")

RANKS_PER_NODE = 2
SESSION = "diff"


def nvrx_available() -> bool:
    try:
        import nvidia_resiliency_ext.checkpointing.local.ckpt_managers.local_manager  # noqa: F401
    except ImportError:
        return False
    return True


def cpu_shims_for_nvrx() -> None:
    """Let NVRx's code run on a machine without CUDA (test side only).

    NVRx calls ``torch.cuda.synchronize()`` before an async save, all-reduces its
    async-queue flags on ``torch.cuda.current_device()``, and moves every tensor it
    sends while retrieving a replica to CUDA (``GroupWrapper.isend_state_dict`` /
    ``irecv_state_dict``). With gloo those steps work on CPU tensors: the shims keep
    NVRx's logic and only drop the device moves.
    """
    from nvidia_resiliency_ext.checkpointing.local.replication.group_utils import GroupWrapper

    torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]
    torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]

    def isend_state_dict(self: Any, state_dict: Any, dst: int) -> dict[str, float]:
        tensors = state_dict.pop_tensors()
        self.send_object(state_dict, dst)
        for t in tensors:
            dist.send(t.contiguous(), dst, group=self.group)
        state_dict.insert_tensors(tensors)
        return {"data_sent": sum(t.nbytes for t in tensors)}

    def irecv_state_dict(self: Any, src: int) -> tuple[Any, dict[str, float]]:
        hollow = self.recv_object(src)
        hollow.init_tensors()
        for t in hollow.tensors:
            dist.recv(t, src, group=self.group)
        return hollow, {"data_recv": sum(t.nbytes for t in hollow.tensors)}

    GroupWrapper.isend_state_dict = isend_state_dict
    GroupWrapper.irecv_state_dict = irecv_state_dict


try:
    from nvidia_resiliency_ext.checkpointing.local.basic_state_dict import (
        BasicTensorAwareStateDict as _NVRxBasic,
    )
except ImportError:
    _NVRxBasic = None

if _NVRxBasic is not None:

    class CPUBasicTensorAwareStateDict(_NVRxBasic):  # type: ignore[misc, valid-type]
        """NVRx's basic wrapper without its CUDA-only assertion and device move."""

        def __init__(self, state_dict: Any) -> None:
            self.state_dict = state_dict
            self._is_hollow = False

        def restore_tensor_device(self, non_blocking: bool = True) -> None:
            pass


def api(impl: str) -> SimpleNamespace:
    """The classes a training script imports, from NVRx or from memckpt."""
    if impl == "nvrx":
        cpu_shims_for_nvrx()
        from nvidia_resiliency_ext.checkpointing.async_ckpt.core import AsyncCallsQueue
        from nvidia_resiliency_ext.checkpointing.local.ckpt_managers.local_manager import (
            LocalCheckpointManager,
        )
        from nvidia_resiliency_ext.checkpointing.local.replication.strategies import (
            CliqueReplicationStrategy,
        )

        return SimpleNamespace(
            LocalCheckpointManager=LocalCheckpointManager,
            BasicTensorAwareStateDict=CPUBasicTensorAwareStateDict,
            CliqueReplicationStrategy=CliqueReplicationStrategy,
            AsyncCallsQueue=AsyncCallsQueue,
        )
    from memckpt.adapters.nvrx import (
        AsyncCallsQueue,
        BasicTensorAwareStateDict,
        CliqueReplicationStrategy,
        LocalCheckpointManager,
    )

    return SimpleNamespace(
        LocalCheckpointManager=LocalCheckpointManager,
        BasicTensorAwareStateDict=BasicTensorAwareStateDict,
        CliqueReplicationStrategy=CliqueReplicationStrategy,
        AsyncCallsQueue=AsyncCallsQueue,
    )


def rank_state(rank: int, iteration: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(1000 * rank + iteration)
    return {
        "model": {"w": torch.randn(64, 16, generator=g), "b": torch.randn(16, generator=g)},
        "optim": [torch.randn(32, generator=g), {"lr": 0.1 * (rank + 1)}],
        "iteration": iteration,
    }


def node_root(base: str, impl: str, rank: int) -> str:
    return str(Path(base) / impl / f"node{rank // RANKS_PER_NODE}")


def _manager(ns: SimpleNamespace, base: str, impl: str, rank: int, replicate: bool) -> Any:
    os.environ["MEMCKPT_NODE_ID"] = f"node{rank // RANKS_PER_NODE}"
    strategy = None
    if replicate:  # cliques (0, 2), (1, 3): each crosses the two simulated nodes
        strategy = ns.CliqueReplicationStrategy.from_replication_params(RANKS_PER_NODE, 2)
    return ns.LocalCheckpointManager(node_root(base, impl, rank), SESSION, strategy)


def save_all(rank: int, world_size: int, base: str, impls: list[str]) -> dict:
    """Phase 1 for each implementation in turn, in the same ranks."""
    from memckpt.adapters.nvrx import default_replication_jump

    os.environ["MEMCKPT_NODE_ID"] = f"node{rank // RANKS_PER_NODE}"
    out: dict[str, Any] = {"default_jump": default_replication_jump()}  # collective
    out.update((impl, save_iterations(rank, base, impl, "nvrx" in impls)) for impl in impls)
    return out


def save_iterations(rank: int, base: str, impl: str, with_nvrx: bool) -> dict:
    """Save iterations 10 (async, memckpt's queue), 20 (async, NVRx's queue) and 30."""
    ns = api(impl)
    mgr = _manager(ns, base, impl, rank, replicate=True)
    out: dict[str, Any] = {"first_latest": mgr.find_latest()}
    from memckpt.adapters.nvrx import AsyncCallsQueue as OurQueue

    queues = [("memckpt", OurQueue())]
    if with_nvrx:
        from nvidia_resiliency_ext.checkpointing.async_ckpt.core import AsyncCallsQueue

        if impl == "memckpt":
            cpu_shims_for_nvrx()  # NVRx's queue itself assumes CUDA
        queues.append(("nvrx", AsyncCallsQueue(persistent=False)))
    hollow_after_save = []
    for iteration, (_, queue) in zip((10, 20), queues):
        ta = ns.BasicTensorAwareStateDict(rank_state(rank, iteration))
        req = mgr.save(ta, iteration, is_async=True)
        hollow_after_save.append(ta.is_hollow)
        queue.schedule_async_request(req)
        finalized = queue.maybe_finalize_async_calls(blocking=True, no_dist=False)
        out.setdefault("after_async", []).append((finalized, mgr.find_latest()))
    for _, queue in queues:
        queue.close()
    ta = ns.BasicTensorAwareStateDict(rank_state(rank, 30))
    mgr.save(ta, 30, is_async=False)
    hollow_after_save.append(ta.is_hollow)
    out["hollow_after_save"] = hollow_after_save
    out["latest"] = mgr.find_latest()
    if hasattr(mgr, "close"):
        mgr.close()
    return out


def restart_all(
    rank: int, world_size: int, base: str, poisoned_base: str, impls: list[str]
) -> dict:
    """Phase 2, restarted ranks, each implementation: load from both directories."""
    return {
        impl: {
            "clean": restart_and_load(rank, base, impl),
            "poisoned": restart_and_load_poisoned(rank, poisoned_base, impl),
        }
        for impl in impls
    }


def restart_and_load(rank: int, base: str, impl: str) -> dict:
    """After node 1 lost its directory: find_latest without replication, then load with it."""
    ns = api(impl)
    plain = _manager(ns, base, impl, rank, replicate=False)
    out: dict[str, Any] = {"latest_without_replication": plain.find_latest()}
    if hasattr(plain, "close"):
        plain.close()
    dist.barrier()
    mgr = _manager(ns, base, impl, rank, replicate=True)
    out["latest"] = mgr.find_latest()
    ta, ckpt_part_id = mgr.load()
    out["ckpt_part_id"] = tuple(ckpt_part_id)
    want = rank_state(rank, out["latest"])
    got = ta.state_dict
    out["equal"] = (
        torch.equal(got["model"]["w"], want["model"]["w"])
        and torch.equal(got["model"]["b"], want["model"]["b"])
        and torch.equal(got["optim"][0], want["optim"][0])
        and got["optim"][1] == want["optim"][1]
        and got["iteration"] == want["iteration"]
    )
    out["has_nan"] = bool(torch.isnan(got["model"]["w"]).any())
    if impl == "memckpt":
        info = mgr.manager.last_load
        out["fetched"] = info.fetched
        out["source_rank"] = info.source_rank
        mgr.close()
    return out


def restart_and_load_poisoned(rank: int, base: str, impl: str) -> dict:
    """Phase 2 after node 1 was lost and the replica of rank 3 on node 0 got NaNs."""
    ns = api(impl)
    mgr = _manager(ns, base, impl, rank, replicate=True)
    out: dict[str, Any] = {"latest": mgr.find_latest()}
    try:
        ta, _ = mgr.load()
    except Exception as e:  # memckpt must refuse; NVRx loads whatever the file holds
        out["error"] = type(e).__name__
        out["message"] = str(e)
    else:
        w = ta.state_dict["model"]["w"]
        out["has_nan"] = bool(torch.isnan(w).any())
        out["equal"] = torch.equal(w, rank_state(rank, out["latest"])["model"]["w"])
    if hasattr(mgr, "close"):
        mgr.close()
    return out
