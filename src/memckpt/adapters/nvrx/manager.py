"""NVRx's ``LocalCheckpointManager`` on memckpt's engine.

Call sequence (every rank, in the same order, as with NVRx)::

    mgr = LocalCheckpointManager(root, session_id, repl_strategy)   # nothing collective yet
    it = mgr.find_latest()            # collective: opens the node runtime, exchanges inventories
    ta, ckpt_part_id = mgr.load()     # collective: reads this rank's part here or from a peer
    mgr.save(ta, iteration)           # stages, then commits (vote on memckpt's gloo group)
    req = mgr.save(ta, iteration, is_async=True)   # stages and returns; commit in the background
    queue.schedule_async_request(req); queue.maybe_finalize_async_calls(...)

``find_latest`` and ``load`` are ``CheckpointManager.latest`` / ``load``: the newest step
whose every rank's object exists, checksum-valid, on a live node; a part missing here is
read from a peer holding its replica and verified chunk by chunk. With ``persist_dir``
(a path or a URL such as ``s3://bucket/prefix``) the durable tier counts too, by the
engine's tier rule: the newest step wins, memory on a tie; a step loaded from it is put
back into memory.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from typing import Any

from memckpt.adapters.nvrx.async_queue import AsyncRequest
from memckpt.adapters.nvrx.replication import LazyCliqueReplicationStrategy
from memckpt.adapters.nvrx.state_dict import (
    BasicTensorAwareStateDict,
    TensorAwareStateDict,
    is_tensor_aware,
)
from memckpt.engine.async_bridge import bridge_async_save
from memckpt.errors import (
    CheckpointNotFoundError,
    ConfigError,
    CorruptCheckpointError,
    MemckptError,
    UnsupportedValueError,
)
from memckpt.ids import validate_job_id, validate_step
from memckpt.manager import CheckpointManager, check_persist_arguments
from memckpt.replication import ReplicationStrategy

__all__ = ["DEFAULT_SESSION_JOB", "CkptID", "LocalCheckpointManager"]

log = logging.getLogger(__name__)

CkptID = tuple[int, int, Any]
"""NVRx's checkpoint part id: (iteration, rank, session_id)."""

DEFAULT_SESSION_JOB = "nvrx-local"
"""The job directory under ``root_local_ckpt_dir`` for the default (empty) session id."""

# The stored form: a marker key, then either a basic state dict or a custom object.
_FORMAT = "memckpt.nvrx"
_FORMAT_VERSION = 1


def _is_nvrx_basic(obj: object) -> bool:
    """Whether ``obj`` is NVRx's BasicTensorAwareStateDict or a subclass (NVRx not imported)."""
    return any(
        k.__name__ == "BasicTensorAwareStateDict"
        and k.__module__.startswith("nvidia_resiliency_ext.")
        for k in type(obj).__mro__
    )


def _saved_form(state_dict: Any) -> dict[str, Any]:
    # NVRx's own basic wrapper is stored as ours: same content, and no class to allow
    if isinstance(state_dict, BasicTensorAwareStateDict) or _is_nvrx_basic(state_dict):
        if state_dict.is_hollow:
            raise UnsupportedValueError(
                "save() got a hollow BasicTensorAwareStateDict (its tensors were popped); "
                "insert_tensors() first"
            )
        return {_FORMAT: _FORMAT_VERSION, "basic": True, "state_dict": state_dict.state_dict}
    if not is_tensor_aware(state_dict):
        raise UnsupportedValueError(
            f"save() takes a TensorAwareStateDict, got {type(state_dict).__name__}; wrap a "
            "state dict in BasicTensorAwareStateDict(state_dict)"
        )
    if state_dict.is_hollow:
        raise UnsupportedValueError(
            f"save() got a hollow {type(state_dict).__name__} (its tensors were popped)"
        )
    return {_FORMAT: _FORMAT_VERSION, "basic": False, "object": state_dict}


def _from_saved(saved: Any, where: str) -> TensorAwareStateDict:
    if not (isinstance(saved, dict) and saved.get(_FORMAT) == _FORMAT_VERSION):
        raise CorruptCheckpointError(
            f"{where} was not saved by memckpt.adapters.nvrx.LocalCheckpointManager "
            "(another memckpt API wrote this job); load it with the API that saved it"
        )
    if saved.get("basic"):
        return BasicTensorAwareStateDict(saved["state_dict"])
    obj = saved.get("object")
    if not is_tensor_aware(obj):
        raise CorruptCheckpointError(f"{where}: the stored object is not a TensorAwareStateDict")
    obj.restore_tensor_device(non_blocking=False)  # as NVRx does after loading a part
    return obj  # type: ignore[no-any-return]


