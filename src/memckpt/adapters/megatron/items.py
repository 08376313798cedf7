"""A rank's Megatron sharded state dict as DCP items, and DCP's metadata from every rank's.

Megatron's torch_dist strategy turns ShardedTensors and ShardedObjects into DCP's
state dict (``mcore_to_pyt_state_dict``) and plans it with ``MCoreSavePlanner``. We do
the same, but locally and with no collective: each rank records the chunks it wrote
(a small JSON list, one manifest blob per rank), and a load assembles DCP's
``Metadata`` from every rank's list. The commit vote carries the lists, so every node
can plan a load, resharding included.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from megatron.core.dist_checkpointing.mapping import ShardedStateDict
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import WriteItemType

from memckpt.adapters.dcp import item_key
from memckpt.errors import CorruptCheckpointError
from memckpt.storage.manifest import StepManifest

__all__ = ["CHUNKS_BLOB", "rank_items", "step_metadata"]

CHUNKS_BLOB = "megatron.chunks.{rank}"
"""Manifest blob: JSON list of what one rank wrote, ``[fqn]`` for a sharded object's
bytes, ``[fqn, offsets, sizes, global_shape, dtype]`` for a tensor chunk."""


def rank_items(sharded_state_dict: ShardedStateDict, rank: int) -> tuple[dict[str, Any], bytes]:
    """(storage key -> tensor or bytes, this rank's chunk list) for a save; no collective.

    Only main replicas are written (``replica_id`` all zero), as torch_dist does by
    default; tensors are the caller's own (not copied).
    """
    flat, _, _ = _replace_state_dict_keys_with_sharded_keys(
        sharded_state_dict, keep_only_main_replica=True
    )
    pyt_state_dict = mcore_to_pyt_state_dict(flat, is_loading=False)
    planner = MCoreSavePlanner(dedup_replicated_tensors=False, flatten_state_dict=False)
    planner.set_up_planner(pyt_state_dict, is_coordinator=rank == 0)
    plan = planner.create_local_plan()
    items: dict[str, Any] = {}
    chunks: list[list[Any]] = []
    for item in plan.items:
        data = planner.resolve_data(item)
        key = item_key(item.index)
        if item.type == WriteItemType.BYTE_IO:
            items[key] = bytes(data.getbuffer())
            chunks.append([item.index.fqn])
            continue
        td = item.tensor_data
        assert td is not None
        items[key] = data.detach()
        chunks.append([item.index.fqn, list(td.chunk.offsets), list(td.chunk.sizes),
                       list(td.size), str(td.properties.dtype)])  # fmt: skip
    return items, json.dumps(chunks).encode()


def _dtype(name: Any, where: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype):
        raise CorruptCheckpointError(f"{where}: unknown dtype {name!r}")
    return dtype


def _ints(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, int) and x >= 0 for x in v)


def step_metadata(manifest: StepManifest, where: str) -> Metadata:
    """DCP's ``Metadata`` (without storage data) of a step, from every rank's chunk list."""
    tensors: dict[str, TensorStorageMetadata] = {}
    objects: set[str] = set()
    for rank in range(manifest.world_size):
        raw = manifest.blobs.get(CHUNKS_BLOB.format(rank=rank))
        if raw is None:
            raise CorruptCheckpointError(
                f"{where}: the step manifest has no chunk list of rank {rank}; it was not "
                "saved by memckpt's Megatron save strategy"
            )
        try:
            entries = json.loads(raw)
        except ValueError as e:
            raise CorruptCheckpointError(f"{where}: chunk list of rank {rank}: {e}") from None
        if not isinstance(entries, list):
            raise CorruptCheckpointError(f"{where}: chunk list of rank {rank} is not a list")
        for e in entries:
            _add(e, tensors, objects, f"{where} (rank {rank})")
    clash = objects & tensors.keys()
    if clash:
        raise CorruptCheckpointError(f"{where}: {sorted(clash)[:3]} are both tensors and objects")
    md: dict[str, Any] = {fqn: BytesStorageMetadata() for fqn in objects}
    for fqn, t in tensors.items():
        t.chunks.sort(key=lambda c: tuple(c.offsets))
        md[fqn] = t
    return Metadata(state_dict_metadata=md)


def _add(e: Any, tensors: dict[str, TensorStorageMetadata], objects: set[str], where: str) -> None:
    if isinstance(e, list) and len(e) == 1 and isinstance(e[0], str):
        objects.add(e[0])
        return
    if not (isinstance(e, list) and len(e) == 5 and isinstance(e[0], str)
            and all(_ints(x) for x in e[1:4])):  # fmt: skip
        raise CorruptCheckpointError(f"{where}: malformed chunk entry {str(e)[:120]}")
    fqn, offsets, sizes, shape, dtype_name = e
    dtype = _dtype(dtype_name, where)
    if not (len(offsets) == len(sizes) == len(shape)) or any(
        o + s > n for o, s, n in zip(offsets, sizes, shape)
    ):
        raise CorruptCheckpointError(
            f"{where}: chunk of {fqn!r} at {offsets} size {sizes} does not fit in {shape}"
        )
    t = tensors.get(fqn)
    if t is None:
        t = tensors[fqn] = TensorStorageMetadata(
            TensorProperties(dtype=dtype), torch.Size(shape), []
        )
    elif t.properties.dtype != dtype or list(t.size) != shape:
        raise CorruptCheckpointError(
            f"{where}: {fqn!r} is {t.properties.dtype} {list(t.size)} in one rank's list "
            f"and {dtype} {shape} in another's"
        )
    t.chunks.append(ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes)))
