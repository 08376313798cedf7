"""CheckpointManager: the public entry point for memory checkpoints."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from memckpt import events
from memckpt.coordination import (
    Collectives,
    LocalCollectives,
    RecoveryPlan,
    TorchCollectives,
    plan_recovery,
)
from memckpt.engine import SaveEngine
from memckpt.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    MemckptError,
)
from memckpt.format import DEFAULT_CHUNK_SIZE
from memckpt.handle import SaveHandle
from memckpt.ids import validate_step
from memckpt.reader import load_object
from memckpt.store import CheckpointStore

__all__ = ["CheckpointManager", "LoadInfo"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadInfo:
    """What the last ``load()`` did on this rank."""

    step: int
    path: str
    seconds: float
    fell_back_from: tuple[int, ...] = ()


def _dist_rank_world() -> tuple[int, int] | None:
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover
        return None
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return None


class CheckpointManager:
    """Memory-first checkpoints of one job, kept under ``base_dir/job_id`` on each node.

    Construct it on every rank after ``torch.distributed`` is initialised (or in a
    single process without it). Constructing it, ``latest()``, ``load()`` and
    ``close()`` are collective: every rank calls them in the same order. ``save()``
    is called by every rank for the same steps; its background commit vote is the
    collective part.

    Args:
        base_dir: node-local directory for checkpoints, ideally on a tmpfs (/dev/shm).
        job_id: names the job's subdirectory; letters, digits, ``_ - .``.
        keep_last: how many complete checkpoints to keep (>= 1).
        timeout_s: limit for every collective; a dead rank becomes an error after it.
        limit_bytes: cap on the bytes this rank's buffers may take (default: free space).
        durable: fsync object files (for base dirs on disks, not needed on tmpfs).
        collectives, commit_collectives: injected collectives for the caller's thread and
            the background commit vote (default: gloo groups, or a world of one).
    """

    def __init__(
        self,
        base_dir: str | os.PathLike[str],
        job_id: str,
        keep_last: int = 2,
        *,
        timeout_s: float = 300.0,
        limit_bytes: int | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        durable: bool = False,
        prefault: bool = True,
        collectives: Collectives | None = None,
        commit_collectives: Collectives | None = None,
    ) -> None:
        if collectives is None:
            dist_info = _dist_rank_world()
            if dist_info is not None and dist_info[1] > 1:
                collectives = TorchCollectives(timeout_s)
                commit_collectives = commit_collectives or TorchCollectives(timeout_s)
            else:
                collectives = LocalCollectives()
        self.coll = collectives
        self.commit_coll = commit_collectives or collectives
        self.rank = collectives.rank
        self.world_size = collectives.world_size
        self.store = CheckpointStore(base_dir, job_id, self.rank, limit_bytes)
        self.store.remove_stale_markers()
        self.engine = SaveEngine(
            self.store,
            self.commit_coll,
            keep_last=keep_last,
            chunk_size=chunk_size,
            durable=durable,
            prefault=prefault,
        )
        self.last_load: LoadInfo | None = None
        self._closed = False

    @property
    def job_id(self) -> str:
        return self.store.job_id

    @property
    def root(self) -> str:
        return str(self.store.root)

    def save(self, step: int, state_dict: Any, *, blocking: bool = False) -> SaveHandle:
        """Checkpoint ``state_dict`` as ``step``; returns once its tensors are copied.

        The caller may change its tensors as soon as this returns. The rest (hashing,
        commit, vote, retention) runs in the background; ``handle.wait()`` returns the
        SaveResult or raises the error. With ``blocking=True`` it returns committed.
        A full filesystem fails the handle, not training; the previous checkpoint stays.
        """
        return self.engine.save(step, state_dict, blocking=blocking)

    def wait(self) -> None:
        """Wait for the save in flight (if any) to finish."""
        self.engine.wait_idle()

    def _plan(self, step: int | None, exclude: Iterable[int] = ()) -> RecoveryPlan:
        self.engine.wait_idle()
        invs = self.coll.all_gather_object(self.store.inventory(), "inventory exchange")
        return plan_recovery(
            invs, self.world_size, allow_fetch=False, step=step, exclude_steps=tuple(exclude)
        )

    def latest(self) -> int | None:
        """The newest step whose every rank's data is present and valid, or None (collective)."""
        return self._plan(None).step

    def load(
        self,
        step: int | None = None,
        state_dict: Any = None,
        *,
        map_location: Any = None,
        strict: bool = True,
        safe_globals: Iterable[Any] = (),
    ) -> Any:
        """Load a checkpoint (collective). Returns the state dict, or None if none exists.

        Without ``step`` the newest complete step is loaded; if a rank finds it damaged,
        every rank falls back to the next older complete step. With ``state_dict``,
        tensors are copied into it in place after checking every key's shape and dtype
        (a mismatch raises before anything is written) and its non-tensor values are
        updated. ``safe_globals`` lists classes the non-tensor part may construct.
        """
        if step is not None:
            step = validate_step(step)
        excluded: list[int] = []
        while True:
            t0 = time.perf_counter()
            plan = self._plan(step, excluded)
            if plan.step is None:
                if step is not None:
                    why = plan.skipped.get(step, "no rank holds it")
                    raise CheckpointNotFoundError(
                        f"step {step} of job {self.job_id!r} cannot be loaded: {why}"
                    )
                log.info("rank %d: no complete memory checkpoint of job %s", self.rank, self.job_id)
                return None
            path = self.store.object_path(plan.step, self.rank)
            error: BaseException | None = None
            result = None
            try:
                result = load_object(
                    path,
                    state_dict,
                    map_location=map_location,
                    strict=strict,
                    safe_globals=safe_globals,
                )
            except MemckptError as e:
                error = e
            votes = self.coll.all_gather_object(
                (error is None, type(error).__name__, str(error) if error else ""),
                f"load vote for step {plan.step}",
            )
            failed = [(r, kind, msg) for r, (ok, kind, msg) in enumerate(votes) if not ok]
            if not failed:
                self.last_load = LoadInfo(
                    plan.step, str(path), time.perf_counter() - t0, tuple(excluded)
                )
                log.info("rank %d: loaded step %d from %s", self.rank, plan.step, path)
                events.emit("loaded", step=plan.step, rank=self.rank)
                return result
            corrupt_only = all(kind == CorruptCheckpointError.__name__ for _, kind, _ in failed)
            if step is None and corrupt_only:
                log.warning(
                    "rank %d: step %d is damaged (%s); trying an older one",
                    self.rank,
                    plan.step,
                    "; ".join(f"rank {r}: {m}" for r, _, m in failed),
                )
                excluded.append(plan.step)
                continue
            if error is not None:
                raise error
            r, kind, msg = failed[0]
            raise MemckptError(f"step {plan.step} failed to load on rank {r}: {kind}: {msg}")

    def close(self) -> None:
        """Wait for the save in flight, stop the background worker, release buffers."""
        if self._closed:
            return
        self._closed = True
        self.engine.close()
        self.store.close()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
