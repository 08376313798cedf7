"""Every exception memckpt raises; each message says what failed, where, and what to do."""

from __future__ import annotations

import errno

__all__ = [
    "AuthenticationError",
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
    "MemckptError",
    "NonFiniteStateError",
    "PeerClosedError",
    "ProtocolError",
    "ReplicationConfigError",
    "ScheduleConfigError",
    "SignalInstallError",
    "StateDictMismatchError",
    "StateModifiedError",
    "StorageIOError",
    "TransferError",
    "UnsafePathError",
    "UnsupportedValueError",
    "UsageError",
    "WorldSizeMismatchError",
    "as_storage_error",
]


class MemckptError(Exception):
    """Base class of every memckpt error."""


class InvalidNameError(MemckptError, ValueError):
    """A job id, step or object name does not match the strict naming rules."""


class UnsupportedValueError(MemckptError, TypeError):
    """A state dict holds a value memckpt cannot store (sparse tensor, unpicklable object...)."""


class CorruptCheckpointError(MemckptError):
    """Stored bytes do not match their recorded checksum or structure."""


class UnsafePathError(CorruptCheckpointError):
    """A path in a job's tree is a symlink, FIFO, device or oversized file where memckpt
    expects a regular file or directory (the tree is untrusted); it is not read."""


class DataDamagedError(CorruptCheckpointError):
    """An object's stored bytes fail their checksums: this copy is damaged (not a mismatch
    of settings or devices). A load tries the next copy and, when every copy is damaged,
    marks the step so every rank and restart passes over it."""


class NonFiniteStateError(MemckptError):
    """The step to load was saved holding NaN/Inf and ``on_non_finite="raise"`` refuses it."""


class StateDictMismatchError(MemckptError, ValueError):
    """Loading in place failed because keys, shapes or dtypes differ; nothing was overwritten."""


class StateModifiedError(MemckptError):
    """A load failed after writing into the caller's tensors and no other step rewrote them.

    The state dict holds partly loaded values: rebuild it before training from it.
    """


class WorldSizeMismatchError(MemckptError):
    """A checkpoint was saved by another number of ranks than the job has now.

    A memory checkpoint loads only into the world size that saved it; reshard through
    ``torch.distributed.checkpoint`` to change the number of ranks.
    """


class InsufficientSpaceError(MemckptError, OSError):
    """The checkpoint directory has too little free space for a save; nothing was lost."""


class StorageIOError(MemckptError, OSError):
    """Reading or writing a checkpoint tree failed (permission, I/O error); names the path."""


class CheckpointNotFoundError(MemckptError, FileNotFoundError):
    """No complete checkpoint exists for the requested step."""


class CommitError(MemckptError):
    """A save did not become globally complete (a rank failed or timed out)."""


class CollectiveError(MemckptError):
    """A collective between ranks failed or timed out."""


class ReplicationConfigError(MemckptError, ValueError):
    """A replication strategy cannot be applied to a topology, or a spec is malformed."""


class ProtocolError(MemckptError):
    """A peer sent bytes that break the wire protocol, or the connection failed mid-frame."""


class TransferError(MemckptError):
    """Moving an object to or from a peer failed after retries; names the peer and the object."""


class PeerClosedError(ProtocolError):
    """The peer closed the connection cleanly between two frames."""


class AuthenticationError(ProtocolError):
    """A peer failed the handshake (wrong secret, tampered nonce) or the secret is unusable."""


class ScheduleConfigError(MemckptError, ValueError):
    """An IterManager argument is out of range or two arguments contradict each other."""


class DeadlineFormatError(ScheduleConfigError):
    """A deadline (environment variable or argument) is not a unix time or ISO-8601 time."""


class SignalInstallError(MemckptError, RuntimeError):
    """Signal handlers could not be installed (not the main thread, or already installed)."""


class ConfigError(MemckptError, ValueError):
    """An override, YAML file or config value is invalid; names the key and where it came from."""


class ConfigTypeError(ConfigError, TypeError):
    """An argument or config value has the wrong type; names it and what it should be."""


class UsageError(MemckptError, RuntimeError):
    """An API was called out of order or in a state that does not allow it; says what to do."""


def as_storage_error(error: OSError, what: str) -> MemckptError:
    """``error`` as the MemckptError a caller can catch: InsufficientSpaceError for a full
    disk or quota, StorageIOError for any other OS error; ``what`` says what failed."""
    if isinstance(error, MemckptError):
        return error
    where = f" ({error.filename})" if error.filename else ""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return InsufficientSpaceError(
            f"{what}: no space left{where}; free space or make the tmpfs larger "
            "(docker --shm-size), keep fewer steps (keep_last) or set limit_bytes"
        )
    return StorageIOError(f"{what}: {error.strerror or error}{where}")
