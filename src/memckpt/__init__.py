"""memckpt: memory-first checkpoints for distributed PyTorch training.

This package exports the user API: managers, adapters' entry points, results and errors.
Engine seams (``SaveTransaction``, ``Ballot``, ``NodeRuntime``, ``ObjectLocator``, ...) are
imported from ``memckpt.engine``.
"""

from memckpt import _warnings  # noqa: F401  (first: filters before torch is imported)
from memckpt.engine.handle import SaveHandle, SaveResult
from memckpt.errors import (
    AuthenticationError,
    CheckpointNotFoundError,
    CollectiveError,
    CommitError,
    ConfigError,
    ConfigTypeError,
    CorruptCheckpointError,
    DataDamagedError,
    DeadlineFormatError,
    InsufficientSpaceError,
    InvalidNameError,
    MemckptError,
    NonFiniteStateError,
    PeerClosedError,
    ProtocolError,
    ReplicationConfigError,
    ScheduleConfigError,
    SignalInstallError,
    StateDictMismatchError,
    StateModifiedError,
    StorageIOError,
    TransferError,
    UnsafePathError,
    UnsupportedValueError,
    UsageError,
    WorldSizeMismatchError,
)
from memckpt.manager import CheckpointManager, LoadInfo
from memckpt.storage.reader import load_object

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
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CollectiveError",
    "CommitError",
    "ConfigError",
    "ConfigTypeError",
    "CorruptCheckpointError",
    "DataDamagedError",
    "DeadlineFormatError",
    "InsufficientSpaceError",
    "InvalidNameError",
    "LoadInfo",
    "MemckptError",
    "MemoryStorageReader",
    "MemoryStorageWriter",
    "NonFiniteStateError",
    "PeerClosedError",
    "ProtocolError",
    "ReplicationConfigError",
    "SaveHandle",
    "SaveResult",
    "ScheduleConfigError",
    "SignalInstallError",
    "State",
    "StateDictMismatchError",
    "StateModifiedError",
    "StorageIOError",
    "TransferError",
    "UnsafePathError",
    "UnsupportedValueError",
    "UsageError",
    "WorldSizeMismatchError",
    "__version__",
    "load_object",
]
