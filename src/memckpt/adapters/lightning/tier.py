"""The memory tier of one Lightning job: where its checkpoints live, save, load, resume choice.

One ``MemoryTier`` is shared by the callback (saves), the CheckpointIO (routes paths)
and the resume hook (chooses memory or persistent at fit start). It opens memckpt's
``CheckpointManager`` lazily, at the first collective use, so a Trainer that is
pickled to spawned workers carries only settings.

Call sequence, every rank, in this order:

    fit start     decide(persistent_path, weights_only): open the manager (collective the
                  first time), rank 0's reading of the persistent step (weights_only=True
                  unless the fit passed False) shared through one all-gather,
                  then the engine's tier rule: the newest memory step at or above it is
                  loaded (collective), falling back over damaged steps; every rank gets
                  the same ResumeDecision, naming the step actually loaded
    resume        load(step) hands over what decide loaded (Lightning's
                  Strategy.load_checkpoint calls the CheckpointIO on every rank)
    every N steps save(step, checkpoint): stage on the training thread; hashing, commit,
                  replication and the commit vote in memckpt's background
    train end     finish(remove, barrier): wait for the save in flight, close, and
                  (remove) delete the job's directory once on each node
"""

from __future__ import annotations

import inspect
import logging
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memckpt import ids
from memckpt.adapters.lightning.checkpoint_dict import persistent_step, to_storable
from memckpt.engine.handle import SaveHandle
from memckpt.engine.tiers import choose_tier, memory_home, release_memory_tier, resume_tiers
from memckpt.errors import (
    CheckpointNotFoundError,
    ConfigTypeError,
    InvalidNameError,
    MemckptError,
)
from memckpt.manager import CheckpointManager, LoadInfo, check_persist_arguments

