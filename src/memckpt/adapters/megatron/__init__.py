"""Megatron-Core ``dist_checkpointing`` on memckpt's memory tier (extra ``[megatron]``).

Frequent memory checkpoints beside the regular ones: an async save strategy and a load
strategy for ``dist_checkpointing.save`` / ``load``, a save helper that puts Megatron's
common data and ``metadata.json`` on every node, and a find-latest call::

    from memckpt.adapters import megatron as mm

    cid = mm.checkpoint_id("/dev/shm/memckpt", "job-7", step)      # "<base>/<job>/step-<N>"
    request = mm.save(sharded_state_dict, cid, mm.MemoryAsyncSaveStrategy(replication="pairwise"))
    async_queue.schedule_async_request(request)                    # AsyncCallsQueue
    ...
    latest = mm.latest_checkpoint("/dev/shm/memckpt", "job-7", replication="pairwise")
    if latest:
        state = dist_checkpointing.load(sharded_state_dict, latest,
                                        mm.MemoryLoadShardedStrategy(replication="pairwise"))

See ``save_strategy`` and ``load_strategy`` for the call sequences, docs/megatron.md
for the lines a Megatron-LM script adds. Importing this module registers the load
strategy as Megatron's default for the ``memckpt`` backend, so Megatron's own calls
that pick a strategy from ``metadata.json`` (``load_common_state_dict``) work too.
"""

from __future__ import annotations

try:
    from megatron.core.dist_checkpointing.strategies.base import (
        StrategyAction,
        register_default_strategy,
    )
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "memckpt.adapters.megatron needs megatron-core (and psutil, which megatron-core "
        "uses without declaring it): pip install 'memckpt[megatron]'"
    ) from e

from memckpt.adapters.dcp import checkpoint_id, close
from memckpt.adapters.megatron.checkpoint import latest_checkpoint, prepare_checkpoint, save
from memckpt.adapters.megatron.files import BACKEND, BACKEND_VERSION
from memckpt.adapters.megatron.load_strategy import MemoryLoadShardedStrategy
from memckpt.adapters.megatron.save_strategy import MemoryAsyncSaveStrategy

__all__ = [
    "BACKEND",
    "BACKEND_VERSION",
    "MemoryAsyncSaveStrategy",
    "MemoryLoadShardedStrategy",
    "checkpoint_id",
    "close",
    "latest_checkpoint",
    "prepare_checkpoint",
    "save",
]

register_default_strategy(
    StrategyAction.LOAD_SHARDED, BACKEND, BACKEND_VERSION, MemoryLoadShardedStrategy()
)
