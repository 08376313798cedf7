"""Every exception memckpt raises; each message says what failed, where, and what to do."""

from __future__ import annotations

__all__ = [
    "CheckpointNotFoundError",
    "CollectiveError",
    "CommitError",
    "CorruptCheckpointError",
    "InsufficientSpaceError",
    "InvalidNameError",
    "MemckptError",
    "StateDictMismatchError",
    "UnsupportedValueError",
]


class MemckptError(Exception):
    """Base class of every memckpt error."""


class InvalidNameError(MemckptError, ValueError):
    """A job id, step or object name does not match the strict naming rules."""


class UnsupportedValueError(MemckptError, TypeError):
    """A state dict holds a value memckpt cannot store (sparse tensor, unpicklable object...)."""


class CorruptCheckpointError(MemckptError):
    """Stored bytes do not match their recorded checksum or structure."""


class StateDictMismatchError(MemckptError, ValueError):
    """Loading in place failed because keys, shapes or dtypes differ; nothing was overwritten."""


class InsufficientSpaceError(MemckptError, OSError):
    """The checkpoint directory has too little free space for a save; nothing was lost."""


class CheckpointNotFoundError(MemckptError, FileNotFoundError):
    """No complete checkpoint exists for the requested step."""


class CommitError(MemckptError):
    """A save did not become globally complete (a rank failed or timed out)."""


class CollectiveError(MemckptError):
    """A collective between ranks failed or timed out."""
