"""memckpt: memory-first checkpoints for distributed PyTorch training."""

from memckpt.coordination import Collectives, LocalCollectives, RecoveryPlan, plan_recovery
from memckpt.errors import (
    CheckpointNotFoundError,
    CollectiveError,
    CommitError,
    CorruptCheckpointError,
    InsufficientSpaceError,
    InvalidNameError,
    MemckptError,
    StateDictMismatchError,
    UnsupportedValueError,
)
from memckpt.handle import SaveHandle, SaveResult
from memckpt.manager import CheckpointManager, LoadInfo
from memckpt.reader import ObjectReader, load_object

__version__ = "0.1.0"

__all__ = [
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CollectiveError",
    "Collectives",
    "CommitError",
    "CorruptCheckpointError",
    "InsufficientSpaceError",
    "InvalidNameError",
    "LoadInfo",
    "LocalCollectives",
    "MemckptError",
    "ObjectReader",
    "RecoveryPlan",
    "SaveHandle",
    "SaveResult",
    "StateDictMismatchError",
    "UnsupportedValueError",
    "__version__",
    "load_object",
    "plan_recovery",
]