__all__ = ["MemoryTier", "ResumeDecision", "choose_resume", "split_base_container"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResumeDecision:
    """Where a fit resumed from: ``source`` is "memory", "persistent" or "none"."""

    source: str
    path: str | None
    memory_step: int | None
    persistent_path: str | None
    persistent_step: int | None

    @property
    def step(self) -> int | None:
        """The step resumed from, if known."""
        if self.source == "memory":
            return self.memory_step
        return self.persistent_step if self.source == "persistent" else None


def choose_resume(
    memory_step: int | None, persistent_path: str | None, persistent_step: int | None
) -> str:
    """ "memory", "persistent" or "none", by the engine's tier rule (``memckpt.engine.tiers``).

    The newer step wins and memory wins a tie; a persistent checkpoint whose step cannot
    be read wins (it is what the user asked for).
    """
    return choose_tier(memory_step, persistent_step, persistent_path is not None)


def lightning_weights(name: str) -> bool:
    """Tensors whose NaN/Inf makes a step unfit to resume from: the model's and the
    optimizers' (callbacks' trackers such as ModelCheckpoint's ``kth_value`` hold Inf)."""
    return name.startswith(("state_dict.", "optimizer_states."))


def split_base_container(base_container: str | os.PathLike[str]) -> tuple[Path, str]:
    """(base_dir, job_id) of a job directory ``<base_dir>/<job_id>``.

    The job id is the last component as written: a path ending in a separator, ``.`` or
    ``..`` (``"/dev/shm/memckpt/"``) names a directory, not a job, and is refused, since
    the job's directory is deleted at train end (InvalidNameError).
    """
    raw = os.fspath(base_container)
    seps = tuple(s for s in (os.sep, os.altsep) if s)
    last = os.path.basename(raw.rstrip("".join(seps))) if raw else ""
    if not raw or raw.endswith(seps) or last in (".", ".."):
        example = os.path.join(raw.rstrip("".join(seps)) or ".", "job-7")
        raise InvalidNameError(
            f"job directory {raw!r} has no job id: its last component is empty, '.' or '..', "
            "so it names a base directory, and the job's directory is deleted at the end of "
            f"training. Pass <base_dir>/<job_id>, e.g. {example!r}, with a job id of its own "
            "that stays the same across restarts"
        )
    path = Path(os.path.abspath(raw))
    return path.parent, ids.validate_job_id(path.name)


class MemoryTier:
    """One job's memory checkpoints, kept in ``base_container`` = ``<base_dir>/<job_id>``.

    ``base_container`` must be node-local (a tmpfs such as /dev/shm), name the job, and
    stay the same when the job restarts. ``resumed`` and ``last_load`` tell where the
    last fit resumed from and, for memory, whether this rank read a peer's copy.
    ``manager_options`` go to ``CheckpointManager``
    (``replication``, ``node_id``, ``keep_last``, ``timeout_s``, ``secret``, ...); its
    durable tier (``persist_every``, ``persist_dir`` a path or fsspec URL,
    ``persist_options``) is checked here (ConfigError) and takes part in the resume choice
    as memckpt's own steps: one loaded from it is put back into memory.
    """

    def __init__(
        self,
        base_container: str | os.PathLike[str],
        *,
        async_save: bool = True,
        safe_globals: Iterable[type] = (),
        require_checkpoint: bool = False,
        **manager_options: Any,
    ) -> None:
        self.base_dir, self.job_id = split_base_container(base_container)
        known = set(inspect.signature(CheckpointManager.__init__).parameters)
        known -= {"self", "base_dir", "job_id"}
        unknown = sorted(k for k in manager_options if k not in known)
        if unknown:
            raise ConfigTypeError(
                f"unknown options {unknown}: wrap_trainer passes its other keyword arguments to "
                "memckpt.CheckpointManager (replication, node_id, keep_last, timeout_s, ...)"
            )
        check_persist_arguments(manager_options.get("persist_every"),
                                manager_options.get("persist_dir"),
                                manager_options.get("persist_options"))  # fmt: skip
        self.async_save = async_save
        self.safe_globals = tuple(safe_globals)
        self.require_checkpoint = require_checkpoint
        self.enabled = True  # wrap_trainer(enabled=False): never consulted
        self.manager_options = manager_options
        self.resumed: ResumeDecision | None = None
        self.failed_steps: list[int] = []
        self.last_load: LoadInfo | None = None
        self._manager: CheckpointManager | None = None
        self._handles: list[SaveHandle] = []  # saves whose outcome is not collected yet
        self._preloaded: tuple[int, dict[str, Any]] | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_manager"] = state["_preloaded"] = None
        state["_handles"] = []
        return state

    @property
    def root(self) -> Path:
        """The job's directory on this node."""
        return self.base_dir / self.job_id

    def checkpoint_path(self, step: int) -> str:
        """The path naming memory checkpoint ``step`` (Lightning's ``ckpt_path`` for it)."""
        return str(ids.JobLayout(self.base_dir, self.job_id).step_dir(step))

    def step_of(self, path: Any) -> int | None:
        """The step ``path`` names if it is one of this job's memory checkpoints, else None."""
        if not isinstance(path, (str, os.PathLike)):
            return None
        p = Path(os.path.abspath(os.fspath(path)))
        if os.path.realpath(p.parent) != os.path.realpath(self.root):
            return None
        return ids.parse_step_dir(p.name)

    def manager(self) -> CheckpointManager:
        """The job's manager; the first call opens it (collective)."""
        if self._manager is None:
            self._manager = CheckpointManager(self.base_dir, self.job_id, **self.manager_options)
        return self._manager

    def decide(
        self, persistent_path: str | None, weights_only: bool | None = None
    ) -> ResumeDecision:
        """Agree on every rank where this fit resumes from, and load it if memory (collective).

        The engine's tier rule decides (``memckpt.engine.tiers``): memory steps at or above
        the persistent step are loaded newest first, falling back over damaged ones, so
        the decision is made on data that verified; else the persistent checkpoint.
        ``weights_only`` is the one the fit loads with: rank 0 reads the persistent
        step with ``weights_only=True`` unless it is False (``persistent_step``); a file
        that read refuses has an unknown step, so it wins and Lightning loads it itself.
        """
        mgr = self.manager()
        self._preloaded = None
        asked = self.step_of(persistent_path)
        if asked is not None:  # fit(ckpt_path=<one of this job's memory checkpoints>)
            self.resumed = ResumeDecision("memory", persistent_path, asked, None, None)
            return self.resumed
        pstep = None
        unread = ""  # why rank 0 could not read the persistent step
        if persistent_path is not None:
            mine = None
            if mgr.rank == 0:
                try:
                    mine = persistent_step(persistent_path, weights_only)
                except Exception as e:  # refused or unreadable: Lightning's own load decides
                    unread = f" ({_reason(e)})"
            pstep = mgr.coll.all_gather_object(mine, "persistent checkpoint step")[0]

        def load_memory(floor: int | None) -> int | None:
            out = mgr.load(None, on_world_size_mismatch="skip", safe_globals=self.safe_globals,
                           newer_than=None if floor is None else floor - 1)  # fmt: skip
            if out is None or mgr.last_load is None:
                return None
            self.last_load = mgr.last_load
            self._preloaded = (mgr.last_load.step, out)
            return mgr.last_load.step

        choice = resume_tiers(load_memory, pstep, persistent_path is not None)
        if choice.tier == "persistent" and pstep is None:
            log.warning(
                "rank %d: resuming from %s, whose step could not be read%s, rather than memory "
                "(Lightning loads it with its own weights_only rule); name persistent "
                "checkpoints with step=N (ModelCheckpoint's default) to let a newer memory "
                "step win",
                mgr.rank, persistent_path, unread,
            )  # fmt: skip
        if choice.tier == "none" and self.require_checkpoint:
            raise CheckpointNotFoundError(
                f"no memory checkpoint of job {self.job_id!r} under {self.base_dir} and no "
                "persistent checkpoint to resume from, and resuming was required "
                "(AutoResume(resume_ignore_no_checkpoint=False)); pass "
                "resume_ignore_no_checkpoint=True to start from scratch"
            )
        memory_step = choice.memory_step
        if choice.tier == "memory":
            assert memory_step is not None
            path: str | None = self.checkpoint_path(memory_step)
        else:
            self._preloaded = None
            path = persistent_path
        self.resumed = ResumeDecision(choice.tier, path, memory_step, persistent_path, pstep)
        log.info("rank %d: resuming from %s (memory step %s, persistent %s at step %s)",
                 mgr.rank, choice.tier if path is None else path, memory_step, persistent_path,
                 pstep)  # fmt: skip
        return self.resumed

    def save(self, step: int, checkpoint: dict[str, Any]) -> None:
        """Save ``checkpoint`` as ``step`` on this rank; returns once its tensors are copied.

        Every rank calls it for the same steps (the commit vote needs each one). A save
        that fails with a MemckptError, at staging or later, is logged and recorded in
        ``failed_steps``; training goes on and the previous memory checkpoint stays. A
        checkpoint holding a value memory checkpoints do not store raises
        UnsupportedValueError (every save would fail alike).
        """
        self._collect()
        storable = to_storable(checkpoint, "checkpoint", self.safe_globals)
        try:
            handle = self.manager().save(step, storable, blocking=not self.async_save,
                                         check_finite=lightning_weights)  # fmt: skip
        except MemckptError as e:  # refused at staging, or (blocking) the commit failed
            self._record_failure(step, e)
            return
        self._handles.append(handle)
        if not self.async_save:
            self._collect()

    def _record_failure(self, step: int, error: MemckptError) -> None:
        self.failed_steps.append(step)
        log.warning("memory checkpoint of step %d failed: %s", step, error)

    def _collect(self, wait: bool = False) -> None:
        """Record the outcome of every save that has ended (all of them with ``wait``)."""
        pending = []
        for h in self._handles:
            if not (wait or h.done()):
                pending.append(h)
                continue
            try:
                h.wait().raise_if_skipped()  # a save skipped for lack of room failed too
            except MemckptError as e:
                self._record_failure(h.step, e)
        self._handles = pending

    def wait(self) -> None:
        """Wait for the save in flight to be committed (or fail, which is logged)."""
        self._collect(wait=True)
        if self._manager is not None:
            self._manager.wait()

    def load(self, step: int, map_location: Any = None) -> dict[str, Any]:
        """Memory checkpoint ``step`` of this rank (collective: every rank loads its own)."""
        pre, self._preloaded = self._preloaded, None
        if pre is not None and pre[0] == step:  # decide() loaded (and verified) it already
            return _to_device(pre[1], map_location)
        mgr = self.manager()
        out = mgr.load(step, map_location=map_location, safe_globals=self.safe_globals)
        self.last_load = mgr.last_load
        if out is None:  # pragma: no cover - load(step) raises rather than return None
            raise CheckpointNotFoundError(f"memory checkpoint step {step} of {self.job_id!r}")
        return out

    def finish(self, remove: bool, barrier: Callable[[str], None]) -> None:
        """End of training (every rank): finalize, close, and delete the job's checkpoints.

        ``barrier`` is the strategy's; with ``remove`` one rank per node directory
        deletes ``<base_dir>/<job_id>`` after every rank has closed.
        """
        self.wait()
        if self._manager is None:
            return
        mgr = self._manager
        rank = mgr.rank
        home = memory_home(self.base_dir, self.job_id, rank, self.manager_options.get("node_id"))
        homes = mgr.coll.all_gather_object(home, "memory checkpoint cleanup")
        self.close()
        if not remove:
            return
        barrier("memckpt_cleanup")
        release_memory_tier(self.base_dir, self.job_id, homes, rank, "training ended")

    def close(self) -> None:
        """Wait for the save in flight and close the manager (idempotent; reopens on use)."""
        if self._manager is None:
            return
        self._collect(wait=True)
        mgr, self._manager = self._manager, None
        mgr.close()


def _reason(error: BaseException) -> str:
    """``error`` in one short line; torch's weights_only refusal as the class it refused."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    refused = re.search(r"Unsupported global: [^.\n]*", text)
    if refused:
        return f"weights_only=True refused it: {refused.group(0)}"
    first = next((line.strip() for line in text.splitlines() if line.strip()), repr(error))
    return f"{type(error).__name__}: {first[:200]}"


def _to_device(checkpoint: Any, map_location: Any) -> Any:
    """``checkpoint`` with its tensors moved as ``map_location`` asks (None: as they are)."""
    if map_location is None or callable(map_location):
        return checkpoint  # Lightning's own default maps storages to where they were
    import torch

    def move(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return v.to(map_location)
        if isinstance(v, dict):
            return {k: move(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return type(v)(move(x) for x in v)
        return v

    return move(checkpoint)
