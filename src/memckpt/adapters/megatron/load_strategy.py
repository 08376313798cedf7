"""The load strategy: Megatron's ``dist_checkpointing.load`` from memckpt's memory tier.

A load goes through memckpt's DCP reader with Megatron's own load planner, as the
torch_dist strategy does with its file reader: DCP decides which saved chunks each
rank reads (resharding when the parallel layout or the world size changed), and the
reader reads each from this node or from a peer that holds it, verifying every chunk.

Call sequence (every rank, inside ``dist_checkpointing.load``): DCP's local plan ->
``read_metadata`` (collective on memckpt's gloo group: inventories, the step's
manifest, DCP's metadata assembled from every saving rank's chunk list) -> DCP's
global plan -> ``read_data``. Afterwards the engine counts the step as the job's
current one and, in the background, pushes each saved object to as many nodes as the
replication strategy keeps (whatever world size saved it).

Trust: ShardedObjects are unpickled as torch_dist does (``torch.load(weights_only=False)``
by Megatron's load planner), so a checkpoint's bytes can run code. ``weights_only=True``
makes every ShardedObject pass a weights-only load first, as memckpt's DCP reader does.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from typing import Any, cast

import torch
from megatron.core.dist_checkpointing.core import CheckpointingException
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import (
    ShardedObject,
    ShardedStateDict,
    ShardedTensor,
    StateDict,
)
from megatron.core.dist_checkpointing.strategies.base import LoadShardedStrategy
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreLoadPlanner,
    _replace_sharded_keys_with_state_dict_keys,
    _replace_state_dict_keys_with_sharded_keys,
    _restore_dict_types,
    _unwrap_pyt_sharded_tensor,
    mcore_to_pyt_state_dict,
)
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

from memckpt import ids
from memckpt.adapters.dcp import MemoryStorageReader, attach_storage_data, parse_checkpoint_id
from memckpt.adapters.megatron.files import BACKEND, BACKEND_VERSION
from memckpt.adapters.megatron.items import step_metadata
from memckpt.engine.runtime import RuntimeSettings
from memckpt.errors import CheckpointNotFoundError, ConfigError
from memckpt.storage.manifest import StepManifest
from memckpt.storage.store import load_step_manifest

__all__ = ["MemoryLoadShardedStrategy"]

log = logging.getLogger(__name__)


class _MegatronReader(MemoryStorageReader):
    """memckpt's DCP reader, with DCP's metadata assembled from the ranks' chunk lists.

    ShardedObjects pass a weights-only load first only with ``weights_only=True``;
    otherwise they are unpickled as torch_dist does.
    """

    _OPT_IN = "MemoryLoadShardedStrategy(weights_only=True, safe_globals=[...])"

    def __init__(self, *args: Any, weights_only: bool, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._weights_only = weights_only

    def step_metadata(self, manifest: StepManifest) -> Metadata:
        where = str(self.checkpoint_id)
        return attach_storage_data(step_metadata(manifest, where), manifest, where)


class MemoryLoadShardedStrategy(LoadShardedStrategy):
    """Megatron load strategy for memckpt memory checkpoints (see the module docstring).

    ``checkpoint_dir`` is what ``memckpt.adapters.megatron.latest_checkpoint`` returned
    (it also wrote ``common.pt`` and ``metadata.json`` there on every node, which
    ``dist_checkpointing.load`` reads first). Data on other nodes is read from there
    whatever ``replication`` says; it only decides how copies are pushed again.

    ShardedObjects are unpickled as torch_dist does: only load checkpoints you trust.
    ``weights_only=True`` refuses, with an UnsupportedValueError naming the object (inside
    DCP's ``CheckpointException``), every ShardedObject that ``torch.load(weights_only=True)``
    refuses; ``safe_globals`` names the classes and functions it may build beyond that.
    """

    def __init__(
        self,
        *,
        replication: str | None = None,
        node_id: str | None = None,
        secret: bytes | None = None,
        timeout_s: float | None = None,
        threads: int = 2,
        weights_only: bool = False,
        safe_globals: Iterable[Any] = (),
    ) -> None:
        super().__init__()
        self._settings = RuntimeSettings(replication=replication, node_id=node_id,
                                         secret=secret, timeout_s=timeout_s)  # fmt: skip
        self.threads = threads
        self.weights_only = weights_only
        self.safe_globals = tuple(safe_globals)
        if self.safe_globals and not weights_only:
            raise ConfigError(
                "MemoryLoadShardedStrategy: safe_globals applies to weights-only loads; pass "
                "weights_only=True with it (without, ShardedObjects load unrestricted)"
            )

    @property
    def can_handle_sharded_objects(self) -> bool:
        return True

    def check_backend_compatibility(self, loaded_backend: str) -> None:
        if loaded_backend != BACKEND:
            raise CheckpointingException(
                f"this checkpoint was saved by the {loaded_backend!r} backend, not by memckpt's "
                "Megatron save strategy: load it with Megatron's own strategy "
                "(sharded_strategy=None)"
            )

    def check_version_compatibility(self, loaded_version: int) -> None:
        if loaded_version != BACKEND_VERSION:
            raise CheckpointingException(
                f"memckpt's Megatron checkpoint format version {loaded_version} is not "
                f"supported (this memckpt reads version {BACKEND_VERSION})"
            )

    def load(
        self, sharded_state_dict: ShardedStateDict, checkpoint_dir: str | os.PathLike[str]
    ) -> StateDict:
        """Load the sharded part of the step into ``sharded_state_dict`` (collective)."""
        validate_shapes = [
            t for t in nested_values(sharded_state_dict)
            if isinstance(t, ShardedTensor) and not t.allow_shape_mismatch
        ]  # fmt: skip
        allow_mismatch = {
            t.key: t for t in nested_values(sharded_state_dict)
            if isinstance(t, ShardedTensor) and t.allow_shape_mismatch
        }  # fmt: skip
        flat, flat_mapping, rename_mapping = _replace_state_dict_keys_with_sharded_keys(
            sharded_state_dict
        )
        pyt_state_dict = mcore_to_pyt_state_dict(flat, True)
        reader = _MegatronReader(
            checkpoint_dir,
            replication=self._settings.replication,
            node_id=self._settings.node_id,
            secret=self._settings.secret,
            timeout_s=self._settings.timeout_s,
            threads=self.threads,
            safe_globals=self.safe_globals,
            weights_only=self.weights_only,
        )
        # DCP's _load_state_dict (what Megatron's torch_dist load calls, through the
        # deprecated load_state_dict): dcp.load would put the loaded ShardedObjects into a
        # copy of the state dict, not into pyt_state_dict
        _load_state_dict(
            state_dict=pyt_state_dict,
            storage_reader=reader,
            planner=MCoreLoadPlanner(
                shapes_validation_sharded_tensors=validate_shapes,
                allow_shape_mismatch_sharded_tensors=allow_mismatch,
            ),
        )
        loaded = {k: _unwrap_pyt_sharded_tensor(v) for k, v in pyt_state_dict.items()}
        result = _replace_sharded_keys_with_state_dict_keys(
            cast(dict[str, Any], loaded), flat_mapping, rename_mapping
        )
        _restore_dict_types(result, sharded_state_dict)
        return result

    def load_tensors_metadata(
        self, checkpoint_dir: str | os.PathLike[str], metadata: Metadata | None = None
    ) -> ShardedStateDict:
        """Global shape and dtype of every tensor in the step (read from this node)."""
        md = metadata or _local_metadata(checkpoint_dir)
        out: ShardedStateDict = {}
        for key, tp in md.state_dict_metadata.items():
            if isinstance(tp, TensorStorageMetadata):
                meta = torch.empty(tp.size, dtype=tp.properties.dtype, device="meta")
                out[key] = ShardedTensor.from_rank_offsets(key, meta).without_data()
        return out

    def load_sharded_metadata(self, checkpoint_dir: str | os.PathLike[str]) -> ShardedStateDict:
        """As ``load_tensors_metadata``, with the ShardedObjects too."""
        md = _local_metadata(checkpoint_dir)
        out = self.load_tensors_metadata(checkpoint_dir, md)
        for key, tp in md.state_dict_metadata.items():
            if not isinstance(tp, TensorStorageMetadata):
                obj = ShardedObject.empty_from_unique_key(key)
                out[obj.unique_key] = obj
        return out


def _local_metadata(checkpoint_dir: str | os.PathLike[str]) -> Metadata:
    """DCP metadata of a step from this node's manifest (no collective)."""
    base, job, step = parse_checkpoint_id(checkpoint_dir)
    manifest = load_step_manifest(ids.JobLayout(base, job), step)
    if manifest is None:
        raise CheckpointNotFoundError(
            f"{checkpoint_dir}: no step manifest on this node; call "
            "memckpt.adapters.megatron.latest_checkpoint on every rank first (it brings the "
            "manifest and Megatron's files to every node)"
        )
    return step_metadata(manifest, str(checkpoint_dir))
