"""What the recipes' training loop checkpoints, and how each tier stores and restores it.

``TrainingState`` holds one rank's model, optimizer, LR scheduler, step, last loss and
RNG states (torch CPU, python ``random``, numpy, and the training GPU's when it trains on
one). The memory tier stores
``memory_state()`` through memckpt (each rank its own object, loaded in place). The
persistent tier stores the same through torch DCP into ``<dir>/step-<N>`` and writes
``COMPLETE_MARKER`` last, so a half-written directory is never picked.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Final

import torch
import torch.distributed as dist
from torch import nn

import memckpt
from memckpt import ids
from memckpt.adapters.dcp import DCP_METADATA_FILE, complete_steps, prune_steps
from memckpt.errors import ConfigError

try:
    import numpy as np
except ImportError:  # pragma: no cover - numpy is optional
    np = None  # type: ignore[assignment]

__all__ = [
    "COMPLETE_MARKER",
    "TrainingState",
    "choose_resume_tier",
    "latest_persistent_step",
    "prune_persistent",
    "rng_state",
    "seed_process",
    "set_rng_state",
    "weights_sha256",
]

log = logging.getLogger(__name__)

COMPLETE_MARKER: Final = DCP_METADATA_FILE
"""DCP's own ``.metadata``, written last into ``<persistent.dir>/step-<N>``: a directory
without it is never loaded (the DCP adapter's rule, ``memckpt.adapters.dcp.complete_steps``)."""


# ---- pure decisions and fingerprints


def latest_persistent_step(directory: str | os.PathLike[str]) -> int | None:
    """The newest complete ``step-<N>`` DCP directory under ``directory``."""
    return max(complete_steps(directory)[1], default=None)


def prune_persistent(directory: str | os.PathLike[str], keep_last: int) -> list[int]:
    """Delete complete ``step-<N>`` directories older than the newest ``keep_last``
    (``memckpt.adapters.dcp.prune_steps``: the engine's retention policy)."""
    if keep_last < 1:
        raise ConfigError(f"checkpoint.persistent.keep_last must be >= 1, got {keep_last}")
    return prune_steps(directory, keep_last)


def _saved_world_size(path: Path) -> int | None:
    """How many ranks wrote a persistent step: each wrote its ``local.rank<r>`` entries."""
    import torch.distributed.checkpoint as dcp

    keys = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    ranks = {k.split(".")[1] for k in keys if k.startswith("local.rank")}
    return len(ranks) or None


def choose_resume_tier(memory_step: int | None, persistent_step: int | None) -> str | None:
    """The tier holding the newer checkpoint ("memory" on a tie), or None when neither has one."""
    if memory_step is None and persistent_step is None:
        return None
    if persistent_step is None or (memory_step is not None and memory_step >= persistent_step):
        return "memory"
    return "persistent"


def weights_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """sha256 over each tensor's name, dtype, shape and bytes, in the state dict's key order."""
    h = hashlib.sha256()
    for name, value in state_dict.items():
        t = value.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{tuple(value.shape)};".encode())
        raw = t.view(torch.uint8) if t.dtype != torch.bool else t.to(torch.uint8)
        h.update(raw.numpy().tobytes() if np is not None else bytes(raw.tolist()))
    return h.hexdigest()


# ---- RNG states


def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """This process's RNG states (torch CPU, python, numpy) as tensors and plain data.

    With a CUDA ``device`` the state of that GPU's generator (dropout on the GPU) is
    added under ``"cuda"``; without one the dict is what it always was.
    """
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    if np is not None:
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        state["numpy"] = {
            "kind": str(kind),
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        }
    return state


def set_rng_state(state: Mapping[str, Any], device: torch.device | None = None) -> None:
    """Restore what ``rng_state(device)`` returned (the GPU state only with a CUDA ``device``)."""
    torch.set_rng_state(state["torch"])
    cuda_state = state.get("cuda")
    if cuda_state is not None and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda_state.cpu(), device)
    random.setstate(_as_tuple(state["python"]))
    numpy_state = state.get("numpy")
    if np is not None and numpy_state is not None:
        np.random.set_state(
            (
                numpy_state["kind"],
                numpy_state["keys"].numpy().astype(np.uint32),
                int(numpy_state["pos"]),
                int(numpy_state["has_gauss"]),
                float(numpy_state["gauss"]),
            )
        )


def _as_tuple(value: Any) -> Any:
    """random.setstate needs tuples; a serializer may hand back lists."""
    if isinstance(value, list | tuple):
        return tuple(_as_tuple(v) for v in value)
    return value


