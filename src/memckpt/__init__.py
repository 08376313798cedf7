"""memckpt: memory-first checkpoints for distributed PyTorch training."""

from memckpt import _warnings  # noqa: F401  (first: filters before torch is imported)
from memckpt.core.coordination import (
    Collectives,
    LocalCollectives,
    ManifestInfo,
    RecoveryPlan,
    StepHoldings,
    plan_recovery,
)
from memckpt.core.handle import SaveHandle, SaveResult
from memckpt.core.manifest import ObjectDigest, StepManifest
from memckpt.core.reader import ObjectReader, load_object
from memckpt.core.retention import RetentionPlan, plan_retention
from memckpt.core.runtime import NodeRuntime
from memckpt.core.sources import ObjectLocator, ObjectSource
from memckpt.core.transaction import Ballot, SaveTransaction, Vote, collective_vote
from memckpt.errors import (
    AuthenticationError,
    CheckpointNotFoundError,
    CollectiveError,
    CommitError,
    CorruptCheckpointError,
    DeadlineFormatError,
    InsufficientSpaceError,
    InvalidNameError,
    MemckptError,
    PeerClosedError,
    ProtocolError,
    ReplicationConfigError,
    ScheduleConfigError,
    SignalInstallError,
    StateDictMismatchError,
    StateModifiedError,
    UnsupportedValueError,
    WorldSizeMismatchError,
)
from memckpt.manager import CheckpointManager, LoadInfo

__version__ = "0.1.0"

_LAZY = {
    "MemoryStorageReader": "memckpt.adapters.dcp",
    "MemoryStorageWriter": "memckpt.adapters.dcp",
    "State": "memckpt.adapters.state",
}


def __getattr__(name: str) -> object:
    # framework adapters import their framework only when used
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'memckpt' has no attribute {name!r}")


__all__ = [
    "AuthenticationError",
    "Ballot",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CollectiveError",
    "Collectives",
    "CommitError",
    "CorruptCheckpointError",
    "DeadlineFormatError",
    "InsufficientSpaceError",
    "InvalidNameError",
    "LoadInfo",
    "LocalCollectives",
    "ManifestInfo",
    "MemckptError",
    "MemoryStorageReader",
    "MemoryStorageWriter",
    "NodeRuntime",
    "ObjectDigest",
    "ObjectLocator",
    "ObjectReader",
    "ObjectSource",
    "PeerClosedError",
    "ProtocolError",
    "RecoveryPlan",
    "ReplicationConfigError",
    "RetentionPlan",
    "SaveHandle",
    "SaveResult",
    "SaveTransaction",
    "ScheduleConfigError",
    "SignalInstallError",
    "State",
    "StateDictMismatchError",
    "StateModifiedError",
    "StepHoldings",
    "StepManifest",
    "UnsupportedValueError",
    "Vote",
    "WorldSizeMismatchError",
    "__version__",
    "collective_vote",
    "load_object",
    "plan_recovery",
    "plan_retention",
]
