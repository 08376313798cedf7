"""Save and find memory checkpoints the way a Megatron-LM training script does.

``save`` is ``dist_checkpointing.save`` for memory checkpoints: the same steps, but
the common state dict and ``metadata.json`` travel in the step manifest to every
node instead of being written on global rank 0 only. ``latest_checkpoint`` picks the
newest complete memory checkpoint and prepares it on every node, or returns None so
the caller falls back to its regular strategy and path.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core.dist_checkpointing.mapping import CommonStateDict, ShardedStateDict, StateDict
from megatron.core.dist_checkpointing.serialization import _CONTENT_METADATA_KEY
from megatron.core.dist_checkpointing.state_dict_utils import save_preprocess
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncRequest

from memckpt.adapters.dcp import checkpoint_id, parse_checkpoint_id
from memckpt.adapters.megatron.files import CONFIG_BLOB, write_step_files
from memckpt.adapters.megatron.save_strategy import MemoryAsyncSaveStrategy
from memckpt.engine.load_transaction import LoadTransaction
from memckpt.engine.recovery_plan import plan_recovery
from memckpt.engine.runtime import NodeRuntime, RuntimeSettings
from memckpt.errors import CheckpointNotFoundError
from memckpt.storage.inventory import Inventory

__all__ = ["latest_checkpoint", "prepare_checkpoint", "save"]


def save(
    sharded_state_dict: ShardedStateDict,
    checkpoint_dir: str | os.PathLike[str],
    sharded_strategy: MemoryAsyncSaveStrategy,
    *,
    async_sharded_save: bool = True,
    validate_access_integrity: bool = True,
    preprocess_common_before_consistancy_check: Callable[[CommonStateDict], StateDict]
    | None = None,
    content_metadata: dict[str, Any] | None = None,
) -> AsyncRequest | None:
    """``dist_checkpointing.save`` into memory, with common data on every node (every rank).

    ``checkpoint_dir`` is ``checkpoint_id(base, job, step)``. Returns the AsyncRequest to
    schedule with Megatron's ``AsyncCallsQueue`` (``async_sharded_save=True``), or None
    once the step is committed (``False``). The other arguments are Megatron's.
    """
    parse_checkpoint_id(checkpoint_dir)
    Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
    if content_metadata is not None:
        sharded_state_dict[_CONTENT_METADATA_KEY] = content_metadata
    sharded, common = save_preprocess(
        sharded_state_dict, validate_access_integrity, preprocess_common_before_consistancy_check
    )
    common_bytes = None
    if dist.get_rank() == 0:  # Megatron takes rank 0's (ranks' common states agree)
        buf = io.BytesIO()
        torch.save(common, buf)
        common_bytes = buf.getvalue()
    request = sharded_strategy.async_save(sharded, checkpoint_dir, common_state=common_bytes)
    if async_sharded_save:
        return request
    request.execute_sync()
    return None


def latest_checkpoint(
    base_dir: str | os.PathLike[str],
    job_id: str,
    *,
    replication: str | None = None,
    node_id: str | None = None,
    secret: bytes | None = None,
    keep_last: int | None = None,
    timeout_s: float | None = None,
    transfer_timeout_s: float | None = None,
    limit_bytes: int | None = None,
) -> str | None:
    """The newest complete memory checkpoint, ready to load on every node; or None.

    Collective: every rank calls it. Complete as ``CheckpointManager.latest`` defines
    it, whatever world size saved it. A node that lacks a complete step's manifest (a
    replaced one) gets it from a peer, for every complete step; then every node's step
    directories hold Megatron's ``common.pt`` and ``metadata.json``, so
    ``dist_checkpointing.load`` works there for the newest step and any older one.
    None: nothing complete in memory; load your regular checkpoint instead.

    The options are the save strategy's: this call opens the job's node runtime in the
    process, and the save strategy's options must agree with it later.
    """
    settings = RuntimeSettings(replication, node_id, secret, keep_last, timeout_s,
                               transfer_timeout_s, limit_bytes)  # fmt: skip
    return _prepare(base_dir, job_id, None, settings)


def prepare_checkpoint(
    base_dir: str | os.PathLike[str],
    job_id: str,
    step: int,
    *,
    replication: str | None = None,
    node_id: str | None = None,
    secret: bytes | None = None,
    timeout_s: float | None = None,
) -> str:
    """Make memory checkpoint ``step`` loadable on every node and return its id (collective).

    ``latest_checkpoint`` for a step you name: on a node that lost the step (a replaced
    one) its manifest and Megatron's ``common.pt`` and ``metadata.json`` come from a peer,
    so ``dist_checkpointing.load`` finds the directory there too; the data is read from
    wherever it is. CheckpointNotFoundError says why a step cannot be loaded.
    """
    settings = RuntimeSettings(replication=replication, node_id=node_id, secret=secret,
                               timeout_s=timeout_s)  # fmt: skip
    cid = _prepare(base_dir, job_id, step, settings)
    assert cid is not None
    return cid


def _prepare(
    base_dir: str | os.PathLike[str], job_id: str, step: int | None, settings: RuntimeSettings
) -> str | None:
    rt = NodeRuntime.hold(Path(base_dir), job_id, settings, reading=True)
    txn = LoadTransaction(rt, step, on_world_size_mismatch="allow")
    plan = txn.plan()
    _prepare_every_complete_step(rt, txn.inventories, skip=plan.step)
    if plan.step is None:
        if step is None:
            return None
        raise CheckpointNotFoundError(
            f"step {step} of job {job_id!r} cannot be loaded: "
            f"{plan.skipped.get(step, 'no rank holds it')}"
        )
    manifest = rt.ensure_manifest(plan)
    cid = checkpoint_id(base_dir, job_id, plan.step)
    if CONFIG_BLOB not in manifest.blobs:
        raise CheckpointNotFoundError(
            f"{cid}, the newest memory checkpoint of job {job_id!r}, was not saved by "
            "memckpt's Megatron save strategy (no metadata.json in its manifest); use a "
            "job id of its own for Megatron memory checkpoints"
        )
    write_step_files(rt.store.step_dir(plan.step), manifest, f"{rt.rank}.{os.getpid()}")
    return cid


def _prepare_every_complete_step(
    rt: NodeRuntime, inventories: list[Inventory], skip: int | None
) -> None:
    """Every complete Megatron step's directory on this node too (collective).

    ``dist_checkpointing.load`` checks the directory, ``common.pt`` and ``metadata.json``
    before a load strategy runs, so a replaced node gets them for every complete step
    (manifests are small): after ``latest_checkpoint`` any of them loads there by name.
    Every rank walks the same steps from the same inventories.
    """
    steps = sorted({s for inv in inventories for s in inv if s != skip}, reverse=True)
    for s in steps:
        plan = plan_recovery(inventories, rt.world_size, allow_fetch=True, step=s,
                             on_world_size_mismatch="allow")  # fmt: skip
        if plan.step is None:
            continue
        manifest = rt.ensure_manifest(plan)
        if CONFIG_BLOB in manifest.blobs:
            write_step_files(rt.store.step_dir(s), manifest, f"{rt.rank}.{os.getpid()}")
