"""The step manifest: the one definition of a complete checkpoint.

Written at the global commit of a step into every node's tree
(``step-<N>/manifest.json``, by every rank of the node; same bytes, atomic
rename). It records the world size that saved the step, each rank's object
(size and digest) and named metadata blobs a framework needs on every node (DCP
``.metadata``, Megatron ``metadata.json``). ``latest()``, recovery, ``ls``,
``status``, ``gc`` and retention all read it: a step is complete when its manifest
is valid and, for every rank of the world that saved it, an object whose digest
matches lies on some live node.

An object's digest is the checksum stored in its header, which covers the
checksums of its index (and so of every tensor chunk) and of its non-tensor part.

File format: the 8 bytes ``MCKMAN01``, the xxh3-64 of the body as 16 hex digits and
a newline, then the body: UTF-8 JSON. Blobs travel base64-encoded in the body.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from memckpt.errors import CorruptCheckpointError
from memckpt.storage.format import checksum
from memckpt.storage.safe_fs import read_regular, write_atomic

__all__ = [
    "MANIFEST_MAGIC",
    "MAX_MANIFEST_BYTES",
    "NonFinite",
    "ObjectDigest",
    "StepManifest",
    "decode_manifest",
    "encode_manifest",
    "read_manifest",
    "write_manifest",
]

MANIFEST_MAGIC: Final = b"MCKMAN01"
MAX_MANIFEST_BYTES: Final = 256 << 20  # refused before reading: a planted file costs nothing
_PREFIX_LEN: Final = len(MANIFEST_MAGIC) + 17


@dataclass(frozen=True)
class ObjectDigest:
    """One rank's object as the manifest knows it: file size and header digest."""

    size: int
    digest: int


@dataclass(frozen=True)
class NonFinite:
    """One rank's tensors that held NaN or Inf when saved: how many, and the first names."""

    count: int
    names: tuple[str, ...]


MAX_NON_FINITE_NAMES: Final = 8


@dataclass(frozen=True)
class StepManifest:
    """What a globally committed step consists of (see the module docstring)."""

    job_id: str
    step: int
    world_size: int
    objects: Mapping[int, ObjectDigest]
    blobs: Mapping[str, bytes] = field(default_factory=dict)
    created_unix: float = 0.0
    non_finite: Mapping[int, NonFinite] = field(default_factory=dict)

    @property
    def finite(self) -> bool:
        """False when some rank saved NaN or Inf (see ``non_finite``)."""
        return not self.non_finite

    def non_finite_summary(self, limit: int = 3) -> str:
        """``rank 1: 'w', 'b' (+3 more)`` for the first ranks with non-finite tensors."""
        parts = []
        for r in sorted(self.non_finite)[:limit]:
            nf = self.non_finite[r]
            more = f" (+{nf.count - len(nf.names)} more)" if nf.count > len(nf.names) else ""
            parts.append(f"rank {r}: {', '.join(repr(n) for n in nf.names)}{more}")
        if len(self.non_finite) > limit:
            parts.append(f"{len(self.non_finite) - limit} more ranks")
        return "; ".join(parts)

    def __post_init__(self) -> None:
        if set(self.objects) != set(range(self.world_size)):
            raise ValueError(
                f"manifest of step {self.step} lists ranks {sorted(self.objects)}, "
                f"expected 0..{self.world_size - 1}"
            )

    @property
    def checksum(self) -> int:
        """Identifies this manifest's content (two nodes' copies agree when equal)."""
        return checksum(_body(self))

    @property
    def nbytes(self) -> int:
        return sum(o.size for o in self.objects.values())


def _body(m: StepManifest) -> bytes:
    doc = {
        "format": 1,
        "job_id": m.job_id,
        "step": m.step,
        "world_size": m.world_size,
        "created_unix": m.created_unix,
        "objects": [[r, m.objects[r].size, m.objects[r].digest] for r in range(m.world_size)],
        "blobs": {k: base64.b64encode(v).decode() for k, v in sorted(m.blobs.items())},
    }
    if m.non_finite:  # absent when finite: a finite step's bytes are those of format 1
        doc["non_finite"] = {
            str(r): [nf.count, list(nf.names)] for r, nf in sorted(m.non_finite.items())
        }
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()


