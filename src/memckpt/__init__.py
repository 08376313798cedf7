"""memckpt: memory-first checkpoints for distributed PyTorch training."""

from memckpt.core.coordination import Collectives, LocalCollectives, RecoveryPlan, plan_recovery
from memckpt.core.handle import SaveHandle, SaveResult
from memckpt.core.reader import ObjectReader, load_object
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
    UnsupportedValueError,
)
from memckpt.manager import CheckpointManager, LoadInfo

__version__ = "0.1.0"

__all__ = [
    "AuthenticationError",
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
    "MemckptError",
    "ObjectReader",
    "PeerClosedError",
    "ProtocolError",
    "RecoveryPlan",
    "ReplicationConfigError",
    "SaveHandle",
    "SaveResult",
    "ScheduleConfigError",
    "SignalInstallError",
    "StateDictMismatchError",
    "UnsupportedValueError",
    "__version__",
    "load_object",
    "plan_recovery",
]
