"""Names of jobs, checkpoints (steps) and objects: parse, format, validate.

Every name that becomes a path component passes through here. Names follow a
strict pattern so that no name can contain ``/``, ``..`` or anything else that
would let it escape the job's directory. The on-disk layout of a job is encoded
once, in :class:`JobLayout`::

    <base_dir>/<job_id>/
      .pool/rank-<r>.<n>.buf       free, pre-faulted buffers of rank r
      .peers/rank-<r>.json         rank r's node, address and replication plan
      .signals/rank-<r>.step-<N>.*.done   a save of rank r has ended (for async queues)
      step-<N>.writing.<r>         present while rank r writes step N
      step-<N>/rank-<r>.mck        rank r's object of step N (appears atomically)
      step-<N>/rank-<r>.mck.prev   the committed object a re-save of step N replaces,
                                   kept until the re-save commits or rolls back
      step-<N>/manifest.json       the step manifest, written at the global commit
      step-<N>/damaged.<c>         a load found the data of the step whose manifest has
                                   checksum <c> (16 hex digits) damaged on every holder
      step-<N>/rank-<r>.mck.damaged  a copy whose data failed its checksums, set aside
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Final

from memckpt.errors import InvalidNameError

__all__ = [
    "DAMAGED_SUFFIX",
    "MANIFEST_NAME",
    "OBJECT_SUFFIX",
    "PEERS_DIR",
    "PERSISTED_RECORD_NAME",
    "POOL_DIR",
    "PREV_SUFFIX",
    "SIGNALS_DIR",
    "JobLayout",
    "damage_mark_name",
    "object_name",
    "parse_damage_mark",
    "parse_object_name",
    "parse_step_dir",
    "parse_writing_marker",
    "step_dir_name",
    "validate_job_id",
    "validate_rank",
    "validate_step",
    "writing_marker_name",
]

POOL_DIR: Final = ".pool"
PEERS_DIR: Final = ".peers"
SIGNALS_DIR: Final = ".signals"
MANIFEST_NAME: Final = "manifest.json"
PERSISTED_RECORD_NAME: Final = "persisted.json"  # memckpt.storage.durability
PREV_SUFFIX: Final = ".prev"
DAMAGED_SUFFIX: Final = ".damaged"
OBJECT_SUFFIX: Final = ".mck"

_JOB_ID_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_STEP_DIR_RE: Final = re.compile(r"step-(0|[1-9][0-9]{0,18})")
_WRITING_RE: Final = re.compile(r"step-(0|[1-9][0-9]{0,18})\.writing\.(0|[1-9][0-9]{0,8})")
_DAMAGE_RE: Final = re.compile(r"damaged\.([0-9a-f]{16})")
_OBJECT_RE: Final = re.compile(r"rank-(0|[1-9][0-9]{0,8})\.mck")
MAX_STEP: Final = 2**63 - 1


def validate_job_id(job_id: str) -> str:
    """Return ``job_id`` if it is a safe single path component, else raise InvalidNameError."""
    if isinstance(job_id, str) and not job_id:
        raise InvalidNameError("the job id is empty: name the job (e.g. job_id='llama-run1')")
    if not isinstance(job_id, str) or not _JOB_ID_RE.fullmatch(job_id) or ".." in job_id:
        raise InvalidNameError(
            f"invalid job id {job_id!r}: use 1-128 characters of letters, digits, '_', '-', '.', "
            "starting with a letter or digit, and no '..'"
        )
    if _STEP_DIR_RE.fullmatch(job_id) or _WRITING_RE.fullmatch(job_id):
        raise InvalidNameError(
            f"invalid job id {job_id!r}: it has the form of a step directory inside a job, so "
            "tools listing the base directory would take it for a step; choose another name"
        )
    return job_id


def validate_step(step: object) -> int:
    """Return ``step`` as an int if it is a non-negative integer, else raise InvalidNameError."""
    if isinstance(step, bool):
        raise InvalidNameError("step must be an integer, got bool")
    if not isinstance(step, int):
        # numpy / torch integer scalars are common in training loops
        try:
            import operator

            step = operator.index(step)  # type: ignore[arg-type]
        except TypeError:
            raise InvalidNameError(f"step must be an integer, got {type(step).__name__}") from None
    if not 0 <= step <= MAX_STEP:  # type: ignore[operator]
        raise InvalidNameError(f"step must be in [0, 2**63), got {step}")
    return int(step)  # type: ignore[arg-type]


def validate_rank(rank: object, world_size: int | None = None) -> int:
    """Return ``rank`` if it is an int in [0, world_size), else raise InvalidNameError."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise InvalidNameError(f"rank must be a non-negative integer, got {rank!r}")
    if world_size is not None and rank >= world_size:
        raise InvalidNameError(f"rank {rank} is outside world size {world_size}")
    return rank


