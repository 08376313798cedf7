"""The durable tier through fsspec: a job's verified objects and manifests at a URL.

A ``persist_dir`` is a local path or an fsspec URL (``s3://bucket/prefix``, ``gs://``,
``az://``, ``file://``). ``resolve_location`` turns it into a local ``Path`` (plain paths and
``file://``; those keep the local drain of ``memckpt.engine.drain``) or a checked URL, and
refuses a scheme that fsspec does not know or whose package is not installed.

A job's remote tree mirrors the local one: ``<url>/<job>/step-<N>/rank-<R>.mck`` and
``<url>/<job>/step-<N>/manifest.json``. Object stores have no rename, so the manifest is the
commit marker: it is uploaded last, once every rank's object is there and verified, and a
step without one does not exist for ``persisted_steps`` (``clean_leftovers`` removes it).

Verification reads back what landed, not the HTTP status: an object's size and header
digest (the first ``HEADER_SIZE`` bytes) must be the manifest's, and the manifest read back
must decode to the same checksum. A download is checked the same way before it is loaded
(the loader then checks every chunk's checksum).

``RemoteDrain`` (``memckpt.engine.drain``) drives any ``RemoteTier`` through four methods:
``upload_part`` (this rank's part, verified), ``has_part``, ``commit`` (the marker, last) and
``clean_leftovers``. A subclass with other part and marker files keeps the same retries,
verification and bounded lag: the DCP adapter drains in DCP's own layout that way
(``job_id=None``: steps directly under the URL, as ``dcp.load`` expects them).

Credentials and endpoints are fsspec's: for S3 the ``AWS_*`` variables, profiles and
instance roles; ``AWS_ENDPOINT_URL`` or the ``endpoint_url`` storage option for
S3-compatible stores. Storage options go to ``fsspec.filesystem`` unchanged.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import re
import threading
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Final

from memckpt import ids
from memckpt.errors import CheckpointNotFoundError, ConfigError, CorruptCheckpointError
from memckpt.storage.format import HEADER_SIZE, decode_header
from memckpt.storage.manifest import (
    ObjectDigest,
    StepManifest,
    decode_manifest,
    encode_manifest,
)
from memckpt.storage.retention import check_keep_last, plan_retention
from memckpt.storage.store import object_digest

if TYPE_CHECKING:
    from memckpt.storage.store import CheckpointStore

__all__ = [
    "LOCAL_PROTOCOLS",
    "RemoteTier",
    "StoreGcPlan",
    "is_permanent",
    "plan_store_gc",
    "resolve_location",
    "url_scheme",
]

S3_PART_CONCURRENCY = 4  # default multipart upload concurrency for s3:// (s3fs)
log = logging.getLogger(__name__)

LOCAL_PROTOCOLS: Final = ("file", "local")
_SCHEME_RE: Final = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
_INSTALL_HINT: Final = {
    "s3": "pip install 'memckpt[s3]' (s3fs)",
    "s3a": "pip install 'memckpt[s3]' (s3fs)",
    "gs": "pip install gcsfs",
    "gcs": "pip install gcsfs",
    "az": "pip install adlfs",
    "abfs": "pip install adlfs",
    "abfss": "pip install adlfs",
}


def url_scheme(value: object) -> str | None:
    """The URL scheme of ``value`` (``"s3"`` for ``s3://b/p``), or None for a plain path."""
    if not isinstance(value, str):
        return None
    m = _SCHEME_RE.match(value)
    return m.group(1).lower() if m else None


def resolve_location(value: str | os.PathLike[str]) -> Path | str:
    """A local ``Path`` for a path or ``file://`` URL; the URL itself for a remote store.

    Raises ConfigError for a scheme fsspec does not know or whose package is missing.
    """
    scheme = url_scheme(value)
    if scheme is None:
        return Path(value)
    import fsspec

    try:
        cls = fsspec.get_filesystem_class(scheme)
    except ValueError:
        raise ConfigError(
            f"persist_dir {value!r}: unknown URL scheme {scheme!r}; use a local path or an "
            "fsspec URL such as s3://bucket/prefix, gs://..., az://... or file://..."
        ) from None
    except ImportError as e:
        hint = _INSTALL_HINT.get(scheme, f"the fsspec implementation of {scheme!r}")
        raise ConfigError(
            f"persist_dir {value!r}: the {scheme!r} scheme needs a package that is not "
            f"installed ({e}); install it: {hint}"
        ) from None
    protocols = cls.protocol if isinstance(cls.protocol, tuple) else (cls.protocol,)
    if scheme in LOCAL_PROTOCOLS or "file" in protocols:
        return Path(cls._strip_protocol(value))
    return str(value).rstrip("/")


def is_permanent(exc: BaseException) -> bool:
    """Whether retrying cannot help: the store refuses these credentials or this bucket."""
    return isinstance(exc, (PermissionError, ConfigError))


@dataclass(frozen=True)
class StoreGcPlan:
    """What ``memckpt gc --persist-dir`` deletes from a job's durable tier, oldest first."""

    half_uploaded: tuple[int, ...]  # objects but no manifest: never visible, never loadable
    expired: tuple[int, ...]  # persisted steps beyond the newest ``keep_last``


def plan_store_gc(
    present: Collection[int],
    persisted: Collection[int],
    *,
    keep_last: int | None = None,
    non_finite: Collection[int] = (),
    ages_s: Mapping[int, float | None] | None = None,
    grace_s: float = 3600.0,
) -> StoreGcPlan:
    """Which steps of a durable tier to delete (pure).

    A step ``present`` without being ``persisted`` is half-uploaded. One older than the newest
    persisted step is deleted (the drain that persisted a newer one would have too); a newer
    one may be an upload in flight, so it goes only once ``ages_s[step]`` (seconds since its
    newest object landed; None or absent: unknown) is at least ``grace_s``. With
    ``keep_last``, persisted steps beyond the newest ``keep_last`` are expired by the
    retention policy (``plan_retention``: the newest finite step is kept too).
    """
    done = sorted(set(persisted))
    newest = done[-1] if done else None
    ages = ages_s or {}
    half = []
    for step in sorted(set(present) - set(done)):
        age = ages.get(step)
        old_enough = grace_s <= 0 or (age is not None and age >= grace_s)
        if (newest is not None and step < newest) or old_enough:
            half.append(step)
    expired: tuple[int, ...] = ()
    if keep_last is not None and done:
        check_keep_last(keep_last, "--persist-keep-last")
        plan = plan_retention(done, done, keep_last=keep_last, non_finite=non_finite)
        expired = tuple(sorted(plan.delete))
    return StoreGcPlan(tuple(half), expired)


class RemoteTier:
    """One job's durable tier at a URL: upload, verify, list, download and delete steps.

    Thread-safe for the drain thread and the caller's thread; every method does blocking
    I/O on the store. Errors are the filesystem's (``OSError`` subclasses,
    ``PermissionError`` for refused credentials) or memckpt's (a mismatch found on
    read-back: CorruptCheckpointError). ``job_id=None``: steps directly under ``url``.
    """

    marker: ClassVar[str] = ids.MANIFEST_NAME
    """The commit marker's file name in a step: uploaded last; a step without it is not there."""

    def __init__(
        self, url: str, job_id: str | None, options: Mapping[str, Any] | None = None
    ) -> None:
        location = resolve_location(url)
        if isinstance(location, Path):
            raise ConfigError(f"{url!r} is a local path; RemoteTier is for object-store URLs")
        self.url = location
        self.job_id = None if job_id is None else ids.validate_job_id(job_id)
        self.scheme = url_scheme(location) or ""
        self.options = dict(options or {})
        self._fs: Any = None
        self._lock = threading.Lock()

    @property
    def fs(self) -> Any:
        with self._lock:
            if self._fs is None:
                import fsspec

                options = dict(self.options)
                if self.scheme in ("s3", "s3a"):
                    # parts of one object in parallel: 77 -> 92 MiB/s to a local S3 server
                    # (docs/performance.md); s3fs's own default is 1
                    options.setdefault("max_concurrency", S3_PART_CONCURRENCY)
                self._fs = fsspec.filesystem(self.scheme, **options)
            return self._fs

    # -- names -------------------------------------------------------------------------

    def _root(self) -> str:
        root = self.fs._strip_protocol(self.url).rstrip("/")
        return root if self.job_id is None else f"{root}/{self.job_id}"

    def step_path(self, step: int) -> str:
        return f"{self._root()}/{ids.step_dir_name(step)}"

    def object_path(self, step: int, rank: int) -> str:
        return f"{self.step_path(step)}/{ids.object_name(rank)}"

    def manifest_path(self, step: int) -> str:
        return f"{self.step_path(step)}/{ids.MANIFEST_NAME}"

    def part_name(self, rank: int) -> str:
        """The file name of ``rank``'s part of a step."""
        return ids.object_name(rank)

    def where(self, step: int | None = None, rank: int | None = None) -> str:
        """The URL of the job, a step or a rank's part, for messages."""
        out = self.url if self.job_id is None else f"{self.url}/{self.job_id}"
        if step is not None:
            out += f"/{ids.step_dir_name(step)}"
        if rank is not None:
            out += f"/{self.part_name(rank)}"
        return out

    # -- what a drain calls (``memckpt.engine.drain.RemoteDrain``) ----------------------

    def upload_part(self, store: CheckpointStore, manifest: StepManifest) -> None:
        """Upload ``store``'s rank's part of ``manifest.step`` and verify what landed."""
        rank = store.rank
        self.upload_object(store.object_path(manifest.step, rank), manifest.step, rank,
                           manifest.objects[rank])  # fmt: skip

    def has_part(self, manifest: StepManifest, rank: int) -> bool:
        """Whether ``rank``'s part of this save of ``manifest.step`` is stored."""
        return self.has_object(manifest.step, rank, manifest.objects[rank])

    def commit(self, manifest: StepManifest) -> None:
        """Upload the step's commit marker and verify it; the coordinator calls it last."""
        self.upload_manifest(manifest)

    def committed(self, step: int) -> bool:
        """Whether ``step``'s commit marker is stored (CorruptCheckpointError: unreadable)."""
        return self.manifest(step) is not None

    # -- upload ------------------------------------------------------------------------

    def upload_object(self, src: Path, step: int, rank: int, expected: ObjectDigest) -> None:
        """Upload ``src`` as ``rank``'s object of ``step`` and verify what landed.

        Large files go up in parts (the filesystem's own multipart upload, s3fs above
        its chunk size).
        """
        self.fs.put_file(str(src), self.object_path(step, rank))
        self.verify_object(step, rank, expected)

    def verify_object(self, step: int, rank: int, expected: ObjectDigest) -> None:
        """Read back the stored object's size and header; CorruptCheckpointError on mismatch."""
        path, where = self.object_path(step, rank), self.where(step, rank)
        self.fs.invalidate_cache(path)
        size = int(self.fs.info(path)["size"])
        raw = self.fs.cat_file(path, start=0, end=min(HEADER_SIZE, size))
        digest = decode_header(raw, where, size).digest
        if size != expected.size or digest != expected.digest:
            raise CorruptCheckpointError(
                f"{where}: the stored object ({size} bytes, digest {digest:#x}) is not the "
                f"one uploaded ({expected.size} bytes, digest {expected.digest:#x})"
            )

    def has_object(self, step: int, rank: int, expected: ObjectDigest) -> bool:
        """Whether ``rank``'s object of ``step`` is stored with the expected size."""
        path = self.object_path(step, rank)
        self.fs.invalidate_cache(path)
        try:
            return int(self.fs.info(path)["size"]) == expected.size
        except FileNotFoundError:
            return False

    def upload_manifest(self, manifest: StepManifest) -> None:
        """Upload the commit marker of ``manifest.step`` and verify it; call it last."""
        path = self.manifest_path(manifest.step)
        self.fs.pipe_file(path, encode_manifest(manifest))
        self.fs.invalidate_cache(path)
        back = decode_manifest(self.fs.cat_file(path), self.where(manifest.step))
        if back.checksum != manifest.checksum:
            raise CorruptCheckpointError(
                f"{self.where(manifest.step)}: the stored manifest is not the one uploaded"
            )

    # -- listing -----------------------------------------------------------------------

    def step_dirs(self) -> list[int]:
        """Steps with anything stored, committed or not, oldest first."""
        root = self._root()
        self.fs.invalidate_cache(root)
        try:
            names = self.fs.ls(root, detail=False)
        except FileNotFoundError:
            return []
        steps = (ids.parse_step_dir(str(n).rstrip("/").rsplit("/", 1)[-1]) for n in names)
        return sorted(s for s in steps if s is not None)

    def manifest(self, step: int) -> StepManifest | None:
        """The committed manifest of ``step``; None when there is none (not committed).

        CorruptCheckpointError when it does not decode or names another job or step.
        """
        path = self.manifest_path(step)
        try:
            raw = self.fs.cat_file(path)
        except FileNotFoundError:
            return None
        m = decode_manifest(raw, self.where(step))
        if m.step != step or m.job_id != self.job_id:
            raise CorruptCheckpointError(
                f"{self.where(step)}: the manifest describes job {m.job_id!r} step {m.step}"
            )
        return m

    def persisted_steps(self) -> list[int]:
        """Steps whose manifest is stored and readable, sorted; the rest are invisible."""
        out = []
        for step in self.step_dirs():
            try:
                if self.committed(step):
                    out.append(step)
            except CorruptCheckpointError as err:
                log.warning("ignoring persisted step %d: %s", step, err)
        return out

    # -- download and delete -----------------------------------------------------------

    def download_object(self, step: int, rank: int, dest_dir: Path) -> tuple[Path, int]:
        """(local path, saving world size) of ``rank``'s object of ``step``, downloaded into
        ``dest_dir`` and checked against the manifest (CheckpointNotFoundError,
        CorruptCheckpointError)."""
        m = self.manifest(step)
        if m is None:
            raise CheckpointNotFoundError(f"{self.where(step)}: no persisted manifest")
        dest = dest_dir / ids.object_name(rank)
        if rank not in m.objects:
            return dest, m.world_size  # another world size: the caller says so
        self.fs.get_file(self.object_path(step, rank), str(dest))
        found = object_digest(dest)
        want = m.objects[rank]
        if found is None or found != (want.size, want.digest):
            raise CorruptCheckpointError(
                f"{self.where(step, rank)}: the downloaded object is not the one the "
                "persisted manifest names"
            )
        return dest, m.world_size

    def delete_step(self, step: int) -> None:
        """Remove everything stored for ``step`` (absent is fine)."""
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self.step_path(step), recursive=True)
        self.fs.invalidate_cache(self._root())

    def delete_persisted_step(self, step: int) -> None:
        """Remove a persisted step: its manifest first, so it is never half-visible."""
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.manifest_path(step))
        self.delete_step(step)

    def step_age_s(self, step: int) -> float | None:
        """Seconds since the newest file of ``step`` landed; None when the store cannot say."""
        try:
            names = self.fs.ls(self.step_path(step), detail=False)
            stamps = [self.fs.modified(str(n)) for n in names]
        except (FileNotFoundError, NotImplementedError):
            return None
        if not stamps:
            return None
        newest = max(stamps)
        now = datetime.datetime.now(newest.tzinfo or datetime.timezone.utc)
        if newest.tzinfo is None:
            now = now.replace(tzinfo=None)
        return (now - newest).total_seconds()

    def gc(
        self, keep_last: int | None = None, grace_s: float = 3600.0, dry_run: bool = False
    ) -> StoreGcPlan:
        """Delete half-uploaded steps and, with ``keep_last``, persisted steps beyond the
        newest ``keep_last`` (``plan_store_gc``); returns what was (or would be) deleted."""
        present = self.step_dirs()
        persisted, non_finite = [], []
        for step in present:
            try:
                m = self.manifest(step)
            except CorruptCheckpointError as err:
                log.warning("persisted step %d is not readable, so half-uploaded: %s", step, err)
                continue
            if m is not None:
                persisted.append(step)
                if not m.finite:
                    non_finite.append(step)
        newest = max(persisted, default=None)
        young = [s for s in present if s not in persisted and (newest is None or s > newest)]
        ages = {s: self.step_age_s(s) for s in young} if grace_s > 0 else {}
        plan = plan_store_gc(present, persisted, keep_last=keep_last, non_finite=non_finite,
                             ages_s=ages, grace_s=grace_s)  # fmt: skip
        if not dry_run:
            for step in plan.expired:
                self.delete_persisted_step(step)
            for step in plan.half_uploaded:
                self.delete_step(step)
            if plan.expired or plan.half_uploaded:
                log.info("gc of %s: deleted half-uploaded steps %s and persisted steps %s",
                         self.where(), list(plan.half_uploaded),
                         list(plan.expired))  # fmt: skip
        return plan

    def clean_leftovers(self, below: int) -> list[int]:
        """Delete the uncommitted steps older than ``below`` (half-uploaded); returns them."""
        removed = []
        for step in self.step_dirs():
            if step >= below:
                break
            try:
                if self.committed(step):
                    continue
            except CorruptCheckpointError as err:
                log.warning("removing persisted step %d: %s", step, err)
            self.delete_step(step)
            removed.append(step)
        if removed:
            log.info("removed half-uploaded steps %s from %s", removed, self.where())
        return removed
