"""A CheckpointIO that sends memory checkpoints to memckpt and the rest to the user's own IO."""

from __future__ import annotations

import inspect
import logging
import os
from typing import Any, Final

from memckpt.adapters.lightning.namespaces import checkpoint_io_bases
from memckpt.adapters.lightning.tier import MemoryTier
from memckpt.errors import MemckptError

__all__ = ["EVERY_RANK", "MemoryCheckpointIO"]

log = logging.getLogger(__name__)


class _EveryRank:
    """``storage_options`` of a save that every rank makes (the callback's)."""

    def __repr__(self) -> str:
        return "memckpt.adapters.lightning.EVERY_RANK"


EVERY_RANK: Final = _EveryRank()


def _accepts(fn: Any, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


class MemoryCheckpointIO(*checkpoint_io_bases()):  # type: ignore[misc]
    """Routes by path: the job's memory checkpoints (``<base_container>/step-<N>``) to memckpt,
    every other path to ``persistent_io`` (the strategy's CheckpointIO before wrapping).

    Lightning calls ``save_checkpoint`` on rank 0 only; a memory checkpoint needs every
    rank, so memory saves come from ``MemoryCheckpointCallback`` on every rank with
    ``storage_options=EVERY_RANK``, and a memory path reaching it otherwise is refused.
    ``load_checkpoint`` runs on every rank (Strategy.load_checkpoint), as a memory load
    needs. ``remove_checkpoint`` leaves memory steps to memckpt's retention.
    """

    def __init__(self, persistent_io: Any, tier: MemoryTier) -> None:
        self.persistent_io = persistent_io
        self.tier = tier

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike[str], storage_options: Any = None
    ) -> None:
        step = self.tier.step_of(path)
        if step is None:
            self.persistent_io.save_checkpoint(checkpoint, path, storage_options=storage_options)
            return
        if storage_options is not EVERY_RANK:
            raise MemckptError(
                f"{path} is a memory checkpoint path of job {self.tier.job_id!r}: memory "
                "checkpoints are saved by MemoryCheckpointCallback on every rank. "
                "Trainer.save_checkpoint reaches the CheckpointIO on rank 0 only, which would "
                "leave the other ranks out of the commit; save persistent checkpoints elsewhere"
            )
        self.tier.save(step, checkpoint)

    def load_checkpoint(
        self,
        path: str | os.PathLike[str],
        map_location: Any = None,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        step = self.tier.step_of(path)
        if step is not None:
            return self.tier.load(step, map_location)
        kwargs: dict[str, Any] = {}
        if map_location is not None:
            kwargs["map_location"] = map_location
        # Lightning < 2.6 CheckpointIOs have no weights_only
        load = self.persistent_io.load_checkpoint
        if weights_only is not None and _accepts(load, "weights_only"):
            kwargs["weights_only"] = weights_only
        return load(path, **kwargs)

    def remove_checkpoint(self, path: str | os.PathLike[str]) -> None:
        if self.tier.step_of(path) is not None:
            log.debug("not removing memory checkpoint %s: retention does", path)
            return
        self.persistent_io.remove_checkpoint(path)

    def teardown(self) -> None:
        try:
            self.persistent_io.teardown()
        finally:
            self.tier.close()
