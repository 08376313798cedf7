"""PyTorch Distributed Checkpoint (DCP) on memckpt's memory tier.

Pass ``MemoryStorageWriter`` / ``MemoryStorageReader`` to ``dcp.save``, ``dcp.async_save``
and ``dcp.load``; the rest of a DCP training loop stays as it is::

    cid = checkpoint_id("/dev/shm/memckpt", "job-7", step)       # "<base>/<job>/step-<N>"
    dcp.save(state, checkpoint_id=cid, storage_writer=MemoryStorageWriter(replication="pairwise"))
    latest = latest_checkpoint("/dev/shm/memckpt", "job-7")      # reads copies on any node
    if latest:
        dcp.load(state, checkpoint_id=latest, storage_reader=MemoryStorageReader())

Call sequence of a save (DCP drives it; see ``torch.distributed.checkpoint.StorageWriter``):

    all ranks    reset(checkpoint_id) -> set_up_storage_writer: hold the job's node
                 runtime (collective the first time in a process; later saves reuse it)
    coordinator  prepare_global_plan: keeps the metadata DCP's default planner would build,
                 for planners that keep none of their own
    all ranks    write_data: resolve every item, then one memckpt save transaction of the
                 items (tensors by storage key, bytes items as blobs): stage into the
                 tmpfs buffer, checksums, local commit, replication, then the commit vote
                 on memckpt's gloo group, in which every rank's ballot carries the key map
                 of its items and the coordinator's carries DCP's ``.metadata``. Every node
                 writes the same step manifest from the ballots: the step is complete,
                 replicated and discoverable on every node when write_data returns; every
                 K-th step is then drained in the background (``persist_every``)
    coordinator  finish: nothing left to do

``dcp.async_save`` uses the writer as its stager (DCP's ``AsyncStager`` protocol), so the
only blocking part is memckpt's own staging copy, straight into the rank's pre-faulted
tmpfs buffer; nothing is copied a second time:

    all ranks    stage(state_dict) (training thread): copy every tensor into a pool buffer
                 (CUDA: device-to-host on a side stream into the registered mapping) and
                 return the same structure over views of it. THREAD executor: the job's
                 runtime stages (``SaveEngine.stage``); PROCESS: a staging pool of this
                 process (``memckpt.engine.staging.StagingArea``), whose views pickle as
                 handles to the buffer file, not as bytes
    all ranks    synchronize_staging (if ``synchronize_after_stage``): the copies are done
    background   DCP's save of the staged views; write_data indexes the staged bytes
                 under DCP's item keys (``SaveEngine.commit(staged, flat=...)``, or
                 ``SaveEngine.adopt`` of the borrowed buffer in DCP's daemon) and the save
                 goes on as above, from the checksums on

A load is the engine's load transaction, driven by DCP: ``read_metadata`` plans
(inventories exchanged, collective; steps a load found damaged are passed over), brings
the step's manifest to a node that lost it and meets the peers; DCP's planners decide
what each rank reads, resharding when the world size changed; ``read_data`` reads each
needed object from this node or from any node that holds it (no replication setting
needed), verifying every chunk, then restores lost copies in the background.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import os
import pickle
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import xxhash
from torch.distributed.checkpoint.default_planner import create_default_global_save_plan
from torch.distributed.checkpoint.metadata import (
    _MEM_FORMAT_ENCODING,
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    ReadItem,
    SavePlan,
    SavePlanner,
    WriteItemType,
)
from torch.distributed.checkpoint.staging import AsyncStager
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult
from torch.futures import Future

from memckpt import ids
from memckpt.engine.drain import (
    DrainPolicy,
    RemoteDrain,
    check_persist,
    schedule_drain,
    wait_for_parts,
)
from memckpt.engine.handle import SaveHandle
from memckpt.engine.load_transaction import LoadTransaction
from memckpt.engine.runtime import NodeRuntime, RuntimeSettings
from memckpt.engine.save_engine import StagedSave
from memckpt.engine.sources import ObjectLocator, ObjectSource, find_object_offline
from memckpt.engine.staging import (
    StagedView,
    StagingArea,
    drop_imported,
    find_staged,
    side_stream,
)
from memckpt.engine.tiers import choose_tier, close_and_release, newest_step_persisted
from memckpt.errors import (
    CheckpointNotFoundError,
    ConfigError,
    CorruptCheckpointError,
    DataDamagedError,
    InsufficientSpaceError,
    InvalidNameError,
    MemckptError,
    StorageIOError,
    TransferError,
    UnsupportedValueError,
)
from memckpt.storage.format import TensorEntry
from memckpt.storage.manifest import StepManifest
from memckpt.storage.reader import ObjectReader
from memckpt.storage.remote import RemoteTier
from memckpt.storage.safe_fs import open_regular, real_subdirs, remove_entry
from memckpt.storage.statedict import FlatStateDict, flatten_state_dict, restore_state_dict
from memckpt.storage.store import CheckpointStore, load_step_manifest
from memckpt.storage.tensorbytes import is_plain_cpu, tensor_memoryview

__all__ = [
    "DCP_METADATA_FILE",
    "MemoryStorageReader",
    "MemoryStorageWriter",
    "checkpoint_id",
    "close",
    "complete_steps",
    "export",
    "failed_on_damaged_data",
    "item_key",
    "latest_checkpoint",
    "load_newest",
    "parse_checkpoint_id",
    "prune_steps",
]

log = logging.getLogger(__name__)

METADATA_BLOB = ".metadata"
DCP_METADATA_FILE = ".metadata"
"""Written last into a DCP directory (by DCP's FileSystemWriter, by ``export`` and by
drains): a ``step-<N>`` directory is complete exactly when it holds this file."""
KEYS_BLOB = "dcp.keys.{rank}"
_METADATA_GLOBALS = (
    Metadata,
    MetadataIndex,
    TensorStorageMetadata,
    BytesStorageMetadata,
    ChunkStorageMetadata,
    TensorProperties,
    StorageMeta,
    torch.serialization._get_layout,
    _MEM_FORMAT_ENCODING,
)


# -- checkpoint ids ----------------------------------------------------------------------


def checkpoint_id(base_dir: str | os.PathLike[str], job_id: str, step: int) -> str:
    """``<base_dir>/<job_id>/step-<N>``: the DCP checkpoint id of a memory checkpoint."""
    return str(ids.JobLayout(base_dir, job_id).step_dir(step))


def parse_checkpoint_id(cid: str | os.PathLike[str]) -> tuple[Path, str, int]:
    """(base_dir, job_id, step) of a checkpoint id; InvalidNameError names what is wrong."""
    p = Path(cid)
    step = ids.parse_step_dir(p.name)
    if step is None:
        raise InvalidNameError(
            f"{cid!s} is not a memckpt checkpoint id: it must end in step-<N>, as "
            "memckpt.adapters.dcp.checkpoint_id(base_dir, job_id, step) builds it"
        )
    return p.parent.parent, ids.validate_job_id(p.parent.name), step


# -- runtimes the adapter keeps open ---------------------------------------------------------


def close(
    base_dir: str | os.PathLike[str] | None = None,
    job_id: str | None = None,
    *,
    release_memory: bool = False,
) -> None:
    """Close the runtimes DCP and Megatron calls opened (all, or one job's); waits for saves
    in flight. They are kept open between calls (DCP has no close) and closed at exit.

    ``release_memory=True`` (collective; name the job) is the end of training: once every
    drain has ended and the job's newest step is persisted (``persist_every``), each
    node's memory tier of the job is deleted, in one log line; otherwise it is kept.
    """
    StagingArea.close_all(None if base_dir is None or job_id is None
                          else ids.JobLayout(base_dir, job_id).root)  # fmt: skip
    if not release_memory:
        NodeRuntime.release_held(base_dir, job_id)
        return
    if base_dir is None or job_id is None:
        raise ConfigError("close(release_memory=True) needs the job: close(base_dir, job_id, ...)")
    rt = NodeRuntime.take_held(base_dir, job_id)
    if rt is None:
        return
    checks = list(rt.persisted)
    if checks and newest_step_persisted(rt, lambda s: any(c(s) for c in checks)):
        close_and_release(rt, rt.release)
    else:
        rt.release()


def item_key(index: MetadataIndex) -> str:
    """The key a DCP item is stored under in a rank's object (its fqn and offset, as JSON)."""
    return json.dumps([index.fqn, list(index.offset) if index.offset is not None else None])


def _index(key: str) -> MetadataIndex:
    fqn, offset = json.loads(key)
    return MetadataIndex(fqn, offset)


# -- writer ----------------------------------------------------------------------------------


class MemoryStorageWriter(StorageWriter, AsyncStager):
    """A DCP storage writer that saves into memckpt's memory tier (see the module docstring).

    It is also the stager ``dcp.async_save`` uses with it: ``async_save`` blocks only for
    one copy into the memory tier, then returns a plain Future.

    Args:
        checkpoint_id: ``<base>/<job>/step-<N>`` (usually passed to ``dcp.save`` instead).
        replication, node_id, secret, keep_last, timeout_s, transfer_timeout_s, limit_bytes:
            as for ``CheckpointManager``; they configure the job's node runtime the first
            time it opens in this process, and must agree afterwards when given.
        persist_every: drain every K-th committed step to ``persist_dir`` as a plain DCP
            directory ``persist_dir/step-<N>``, in the background.
        persist_dir: where drained steps go (needed with ``persist_every``): a path, or an
            fsspec URL (``s3://bucket/prefix``, ``gs://...``); a step at a URL is
            persisted once every rank's file is verified and ``.metadata`` is uploaded,
            last (``memckpt.engine.drain.RemoteDrain``: retries, circuit, bounded lag).
            A scheme that is unknown or not installed is a ConfigError here.
        persist_options: fsspec storage options for a ``persist_dir`` URL (``endpoint_url``,
            ``key``, ``secret``...), given to the filesystem unchanged.
        persist_policy: retries, timeouts and circuit of drains to a URL
            (``memckpt.engine.drain.DrainPolicy``).
        synchronize_after_stage: ``async_save`` returns once CUDA tensors are copied to
            the host (default). With False it returns as soon as the copies are queued
            (on a side stream, after the work already queued), and the caller calls
            ``synchronize_staging()`` before changing those tensors (before the
            optimizer step, say). CPU tensors are always copied before it returns.
    """

    def __init__(
        self,
        checkpoint_id: str | os.PathLike[str] | None = None,
        *,
        replication: str | None = None,
        node_id: str | None = None,
        secret: bytes | None = None,
        keep_last: int | None = None,
        timeout_s: float | None = None,
        transfer_timeout_s: float | None = None,
        limit_bytes: int | None = None,
        persist_every: int | None = None,
        persist_dir: str | os.PathLike[str] | None = None,
        persist_options: Mapping[str, Any] | None = None,
        persist_policy: DrainPolicy | None = None,
        synchronize_after_stage: bool = True,
    ) -> None:
        super().__init__()
        persist_where = check_persist(persist_every, persist_dir)
        _check_persist_options(persist_where, persist_options)
        self._synchronize_after_execute = synchronize_after_stage
        self._staged: StagedSave | None = None  # staged by the job's runtime (THREAD)
        self._copy_events: list[Any] = []  # ends of the device-to-host copies of the last stage
        self._settings = RuntimeSettings(replication, node_id, secret, keep_last, timeout_s,
                                         transfer_timeout_s, limit_bytes)  # fmt: skip
        self.persist_every = persist_every
        self.persist_dir: Path | str | None = persist_where
        self.persist_options = dict(persist_options) if persist_options is not None else None
        self.persist_policy = persist_policy
        self.checkpoint_id: str | None = None
        self._where: tuple[Path, str, int] | None = None
        self._runtime: NodeRuntime | None = None
        self._is_coordinator = False
        self._metadata: Metadata | None = None  # the coordinator's, from the global plan
        if checkpoint_id is not None:
            self.reset(checkpoint_id)

    def __getstate__(self) -> dict[str, Any]:
        # the async process executor pickles the writer; the runtime stays in this process
        state = dict(self.__dict__)
        state["_runtime"] = None
        state["_staged"] = None
        state["_copy_events"] = []
        return state

    # -- AsyncStager: the blocking half of dcp.async_save ----------------------------------
    def stage(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """Copy ``state_dict``'s tensors into this rank's memory tier; return it over views.

        Called by ``dcp.async_save`` on every rank (the first call of a job in a process
        is collective with the THREAD executor: it opens the job's runtime). The result
        has the same structure; its tensors (DTensors' local tensors) are CPU views of
        the staged bytes, which the save then commits without copying them again.
        Without a checkpoint id (neither ``async_save``'s nor this writer's), or for
        values memckpt does not stage (ShardedTensor), it copies into new CPU memory as
        DCP's default stager does, and the save copies once more.
        """
        self._staged, self._copy_events = None, []
        cid, executor = _async_save_call()
        cid = cid if cid is not None else self.checkpoint_id
        tree = _StagedTree.collect(state_dict) if cid is not None else None
        if tree is None or cid is None:
            why = "no checkpoint id" if cid is None else "values memckpt does not stage"
            log.debug("staging %s with plain copies: %s", cid, why)
            return _plain_copy(state_dict)
        base, job, step = parse_checkpoint_id(cid)
        flat = FlatStateDict(tree.names, tree.tensors, b"")
        stream = _side_stream_for(tree.tensors)
        if executor == "thread":  # this process commits: stage through the job's runtime
            rt = NodeRuntime.hold(base, job, self._settings)
            staged = rt.engine.stage(step, flat=flat, cuda_stream=stream)
            self._staged = staged
            if staged.handle is not None:  # skipped or failed: write_data reports it
                return state_dict
            self._copy_events = staged.cuda_events()
            return tree.rebuild(staged.views())
        # another process commits (PROCESS executor), or we cannot tell: stage into this
        # process's staging pool, whose views travel to the committer as handles
        area = StagingArea.open(ids.JobLayout(base, job), _global_rank(),
                                self._settings.limit_bytes)  # fmt: skip
        try:
            staged_obj, views = area.stage(flat, cuda_stream=stream)
        except InsufficientSpaceError as e:  # the committer's save decides (and skips)
            log.debug("rank %d: no room to stage step %d (%s); plain copies", area.rank, step, e)
            return _plain_copy(state_dict)
        self._copy_events = list(staged_obj.cuda_events)
        return tree.rebuild(views)

    def synchronize_staging(self) -> None:
        """Wait until the device-to-host copies of the last ``stage`` are done (no-op on CPU)."""
        for ev in self._copy_events:  # pragma: no cover - needs CUDA
            ev.synchronize()

    def close(self) -> None:
        """Nothing to release here: ``memckpt.adapters.dcp.close`` closes runtimes and pools."""

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        if checkpoint_id is None:
            if self.checkpoint_id is None:
                raise MemckptError(
                    "MemoryStorageWriter needs a checkpoint id: pass "
                    "checkpoint_id=memckpt.adapters.dcp.checkpoint_id(base, job, step)"
                )
            return
        self._where = parse_checkpoint_id(checkpoint_id)
        self.checkpoint_id = str(checkpoint_id)

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        assert self._where is not None
        base, job, _ = self._where
        self._runtime = NodeRuntime.hold(base, job, self._settings)
        self._is_coordinator = is_coordinator
        self._metadata = None

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        # DCP's .metadata travels in the coordinator's ballot, inside the save transaction,
        # so every node writes the same manifest. A planner that keeps none of its own
        # (custom planners) gets the one DCP's default planner builds from these plans.
        try:
            self._metadata = create_default_global_save_plan(plans, rewrite_index_hints=False)[1]
        except (AssertionError, ValueError) as e:  # a planner with its own item rules
            log.debug("no default metadata for %s: %s", self.checkpoint_id, e)
            self._metadata = None
        return plans

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        rt, (_, _, step) = self._runtime, self._where  # type: ignore[misc]
        assert rt is not None
        items: dict[str, Any] = {}
        views: dict[tuple[Any, ...], torch.Tensor] = {}
        for item in plan.items:
            data = planner.resolve_data(item)
            key = item_key(item.index)
            if item.type == WriteItemType.BYTE_IO:
                items[key] = bytes(data.getbuffer())
            else:
                t = data.detach()
                # two items over the same bytes (a tensor under two names) are one tensor
                items[key] = views.setdefault(
                    (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride()), t
                )
        flat = flatten_state_dict(items)
        # a tensor two items share is stored once: record which stored name holds each key
        stored = {id(t): n for n, t in zip(flat.names, flat.tensors)}
        keys = {k: stored.get(id(v)) if isinstance(v, torch.Tensor) else None
                for k, v in items.items()}  # fmt: skip
        blobs = {KEYS_BLOB.format(rank=rt.rank): json.dumps(keys).encode()}
        metadata = getattr(planner, "metadata", None)
        if not isinstance(metadata, Metadata):
            metadata = self._metadata
        if self._is_coordinator:
            if metadata is None:
                raise MemckptError(
                    f"{self.checkpoint_id}: no DCP metadata on the coordinator (neither the "
                    "planner nor the global plan gave one); the step would not load"
                )
            blobs[METADATA_BLOB] = pickle.dumps(metadata)
        result = self._commit(rt, step, flat, blobs).wait()
        result.raise_if_skipped()  # DCP has no "skipped": its save fails with the reason
        results = [
            WriteResult(index=item.index, size_in_bytes=_item_bytes(items[item_key(item.index)]),
                        storage_data=(rt.rank, item_key(item.index)))
            for item in plan.items
        ]  # fmt: skip
        log.debug("rank %d: dcp step %d in memory (staged in %.3fs, committed %.3fs after)",
                  rt.rank, step, result.stage_s, result.total_s)  # fmt: skip
        if self.persist_every and step % self.persist_every == 0:
            if isinstance(self.persist_dir, Path):
                _schedule_drain(rt, step, self.persist_dir, self._is_coordinator)
            else:
                assert self.persist_dir is not None
                _remote_drain(rt, self.persist_dir, self.persist_options,
                              self.persist_policy).schedule(step)  # fmt: skip
        fut: Future[list[WriteResult]] = Future()
        fut.set_result(results)
        return fut

    def _commit(
        self, rt: NodeRuntime, step: int, flat: FlatStateDict, blobs: dict[str, bytes]
    ) -> SaveHandle:
        """One save transaction of ``flat``: of bytes ``stage`` put in the memory tier when
        they are there (no copy), else a save that copies them (``dcp.save``)."""
        staged, self._staged = self._staged, None
        if staged is None or staged.step != step:  # staged by another writer (async_stager=)
            staged = rt.engine.pending(step)
        try:
            if staged is not None:  # staged by this runtime
                return rt.engine.commit(staged, flat=flat, blobs=blobs, blocking=True)
            borrowed = find_staged(flat.tensors)  # staged by another pool (or process)
            if borrowed is not None:
                adopted = rt.engine.adopt(step, borrowed, flat)
                return rt.engine.commit(adopted, blobs=blobs, blocking=True)
            return rt.engine.save(step, None, flat=flat, blobs=blobs, blocking=True)
        finally:
            drop_imported()  # buffers of saves that failed before their commit go back

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """Nothing left to do: write_data's transaction committed the step and its manifest
        (with ``.metadata``) on every node."""

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=self.checkpoint_id) if self.checkpoint_id else None

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        try:
            parse_checkpoint_id(checkpoint_id)
        except InvalidNameError:
            return False
        return True


def _item_bytes(v: Any) -> int:
    return v.numel() * v.element_size() if isinstance(v, torch.Tensor) else len(v)


# -- staging helpers -------------------------------------------------------------------------


def _async_save_call() -> tuple[str | None, str | None]:
    """(checkpoint id, executor: "thread" or "process") of the ``dcp.async_save`` call
    that is staging, each None when unknown.

    DCP's ``AsyncStager.stage`` receives only the state dict; which job and step it is for
    (and whether this process commits it) are arguments of ``async_save``, in its frame.
    """
    frame = sys._getframe(1)
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if frame.f_code.co_name == "async_save" and module.startswith("torch.distributed."):
            cid = frame.f_locals.get("checkpoint_id")
            kind = frame.f_locals.get("async_checkpointer_type")
            return (None if cid is None else str(cid)), getattr(kind, "value", None)
        frame = frame.f_back
    return None, None


def _global_rank() -> int:
    dist = torch.distributed
    return int(dist.get_rank()) if dist.is_available() and dist.is_initialized() else 0


def _side_stream_for(tensors: Sequence[torch.Tensor]) -> Any:
    devices = {t.device for t in tensors if t.is_cuda}
    if len(devices) != 1:  # none, or several GPUs: the current streams, as saves use
        return None
    return side_stream(devices.pop())  # pragma: no cover - needs CUDA


def _plain_copy(state_dict: dict[str, Any]) -> dict[str, Any]:
    """A copy in new CPU memory, as DCP's default stager makes (the fallback)."""
    from torch.distributed._state_dict_utils import _copy_state_dict, _create_cpu_state_dict

    staged = _create_cpu_state_dict(state_dict)
    return _copy_state_dict(state_dict, staged, type_check=False)


_IMMUTABLE = (int, float, complex, str, bytes, bool, type(None))


class _StagedTree:
    """The tensors of a DCP state dict, and how to rebuild it over staged views of them.

    Dicts, lists and tuples are rebuilt; a tensor under two keys is staged once and
    stays one tensor; a DTensor is staged as its local tensor and rebuilt around the
    view with its spec; other values are deep-copied (immutable ones kept).
    """

    def __init__(self, state_dict: Any) -> None:
        self.root = state_dict
        self.names: list[str] = []
        self.tensors: list[torch.Tensor] = []
        self._index: dict[int, int] = {}  # id(tensor or DTensor) -> position

    @classmethod
    def collect(cls, state_dict: Any) -> _StagedTree | None:
        """None when the state dict holds a value memckpt does not stage."""
        tree = cls(state_dict)
        return tree if tree._walk(state_dict, "") else None

    def _walk(self, obj: Any, path: str) -> bool:
        from torch.distributed.tensor import DTensor

        if isinstance(obj, torch.Tensor):
            if id(obj) in self._index:
                return True
            if type(obj) is DTensor:
                local, shape = obj._local_tensor, obj.shape
            elif type(obj) in (torch.Tensor, torch.nn.Parameter) or isinstance(obj, StagedView):
                local, shape = obj, obj.shape
            else:  # ShardedTensor, other subclasses: DCP's own stager handles them
                return False
            if (local.layout != torch.strided or local.is_quantized or local.is_nested
                    or local.device.type not in ("cpu", "cuda")):  # fmt: skip
                return False
            self._index[id(obj)] = len(self.tensors)
            # the name only sizes the index: as long as the DCP item key it becomes
            self.names.append(json.dumps([path, list(shape)]))
            self.tensors.append(local.detach())
            return True
        if isinstance(obj, dict):
            return all(self._walk(v, f"{path}.{k}") for k, v in obj.items())
        if isinstance(obj, (list, tuple)):
            return all(self._walk(v, f"{path}.{i}") for i, v in enumerate(obj))
        return True

    def rebuild(self, views: Sequence[torch.Tensor]) -> Any:
        """The state dict again, each tensor replaced by ``views[its position]``."""
        return self._rebuild(self.root, views)

    def _rebuild(self, obj: Any, views: Sequence[torch.Tensor]) -> Any:
        from torch.distributed.tensor import DTensor

        if isinstance(obj, torch.Tensor):
            view = views[self._index[id(obj)]]
            if type(obj) is DTensor:
                # built around an empty tensor, then given the view: a DTensor built on a
                # view at an offset would pickle (PROCESS executor) as that view's storage
                dt = DTensor(torch.empty(0, dtype=view.dtype), obj._spec, requires_grad=False)
                dt._local_tensor = view
                return dt
            return view
        if isinstance(obj, dict):
            out = {k: self._rebuild(v, views) for k, v in obj.items()}
            try:
                return out if type(obj) is dict else type(obj)(out)
            except TypeError:  # a dict subclass that cannot be built from a dict
                return out
        if isinstance(obj, list):
            return [self._rebuild(v, views) for v in obj]
        if isinstance(obj, tuple):
            items = [self._rebuild(v, views) for v in obj]
            return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
        if isinstance(obj, _IMMUTABLE):
            return obj
        try:  # a training loop may change it after async_save returns
            return copy.deepcopy(obj)
        except Exception:
            return obj


# -- latest and the reader -------------------------------------------------------------------


def latest_checkpoint(
    base_dir: str | os.PathLike[str],
    job_id: str,
    *,
    replication: str | None = None,
    node_id: str | None = None,
    secret: bytes | None = None,
    timeout_s: float | None = None,
    persist_dir: str | os.PathLike[str] | None = None,
    persist_options: Mapping[str, Any] | None = None,
) -> str | None:
    """The newest complete checkpoint's id, or None (collective: every rank calls it).

    Complete as ``CheckpointManager.latest`` defines it, whatever world size saved it
    (DCP's planners reshard on load) and wherever its bytes are: no replication setting
    is needed to read copies on other nodes. A step whose data a load found damaged on
    every holder is passed over, by every rank and after every restart. ``replication``
    only says how to push copies again after the load (skipped, in one log line, when
    today's layout cannot host it).

    With ``persist_dir`` (and ``persist_options``), as the writer drained to it, the
    drained steps count too, by the engine's tier rule (``memckpt.engine.tiers``): the
    newest wins, memory on a tie. A drained step's id is ``<persist_dir>/step-<N>``;
    ``MemoryStorageReader(persist_dir=...)`` (or DCP's own reader) loads it. Rank 0 lists
    the drained steps for every rank. A store that cannot be listed is passed over with
    a warning when memory has a step; with none that is a StorageIOError.
    """
    durable = _Durable.of(persist_dir, persist_options)
    settings = RuntimeSettings(replication=replication, node_id=node_id, secret=secret,
                               timeout_s=timeout_s)  # fmt: skip
    rt = NodeRuntime.hold(Path(base_dir), job_id, settings, reading=True)
    plan = LoadTransaction(rt, on_world_size_mismatch="allow").plan()
    if durable is None:
        return None if plan.step is None else checkpoint_id(base_dir, job_id, plan.step)
    found: list[int] | str | None = None
    if rt.rank == 0:
        try:
            found = durable.steps()
        except (OSError, MemckptError) as e:
            found = f"{type(e).__name__}: {e}"
            log.warning("rank 0: cannot list the drained steps in %s: %s", durable.where, found)
    listed = rt.coll.all_gather_object(found, "drained DCP steps")[0]
    pstep = max(listed, default=None) if isinstance(listed, list) else None
    tier = choose_tier(plan.step, pstep, pstep is not None)
    if tier == "memory":
        assert plan.step is not None
        return checkpoint_id(base_dir, job_id, plan.step)
    if tier == "persistent":
        assert pstep is not None
        return durable.step_id(pstep)
    if isinstance(listed, str):
        raise StorageIOError(
            f"no DCP step of job {job_id!r} in memory and {durable.where} cannot be listed "
            f"({listed}); fix the store's endpoint or credentials and retry"
        )
    return None


def failed_on_damaged_data(error: BaseException) -> bool:
    """Whether a ``dcp.load`` failure is damaged or unreachable memory data on every rank
    that failed (``CheckpointException`` of DataDamagedError/TransferError): the step is
    marked, and ``latest_checkpoint`` now names an older intact one."""
    failures = getattr(error, "failures", None)
    if not isinstance(failures, dict) or not failures:
        return isinstance(error, (DataDamagedError, TransferError))
    return all(
        isinstance(f[0] if isinstance(f, tuple) else f, (DataDamagedError, TransferError))
        for f in failures.values()
    )


T = TypeVar("T")


def load_newest(
    load: Callable[[str], T],
    base_dir: str | os.PathLike[str],
    job_id: str,
    **options: Any,
) -> tuple[str, T] | None:
    """``load(cid)`` of the newest loadable memory checkpoint; None when there is none.

    Collective. ``latest_checkpoint(base_dir, job_id, **options)`` names the newest complete
    step; when ``load`` (your ``dcp.load`` with ``MemoryStorageReader``) fails because its
    data is damaged in every copy, the step is marked and the next older one is tried, on
    every rank alike (DCP raises the same ``CheckpointException`` everywhere). Other
    failures are raised. CorruptCheckpointError when every complete step was damaged.
    """
    tried: list[str] = []
    while True:
        cid = latest_checkpoint(base_dir, job_id, **options)
        if cid is None:
            if tried:
                raise CorruptCheckpointError(
                    f"job {job_id!r} under {base_dir}: no complete checkpoint loaded (damaged: "
                    f"{tried}); not starting from scratch: remove the job's directory to do so"
                )
            return None
        try:
            return cid, load(cid)
        except BaseException as e:  # DCP's CheckpointException is a BaseException
            if not failed_on_damaged_data(e) or cid in tried:
                raise
            log.warning("%s is damaged in every copy; trying the next older step", cid)
            tried.append(cid)


def _load_metadata(manifest: StepManifest, where: str) -> Metadata:
    raw = manifest.blobs.get(METADATA_BLOB)
    if raw is None:
        raise CorruptCheckpointError(
            f"{where}: the step manifest has no DCP .metadata (not saved through "
            "MemoryStorageWriter?)"
        )
    md = restore_state_dict(raw, _no_tensors(where), _METADATA_GLOBALS, where=f"{where} .metadata")
    if not isinstance(md, Metadata):
        raise CorruptCheckpointError(f"{where}: .metadata holds a {type(md).__name__}")
    return attach_storage_data(md, manifest, where)


def attach_storage_data(md: Metadata, manifest: StepManifest, where: str) -> Metadata:
    """``md`` with its storage data: each item's (rank, stored name), from the ranks' key maps."""
    storage: dict[MetadataIndex, tuple[int, str]] = {}
    for r in range(manifest.world_size):
        try:
            keys = json.loads(manifest.blobs[KEYS_BLOB.format(rank=r)])
        except (KeyError, ValueError) as e:
            raise CorruptCheckpointError(f"{where}: no item map of rank {r} ({e})") from None
        for key, name in keys.items():
            storage[_index(key)] = (r, name if name is not None else key)
    md.storage_data = storage
    return md


def _no_tensors(where: str) -> Any:
    def refuse(i: int) -> torch.Tensor:
        raise CorruptCheckpointError(f"{where}: .metadata refers to a tensor")

    return refuse


class MemoryStorageReader(StorageReader):
    """A DCP storage reader for memory checkpoints (see the module docstring).

    Loads verify every chunk's checksum. A rank reads whichever ranks' objects DCP's
    planner assigns it (resharding), from this node or from peers that hold them.

    No checkpoint bytes run code on load: every bytes item must pass
    ``torch.load(weights_only=True)`` before the planner (whichever it is) unpickles it;
    one that does not is an UnsupportedValueError naming the item. ``safe_globals``:
    the classes and functions beyond plain data that bytes items may build, for a
    checkpoint you trust (as ``torch.serialization.safe_globals`` takes them).

    ``persist_dir`` (and ``persist_options``), as the writer drained to: a checkpoint id
    ``<persist_dir>/step-<N>`` (what ``latest_checkpoint(..., persist_dir=...)`` names
    when no memory step is newer) is read from there with DCP's own reader
    (``FileSystemReader``, or ``FsspecReader`` for a URL), under the same rules:
    ``.metadata`` through memckpt's restricted unpickler, bytes items weights-only.
    """

    _OPT_IN = "MemoryStorageReader(safe_globals=[...])"
    """How a user allows more in bytes items (an adapter's reader names its own option)."""

    def __init__(
        self,
        checkpoint_id: str | os.PathLike[str] | None = None,
        *,
        replication: str | None = None,
        node_id: str | None = None,
        secret: bytes | None = None,
        timeout_s: float | None = None,
        threads: int = 2,
        safe_globals: Iterable[Any] = (),
        persist_dir: str | os.PathLike[str] | None = None,
        persist_options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self._durable = _Durable.of(persist_dir, persist_options)
        self._drained: StorageReader | None = None  # DCP's reader of a drained step
        self._settings = RuntimeSettings(replication=replication, node_id=node_id,
                                         secret=secret, timeout_s=timeout_s)  # fmt: skip
        self.threads = threads
        self.safe_globals = tuple(safe_globals)
        self._weights_only = True
        self.checkpoint_id: str | None = None
        self._where: tuple[Path, str, int] | None = None
        self._runtime: NodeRuntime | None = None
        self._txn: LoadTransaction | None = None
        self._locator: ObjectLocator | None = None
        if checkpoint_id is not None:
            self.reset(checkpoint_id)

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        if checkpoint_id is None:
            return
        drained = None if self._durable is None else self._durable.step_of(checkpoint_id)
        if drained is not None:
            assert self._durable is not None
            self._where, self.checkpoint_id = None, str(checkpoint_id)
            self._drained = self._durable.reader(drained)
            return
        self._drained = None
        self._where = parse_checkpoint_id(checkpoint_id)
        self.checkpoint_id = str(checkpoint_id)

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if self._drained is not None:
            assert self._durable is not None
            step = self._durable.step_of(str(self.checkpoint_id))
            assert step is not None
            md = self._durable.metadata(step)
            md.storage_meta = md.storage_meta or StorageMeta()
            md.storage_meta.load_id = getattr(self._drained, "load_id", None)
            return md
        if self._where is None:
            raise MemckptError("MemoryStorageReader needs a checkpoint id")
        base, job, step = self._where
        rt = self._runtime = NodeRuntime.hold(base, job, self._settings, reading=True)
        txn = self._txn = LoadTransaction(rt, step, on_world_size_mismatch="allow")
        plan = txn.plan()
        if plan.step is None:
            raise CheckpointNotFoundError(
                f"memory checkpoint {self.checkpoint_id} cannot be loaded: "
                f"{plan.skipped.get(step, 'no rank holds it')}; "
                "latest_checkpoint(base_dir, job_id) names the newest one that can"
            )
        manifest = rt.ensure_manifest(plan)
        self._locator = txn.locator()
        return self.step_metadata(manifest)

    def step_metadata(self, manifest: StepManifest) -> Metadata:
        """DCP's metadata of the step, from its manifest (an adapter may assemble it otherwise)."""
        return _load_metadata(manifest, str(self.checkpoint_id))

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any,
                              **kwargs: Any) -> None:  # fmt: skip
        self._metadata = metadata
        if self._drained is not None:
            self._drained.set_up_storage_reader(metadata, is_coordinator, *args, **kwargs)

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        if self._drained is not None:  # bytes items pass a weights-only load first
            where = str(self.checkpoint_id)
            checked = _WeightsOnlyBytes(
                planner, lambda fqn, raw: self._check_item(f"{where}: bytes item {fqn!r}", raw)
            )
            return self._drained.read_data(plan, checked)  # type: ignore[arg-type]
        storage: Mapping[MetadataIndex, tuple[int, str]] = self._metadata.storage_data
        by_rank: dict[int, list[ReadItem]] = {}
        for item in plan.items:
            rank, _ = storage[item.storage_index]
            by_rank.setdefault(rank, []).append(item)
        assert self._locator is not None
        for rank, items in sorted(by_rank.items()):
            names = {storage[i.storage_index][1] for i in items}
            # an item that is a whole stored tensor lands straight in its destination
            direct: dict[str, torch.Tensor] = {}
            targets: dict[int, torch.Tensor] = {}
            for i, item in enumerate(items):
                if item.type == LoadItemType.BYTE_IO:
                    continue
                target = planner.resolve_tensor(item).detach()
                targets[i] = target
                name = storage[item.storage_index][1]
                if (
                    not any(item.storage_offsets)
                    and name not in direct
                    and is_plain_cpu(target)
                    and tuple(target.shape) == tuple(item.lengths)
                ):
                    direct[name] = target
            values, _ = self._locator.read(
                rank, lambda src, n=names, d=direct: _read_values(src, n, self.threads, d)
            )
            for i, item in enumerate(items):
                name = storage[item.storage_index][1]
                value = values[name]
                if item.type == LoadItemType.BYTE_IO:
                    self._check_bytes(item.storage_index.fqn, rank, value)
                    planner.load_bytes(item, io.BytesIO(value))
                    continue
                target = targets[i]
                if value is not target:  # not read in place: copy the region
                    src = value
                    for dim, (off, length) in enumerate(zip(item.storage_offsets, item.lengths)):
                        src = src.narrow(dim, off, length)
                    if target.size() != src.size():
                        raise CorruptCheckpointError(
                            f"{self.checkpoint_id}: {item.storage_index.fqn} region is "
                            f"{tuple(src.size())}, the planner expects {tuple(target.size())}"
                        )
                    target.copy_(src)
                planner.commit_tensor(item, target)
        assert self._txn is not None
        self._txn.restore_copies()
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut

    def _check_bytes(self, fqn: str, rank: int, value: bytes) -> None:
        """Refuse a bytes item that a weights-only load refuses, before any planner reads it.

        DCP's planners unpickle bytes items with ``torch.load(weights_only=False)``.
        """
        self._check_item(f"{self.checkpoint_id}: bytes item {fqn!r} of rank {rank}", value)

    def _check_item(self, where: str, value: bytes) -> None:
        if not self._weights_only:
            return
        try:
            with torch.serialization.safe_globals(list(self.safe_globals)):
                torch.load(io.BytesIO(value), weights_only=True, map_location="cpu")
        except pickle.UnpicklingError as e:
            raise UnsupportedValueError(
                f"{where} was not loaded: a weights-only load refuses it "
                f"({_weights_only_reason(e)}). Checkpoint bytes never run code on load; if "
                f"you trust this checkpoint, name what it may build: {self._OPT_IN}"
            ) from None
        except Exception as e:
            raise CorruptCheckpointError(
                f"{where} is not a torch.save payload ({type(e).__name__}: {e})"
            ) from e

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return MemoryStorageWriter.validate_checkpoint_id(checkpoint_id)


def _weights_only_reason(error: pickle.UnpicklingError) -> str:
    """The line of torch's weights-only refusal that says what was refused."""
    text = str(error)
    found = re.search(r"WeightsUnpickler error: (.*?)(?: Please use|\n|$)", text)
    return (found.group(1) if found else text.splitlines()[0] if text else "refused").strip()


def _read_values(
    src: ObjectSource,
    names: Iterable[str],
    threads: int,
    into: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """The named tensors (read and verified) and byte values of one object.

    A tensor named in ``into`` whose dtype and shape match is read straight into that
    tensor (one pass, verified chunk by chunk); others into new tensors.
    """
    wanted = set(names)
    entries = {e.name: e for e in src.index.tensors}
    targets: list[tuple[TensorEntry, memoryview]] = []
    out: dict[str, Any] = {}
    for name in wanted & entries.keys():
        e = entries[name]
        t = (into or {}).get(name)
        if t is None or t.dtype != e.torch_dtype or tuple(t.shape) != e.shape:
            t = torch.empty(e.shape, dtype=e.torch_dtype)
        out[name] = t
        targets.append((e, tensor_memoryview(t)))
    damage = src.read_all(targets, threads) if targets else []
    if damage:
        shown = ", ".join(str(d) for d in damage[:5])
        raise DataDamagedError(f"{src.where}: checksum mismatch in {shown}")
    rest = wanted - entries.keys()
    if rest:
        empty = torch.empty(0)
        skeleton = restore_state_dict(src.skeleton, lambda i: empty, where=src.where)
        for name in rest:
            if not isinstance(skeleton, dict) or name not in skeleton:
                raise CorruptCheckpointError(f"{src.where}: no item {name!r}")
            out[name] = skeleton[name]
    return out


# -- export and drain ------------------------------------------------------------------------


def complete_steps(directory: str | os.PathLike[str]) -> tuple[list[int], list[int]]:
    """(every ``step-<N>`` directory under ``directory``, the complete ones), sorted.

    The one rule for persistent DCP directories: complete once ``.metadata`` is there.
    """
    root = Path(directory)
    present, complete = [], []
    for entry in real_subdirs(root):  # a symlinked step is never listed, read or deleted
        step = ids.parse_step_dir(entry.name)
        if step is None:
            continue
        present.append(step)
        meta = Path(entry.path) / DCP_METADATA_FILE
        if meta.is_file() and not meta.is_symlink():
            complete.append(step)
    return sorted(present), sorted(complete)


def prune_steps(directory: str | os.PathLike[str], keep_last: int) -> list[int]:
    """Delete complete ``step-<N>`` DCP directories older than the newest ``keep_last``.

    The engine's retention policy decides (``memckpt.storage.retention``). ``.metadata``
    goes first, so a directory being deleted never looks complete; incomplete ones (a
    save in progress, or a crashed one) are left alone. Returns the deleted steps.
    """
    from memckpt.storage.retention import plan_retention

    root = Path(directory)
    present, complete = complete_steps(root)
    doomed = [s for s in plan_retention(present, complete, keep_last=keep_last).delete
              if s in complete]  # fmt: skip
    for step in doomed:
        path = root / ids.step_dir_name(step)
        (path / DCP_METADATA_FILE).unlink(missing_ok=True)
        remove_entry(path)
    if doomed:
        log.info("deleted DCP steps %s under %s", doomed, root)
    return doomed


def export(
    cid: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    *,
    sources: Sequence[str | os.PathLike[str]] = (),
) -> Path:
    """Write a memory checkpoint as a plain DCP directory at ``dest`` (not collective).

    Every rank's object must be readable from ``cid``'s node tree or from the other node
    base directories in ``sources``. The result loads with ``dcp.FileSystemReader`` in a
    process that never imports memckpt. ``.metadata`` is written last, so a partial
    export never looks loadable.
    """
    base, job, step = parse_checkpoint_id(cid)
    layouts = [ids.JobLayout(b, job) for b in (base, *sources)]
    manifest = None
    for lay in layouts:
        manifest = load_step_manifest(lay, step)  # the one rule: this job, this step
        if manifest is not None:
            break
    if manifest is None:
        raise CheckpointNotFoundError(f"{cid}: no step manifest here (not committed?)")
    md = _load_metadata(manifest, str(cid))
    out = Path(dest)
    out.mkdir(parents=True, exist_ok=True)
    (out / ".metadata").unlink(missing_ok=True)
    storage: dict[MetadataIndex, Any] = {}
    by_rank: dict[int, list[tuple[MetadataIndex, str]]] = {}
    for idx, (r, name) in md.storage_data.items():
        by_rank.setdefault(r, []).append((idx, name))
    for r in range(manifest.world_size):
        path = find_object_offline(layouts, step, r, manifest.objects[r].digest)
        items = by_rank.get(r, [])
        with ObjectReader(path) as reader:
            values = _read_values(reader, {n for _, n in items}, 2)
        storage.update(_write_rank_file(out, r, items, values))
    md.storage_data = storage
    _write_metadata(out, md)
    log.info("exported %s to %s (%d ranks)", cid, out, manifest.world_size)
    return out


def _rank_file(rank: int) -> str:
    """A rank's file in a DCP directory, as DCP's FileSystemWriter names it."""
    return f"__{rank}_0.distcp"


class _DigestWriter:
    """Writes through to ``out``, counting the bytes and their xxh3-64 digest."""

    def __init__(self, out: Any) -> None:
        self.out, self.size, self.hash = out, 0, xxhash.xxh3_64()

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.out.write(view)
        self.hash.update(view)
        self.size += view.nbytes
        return view.nbytes

    def flush(self) -> None:
        self.out.flush()


def _write_items(
    out: _DigestWriter,
    name: str,
    items: Sequence[tuple[MetadataIndex, str]],
    value_of: Callable[[str], Any],
) -> dict[MetadataIndex, Any]:
    """Write ``items`` as DCP's rank file ``name`` does (a tensor by ``torch.save``, bytes
    as they are); returns each item's storage info."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    storage = {}
    for idx, stored in items:
        v = value_of(stored)
        offset = out.size
        if isinstance(v, torch.Tensor):
            torch.save(v, out)
        else:
            out.write(v)
        storage[idx] = _StorageInfo(name, offset, out.size - offset)
    return storage


def _write_rank_file(
    out: Path, rank: int, items: Sequence[tuple[MetadataIndex, str]], values: Mapping[str, Any]
) -> dict[MetadataIndex, Any]:
    name = _rank_file(rank)
    tmp = out / f".{name}.tmp"
    with open(tmp, "wb") as f:
        storage = _write_items(_DigestWriter(f), name, items, values.__getitem__)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out / name)
    return storage


def _metadata_bytes(md: Metadata) -> bytes:
    from torch.distributed.checkpoint.filesystem import CURRENT_DCP_VERSION

    md.version = CURRENT_DCP_VERSION
    return pickle.dumps(md)


def _write_metadata(out: Path, md: Metadata) -> None:
    tmp = out / ".metadata.tmp"
    with open(tmp, "wb") as f:
        f.write(_metadata_bytes(md))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out / ".metadata")


def _schedule_drain(rt: NodeRuntime, step: int, persist_dir: Path, coordinator: bool) -> None:
    """Write this rank's part of ``step`` to ``persist_dir/step-<N>`` in the background.

    Every rank writes ``__<rank>_0.distcp`` and a small index beside it; the coordinator
    then waits for every rank's index and writes ``.metadata`` last, so the directory
    is a plain DCP checkpoint once it is loadable (``memckpt.engine.drain``).
    """
    dest = persist_dir / ids.step_dir_name(step)
    if not any(getattr(c, "persist_dir", None) == persist_dir for c in rt.persisted):
        rt.persisted.append(_DrainedTo(persist_dir))

    def drain() -> None:
        manifest = rt.store.manifest(step)
        if manifest is None:
            raise CheckpointNotFoundError(f"step {step} has no manifest on this node")
        md = _load_metadata(manifest, f"step {step}")
        mine = [(i, n) for i, (r, n) in md.storage_data.items() if r == rt.rank]
        dest.mkdir(parents=True, exist_ok=True)
        with ObjectReader(rt.store.object_path(step, rt.rank)) as reader:
            values = _read_values(reader, {n for _, n in mine}, 2)
        info = _write_rank_file(dest, rt.rank, mine, values)
        idx = _index_rows(info)
        tmp = dest / f".__{rt.rank}_0.index.tmp"
        tmp.write_text(json.dumps(idx))
        os.replace(tmp, dest / f".__{rt.rank}_0.index")
        if coordinator:
            _finish_drain(dest, md, manifest.world_size)

    schedule_drain(
        rt.engine, step, drain, str(dest), committed=lambda: _DrainedTo(persist_dir)(step)
    )


@dataclass(frozen=True)
class _DrainedTo:
    """Whether a step is complete (``.metadata`` written last) in a drain's directory."""

    persist_dir: Path

    def __call__(self, step: int) -> bool:
        return step in complete_steps(self.persist_dir)[1]


def _finish_drain(dest: Path, md: Metadata, world_size: int) -> None:
    parts = [dest / f".__{r}_0.index" for r in range(world_size)]
    wait_for_parts(parts)
    md.storage_data = _storage_of(json.loads(p.read_text()) for p in parts)
    _write_metadata(dest, md)


def _index_rows(storage: Mapping[MetadataIndex, Any]) -> list[list[Any]]:
    """A rank file's storage infos as JSON rows: [item key, file, offset, length]."""
    return [[item_key(i), v.relative_path, v.offset, v.length] for i, v in storage.items()]


def _storage_of(row_lists: Iterable[Iterable[Sequence[Any]]]) -> dict[MetadataIndex, Any]:
    """DCP's storage data (item -> ``_StorageInfo``) of every rank's ``_index_rows``."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    storage: dict[MetadataIndex, Any] = {}
    for rows in row_lists:
        for key, rel, off, length in rows:
            storage[_index(key)] = _StorageInfo(rel, off, length)
    return storage


# -- drains to an object store, and reading drained steps ------------------------------------

_READ_BLOCK = 16 << 20


def _check_persist_options(where: Path | str | None, options: Mapping[str, Any] | None) -> None:
    if options is not None and not isinstance(where, str):
        raise ConfigError("persist_options apply to a persist_dir URL (s3://..., gs://...)")


class _RemoteDcpSteps(RemoteTier):
    """DCP steps at a URL, as ``dcp.load`` reads them: ``<url>/step-<N>/``.

    A drain of a step (``RemoteDrain``: each rank, then the coordinator):

    1. each rank removes the step's ``.metadata`` (a re-save of a step is invisible while
       its files are rewritten), streams its ``__<rank>_0.distcp`` to the store, reads it
       back and checks its size and xxh3-64 digest against what it wrote, then uploads
       ``.__<rank>_0.index`` (that size and digest, the file's items, and which save of
       the step it is: the memory manifest's checksum), read back too;
    2. the coordinator waits for every rank's index of this save and its file of that
       size, builds DCP's ``.metadata`` from the indexes, uploads it last and reads it back.

    A step without ``.metadata`` does not exist (``persisted_steps``); older ones are
    removed by the next drain (``clean_leftovers``).
    """

    marker = DCP_METADATA_FILE

    def __init__(self, url: str, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(url, None, options)

    def part_name(self, rank: int) -> str:
        return _rank_file(rank)

    def file_path(self, step: int, name: str) -> str:
        return f"{self.step_path(step)}/{name}"

    def upload_part(self, store: CheckpointStore, manifest: StepManifest) -> None:
        step, rank = manifest.step, store.rank
        where, name = self.where(step, rank), self.part_name(rank)
        md = _load_metadata(manifest, self.where(step))
        mine = [(i, n) for i, (r, n) in md.storage_data.items() if r == rank]
        marker = self.file_path(step, self.marker)
        if self.fs.exists(marker):
            self.fs.rm_file(marker)
        path = self.file_path(step, name)
        with ObjectReader(store.object_path(step, rank)) as reader:
            value_of = _one_value_at_a_time(reader, {n for _, n in mine})
            with self.fs.open(path, "wb") as f:
                out = _DigestWriter(f)
                storage = _write_items(out, name, mine, value_of)
        digest = out.hash.intdigest()
        self._verify_file(path, where, out.size, digest)
        index = {"save": manifest.checksum, "size": out.size, "xxh3_64": digest,
                 "items": _index_rows(storage)}  # fmt: skip
        self._put_verified(self.file_path(step, _drain_index(rank)), json.dumps(index).encode(),
                           f"{where} index")  # fmt: skip

    def has_part(self, manifest: StepManifest, rank: int) -> bool:
        index = self._index(manifest, rank)
        if index is None:
            return False
        path = self.file_path(manifest.step, self.part_name(rank))
        self.fs.invalidate_cache(path)
        try:
            return bool(int(self.fs.info(path)["size"]) == index["size"])
        except FileNotFoundError:
            return False

    def commit(self, manifest: StepManifest) -> None:
        step = manifest.step
        md = _load_metadata(manifest, self.where(step))
        rows = []
        for r in sorted(manifest.objects):
            index = self._index(manifest, r)
            if index is None:
                raise CorruptCheckpointError(f"{self.where(step, r)}: its index is gone")
            rows.append(index["items"])
        md.storage_data = _storage_of(rows)
        self._put_verified(self.file_path(step, self.marker), _metadata_bytes(md),
                           f"{self.where(step)}/{self.marker}")  # fmt: skip

    def committed(self, step: int) -> bool:
        path = self.file_path(step, self.marker)
        self.fs.invalidate_cache(path)
        return bool(self.fs.exists(path))

    def metadata_bytes(self, step: int) -> bytes:
        return bytes(self.fs.cat_file(self.file_path(step, self.marker)))

    def _index(self, manifest: StepManifest, rank: int) -> dict[str, Any] | None:
        """``rank``'s index of this save of the step; None when not (yet) there."""
        path = self.file_path(manifest.step, _drain_index(rank))
        self.fs.invalidate_cache(path)
        try:
            index = json.loads(self.fs.cat_file(path))
        except FileNotFoundError:
            return None
        except ValueError as e:
            log.debug("%s: not an index (%s)", path, e)
            return None
        if not isinstance(index, dict) or index.get("save") != manifest.checksum:
            return None  # left by another save of this step
        return index

    def _put_verified(self, path: str, raw: bytes, where: str) -> None:
        self.fs.pipe_file(path, raw)
        self.fs.invalidate_cache(path)
        if bytes(self.fs.cat_file(path)) != raw:
            raise CorruptCheckpointError(f"{where}: the stored file is not the one uploaded")

    def _verify_file(self, path: str, where: str, size: int, digest: int) -> None:
        """Read the stored file back: its size and xxh3-64 digest must be what was written."""
        self.fs.invalidate_cache(path)
        h, got = xxhash.xxh3_64(), 0
        with self.fs.open(path, "rb") as f:
            while block := f.read(_READ_BLOCK):
                h.update(block)
                got += len(block)
        if got != size or h.intdigest() != digest:
            raise CorruptCheckpointError(
                f"{where}: the stored file ({got} bytes, digest {h.intdigest():#x}) is not "
                f"the one uploaded ({size} bytes, digest {digest:#x})"
            )


def _drain_index(rank: int) -> str:
    return f".__{rank}_0.index"


def _one_value_at_a_time(reader: ObjectReader, names: set[str]) -> Callable[[str], Any]:
    """``value_of(name)`` for ``_write_items``: bytes items read at once (small), each tensor
    when asked for, so a drain holds one tensor in memory, not the rank's state."""
    tensors = {e.name for e in reader.index.tensors}
    others = _read_values(reader, names - tensors, 2) if names - tensors else {}

    def value_of(name: str) -> Any:
        return others[name] if name in others else _read_values(reader, {name}, 2)[name]

    return value_of


@dataclass(frozen=True)
class _DrainedToStore:
    """Whether a step is persisted at a URL (for ``close(release_memory=True)``), and the
    runtime's one drain to it (its circuit and lag outlive the writers, one per save)."""

    tier: _RemoteDcpSteps
    drain: RemoteDrain

    def __call__(self, step: int) -> bool:
        try:
            return self.tier.committed(step)
        except (OSError, MemckptError) as e:
            log.warning("cannot tell whether step %d is in %s: %s", step, self.tier.where(), e)
            return False


def _remote_drain(
    rt: NodeRuntime, url: str, options: Mapping[str, Any] | None, policy: DrainPolicy | None
) -> RemoteDrain:
    """The runtime's drain to ``url`` (made by the first writer that drains there)."""
    for check in rt.persisted:
        if isinstance(check, _DrainedToStore) and check.tier.url == url:
            return check.drain
    tier = _RemoteDcpSteps(url, options)
    found = _DrainedToStore(tier, RemoteDrain(rt.engine, tier, policy))
    rt.persisted.append(found)
    return found.drain


class _WeightsOnlyBytes:
    """``planner`` for DCP's own readers, except that each bytes item is first checked
    (``check(fqn, raw)``) before the planner unpickles it."""

    def __init__(self, planner: LoadPlanner, check: Callable[[str, bytes], None]) -> None:
        self._planner, self._check = planner, check

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        self._check(read_item.storage_index.fqn, value.getvalue())
        self._planner.load_bytes(read_item, value)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._planner, name)


@dataclass(frozen=True)
class _Durable:
    """The DCP steps drained to a ``persist_dir``: a local directory or a URL."""

    where: Path | str
    options: Mapping[str, Any] | None

    @classmethod
    def of(
        cls, persist_dir: str | os.PathLike[str] | None, options: Mapping[str, Any] | None
    ) -> _Durable | None:
        """None without a ``persist_dir``; ConfigError for a scheme unknown or not installed."""
        where = check_persist(None, persist_dir)
        _check_persist_options(where, options)
        return None if where is None else cls(where, dict(options or {}))

    def tier(self) -> _RemoteDcpSteps:
        assert isinstance(self.where, str)
        return _RemoteDcpSteps(self.where, self.options)

    def steps(self) -> list[int]:
        """The complete (``.metadata`` there) steps, sorted."""
        if isinstance(self.where, Path):
            return complete_steps(self.where)[1]
        return self.tier().persisted_steps()

    def step_id(self, step: int) -> str:
        if isinstance(self.where, Path):
            return str(self.where / ids.step_dir_name(step))
        return f"{self.where}/{ids.step_dir_name(step)}"

    def step_of(self, cid: str | os.PathLike[str]) -> int | None:
        """The step ``cid`` names in this ``persist_dir``; None when it is not one of its steps."""
        if isinstance(self.where, Path):
            p = Path(cid)
            inside = os.path.abspath(p.parent) == os.path.abspath(self.where)
            return ids.parse_step_dir(p.name) if inside else None
        parent, _, name = str(cid).rstrip("/").rpartition("/")
        return ids.parse_step_dir(name) if parent == self.where else None

    def reader(self, step: int) -> StorageReader:
        """DCP's own reader of the step (it reads the files; ``metadata`` reads ``.metadata``)."""
        from torch.distributed.checkpoint import FileSystemReader

        if isinstance(self.where, Path):
            return FileSystemReader(self.step_id(step))
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

        return FsspecReader(self.step_id(step), **dict(self.options or {}))

    def metadata(self, step: int) -> Metadata:
        """The step's ``.metadata``, through memckpt's restricted unpickler."""
        from torch.distributed.checkpoint.filesystem import _StorageInfo

        where = self.step_id(step)
        try:
            if isinstance(self.where, Path):
                fd = open_regular(Path(where) / DCP_METADATA_FILE, "DCP metadata")
                if fd is None:
                    raise FileNotFoundError(f"{where}/{DCP_METADATA_FILE}")
                with os.fdopen(fd, "rb") as f:
                    raw = f.read()
            else:
                raw = self.tier().metadata_bytes(step)
        except FileNotFoundError:
            raise CheckpointNotFoundError(
                f"{where}: no {DCP_METADATA_FILE} (not drained completely); "
                "latest_checkpoint(..., persist_dir=...) names the newest complete step"
            ) from None
        md = restore_state_dict(raw, _no_tensors(where), (*_METADATA_GLOBALS, _StorageInfo),
                                where=f"{where}/{DCP_METADATA_FILE}")  # fmt: skip
        if not isinstance(md, Metadata) or not isinstance(md.storage_data, dict):
            raise CorruptCheckpointError(f"{where}/{DCP_METADATA_FILE} is not DCP metadata")
        return md
