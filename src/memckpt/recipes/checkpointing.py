"""What the recipes' training loop checkpoints, and how each tier stores and restores it.

``TrainingState`` holds one rank's model, optimizer, LR scheduler, step, last loss and
RNG states (``memckpt.engine.rng``: python ``random``, numpy, torch CPU and every GPU's
once CUDA is initialised). The memory tier stores ``memory_state()`` through memckpt
(each rank its own object, loaded in place). The persistent tier stores the same
through torch DCP into ``<checkpoint.persistent.dir>/<job_id>/step-<N>``
(``persistent_job_dir``) and writes ``COMPLETE_MARKER`` last, so a half-written
directory is never picked.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import random
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Final

import torch
import torch.distributed as dist
from torch import nn

import memckpt
from memckpt import ids
from memckpt.adapters.dcp import DCP_METADATA_FILE, complete_steps, prune_steps
from memckpt.engine.rng import capture_rng_state, restore_rng_state
from memckpt.engine.tiers import choose_tier
from memckpt.errors import CorruptCheckpointError
from memckpt.recipes.config import CheckpointConfig
from memckpt.storage.retention import check_keep_last

try:
    import numpy as np
except ImportError:  # pragma: no cover - numpy is optional
    np = None  # type: ignore[assignment]

__all__ = [
    "COMPLETE_MARKER",
    "TrainingState",
    "choose_resume_tier",
    "latest_persistent_step",
    "persistent_job_dir",
    "prune_persistent",
    "seed_process",
    "weights_sha256",
]

log = logging.getLogger(__name__)

COMPLETE_MARKER: Final = DCP_METADATA_FILE
"""DCP's own ``.metadata``, written last into ``<persistent job dir>/step-<N>``: a directory
without it is never loaded (the DCP adapter's rule, ``memckpt.adapters.dcp.complete_steps``)."""


# ---- pure decisions and fingerprints


def persistent_job_dir(ckpt: CheckpointConfig) -> Path:
    """``<checkpoint.persistent.dir>/<checkpoint.job_id>``: the job's persistent steps.

    Keyed by the job as the memory tier is (``<memory.base_dir>/<job_id>``), so a run
    with another ``job_id`` never resumes this job's checkpoints.
    """
    return ids.JobLayout(ckpt.persistent.dir, ckpt.job_id).root


def latest_persistent_step(directory: str | os.PathLike[str]) -> int | None:
    """The newest complete ``step-<N>`` DCP directory under ``directory``."""
    return max(complete_steps(directory)[1], default=None)


def prune_persistent(directory: str | os.PathLike[str], keep_last: int) -> list[int]:
    """Delete complete ``step-<N>`` directories older than the newest ``keep_last``
    (``memckpt.adapters.dcp.prune_steps``: the engine's retention policy)."""
    check_keep_last(keep_last, "checkpoint.persistent.keep_last")
    return prune_steps(directory, keep_last)


def _saved_world_size(keys: Iterable[str]) -> int | None:
    """How many ranks wrote a persistent step: each wrote its ``local.rank<r>`` entries."""
    ranks = {k.split(".")[1] for k in keys if k.startswith("local.rank")}
    return len(ranks) or None


def choose_resume_tier(memory_step: int | None, persistent_step: int | None) -> str | None:
    """The tier holding the newer checkpoint ("memory" on a tie), or None when neither has one.

    The engine's tier rule (``memckpt.engine.tiers.choose_tier``).
    """
    tier = choose_tier(memory_step, persistent_step, persistent_step is not None)
    return None if tier == "none" else tier


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


def _packed_rng() -> bytes:
    """This process's RNG states as one DCP item: a dict of DCP tensors would need a
    template of the same GPU count on load, and a persistent step may load elsewhere."""
    buf = io.BytesIO()
    torch.save(capture_rng_state(), buf)
    return buf.getvalue()


def _unpacked_rng(raw: Any, where: str) -> dict[str, Any]:
    if not isinstance(raw, (bytes, bytearray)):
        raise CorruptCheckpointError(f"{where}: RNG states are a {type(raw).__name__}, not bytes")
    try:
        state = torch.load(io.BytesIO(raw), weights_only=True, map_location="cpu")
    except Exception as e:
        raise CorruptCheckpointError(f"{where}: unreadable RNG states ({e})") from e
    return state  # type: ignore[no-any-return]


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
            if local.get("rng") is not None:
                restore_rng_state(local["rng"])

    # -- memory tier

    def memory_state(self) -> dict[str, Any]:
        """Everything this rank needs to continue, for ``CheckpointManager.save``."""
        return {
            "model": self.module.state_dict(),
            "optim": self.optimizer.state_dict(),
            "sched": self.scheduler.state_dict(),
            "train": {"step": self.step, "world_size": self.world_size},
            "local": {"loss": self.local_loss, "rng": capture_rng_state()},
        }

    def load_memory(
        self, manager: memckpt.CheckpointManager, at_least: int | None = None
    ) -> int | None:
        """Load the newest loadable memory checkpoint >= ``at_least`` in place (collective).

        Damaged steps are passed over (the engine's load transaction); returns its step or None.
        """
        state = self.memory_state()
        # The RNG states load as they were saved (another GPU count, an older layout),
        # not into a template of this process's generators.
        state["local"]["rng"] = {}
        floor = None if at_least is None else at_least - 1
        if manager.load(state_dict=state, newer_than=floor) is None:
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
            state["local"] = {f"rank{self.rank}": {"loss": self.local_loss, "rng": _packed_rng()}}
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
        keys = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
        saved = _saved_world_size(keys)
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
        mine = f"rank{self.rank}"
        if same_world and f"local.{mine}.rng" not in keys:
            # written before the RNG states became one item (a dict of tensors per key)
            log.warning("rank %d: persistent step %d holds RNG states in an older layout; "
                        "RNG states start fresh", self.rank, step)  # fmt: skip
            del state["local"][mine]["rng"]
        with _quiet_single_process():
            dcp.load(state, storage_reader=dcp.FileSystemReader(path), no_dist=not self.distributed)
        set_state_dict(
            self.module,
            self.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optim"],
        )
        local = state["local"][mine] if same_world else None
        if local is not None and "rng" in local:
            local["rng"] = _unpacked_rng(local["rng"], f"persistent step {step} rank {self.rank}")
        self._apply(state, local)

    def broadcast_from_rank0(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (collective when distributed)."""
        if not self.distributed or self.world_size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]