def encode_manifest(m: StepManifest) -> bytes:
    body = _body(m)
    return MANIFEST_MAGIC + f"{checksum(body):016x}\n".encode() + body


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def decode_manifest(raw: bytes, where: str) -> StepManifest:
    """Parse and check a manifest; any fault is a CorruptCheckpointError naming ``where``."""

    def bad(what: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"{where}: damaged step manifest: {what}")

    if len(raw) < _PREFIX_LEN or not raw.startswith(MANIFEST_MAGIC):
        raise bad("bad magic (not a memckpt manifest)")
    try:
        stored = int(raw[len(MANIFEST_MAGIC) : _PREFIX_LEN - 1], 16)
    except ValueError:
        raise bad("unreadable checksum") from None
    body = raw[_PREFIX_LEN:]
    if checksum(body) != stored:
        raise bad("checksum mismatch")
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise bad(f"not JSON ({e})") from None
    if not isinstance(doc, dict):
        raise bad("not a JSON object")
    for key in ("step", "world_size"):
        if not _int(doc.get(key)):
            raise bad(f"field {key!r}")
    if not isinstance(doc.get("job_id"), str):
        raise bad("field 'job_id'")
    objs = doc.get("objects")
    if not isinstance(objs, list) or len(objs) != doc["world_size"]:
        raise bad("field 'objects'")
    objects: dict[int, ObjectDigest] = {}
    for entry in objs:
        if not (isinstance(entry, list) and len(entry) == 3 and all(_int(x) for x in entry)):
            raise bad(f"object entry {str(entry)[:80]}")
        objects[entry[0]] = ObjectDigest(entry[1], entry[2])
    blobs_doc = doc.get("blobs", {})
    if not isinstance(blobs_doc, dict):
        raise bad("field 'blobs'")
    blobs = {}
    for k, v in blobs_doc.items():
        if not isinstance(v, str):
            raise bad(f"blob {k!r}")
        try:
            blobs[k] = base64.b64decode(v, validate=True)
        except (binascii.Error, ValueError):
            raise bad(f"blob {k!r} is not base64") from None
    non_finite: dict[int, NonFinite] = {}
    nf_doc = doc.get("non_finite", {})
    if not isinstance(nf_doc, dict):
        raise bad("field 'non_finite'")
    for k, v in nf_doc.items():
        ok = (
            isinstance(k, str) and k.isdigit() and int(k) in objects
            and isinstance(v, list) and len(v) == 2 and _int(v[0]) and isinstance(v[1], list)
            and len(v[1]) <= MAX_NON_FINITE_NAMES and all(isinstance(n, str) for n in v[1])
        )  # fmt: skip
        if not ok:
            raise bad(f"non_finite entry {str(k)[:20]!r}")
        non_finite[int(k)] = NonFinite(v[0], tuple(n[:200] for n in v[1]))
    created = doc.get("created_unix", 0.0)
    if not isinstance(created, (int, float)) or isinstance(created, bool):
        raise bad("field 'created_unix'")
    try:
        return StepManifest(
            doc["job_id"], doc["step"], doc["world_size"], objects, blobs, float(created),
            non_finite,
        )  # fmt: skip
    except ValueError as e:
        raise bad(str(e)) from None


def read_manifest(path: str | os.PathLike[str]) -> StepManifest | None:
    """The manifest at ``path``; None when there is none. Damage raises CorruptCheckpointError."""
    p = Path(path)
    # a symlink, FIFO or device planted in its place is refused, never read or waited on
    raw = read_regular(p, MAX_MANIFEST_BYTES, "step manifest")
    if raw is None:
        return None
    return decode_manifest(raw, str(p))


def write_manifest(path: str | os.PathLike[str], manifest: StepManifest, tag: str = "") -> None:
    """Write atomically: a temporary file in the same directory, then rename over ``path``."""
    write_atomic(path, encode_manifest(manifest), tag)


def new_manifest(
    job_id: str,
    step: int,
    world_size: int,
    objects: Mapping[int, ObjectDigest],
    blobs: Mapping[str, bytes] | None = None,
    *,
    created_unix: float | None = None,
    non_finite: Mapping[int, NonFinite] | None = None,
) -> StepManifest:
    when = time.time() if created_unix is None else created_unix
    return StepManifest(job_id, step, world_size, dict(objects), dict(blobs or {}), when,
                        dict(non_finite or {}))  # fmt: skip
