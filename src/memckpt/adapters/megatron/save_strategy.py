"""The async save strategy: Megatron's ``dist_checkpointing.save`` into memckpt's memory tier.

Call sequence of one save, on every rank (``async_save``, then Megatron's queue)::

    caller   async_save: Megatron's ShardedTensors and ShardedObjects become this rank's
             DCP items (no collective) -> memckpt save transaction: staged into the
             rank's pre-faulted tmpfs buffer (the only blocking part) -> AsyncRequest
    engine   (memckpt's save worker thread) checksums, local commit, replication,
             commit vote on memckpt's gloo group; every ballot carries the rank's chunk
             list, rank 0's also common.pt and metadata.json -> every node writes the
             step manifest, then those two files into its step directory -> signal file
    async_fn (Megatron's forked or spawned checkpoint process) waits for the signal file:
             no threads, no CUDA, no collective, so it is safe after fork
    finalize (every rank, from ``maybe_finalize_async_calls``) waits for the save and
             raises its error: a failed vote fails the step on every rank
"""

from __future__ import annotations

import functools
import json
import logging
import os

from megatron.core.dist_checkpointing.mapping import ShardedStateDict
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncRequest
from megatron.core.dist_checkpointing.strategies.base import AsyncSaveShardedStrategy

from memckpt.adapters.dcp import KEYS_BLOB, parse_checkpoint_id
from memckpt.adapters.megatron.files import (
    BACKEND,
    BACKEND_VERSION,
    COMMON_BLOB,
    CONFIG_BLOB,
    config_bytes,
    read_common_file,
    write_step_files,
)
from memckpt.adapters.megatron.items import CHUNKS_BLOB, rank_items
from memckpt.engine.async_bridge import AsyncSaveBridge, bridge_async_save
from memckpt.engine.handle import SaveHandle
from memckpt.engine.runtime import NodeRuntime, RuntimeSettings
from memckpt.errors import CheckpointNotFoundError
from memckpt.storage.statedict import flatten_state_dict

__all__ = ["MemoryAsyncSaveStrategy"]

log = logging.getLogger(__name__)


class MemoryAsyncSaveStrategy(AsyncSaveShardedStrategy):
    """Megatron async save strategy writing memckpt memory checkpoints (see the module).

    ``checkpoint_dir`` must be a memckpt checkpoint id, ``<base>/<job>/step-<N>``
    (``memckpt.adapters.megatron.checkpoint_id``). Options are those of
    ``MemoryStorageWriter``; they configure the job's node runtime the first time it
    opens in the process and must agree afterwards when given.
    """

    def __init__(
        self,
        *,
        replication: str | None = None,
        node_id: str | None = None,
        secret: bytes | None = None,
        keep_last: int | None = None,
        timeout_s: float | None = None,
        transfer_timeout_s: float | None = None,
        limit_bytes: int | None = None,
    ) -> None:
        super().__init__(BACKEND, BACKEND_VERSION)
        self._settings = RuntimeSettings(replication, node_id, secret, keep_last, timeout_s,
                                         transfer_timeout_s, limit_bytes)  # fmt: skip

    @property
    def can_handle_sharded_objects(self) -> bool:
        return True

    def runtime(self, checkpoint_dir: str | os.PathLike[str]) -> NodeRuntime:
        """The node runtime of ``checkpoint_dir``'s job (opened, collectively, on first use)."""
        base, job, _ = parse_checkpoint_id(checkpoint_dir)
        return NodeRuntime.hold(base, job, self._settings)

    def async_save(
        self,
        sharded_state_dict: ShardedStateDict,
        checkpoint_dir: str | os.PathLike[str],
        *,
        common_state: bytes | None = None,
    ) -> AsyncRequest:
        """Stage this rank's part of the step and return the request that completes it.

        Blocks for the staging copy only. ``common_state``: the serialized common state
        dict (``memckpt.adapters.megatron.save`` passes it); without it, rank 0 takes the
        ``common.pt`` that ``dist_checkpointing.save`` has just written there.
        """
        _, _, step = parse_checkpoint_id(checkpoint_dir)
        rt = self.runtime(checkpoint_dir)
        items, chunks = rank_items(sharded_state_dict, rt.rank)
        flat = flatten_state_dict(items)
        # a tensor two items share is stored once: record which stored name holds each key
        stored = {id(t): n for n, t in zip(flat.names, flat.tensors)}
        keys = {k: stored.get(id(v)) if not isinstance(v, bytes) else None
                for k, v in items.items()}  # fmt: skip
        blobs = {KEYS_BLOB.format(rank=rt.rank): json.dumps(keys).encode(),
                 CHUNKS_BLOB.format(rank=rt.rank): chunks}  # fmt: skip
        if rt.rank == 0:
            blobs[CONFIG_BLOB] = config_bytes(self.backend, self.version)
            common = common_state if common_state is not None else read_common_file(checkpoint_dir)
            if common is not None:
                blobs[COMMON_BLOB] = common
        bridge = bridge_async_save(
            rt,
            step,
            lambda: rt.engine.save(step, None, flat=flat, blobs=blobs, blocking=False),
            after=functools.partial(_write_files, rt, step),
        )
        return AsyncRequest(bridge.signal, (), [functools.partial(_finalize, bridge)])


def _write_files(rt: NodeRuntime, step: int, handle: SaveHandle) -> None:
    """After the commit, before the signal: Megatron's common.pt and metadata.json."""
    manifest = rt.store.manifest(step)
    if manifest is None:
        raise CheckpointNotFoundError(
            f"rank {rt.rank}: step {step} committed but its manifest is not in "
            f"{rt.store.step_dir(step)}"
        )
    write_step_files(rt.store.step_dir(step), manifest, f"{rt.rank}.{os.getpid()}")


def _finalize(bridge: AsyncSaveBridge) -> None:
    """Megatron's finalize function: wait for the save, raise its error."""
    result = bridge.finalize()
    log.debug("rank %d: megatron step %d in memory (%.3fs blocking, %.3fs total)",
              bridge.rank, bridge.step, result.blocking_s, result.total_s)  # fmt: skip
