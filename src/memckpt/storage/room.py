"""Is there room for a save? tmpfs free space, the cgroup's memory limit, ``limit_bytes``.

tmpfs pages are memory: they count toward the memory cgroup of the process that
touched them, so a save that fits the tmpfs can still push a container over its
memory limit and have it OOM-killed. Before a save stages, the engine adds up what it
will newly allocate (its buffer and the replicas it will receive, less the free pool
buffers it can reuse) and checks it against all three; without room the save is
skipped, with one warning that gives the numbers and what to change.

The cgroup files are read from ``/proc/self/cgroup`` and ``/sys/fs/cgroup`` (v1
``memory.limit_in_bytes``/``memory.usage_in_bytes``, v2 ``memory.max``/
``memory.current``); the parsing takes those roots as arguments so tests drive it with
a fake tree. The tightest limit of the cgroup and its ancestors applies.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

__all__ = ["CGROUP_MARGIN", "MemoryLimit", "Room", "cgroup_memory", "shortfall"]

UNLIMITED: Final = 1 << 60  # cgroup v1 writes "no limit" as a page-rounded 2**63 - 1
CGROUP_MARGIN: Final = 64 << 20  # left for the training process itself to grow into
_SMALL: Final = 4096


@dataclass(frozen=True)
class MemoryLimit:
    """The memory cgroup's limit and usage, in bytes; ``where`` is the file with the limit."""

    limit: int
    usage: int
    where: str

    @property
    def headroom(self) -> int:
        return max(0, self.limit - self.usage)


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    if text == "max":
        return UNLIMITED
    try:
        return int(text)
    except ValueError:
        return None


def _cgroup_paths(proc_cgroup: Path) -> tuple[str | None, str | None]:
    """(v1 memory controller path, v2 unified path) of this process, when listed."""
    v1 = v2 = None
    try:
        lines = proc_cgroup.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None, None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            v2 = path
        elif "memory" in controllers.split(","):
            v1 = path
    return v1, v2


def _ancestors(root: Path, path: str) -> list[Path]:
    """``root/path`` and each parent up to ``root`` (a container may see only a prefix)."""
    rel = Path(path.lstrip("/"))
    out = [root / rel]
    while rel != Path("."):
        rel = rel.parent
        out.append(root / rel)
    return out


def cgroup_memory(
    proc_cgroup: str | os.PathLike[str] = "/proc/self/cgroup",
    cgroup_root: str | os.PathLike[str] = "/sys/fs/cgroup",
) -> MemoryLimit | None:
    """This process's memory limit and usage; None when no limit is set or none is readable."""
    root = Path(cgroup_root)
    v1, v2 = _cgroup_paths(Path(proc_cgroup))
    candidates: list[tuple[Path, str, str]] = []
    if v2 is not None:
        candidates += [(d, "memory.max", "memory.current") for d in _ancestors(root, v2)]
    if v1 is not None:
        v1_root = root / "memory"
        candidates += [
            (d, "memory.limit_in_bytes", "memory.usage_in_bytes") for d in _ancestors(v1_root, v1)
        ]
    best: MemoryLimit | None = None
    for d, limit_name, usage_name in candidates:
        limit = _read_int(d / limit_name)
        usage = _read_int(d / usage_name)
        if limit is None or usage is None or limit >= UNLIMITED:
            continue
        found = MemoryLimit(limit, usage, str(d / limit_name))
        if best is None or found.headroom < best.headroom:
            best = found
    return best


@dataclass(frozen=True)
class Room:
    """What one save will newly allocate and what the node has, in bytes."""

    need: int
    tmpfs_free: int
    tmpfs_path: str
    cgroup: MemoryLimit | None = None
    limit_left: int | None = None  # limit_bytes minus what this rank's pool holds


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 10**9 else f"{n / 1e6:.1f} MB"


def shortfall(room: Room) -> str | None:
    """Why the save does not fit (with the numbers and what to change), or None if it does."""
    if room.need <= _SMALL:
        return None
    if room.need > room.tmpfs_free:
        return (
            f"needs {_gb(room.need)} more in {room.tmpfs_path} but only {_gb(room.tmpfs_free)} "
            "is free: give the tmpfs more room (docker --shm-size, a larger /dev/shm "
            "emptyDir), keep fewer steps (keep_last) or hold fewer replicas"
        )
    if room.cgroup is not None and room.need + CGROUP_MARGIN > room.cgroup.headroom:
        cg = room.cgroup
        return (
            f"needs {_gb(room.need)} more memory (tmpfs pages count toward the memory limit) "
            f"but the cgroup has {_gb(cg.headroom)} left of its {_gb(cg.limit)} limit "
            f"({cg.where}), less a {_gb(CGROUP_MARGIN)} margin: raise the container's memory "
            "limit, keep fewer steps (keep_last) or hold fewer replicas"
        )
    if room.limit_left is not None and room.need > room.limit_left:
        return (
            f"needs {_gb(room.need)} more but limit_bytes leaves {_gb(room.limit_left)}: raise "
            "limit_bytes or keep fewer steps (keep_last)"
        )
    return None