def _job_for(session_id: str) -> str:
    if session_id == "":
        return DEFAULT_SESSION_JOB
    try:
        return validate_job_id(session_id)
    except MemckptError as e:
        raise type(e)(
            f"session_id {session_id!r} names memckpt's job directory: use letters, digits "
            f"and '_ - .' (NVRx accepts any path component; memckpt does not). {e}"
        ) from e


class LocalCheckpointManager:
    """Local checkpoints with NVRx's interface, kept by memckpt (see the module docstring).

    Args:
        root_local_ckpt_dir: node-local directory, ideally a tmpfs such as /dev/shm.
        session_id: names the job under it (``""``: ``DEFAULT_SESSION_JOB``); it is the
            third element of every ckpt_part_id, as with NVRx.
        repl_strategy: ``CliqueReplicationStrategy`` (or its lazy form, or any memckpt
            ReplicationStrategy or spec string); None keeps parts on their own node.
        keep_last: complete iterations kept (NVRx keeps one).
        safe_globals: classes a custom TensorAwareStateDict's stored form may construct
            when loaded (its own class included). NVRx unpickles anything; memckpt does not.
        **options: passed to ``memckpt.CheckpointManager`` (``timeout_s``, ``node_id``,
            ``limit_bytes``, ``transfer_host``, ``secret``, ...), among them the durable
            tier: ``persist_every``, ``persist_dir`` (a path or an fsspec URL) and
            ``persist_options`` (storage options), checked here (ConfigError).

    The memckpt runtime opens at the first ``find_latest``, ``load`` or ``save`` (all
    collective); ``close()`` waits for the save in flight and shuts it down.
    """

    def __init__(
        self,
        root_local_ckpt_dir: str | os.PathLike[str],
        session_id: str = "",
        repl_strategy: Any = None,
        *,
        keep_last: int = 1,
        safe_globals: Iterable[Any] = (),
        **options: Any,
    ) -> None:
        if not isinstance(root_local_ckpt_dir, (str, os.PathLike)):
            raise UnsupportedValueError(
                "root_local_ckpt_dir must be a directory path (str or os.PathLike), got "
                f"{type(root_local_ckpt_dir).__name__}"
            )
        self.root_local_ckpt_dir = root_local_ckpt_dir
        self.session_id = session_id
        self.job_id = _job_for(session_id)
        known = (str, ReplicationStrategy, LazyCliqueReplicationStrategy)
        if repl_strategy is not None and not isinstance(repl_strategy, known):
            raise UnsupportedValueError(
                f"repl_strategy {type(repl_strategy).__name__} is not a memckpt strategy; use "
                "memckpt.adapters.nvrx.CliqueReplicationStrategy.from_replication_params(...) "
                "(NVRx's strategies replicate over torch.distributed, memckpt's over its "
                "transfer service)"
            )
        check_persist_arguments(options.get("persist_every"), options.get("persist_dir"),
                                options.get("persist_options"))  # fmt: skip
        self.repl_strategy = repl_strategy
        self.keep_last = keep_last
        self.safe_globals = tuple(safe_globals)
        self._options = options
        self.latest_iteration = -1
        self._mgr: CheckpointManager | None = None

    # -- runtime -----------------------------------------------------------------------
    @property
    def manager(self) -> CheckpointManager:
        """The memckpt CheckpointManager underneath (opened collectively on first use)."""
        if self._mgr is None:
            if isinstance(self.repl_strategy, LazyCliqueReplicationStrategy):
                self.repl_strategy = self.repl_strategy.replication_strategy
            self._mgr = CheckpointManager(
                self.root_local_ckpt_dir,
                self.job_id,
                keep_last=self.keep_last,
                replication=self.repl_strategy,
                **self._options,
            )
        return self._mgr

    @property
    def rank(self) -> int:
        if self._mgr is not None:
            return self._mgr.rank
        import torch.distributed as dist

        return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

    def _ckpt_id(self, iteration: int) -> CkptID:
        return (iteration, self.rank, self.session_id)

    # -- NVRx interface ----------------------------------------------------------------
    def find_latest(self) -> int:
        """The newest iteration complete across the live ranks, or -1 (collective).

        Cached until the next save, as with NVRx. Steps saved by another world size are
        passed over (with a warning), so a resized job falls back to its global checkpoint.
        With ``persist_dir``, a newer persisted step is the answer (``load`` reads it).
        """
        if self.latest_iteration != -1:
            return self.latest_iteration
        mgr = self.manager
        plan = mgr.recovery_plan()
        for step, why in sorted(plan.skipped.items(), reverse=True):
            if plan.step is None or step > plan.step:
                log.warning("rank %d: local checkpoint iteration %d passed over: %s",
                            self.rank, step, why)  # fmt: skip
        latest = plan.step
        persisted = mgr.persisted_step()
        if persisted is not None and (latest is None or persisted > latest):
            latest = persisted
        self.latest_iteration = latest if latest is not None else -1
        return self.latest_iteration

    def load(self) -> tuple[TensorAwareStateDict, CkptID]:
        """Load this rank's part of the newest complete iteration (collective).

        Call ``find_latest`` first (as with NVRx). Returns a new TensorAwareStateDict and
        this part's id ``(iteration, rank, session_id)``. A part this node lost is read
        from a peer's replica and checksum-verified; if the newest iteration turns out
        damaged, every rank falls back to the next older complete one (its iteration is
        the id's first element).
        """
        if self.latest_iteration == -1:
            raise CheckpointNotFoundError(
                f"rank {self.rank}: load() needs a checkpoint found by find_latest() first "
                f"(job {self.job_id!r} under {self.root_local_ckpt_dir}); find_latest() "
                "returned -1 or was not called"
            )
        mgr = self.manager
        try:
            saved = mgr.load(safe_globals=self.safe_globals, on_world_size_mismatch="skip")
        except UnsupportedValueError as e:
            raise UnsupportedValueError(
                f"{e} (for this manager: LocalCheckpointManager(..., safe_globals=[...]))"
            ) from e
        info = mgr.last_load
        if saved is None or info is None:
            raise CheckpointNotFoundError(
                f"rank {self.rank}: no iteration of job {self.job_id!r} could be loaded: "
                f"iteration {self.latest_iteration} (found by find_latest) is damaged or lost "
                "on some rank (the log names the part that failed its checksum) and no older "
                "complete one is kept. Load your persistent checkpoint instead"
            )
        self.latest_iteration = info.step
        ta = _from_saved(saved, f"iteration {info.step} of rank {self.rank}")
        return ta, self._ckpt_id(info.step)

    def save(
        self, state_dict: TensorAwareStateDict, iteration: int, is_async: bool = False
    ) -> AsyncRequest | None:
        """Save this rank's part of ``iteration`` (every rank calls it).

        Returns once the tensors are copied into memory: the caller's object and its
        tensors are left as they were (no placeholders). Synchronous: returns after the
        global commit, or raises its error. ``is_async``: returns an AsyncRequest for
        an AsyncCallsQueue (NVRx's with ``persistent=False``, or this package's); its
        finalize raises the save's error.
        """
        iteration = validate_step(iteration)
        if self.latest_iteration >= iteration:
            raise ConfigError(
                f"rank {self.rank}: a newer checkpoint is already available: iteration "
                f"{self.latest_iteration} (saving {iteration}); save iterations in increasing "
                "order, as with NVRx"
            )
        saved = _saved_form(state_dict)
        mgr = self.manager
        self.latest_iteration = -1
        if not is_async:
            mgr.engine.save(iteration, saved, blocking=True).wait().raise_if_skipped()
            log.info("rank %d: saved local checkpoint of iteration %d", self.rank, iteration)
            return None
        bridge = bridge_async_save(
            mgr.runtime, iteration, lambda: mgr.engine.save(iteration, saved, blocking=False)
        )

        def finalize() -> None:
            self.latest_iteration = -1
            bridge.finalize()  # raises the save's error
            log.info("rank %d: saved local checkpoint of iteration %d", self.rank, iteration)

        return AsyncRequest(bridge.signal, (), [finalize])

    def close(self) -> None:
        """Wait for the save in flight and close memckpt's runtime (this process's share)."""
        if self._mgr is not None:
            self._mgr.close()
            self._mgr = None

    def __enter__(self) -> LocalCheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