def seed_process(seed: int) -> None:
    """Seed torch, python ``random`` and numpy."""
    torch.manual_seed(seed)
    random.seed(seed)
    if np is not None:
        np.random.seed(seed % (1 << 32))


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    """DCP warns that it assumes a single process; without a process group that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to")
        yield


# ---- the state of a run


class TrainingState:
    """One rank's resumable state, and its round trips through both checkpoint tiers.

    ``step`` counts optimizer steps done; ``local_loss`` is this rank's loss of the last
    one. ``device`` is where the model lives: its tensors are saved from there (memckpt
    stages CUDA tensors with asynchronous copies into its pinned mapping) and loaded back
    in place, so they stay there. Loads are collective (every rank, same order); so is
    ``save_persistent``.
    """

    def __init__(
        self,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        *,
        rank: int = 0,
        world_size: int = 1,
        distributed: bool = False,
        device: torch.device | None = None,
    ) -> None:
        self.module = module
        self.device = device if device is not None else torch.device("cpu")
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.rank = rank
        self.world_size = world_size
        self.distributed = distributed
        self.step = 0
        self.local_loss: float | None = None

    def _apply(self, state: Mapping[str, Any], local: Mapping[str, Any] | None) -> None:
        self.scheduler.load_state_dict(dict(state["sched"]))
        self.step = int(state["train"]["step"])
        if local is not None:
            self.local_loss = local["loss"]
            set_rng_state(local["rng"], self.device)

    # -- memory tier

    def memory_state(self) -> dict[str, Any]:
        """Everything this rank needs to continue, for ``CheckpointManager.save``."""
        return {
            "model": self.module.state_dict(),
            "optim": self.optimizer.state_dict(),
            "sched": self.scheduler.state_dict(),
            "train": {"step": self.step, "world_size": self.world_size},
            "local": {"loss": self.local_loss, "rng": rng_state(self.device)},
        }

    def load_memory(self, manager: memckpt.CheckpointManager) -> int | None:
        """Load the newest complete memory checkpoint in place (collective); its step or None."""
        state = self.memory_state()
        if manager.load(state_dict=state) is None:
            return None
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optim"])
        self._apply(state, state["local"])
        return self.step

    # -- persistent tier

    def _persistent_state(self, with_local: bool) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.module, self.optimizer)
        state: dict[str, Any] = {
            "model": model_sd,
            "optim": optim_sd,
            "sched": self.scheduler.state_dict(),
            "train": {"step": self.step, "world_size": self.world_size},
        }
        if with_local:  # keyed by rank: DCP keeps one copy of a key that every rank writes
            state["local"] = {
                f"rank{self.rank}": {"loss": self.local_loss, "rng": rng_state(self.device)}
            }
        return state

    def save_persistent(self, directory: str | os.PathLike[str]) -> Path:
        """DCP save to ``<directory>/step-<step>`` (collective); ``.metadata`` comes last."""
        import torch.distributed.checkpoint as dcp

        t0 = time.perf_counter()
        path = Path(directory) / ids.step_dir_name(self.step)
        if self.rank == 0:
            path.mkdir(parents=True, exist_ok=True)
            # A directory being written over must not look complete until this save is.
            # No rank writes data before rank 0 has planned the save, which comes after this.
            (path / COMPLETE_MARKER).unlink(missing_ok=True)
        with _quiet_single_process():
            dcp.save(
                self._persistent_state(with_local=True),
                storage_writer=dcp.FileSystemWriter(path),
                no_dist=not self.distributed,
            )
        # dcp.save returns once every rank's data and then .metadata are written.
        log.info("rank %d: persistent checkpoint of step %d in %s (%.2fs)", self.rank, self.step,
                 path, time.perf_counter() - t0)  # fmt: skip
        return path

    def load_persistent(self, directory: str | os.PathLike[str], step: int) -> None:
        """DCP load of ``<directory>/step-<step>`` (collective; it must be complete)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        path = Path(directory) / ids.step_dir_name(step)
        saved = _saved_world_size(path)
        same_world = saved == self.world_size
        if not same_world:
            log.warning(
                "rank %d: persistent step %d was written by %s ranks, this run has %d; "
                "RNG states start fresh",
                self.rank,
                step,
                saved,
                self.world_size,
            )
        state = self._persistent_state(with_local=same_world)
        with _quiet_single_process():
            dcp.load(state, storage_reader=dcp.FileSystemReader(path), no_dist=not self.distributed)
        set_state_dict(
            self.module,
            self.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optim"],
        )
        self._apply(state, state["local"][f"rank{self.rank}"] if same_world else None)

    def broadcast_from_rank0(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (collective when distributed)."""
        if not self.distributed or self.world_size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]
