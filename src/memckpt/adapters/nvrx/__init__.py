"""NVRx-compatible local checkpointing on memckpt (``nvidia_resiliency_ext.checkpointing.local``).

Change the imports and keep the code::

    from memckpt.adapters.nvrx import (
        BasicTensorAwareStateDict, CliqueReplicationStrategy, LocalCheckpointManager,
    )

NVRx itself is not needed; ``AsyncCallsQueue`` here has the methods of NVRx's, and the
requests ``save(..., is_async=True)`` returns also run through NVRx's own queue
(``persistent=False``). See docs/nvrx.md for what differs from NVRx and why.
"""

from __future__ import annotations

from memckpt.adapters.nvrx.async_queue import AsyncCallsQueue, AsyncRequest
from memckpt.adapters.nvrx.manager import DEFAULT_SESSION_JOB, CkptID, LocalCheckpointManager
from memckpt.adapters.nvrx.replication import (
    CliqueReplicationStrategy,
    LazyCliqueReplicationStrategy,
    default_replication_jump,
)
from memckpt.adapters.nvrx.state_dict import (
    BasicTensorAwareStateDict,
    TensorAwareStateDict,
    TensorPlaceholder,
)

__all__ = [
    "DEFAULT_SESSION_JOB",
    "AsyncCallsQueue",
    "AsyncRequest",
    "BasicTensorAwareStateDict",
    "CkptID",
    "CliqueReplicationStrategy",
    "LazyCliqueReplicationStrategy",
    "LocalCheckpointManager",
    "TensorAwareStateDict",
    "TensorPlaceholder",
    "default_replication_jump",
]
