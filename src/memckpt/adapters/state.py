"""velastic-style ``State``: model, optimizer, scheduler, extra state and RNG in memory checkpoints.

``memckpt.State`` replaces velastic's ``BCPState`` / ``DCPState`` with the same calls::

    state = memckpt.State(model=model, optimizer=optimizer, framework="ddp",
                          get_extra_fn=get_extra_state, base_dir="/dev/shm/memckpt",
                          job_id="nanogpt")
    extra = state.maybe_resume_from_ckpt()      # None, or what get_extra_fn returned
    while True:
        iter_mngr.iter()
        if iter_mngr.should_save_ckpt():
            state.save(sync=False)

``"single"`` and ``"ddp"`` save each rank's state through ``CheckpointManager`` (a
checkpoint loads only into the world size that saved it); ``"fsdp"`` goes through DCP's
state-dict helpers and memckpt's DCP storage writer and reader, so it reshards on load.

Call sequence (every rank, same order): construct, ``maybe_resume_from_ckpt()`` or
``load()`` (collective), ``save()`` for the same steps (its commit vote is collective),
``close()``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future
from typing import Any, Final, Literal

import torch

from memckpt import settings
from memckpt.engine.handle import SaveHandle, SaveResult
from memckpt.engine.rng import capture_rng_state, restore_rng_state
from memckpt.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    MemckptError,
    StateDictMismatchError,
    UnsupportedValueError,
)
from memckpt.ids import validate_step
from memckpt.storage.statedict import flatten_state_dict, restore_state_dict

__all__ = ["DEFAULT_BASE_DIR", "FRAMEWORKS", "State"]

log = logging.getLogger(__name__)

FRAMEWORKS: Final = ("single", "ddp", "fsdp")
DEFAULT_BASE_DIR: Final = "/dev/shm/memckpt"
"""Where checkpoints go without ``base_dir`` and ``MEMCKPT_BASE_DIR``."""
_RANK_KEY: Final = "memckpt_state_rank{rank}"
"""DCP key of one saving rank's own part (step, extra state, scheduler, RNG) in fsdp mode."""

Framework = Literal["single", "ddp", "fsdp"]


# -- one rank's own part in fsdp mode ---------------------------------------------------------


def _pack(obj: Any) -> bytes:
    """``obj`` as bytes: memckpt's skeleton (restricted on load) and its tensors."""
    flat = flatten_state_dict(obj)
    buf = io.BytesIO()
    tensors = [t.detach().to("cpu", copy=True) for t in flat.tensors]
    torch.save({"skeleton": flat.skeleton, "tensors": tensors}, buf)
    return buf.getvalue()


def _unpack(raw: Any, safe_globals: Iterable[Any], where: str) -> Any:
    if not isinstance(raw, (bytes, bytearray)):
        raise CorruptCheckpointError(f"{where}: holds a {type(raw).__name__}, not packed bytes")
    try:
        parts = torch.load(io.BytesIO(raw), weights_only=True, map_location="cpu")
        skeleton, tensors = parts["skeleton"], parts["tensors"]
    except Exception as e:
        raise CorruptCheckpointError(f"{where}: unreadable ({type(e).__name__}: {e})") from e

    def tensor(i: int) -> torch.Tensor:
        if not 0 <= i < len(tensors):
            raise CorruptCheckpointError(f"{where}: tensor reference {i} out of range")
        return tensors[i]

    return restore_state_dict(skeleton, tensor, safe_globals, where=where)


def _done_handle(step: int, result: SaveResult) -> SaveHandle:
    future: Future[SaveResult] = Future()
    future.set_result(result)
    return SaveHandle(step, future)


# -- State --------------------------------------------------------------------------------------


