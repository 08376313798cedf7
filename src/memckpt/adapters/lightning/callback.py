"""MemoryCheckpointCallback: a memory checkpoint every N steps, on every rank."""

from __future__ import annotations

import logging
import os
from typing import Any

from memckpt.adapters.lightning.checkpoint_dict import (
    EPOCH_END_KEY,
    RNG_KEY,
    capture_rng,
    restore_rng,
)
from memckpt.adapters.lightning.checkpoint_io import EVERY_RANK, MemoryCheckpointIO
from memckpt.adapters.lightning.namespaces import callback_bases
from memckpt.adapters.lightning.tier import MemoryTier, split_base_container
from memckpt.errors import ConfigError, MemckptError

__all__ = ["MemoryCheckpointCallback"]

log = logging.getLogger(__name__)


class MemoryCheckpointCallback(*callback_bases()):  # type: ignore[misc]
    """Saves a memory checkpoint of every rank each ``every_n_steps`` optimizer steps.

    A save is what ``Trainer.save_checkpoint`` would write (model, optimizers, LR
    schedulers, loops, callbacks' state, ...), plus the rank's RNG states, taken at the
    end of the training batch that completed the step. It returns once the tensors are
    copied; the commit runs in the background (``wrap_trainer(async_save=False)``: it
    returns committed). Steps divisible by ``skip_every_n_steps`` are skipped: pass your
    ``ModelCheckpoint(every_n_train_steps=K)`` interval so both never save the same step.

    At the end of training it waits for the save in flight and, unless
    ``keep_on_train_end``, deletes the job's memory checkpoints on every node. A run
    that fails or is killed keeps them, so the restart resumes from them.

    ``enabled=False``: no memory saves and no resume from memory; ``wrap_trainer``
    leaves the Trainer as it is. It needs ``wrap_trainer(trainer, base_container)``,
    which adds this callback when the Trainer has none.
    """

    def __init__(
        self,
        base_container: str | os.PathLike[str],
        every_n_steps: int,
        skip_every_n_steps: int | None = None,
        enabled: bool = True,
        keep_on_train_end: bool = False,
    ) -> None:
        if type(every_n_steps) is not int or every_n_steps < 1:
            raise ConfigError(f"every_n_steps must be a positive integer, got {every_n_steps!r}")
        if skip_every_n_steps is not None and (
            type(skip_every_n_steps) is not int or skip_every_n_steps < 0
        ):
            raise ConfigError(
                f"skip_every_n_steps must be None or an integer >= 0, got {skip_every_n_steps!r}"
            )
        split_base_container(base_container)  # a valid job directory name
        self.base_container = os.path.abspath(os.fspath(base_container))
        self.every_n_steps = every_n_steps
        self.skip_every_n_steps = skip_every_n_steps or 0
        self.enabled = bool(enabled)
        self.keep_on_train_end = keep_on_train_end
        self.tier: MemoryTier | None = None
        self._last_step = -1
        self._pending_rng: dict[str, Any] | None = None

    def should_save(self, step: int) -> bool:
        """Whether optimizer step ``step`` gets a memory checkpoint."""
        if not self.enabled or step <= 0 or step == self._last_step:
            return False
        if step % self.every_n_steps:
            return False
        return not (self.skip_every_n_steps and step % self.skip_every_n_steps == 0)

    def wait(self) -> None:
        """Block until the memory save in flight is committed (or has failed and been logged)."""
        if self.tier is not None:
            self.tier.wait()

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if self.enabled and self.tier is None:
            raise MemckptError(
                "MemoryCheckpointCallback is not connected to the Trainer: call "
                "memckpt.adapters.lightning.wrap_trainer(trainer, base_container) before fit"
            )

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._last_step = trainer.global_step  # the step resumed from is saved already

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        # RNG states are restored where the saving run went on: right before the next
        # batch (after Lightning's start-up, which may draw random numbers), or, after a
        # save on an epoch's last batch, now: Lightning makes the next epoch's data
        # iterator before any later hook, and a DataLoader without its own generator
        # draws its seed and shuffle order from torch's RNG there
        self._pending_rng = checkpoint.pop(RNG_KEY, None)
        if checkpoint.pop(EPOCH_END_KEY, False):
            self._restore_rng()

    def _restore_rng(self) -> None:
        if self._pending_rng is not None:
            restore_rng(self._pending_rng)
            self._pending_rng = None

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, idx: int) -> None:
        self._restore_rng()

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self.tier is None or not self.should_save(step):
            return
        self._last_step = step
        io = trainer.strategy.checkpoint_io
        if not isinstance(io, MemoryCheckpointIO):
            raise MemckptError(
                f"the strategy's CheckpointIO is a {type(io).__name__}, not the one wrap_trainer "
                "installed; set your own CheckpointIO before calling wrap_trainer"
            )
        checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
        checkpoint[RNG_KEY] = capture_rng()
        checkpoint[EPOCH_END_KEY] = batch_idx + 1 >= trainer.num_training_batches
        io.save_checkpoint(checkpoint, self.tier.checkpoint_path(step), storage_options=EVERY_RANK)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self.tier is not None:
            self.tier.finish(remove=not self.keep_on_train_end, barrier=trainer.strategy.barrier)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        if self.tier is not None:
            self.tier.close()  # keeps the checkpoints: the restart resumes from them