def step_dir_name(step: int) -> str:
    return f"step-{validate_step(step)}"


def parse_step_dir(name: str) -> int | None:
    """Return the step of a checkpoint directory name, or None if it is not one."""
    m = _STEP_DIR_RE.fullmatch(name)
    return int(m.group(1)) if m else None


def writing_marker_name(step: int, rank: int) -> str:
    return f"step-{validate_step(step)}.writing.{validate_rank(rank)}"


def parse_writing_marker(name: str) -> tuple[int, int] | None:
    """Return (step, rank) of a writing marker name, or None if it is not one."""
    m = _WRITING_RE.fullmatch(name)
    return (int(m.group(1)), int(m.group(2))) if m else None


def object_name(rank: int) -> str:
    """File name of the object holding ``rank``'s data inside a step directory."""
    return f"rank-{validate_rank(rank)}{OBJECT_SUFFIX}"


def parse_object_name(name: str) -> int | None:
    """Return the source rank of an object file name, or None if it is not one."""
    m = _OBJECT_RE.fullmatch(name)
    return int(m.group(1)) if m else None


def damage_mark_name(manifest_checksum: int) -> str:
    """Name of the mark that a step (with this manifest) failed verification on load."""
    return f"damaged.{manifest_checksum & (2**64 - 1):016x}"


def parse_damage_mark(name: str) -> int | None:
    """The manifest checksum a damage mark names, or None if ``name`` is not one."""
    m = _DAMAGE_RE.fullmatch(name)
    return int(m.group(1), 16) if m else None


class JobLayout:
    """Where everything of one job lives under a base directory (see the module docstring)."""

    def __init__(self, base_dir: str | os.PathLike[str], job_id: str) -> None:
        self.base_dir = Path(base_dir)
        self.job_id = validate_job_id(job_id)
        self.root = self.base_dir / self.job_id

    @property
    def pool_dir(self) -> Path:
        return self.root / POOL_DIR

    @property
    def peers_dir(self) -> Path:
        return self.root / PEERS_DIR

    @property
    def signals_dir(self) -> Path:
        """Files that tell other processes a save has ended (``core.done_signal``)."""
        return self.root / SIGNALS_DIR

    def peer_file(self, rank: int) -> Path:
        return self.peers_dir / f"rank-{validate_rank(rank)}.json"

    def step_dir(self, step: int) -> Path:
        return self.root / step_dir_name(step)

    def object_path(self, step: int, rank: int) -> Path:
        return self.step_dir(step) / object_name(rank)

    def prev_object_path(self, step: int, rank: int) -> Path:
        return self.step_dir(step) / (object_name(rank) + PREV_SUFFIX)

    def manifest_path(self, step: int) -> Path:
        return self.step_dir(step) / MANIFEST_NAME

    def persisted_record_path(self, step: int) -> Path:
        return self.step_dir(step) / PERSISTED_RECORD_NAME

    def damage_mark_path(self, step: int, manifest_checksum: int) -> Path:
        return self.step_dir(step) / damage_mark_name(manifest_checksum)

    def damaged_object_path(self, step: int, rank: int) -> Path:
        return self.step_dir(step) / (object_name(rank) + DAMAGED_SUFFIX)

    def marker_path(self, step: int, rank: int) -> Path:
        return self.root / writing_marker_name(step, rank)

    @staticmethod
    def relpath(job_id: str, step: int, rank: int) -> str:
        """``<job_id>/step-<N>/rank-<R>.mck``, relative to the base directory."""
        return f"{validate_job_id(job_id)}/{step_dir_name(step)}/{object_name(rank)}"

    def resolve_object(self, step: int, rank: int) -> Path:
        """Real path of an object; raises if it resolves (symlinks too) outside the base dir."""
        base = Path(os.path.realpath(self.base_dir))
        path = Path(os.path.realpath(base / self.relpath(self.job_id, step, rank)))
        if not path.is_relative_to(base) or path == base:
            raise InvalidNameError(
                f"object (job {self.job_id!r}, step {step}, rank {rank}) resolves to {path}, "
                f"outside the store root {base}; check for symlinks under the root"
            )
        return path
