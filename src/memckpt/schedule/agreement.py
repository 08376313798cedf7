"""The element-wise max across ranks that makes every rank take the same save decision."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

from memckpt.errors import CollectiveError

__all__ = ["AllReduceMax", "default_all_reduce_max", "local_all_reduce_max", "torch_all_reduce_max"]

AllReduceMax = Callable[[list[float]], list[float]]
"""Element-wise maximum of a short list of floats over all ranks; every rank gets the result."""


def local_all_reduce_max(values: Sequence[float]) -> list[float]:
    """The reduction of a world of one process: the values themselves."""
    return list(values)


def torch_all_reduce_max(group: Any = None) -> AllReduceMax:
    """An AllReduceMax over ``group`` (default: the default process group) of torch.distributed.

    The values travel as one float64 tensor: on the CPU (gloo), or on the current CUDA
    device when the group's backend is NCCL. Blocking up to the group's timeout (pass a
    group created with one, such as ``TorchCollectives(timeout_s).group``); every rank of
    the group must call the returned function the same number of times.
    """
    import torch
    import torch.distributed as dist

    def all_reduce_max(values: list[float]) -> list[float]:
        backend = str(dist.get_backend(group))
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else "cpu"
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        try:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
        except Exception as e:
            raise CollectiveError(
                f"rank {dist.get_rank()}: agreeing on the save decision (all_reduce MAX of "
                f"{len(values)} values) failed ({e}); a rank may have died or skipped "
                "IterManager.should_save_ckpt()"
            ) from e
        return [float(v) for v in tensor.cpu().tolist()]

    return all_reduce_max


def default_all_reduce_max() -> AllReduceMax | None:
    """``torch_all_reduce_max()`` when torch.distributed is initialised, else None."""
    # Not imported here: a process that never imported torch.distributed has no process group.
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None
    return torch_all_reduce_max()
