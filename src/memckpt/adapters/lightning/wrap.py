"""wrap_trainer: memory checkpoints and auto-resume for a Lightning Trainer in one call."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from typing import Any, Final

from memckpt.adapters.lightning.callback import MemoryCheckpointCallback
from memckpt.adapters.lightning.checkpoint_io import MemoryCheckpointIO
from memckpt.adapters.lightning.tier import MemoryTier
from memckpt.errors import ConfigError, MemckptError

__all__ = ["check_strategy", "wrap_trainer"]

log = logging.getLogger(__name__)

_SUPPORTED: Final = ("SingleDeviceStrategy", "DDPStrategy")
_REFUSED: Final = {
    "FSDPStrategy": (
        "FSDP gathers the full state dict onto rank 0 or saves sharded ones through DCP "
        "itself, around the CheckpointIO (and Lightning runs it on GPUs only); checkpoint "
        "FSDP with memckpt.adapters.dcp"
    ),
    "ModelParallelStrategy": "it saves through DCP itself; use memckpt.adapters.dcp",
    "DeepSpeedStrategy": "DeepSpeed writes its own checkpoint directories around the CheckpointIO",
    "MegatronStrategy": (
        "its checkpoints are Megatron sharded state dicts saved through MegatronCheckpointIO; "
        "use memckpt's Megatron-Core strategies"
    ),
    "XLAStrategy": "XLA is not supported",
    "XLAFSDPStrategy": "XLA is not supported",
    "SingleDeviceXLAStrategy": "XLA is not supported",
}


def check_strategy(strategy: Any) -> None:
    """Raise MemckptError unless ``strategy`` is single-device or DDP (either namespace)."""
    names = [c.__name__ for c in type(strategy).__mro__]
    refused = next((n for n in names if n in _REFUSED), None)
    if refused is not None or not set(_SUPPORTED) & set(names):
        why = _REFUSED.get(refused or "", "it is neither single-device nor DDP")
        raise MemckptError(
            f"memckpt's Lightning adapter does not support {type(strategy).__name__}: {why}. "
            f"Supported: {', '.join(_SUPPORTED)} (ddp, ddp_spawn, ddp_fork, single device; "
            "any accelerator). Pass enabled=False to train without memory checkpoints"
        )


def _find_callback(trainer: Any) -> MemoryCheckpointCallback | None:
    found = [cb for cb in trainer.callbacks if isinstance(cb, MemoryCheckpointCallback)]
    if len(found) > 1:
        raise MemckptError("the Trainer has more than one MemoryCheckpointCallback; keep one")
    return found[0] if found else None


class _ResumeHook:
    """At fit start, resume from the newer of memory and the persistent checkpoint.

    Lightning resolves ``fit(ckpt_path=...)`` ("last", "hpc", a path, or NeMo's
    AutoResume's choice) before the process group exists, then calls
    ``_CheckpointConnector.resume_start(path)`` on every rank once it does; the hook
    replaces that method on the Trainer's connector, decides there (collectively) and
    hands Lightning the chosen path. The fit's ``weights_only`` (Lightning 2.6 passes it
    to ``resume_start``; 2.4 has none) goes to the decision, which reads the persistent
    checkpoint's step under it. A class, not a closure, so that the Trainer still
    pickles (``ddp_spawn``).
    """

    def __init__(self, connector: Any, tier: MemoryTier) -> None:
        self.connector = connector
        self.tier = tier

    def __call__(self, checkpoint_path: Any = None, *args: Any, **kwargs: Any) -> Any:
        state = self.connector.trainer.state
        if getattr(state.fn, "value", state.fn) == "fit":
            persistent = os.fspath(checkpoint_path) if checkpoint_path else None
            weights_only = kwargs.get("weights_only", args[0] if args else None)
            checkpoint_path = self.tier.decide(persistent, weights_only).path
        original = type(self.connector).resume_start
        return original(self.connector, checkpoint_path, *args, **kwargs)


def _install_resume_hook(trainer: Any, tier: MemoryTier) -> None:
    connector = trainer._checkpoint_connector
    connector.resume_start = _ResumeHook(connector, tier)
    connector._memckpt_tier = tier


def wrap_trainer(
    trainer: Any,
    base_container: str | os.PathLike[str],
    async_save: bool = True,
    *,
    every_n_steps: int | None = None,
    skip_every_n_steps: int | None = None,
    enabled: bool = True,
    keep_on_train_end: bool = False,
    safe_globals: Iterable[type] = (),
    require_checkpoint: bool = False,
    **manager_options: Any,
) -> MemoryTier:
    """Give ``trainer`` memory checkpoints and auto-resume; call once, before ``fit``.

    ``base_container`` is the job's node-local directory ``<base_dir>/<job_id>`` (e.g.
    ``/dev/shm/memckpt/job-7``): the same on every node and across restarts of the job,
    different for another job. The Trainer's ``MemoryCheckpointCallback`` is used (one
    is added when ``every_n_steps`` is given and it has none) and moved last, the strategy's
    CheckpointIO is wrapped by ``MemoryCheckpointIO``, and ``fit`` resumes from the
    newest complete memory checkpoint when it is newer than the persistent checkpoint
    ``fit(ckpt_path=...)`` would load. ``manager_options`` go to ``CheckpointManager``
    (``replication="pairwise"``, ``node_id``, ``keep_last``, ``timeout_s``, ``secret``...).
    ``safe_globals``: classes of your own that checkpoints hold and may be rebuilt.
    ``require_checkpoint``: fail at fit start when there is nothing to resume from.

    Returns the job's MemoryTier (``.resumed`` tells where the last fit resumed from).
    With ``enabled=False`` (or a disabled callback) the Trainer is left as it is.
    """
    tier = MemoryTier(base_container, async_save=async_save, safe_globals=safe_globals,
                      require_checkpoint=require_checkpoint, **manager_options)  # fmt: skip
    status = getattr(trainer.state, "status", None)
    if getattr(status, "value", status) == "running":
        raise MemckptError(
            "wrap_trainer was called while the Trainer is running (inside fit): memory "
            "checkpoints and resume are set up before fit; call it right after creating the Trainer"
        )
    cb = _find_callback(trainer)
    if cb is None and not enabled:
        tier.enabled = False
        log.info("memory checkpoints disabled: the Trainer is left as it is")
        return tier
    if cb is None:
        if every_n_steps is None:
            raise ConfigError(
                "the Trainer has no MemoryCheckpointCallback: add one to its callbacks or "
                "pass every_n_steps to wrap_trainer"
            )
        cb = MemoryCheckpointCallback(
            base_container,
            every_n_steps,
            skip_every_n_steps,
            enabled=enabled,
            keep_on_train_end=keep_on_train_end,
        )
    elif every_n_steps is not None and every_n_steps != cb.every_n_steps:
        raise ConfigError(
            f"every_n_steps={every_n_steps} differs from the Trainer's MemoryCheckpointCallback "
            f"({cb.every_n_steps}); pass one of them"
        )
    if os.path.realpath(cb.base_container) != os.path.realpath(tier.root):
        raise ConfigError(
            f"the MemoryCheckpointCallback saves under {cb.base_container}, wrap_trainer was "
            f"given {tier.root}; pass the same base_container to both"
        )
    if not (enabled and cb.enabled):
        cb.enabled = tier.enabled = False
        log.info("memory checkpoints disabled: the Trainer is left as it is")
        return tier
    check_strategy(trainer.strategy)
    if getattr(trainer._checkpoint_connector, "_memckpt_tier", None) is not None:
        raise MemckptError("wrap_trainer was already called on this Trainer")
    # last, so callbacks that change their state at a step's end have done so when it saves
    if cb in trainer.callbacks:
        trainer.callbacks.remove(cb)
    trainer.callbacks.append(cb)
    cb.tier = tier
    trainer.strategy.checkpoint_io = MemoryCheckpointIO(trainer.strategy.checkpoint_io, tier)
    _install_resume_hook(trainer, tier)
    return tier
