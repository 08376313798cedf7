"""Names of jobs, checkpoints (steps) and objects: parse, format, validate.

Every name that becomes a path component passes through here. Names follow a
strict pattern so that no name can contain ``/``, ``..`` or anything else that
would let it escape the job's directory.
"""

from __future__ import annotations

import re
from typing import Final

from memckpt.errors import InvalidNameError

__all__ = [
    "COMMITTED_MARKER",
    "OBJECT_SUFFIX",
    "POOL_DIR",
    "object_name",
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
COMMITTED_MARKER: Final = ".committed"
OBJECT_SUFFIX: Final = ".mck"

_JOB_ID_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_STEP_DIR_RE: Final = re.compile(r"step-(0|[1-9][0-9]{0,18})")
_WRITING_RE: Final = re.compile(r"step-(0|[1-9][0-9]{0,18})\.writing\.(0|[1-9][0-9]{0,8})")
_OBJECT_RE: Final = re.compile(r"rank-(0|[1-9][0-9]{0,8})\.mck")
MAX_STEP: Final = 2**63 - 1


def validate_job_id(job_id: str) -> str:
    """Return ``job_id`` if it is a safe single path component, else raise InvalidNameError."""
    if not isinstance(job_id, str) or not _JOB_ID_RE.fullmatch(job_id) or ".." in job_id:
        raise InvalidNameError(
            f"invalid job id {job_id!r}: use 1-128 characters of letters, digits, '_', '-', '.', "
            "starting with a letter or digit, and no '..'"
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
