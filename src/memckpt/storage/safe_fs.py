"""File access inside a job's tree, which is untrusted: no symlink, no FIFO, no device.

``/dev/shm`` is shared by every user and process of a node, so whatever lies in a
job's tree may have been planted there. The rules, enforced here once for every
reader and every deletion of the storage layer:

- the job root is created ``0700`` and must be a real directory owned by the current
  user that no one else can write (:func:`ensure_job_root`); its parent must not let
  other users rename it away (group/world-writable without the sticky bit);
- a file is opened without following a symlink (``O_NOFOLLOW``) and without blocking
  (``O_NONBLOCK``), then read only when ``fstat`` says it is a regular file whose
  size is within the caller's bound (:func:`open_regular`, :func:`read_regular`);
- directories are walked without following symlinks (:func:`real_subdirs`), and
  deletion never leaves the directory it was given (:func:`remove_entry`).

A refusal is an :class:`~memckpt.errors.UnsafePathError` (a
``CorruptCheckpointError``): readers that pass over damaged files pass over it too.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

from memckpt.errors import ConfigError, UnsafePathError

__all__ = [
    "check_job_root",
    "ensure_job_root",
    "is_real_dir",
    "open_regular",
    "read_regular",
    "real_subdirs",
    "remove_entry",
    "remove_tree_inside",
    "write_atomic",
]

log = logging.getLogger(__name__)

_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISLNK, "a symlink"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path: str | os.PathLike[str], what: str = "file") -> int | None:
    """An fd open for reading on the regular file at ``path``; None when nothing is there.

    Never follows a symlink at ``path``, never blocks (a FIFO is refused, not opened for
    reading until a writer comes), never reads a device. The returned fd is blocking.
    """
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UnsafePathError(f"{path}: {what} is a symlink; refusing to follow it") from None
        raise
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise UnsafePathError(f"{path}: {what} is {_kind(mode)}; only regular files are read")
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular(path: str | os.PathLike[str], max_bytes: int, what: str = "file") -> bytes | None:
    """The bytes of the regular file at ``path`` (see :func:`open_regular`); None if absent.

    A file larger than ``max_bytes`` is refused before anything is read.
    """
    fd = open_regular(path, what)
    if fd is None:
        return None
    try:
        size = os.fstat(fd).st_size
        if size > max_bytes:
            raise UnsafePathError(
                f"{path}: {what} is {size} bytes, more than the {max_bytes} a valid one can be"
            )
        parts = []
        left = size + 1  # one more: a file that grew meanwhile is caught below
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            parts.append(chunk)
            left -= len(chunk)
        data = b"".join(parts)
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise UnsafePathError(f"{path}: {what} grew past {max_bytes} bytes while being read")
    return data


def write_atomic(path: str | os.PathLike[str], data: bytes, tag: str = "") -> None:
    """Write ``data`` to a new temporary file beside ``path`` (never through a link or FIFO
    planted there), then rename it over ``path``; a failure leaves no temporary file."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp.{tag}{os.getpid()}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)  # a leftover of a crashed process with our pid, or a planted entry
    fd = os.open(tmp, flags, 0o644)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        os.rename(tmp, p)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def is_real_dir(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a directory itself (not a symlink to one)."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        return False


def real_subdirs(path: str | os.PathLike[str]) -> Iterator[os.DirEntry[str]]:
    """Entries of the directory ``path`` that are directories themselves (no symlinks).

    Nothing when ``path`` is missing, not a directory or a symlink.
    """
    if not is_real_dir(path):
        return
    try:
        entries = list(os.scandir(path))
    except (FileNotFoundError, NotADirectoryError):
        return
    for e in entries:
        with contextlib.suppress(OSError):
            if e.is_dir(follow_symlinks=False):
                yield e


def remove_entry(path: str | os.PathLike[str]) -> None:
    """Remove one entry of a directory: a file or symlink is unlinked (never its target),
    a directory is removed with everything in it, without following any symlink."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISDIR(mode):
        shutil.rmtree(path, ignore_errors=True)  # fd-based on Linux: never follows symlinks
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def remove_tree_inside(path: str | os.PathLike[str], root: str | os.PathLike[str]) -> None:
    """Remove ``path`` (see :func:`remove_entry`) if it lies lexically inside ``root``."""
    p, r = Path(os.path.abspath(path)), Path(os.path.abspath(root))
    if p == r or not p.is_relative_to(r):
        raise UnsafePathError(f"refusing to delete {p}: it is not inside {r}")
    remove_entry(p)


def _owner_name(uid: int) -> str:
    try:
        import pwd

        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except (KeyError, ImportError):
        return f"uid {uid}"


def check_job_root(root: Path) -> None:
    """Refuse a job root that is not a real directory owned by us and writable by us alone."""
    try:
        st = os.lstat(root)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise ConfigError(
            f"job directory {root} is a symlink (to {os.readlink(root)!r}); a job's tree must "
            "be a real directory: remove the link or choose another base directory"
        )
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(
            f"job directory {root} is {_kind(st.st_mode)}; remove it or choose another job id"
        )
    me = os.geteuid()
    if st.st_uid != me:
        raise ConfigError(
            f"job directory {root} belongs to {_owner_name(st.st_uid)}, not to you "
            f"({_owner_name(me)}); another user may have planted it: use another job id or base "
            "directory, or have its owner remove it"
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigError(
            f"job directory {root} is writable by other users (mode {stat.S_IMODE(st.st_mode):o}); "
            f"run `chmod 700 {root}` or use a new job id"
        )


def _check_base(base: Path) -> None:
    try:
        st = os.stat(base)
    except FileNotFoundError:
        return
    writable_by_others = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    if writable_by_others and not st.st_mode & stat.S_ISVTX:
        raise ConfigError(
            f"base directory {base} is writable by other users without the sticky bit (mode "
            f"{stat.S_IMODE(st.st_mode):o}): anyone could replace the job's directory in it; "
            f"run `chmod +t {base}` (as /dev/shm and /tmp are) or `chmod go-w {base}`"
        )


def ensure_job_root(root: str | os.PathLike[str]) -> Path:
    """Create the job root ``0700`` (parents as needed) or check the one that is there.

    Raises ConfigError naming the path, its owner and the fix when the root belongs to
    another user, is writable by others, is a symlink, or lies in a directory where
    other users could rename it.
    """
    root = Path(root)
    base = root.parent
    base.mkdir(mode=0o755, parents=True, exist_ok=True)
    _check_base(base)
    with contextlib.suppress(FileExistsError):
        os.mkdir(root, 0o700)
    check_job_root(root)
    return root