class State:
    """What a training job must keep, saved and resumed in one call each (velastic's ``State``).

    A checkpoint holds the model, the optimizer, the LR scheduler when given, the extra
    state ``get_extra_fn()`` returns (a dict), the RNG states when ``include_rng``, and
    the step. ``step`` is the counter a save is labelled with; ``maybe_resume_from_ckpt``
    sets it from the checkpoint, and an ``IterManager`` given this state advances it.

    Args:
        model: the module being trained; DDP and ``torch.compile`` wrappers are unwrapped
            in "single"/"ddp" mode, so a checkpoint is the plain module's state dict.
        optimizer: its optimizer, or None.
        framework: "single" (one process), "ddp" (every rank saves its own copy) or
            "fsdp" (FSDP2 and anything ``torch.distributed.checkpoint.state_dict``
            supports; saved through DCP, loads into another world size).
        get_extra_fn: returns a dict of anything else to keep (counters, the current
            batch, a GradScaler's state dict). Values follow memckpt's state-dict rules:
            tensors, numpy arrays and plain Python data; other classes need
            ``safe_globals`` to load.
        lr_scheduler: an LR scheduler (anything with ``state_dict``/``load_state_dict``).
        include_rng: also save and restore the RNG states (python, numpy, torch, CUDA).
        base_dir: node-local checkpoint directory (default ``MEMCKPT_BASE_DIR``, else
            ``/dev/shm/memckpt``); job_id: the job's name under it.
        keep_last, replication, timeout_s: as for ``CheckpointManager``.
        safe_globals: classes the extra state may hold beyond plain data (in "fsdp" mode
            also DCP's bytes items, such as a module's extra state).
        step: the counter's value before any resume.
        persist_every, persist_dir, persist_options: the durable tier, as for
            ``CheckpointManager``: drain every K-th step to ``persist_dir``, a path or an
            fsspec URL (``s3://bucket/prefix``) with ``persist_options`` (storage options);
            checked here (ConfigError). "single"/"ddp" resume from it by the tier rule when
            it holds a newer step than memory, and put that step back into memory; "fsdp"
            passes them to ``MemoryStorageWriter``.
        **options: further ``CheckpointManager`` arguments ("single"/"ddp") or
            ``MemoryStorageWriter`` arguments ("fsdp").
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        framework: Framework = "ddp",
        get_extra_fn: Callable[[], Mapping[str, Any] | None] | None = None,
        *,
        lr_scheduler: Any = None,
        include_rng: bool = False,
        base_dir: str | os.PathLike[str] | None = None,
        job_id: str = "state",
        keep_last: int = 2,
        replication: str | None = None,
        timeout_s: float = 300.0,
        safe_globals: Iterable[Any] = (),
        step: int = 0,
        persist_every: int | None = None,
        persist_dir: str | os.PathLike[str] | None = None,
        persist_options: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> None:
        if framework not in FRAMEWORKS:
            raise MemckptError(
                f"framework must be one of {', '.join(map(repr, FRAMEWORKS))}, got {framework!r}"
            )
        if get_extra_fn is not None and not callable(get_extra_fn):
            raise MemckptError(f"get_extra_fn must be callable, got {get_extra_fn!r}")
        if not isinstance(model, torch.nn.Module):
            raise MemckptError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        for name, obj in (("optimizer", optimizer), ("lr_scheduler", lr_scheduler)):
            if obj is not None and not (
                callable(getattr(obj, "state_dict", None))
                and callable(getattr(obj, "load_state_dict", None))
            ):
                raise MemckptError(
                    f"{name} must have state_dict() and load_state_dict(), got {type(obj).__name__}"
                )
        from memckpt.manager import check_persist_arguments

        check_persist_arguments(persist_every, persist_dir, persist_options)
        if persist_dir is not None:
            options["persist_dir"] = persist_dir
            if persist_every is not None:
                options["persist_every"] = persist_every
            if persist_options is not None:
                options["persist_options"] = persist_options
        import torch.distributed as dist

        distributed = dist.is_available() and dist.is_initialized()
        if framework != "single" and not distributed:
            raise MemckptError(
                f"framework={framework!r} needs torch.distributed initialised "
                "(init_process_group) before State is constructed; use framework='single' "
                "for one process"
            )
        self.model = model
        self.optimizer = optimizer
        self.framework: Framework = framework
        self.get_extra_fn = get_extra_fn
        self.lr_scheduler = lr_scheduler
        self.include_rng = include_rng
        self.base_dir = str(base_dir or settings.get(settings.BASE_DIR_ENV) or DEFAULT_BASE_DIR)
        self.job_id = job_id
        self.safe_globals = tuple(safe_globals)
        self.step = validate_step(step)
        self.rank = dist.get_rank() if distributed else 0
        self.last_save: SaveHandle | None = None
        self.resumed_step: int | None = None
        self._replication = replication
        self._timeout_s = timeout_s
        self._pending_dcp: Future[Any] | None = None
        self._closed = False
        self._pauses: list[Any] = []  # the throttle each pause_replication() paused
        self._manager: Any = None
        if framework == "fsdp":
            from memckpt.adapters import dcp as dcp_adapter

            self._dcp = dcp_adapter
            self._writer_options = dict(
                options, replication=replication, keep_last=keep_last, timeout_s=timeout_s
            )
            dcp_adapter.MemoryStorageWriter(**self._writer_options)  # bad options fail here
        else:
            from memckpt.manager import CheckpointManager

            self._manager = CheckpointManager(
                self.base_dir,
                job_id,
                keep_last=keep_last,
                replication=replication,
                timeout_s=timeout_s,
                **options,
            )

    # ---- what is saved

    def _module(self) -> torch.nn.Module:
        module = self.model
        while True:
            inner = getattr(module, "module", None)  # DistributedDataParallel
            if isinstance(inner, torch.nn.Module) and type(module).__name__ in (
                "DistributedDataParallel",
                "DataParallel",
            ):
                module = inner
                continue
            orig = getattr(module, "_orig_mod", None)  # torch.compile
            if isinstance(orig, torch.nn.Module):
                module = orig
                continue
            return module

    def _extra(self) -> dict[str, Any]:
        if self.get_extra_fn is None:
            return {}
        extra = self.get_extra_fn()
        if extra is None:
            return {}
        if not isinstance(extra, Mapping):
            raise UnsupportedValueError(
                f"get_extra_fn must return a dict (or None), got {type(extra).__name__}"
            )
        return dict(extra)

    def _own_part(self, step: int) -> dict[str, Any]:
        """What each rank keeps besides the model and optimizer."""
        part: dict[str, Any] = {"step": step, "extra": self._extra()}
        if self.lr_scheduler is not None:
            part["lr_scheduler"] = self.lr_scheduler.state_dict()
        if self.include_rng:
            part["rng"] = capture_rng_state()
        return part

    def state_dict(self, step: int | None = None) -> dict[str, Any]:
        """The state dict a "single"/"ddp" save stores (model, optimizer, own part)."""
        sd: dict[str, Any] = {"model": self._module().state_dict()}
        if self.optimizer is not None:
            sd["optimizer"] = self.optimizer.state_dict()
        sd.update(self._own_part(self.step if step is None else step))
        return sd

    # ---- save

    def save(self, step: int | None = None, *, sync: bool = True) -> SaveHandle:
        """Checkpoint the state as ``step`` (default: ``self.step``); every rank calls it.

        Returns once the state is copied (the caller may train on); the handle's
        ``wait()`` returns the SaveResult once the step is committed on every rank.
        With ``sync=True`` it returns committed. Passing ``step`` sets ``self.step``.
        """
        if self._closed:
            raise MemckptError(f"State of job {self.job_id!r} is closed")
        if step is not None:
            self.step = validate_step(step)
        step = self.step
        if self.framework == "fsdp":
            handle = self._save_dcp(step, sync)
        else:
            handle = self._manager.save(step, self.state_dict(step), blocking=sync)
        self.last_save = handle
        return handle

    def _save_dcp(self, step: int, sync: bool) -> SaveHandle:
        import torch.distributed.checkpoint as dcp

        self._wait_dcp()  # DCP allows one save in flight; the previous one must finish first
        t0 = time.perf_counter()
        sd = self._dcp_state()
        sd[_RANK_KEY.format(rank=self.rank)] = _pack(self._own_part(step))
        cid = self._dcp.checkpoint_id(self.base_dir, self.job_id, step)
        writer = self._dcp.MemoryStorageWriter(**self._writer_options)

        def result(blocking_s: float) -> SaveResult:
            total = time.perf_counter() - t0
            return SaveResult(step, 0, 0, 0, blocking_s, blocking_s, 0.0, 0.0, total, cid)

        if sync:
            dcp.save(sd, checkpoint_id=cid, storage_writer=writer)
            return _done_handle(step, result(time.perf_counter() - t0))
        dcp_future = dcp.async_save(sd, checkpoint_id=cid, storage_writer=writer)
        blocking = time.perf_counter() - t0
        future: Future[SaveResult] = Future()

        def finished(f: Any) -> None:
            try:
                f.result()
            except BaseException as e:
                future.set_exception(e)
            else:
                future.set_result(result(blocking))

        self._pending_dcp = dcp_future
        dcp_future.add_done_callback(finished)
        return SaveHandle(step, future)

    def _wait_dcp(self) -> None:
        pending, self._pending_dcp = self._pending_dcp, None
        if pending is not None:
            pending.result()

    def _dcp_state(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

        if self.optimizer is None:
            return {"model": get_model_state_dict(self.model)}
        msd, osd = get_state_dict(self.model, self.optimizer)
        return {"model": msd, "optimizer": osd}

    def wait(self) -> SaveResult | None:
        """Wait for the latest save; return its result (None if nothing was saved)."""
        if self.last_save is None:
            return None
        return self.last_save.wait()

    # ---- resume

    def maybe_resume_from_ckpt(self, step: int | None = None) -> dict[str, Any] | None:
        """Load the newest complete checkpoint (or ``step``); None when there is none.

        Collective. Returns what ``get_extra_fn`` returned at save time ({} without
        one) and sets ``self.step`` to the checkpoint's step. Unlike velastic's, an error
        (a damaged checkpoint, another world size, a mismatched model) propagates:
        the job never starts fresh silently.
        """
        try:
            return self.load(step)
        except CheckpointNotFoundError:
            if step is not None:
                raise
            return None

    def load(self, step: int | None = None) -> dict[str, Any]:
        """Load the newest complete checkpoint (or ``step``) into the model and optimizer.

        Collective. Returns the extra state and sets ``self.step``; raises
        CheckpointNotFoundError when there is no checkpoint.
        """
        if step is not None:
            step = validate_step(step)
        self._wait_pending()
        t0 = time.perf_counter()
        if self.framework == "fsdp":
            loaded, part = self._load_dcp(step)
        else:
            loaded, part = self._load_local(step)
        where = f"step {loaded} of job {self.job_id!r}"
        if self.lr_scheduler is not None:
            if "lr_scheduler" not in part:
                raise StateDictMismatchError(
                    f"{where} holds no LR scheduler state, but State was given lr_scheduler; "
                    "construct State as the job that saved it did"
                )
            self.lr_scheduler.load_state_dict(part["lr_scheduler"])
        elif "lr_scheduler" in part:
            raise StateDictMismatchError(
                f"{where} holds an LR scheduler state that would be dropped: pass "
                "lr_scheduler= to State"
            )
        if self.include_rng:
            if "rng" in part:
                restore_rng_state(part["rng"])
            else:
                log.warning("%s holds no RNG states (saved without include_rng): not restored",
                            where)  # fmt: skip
        self.step = self.resumed_step = loaded
        log.info("rank %d: resumed from %s in %.2fs", self.rank, where, time.perf_counter() - t0)
        extra = part.get("extra", {})
        return dict(extra) if isinstance(extra, Mapping) else extra

    def _wait_pending(self) -> None:
        if self.framework == "fsdp":
            self._wait_dcp()
        else:
            self._manager.wait()

    def _load_local(self, step: int | None) -> tuple[int, dict[str, Any]]:
        module = self._module()
        template: dict[str, Any] = {"model": module.state_dict()}
        if self.optimizer is not None:
            template["optimizer"] = self.optimizer.state_dict()
        newest = self._manager.latest() if step is None else step
        out = None
        if newest is not None or self._manager.persist_dir is not None:
            try:
                out = self._manager.load(step, state_dict=template, safe_globals=self.safe_globals)
            except UnsupportedValueError as e:
                raise UnsupportedValueError(
                    f"{e} (for State: memckpt.State(..., safe_globals=[...]))"
                ) from e
        if out is None:
            if newest is not None:
                # CheckpointManager passed over damaged steps and found no older one
                raise CorruptCheckpointError(
                    f"job {self.job_id!r} has complete checkpoints (newest: step {newest}) but "
                    "none of them loaded: see the warnings above. Not starting from scratch; "
                    "remove the job's directory to do so"
                )
            durable = self._manager.persist_dir
            raise CheckpointNotFoundError(
                f"no complete memory checkpoint of job {self.job_id!r} under {self.base_dir}"
                + (f" and no persisted step in {durable}" if durable is not None else "")
            )
        loaded = self._manager.last_load.step
        where = f"step {loaded} of job {self.job_id!r}"
        if "model" not in out or "extra" not in out:
            raise StateDictMismatchError(f"{where} was not saved by memckpt.State")
        module.load_state_dict(out["model"])
        if self.optimizer is not None:
            if "optimizer" not in out:
                raise StateDictMismatchError(
                    f"{where} holds no optimizer state; State was given an optimizer"
                )
            self.optimizer.load_state_dict(out["optimizer"])
        return loaded, out

    def _load_dcp(self, step: int | None) -> tuple[int, dict[str, Any]]:
        if step is not None:
            return self._load_dcp_step(step)
        out = self._dcp.load_newest(
            lambda cid: self._load_dcp_step(None, cid),
            self.base_dir,
            self.job_id,
            **self._reader_options(),
        )
        if out is None:
            raise CheckpointNotFoundError(
                f"no complete memory checkpoint of job {self.job_id!r} under {self.base_dir}"
            )
        return out[1]

    def _reader_options(self) -> dict[str, Any]:
        # persist_dir: the steps drained there count too (the DCP adapter's tier rule)
        return {
            "replication": self._replication,
            "timeout_s": self._timeout_s,
            **{
                k: self._writer_options[k]
                for k in ("node_id", "secret", "persist_dir", "persist_options")
                if k in self._writer_options
            },
        }

    def _load_dcp_step(
        self, step: int | None, cid: str | None = None
    ) -> tuple[int, dict[str, Any]]:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

        reader_options = self._reader_options()
        if cid is None:
            assert step is not None
            cid = self._dcp.checkpoint_id(self.base_dir, self.job_id, step)
        _, _, loaded = self._dcp.parse_checkpoint_id(cid)
        md = self._dcp.MemoryStorageReader(cid, **reader_options).read_metadata()
        prefix = _RANK_KEY.format(rank="")
        saved_ranks = sorted(
            int(k[len(prefix) :]) for k in md.state_dict_metadata if k.startswith(prefix)
        )
        if not saved_ranks:
            raise StateDictMismatchError(f"{cid} was not saved by memckpt.State")
        source = self.rank if self.rank in saved_ranks else saved_ranks[0]
        if source != self.rank:
            log.info("rank %d: %s was saved by %d ranks; taking rank %d's step, extra state "
                     "and RNG", self.rank, cid, len(saved_ranks), source)  # fmt: skip
        key = _RANK_KEY.format(rank=source)
        sd = self._dcp_state()
        sd[key] = b""
        # the reader lets bytes items through a weights-only load only (with safe_globals)
        reader = self._dcp.MemoryStorageReader(safe_globals=self.safe_globals, **reader_options)
        dcp.load(sd, checkpoint_id=cid, storage_reader=reader)
        if self.optimizer is None:
            set_model_state_dict(self.model, sd["model"])
        else:
            set_state_dict(self.model, self.optimizer, model_state_dict=sd["model"],
                           optim_state_dict=sd["optimizer"])  # fmt: skip
        part = _unpack(sd[key], self.safe_globals, f"{cid} rank {source}'s state")
        if not isinstance(part, dict) or "extra" not in part:
            raise CorruptCheckpointError(f"{cid}: rank {source}'s state is not State's")
        return loaded, part

    # ---- end

    # ---- replication

    def _throttle(self) -> Any:
        if self.framework != "fsdp":
            return self._manager.runtime.throttle
        from memckpt.engine.runtime import NodeRuntime

        with NodeRuntime._lock:
            rt = NodeRuntime._held.get((os.path.realpath(self.base_dir), self.job_id))
        return None if rt is None else rt.throttle

    def pause_replication(self) -> None:
        """Hold this rank's replication traffic until ``resume_replication()``
        (``CheckpointManager.pause_replication``); also what ``IterManager(pause_replication=
        state)`` calls. Before the first save has opened the job's runtime (``"fsdp"``)
        there is no traffic, and the pause is a no-op that its resume matches."""
        throttle = self._throttle()
        if throttle is not None:
            throttle.pause()
        self._pauses.append(throttle)

    def resume_replication(self) -> None:
        """Give back one ``pause_replication()``; the last one lets replication go on."""
        if self._pauses:
            throttle = self._pauses.pop()
            if throttle is not None:
                throttle.resume()

    @contextlib.contextmanager
    def replication_paused(self) -> Iterator[None]:
        """``with state.replication_paused(): ...``: pause around a block, resume after it."""
        self.pause_replication()
        try:
            yield
        finally:
            self.resume_replication()

    def close(self) -> None:
        """Wait for the save in flight, then release the node runtime; safe to call twice.

        Closing while an exception propagates (a ``with`` block, a ``finally`` clause)
        does not wait for other ranks' drain parts, which a dead peer would never upload.
        """
        self._close(failing=sys.exc_info()[1] is not None)

    def _close(self, *, failing: bool) -> None:
        if self._closed:
            return
        self._closed = True
        while self._pauses:
            self.resume_replication()
        if self.framework == "fsdp":
            from memckpt.engine.drain import finish_drains, stop_waiting_for_parts

            if failing:
                stop_waiting_for_parts(f"rank {self.rank} is closing after an error")
            try:
                self._wait_dcp()
            finally:
                self._dcp.close(self.base_dir, self.job_id)
                finish_drains()  # the last step's drain, before the process may exit
        else:
            self._manager._close(None, failing=failing)

    def __enter__(self) -> State:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self._close(failing=exc_type is not None)
