"""One rank's save of one step, as a transaction with an injectable completion vote.

Call sequence, on every rank that saves the step::

    txn = SaveTransaction(store, step)       # begin: writing marker; nothing committed touched
    txn.stage(flat, layout, hash_inline=..)  # caller thread: the only blocking part
      (or txn.adopt_staged(staged): bytes staged earlier, maybe by another process)
      (then, optionally, txn.relabel(flat) or txn.restage(flat, layout): index the staged
       bytes under the names a framework chose, or copy them when they are not all there)
      (or txn.adopt_object(buf): a complete, verified object, such as a step restored from
       the durable tier and put back into memory; finalize then has nothing to do)
    ---- background ----
    txn.finalize(world_size)                 # checksums, index, header -> ObjectDigest
    txn.commit_local()                       # atomic rename into step-<N>/
    txn.replicate(replicator)                # push to holder nodes; reports, never raises
    manifest = txn.complete(vote, blobs)     # vote -> manifest on this node, or rollback +
                                             # CommitError naming the failed ranks
    (or txn.fail(vote, error) at any point before complete: votes no, rolls back)

The vote is any ``Vote``: ``collective_vote(coll)`` all-gathers every rank's
``Ballot`` on a gloo group (the default); a framework can supply its own (DCP's
finish, NVRx's finalize) as long as it returns every saving rank's ballot, indexed
by rank. The manifest is built from the ballots, so every node that took part in
the vote writes the same manifest without another round trip.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memckpt.collectives import Collectives
from memckpt.engine.staging import stage_into
from memckpt.errors import CommitError
from memckpt.replication.replicator import ReplicationOutcome, Replicator
from memckpt.storage.faults import fault_point
from memckpt.storage.format import read_header
from memckpt.storage.manifest import (
    MAX_NON_FINITE_NAMES,
    NonFinite,
    ObjectDigest,
    StepManifest,
    new_manifest,
)
from memckpt.storage.pool import Buffer
from memckpt.storage.statedict import FlatStateDict
from memckpt.storage.store import CheckpointStore
from memckpt.storage.writer import ObjectLayout, StagedObject, finalize, relabel

__all__ = [
    "Ballot",
    "SaveSkipped",
    "SaveTransaction",
    "Vote",
    "collective_vote",
    "single_rank_vote",
]


class SaveSkipped(Exception):
    """Some rank had no room for the step: every rank skips it (a result, not an error)."""


@dataclass(frozen=True)
class Ballot:
    """One rank's word on a step: did its part commit locally, and what it wrote."""

    rank: int
    ok: bool
    error: str = ""
    replicated: bool = False
    object: ObjectDigest | None = None
    blobs: Mapping[str, bytes] = field(default_factory=dict)
    unix: float = 0.0  # when the rank voted; the manifest's time is the latest of them
    non_finite: NonFinite | None = None  # tensors of this rank that held NaN/Inf
    skipped: bool = False  # not ok because the save did not fit: every rank skips it


Vote = Callable[[int, Ballot], Sequence[Ballot]]
"""(step, this rank's ballot) -> every saving rank's ballot, indexed by rank."""


def collective_vote(coll: Collectives) -> Vote:
    """The default vote: all-gather the ballots on ``coll`` (times out into CollectiveError)."""

    def vote(step: int, ballot: Ballot) -> Sequence[Ballot]:
        return coll.all_gather_object(ballot, f"commit vote for step {step}")

    return vote


def single_rank_vote(step: int, ballot: Ballot) -> Sequence[Ballot]:
    """A world of one: this rank's ballot is the result."""
    return [ballot]


class SaveTransaction:
    """See the module docstring for the call sequence. Not thread-safe; one thread at a time."""

    def __init__(self, store: CheckpointStore, step: int, *, held: Sequence[int] = ()) -> None:
        self.store = store
        self.step = step
        self.held = tuple(held)  # ranks whose replicas of this step this rank receives
        self.buf: Buffer | None = None
        self.staged: StagedObject | None = None
        self.digest: ObjectDigest | None = None
        self.path: Path | None = None
        self.outcome: ReplicationOutcome | None = None
        self.restored = False  # adopt_object: a complete object, not a new save
        self._non_finite: NonFinite | None = None  # adopt_object's, as its manifest said
        self._restored_bytes = 0
        self.hash_s = 0.0
        self.file_bytes = 0
        self._committed_locally = False
        self.manifest: StepManifest | None = None
        store.begin(step)
        fault_point("after_begin", step)

    # -- caller thread -------------------------------------------------------------------
    def stage(
        self,
        flat: FlatStateDict,
        layout: ObjectLayout,
        *,
        hash_inline: bool,
        chunk_size: int,
        check_finite: Callable[[str], bool] | None = None,
        cuda_stream: Any = None,
    ) -> StagedObject:
        """Copy the tensors into a pool buffer; the caller may change them afterwards.

        A buffer staged before (``adopt_staged``) goes back to its pool once the copy is
        done (the copy may read from it).
        """
        old = self.buf
        staged = stage_into(self.store.pool, flat, layout, hash_inline=hash_inline,
                            chunk_size=chunk_size, step=self.step,
                            cuda_stream=cuda_stream)  # fmt: skip
        self.buf, self.staged = staged.buf, staged
        if old is not None:
            self.store.pool.give_back(old)
        self._set_check_finite(flat, check_finite)
        fault_point("after_stage", self.step)
        return staged

    def adopt_staged(self, staged: StagedObject) -> None:
        """Take bytes staged earlier (``memckpt.engine.staging``) as this save's buffer."""
        self.buf, self.staged = staged.buf, staged

    def adopt_object(self, buf: Buffer, non_finite: NonFinite | None = None) -> ObjectDigest:
        """Take a buffer that holds a complete object of this rank and step, verified by the
        caller (a restore from the durable tier): nothing to stage or finalize.

        ``non_finite`` is what the object's manifest recorded of it (NaN/Inf at save time).
        """
        self.buf, self.staged, self.restored = buf, None, True  # rollback frees it from here
        header = read_header(buf.fd, str(buf.path))
        self._non_finite = non_finite
        self.digest = ObjectDigest(os.fstat(buf.fd).st_size, header.digest)
        self.file_bytes = header.index_offset + header.index_length
        self._restored_bytes = header.data_length
        return self.digest

    def relabel(
        self, flat: FlatStateDict, *, check_finite: Callable[[str], bool] | None = None
    ) -> bool:
        """Index the staged bytes under ``flat``'s names and skeleton (no copy): True when
        every tensor of ``flat`` is a view of them, else False and nothing changes."""
        assert self.staged is not None, "stage() or adopt_staged() first"
        out = relabel(self.staged, flat)
        if out is None:
            return False
        self.staged = out
        self._set_check_finite(flat, check_finite)
        return True

    def _set_check_finite(
        self, flat: FlatStateDict, check_finite: Callable[[str], bool] | None
    ) -> None:
        if check_finite is not None and self.staged is not None:
            self.staged.check_finite = [bool(check_finite(n)) for n in flat.names]

    # -- background ----------------------------------------------------------------------
    def finalize(self, world_size: int, *, durable: bool = False) -> ObjectDigest:
        """Checksums, index and header; returns the object's digest."""
        if self.restored:
            assert self.digest is not None
            return self.digest
        assert self.staged is not None and self.buf is not None, "stage() first"
        store = self.store
        self.file_bytes, self.hash_s = finalize(
            self.staged,
            job_id=store.job_id,
            step=self.step,
            rank=store.rank,
            world_size=world_size,
            durable=durable,
        )
        header = read_header(self.buf.fd, str(self.buf.path))
        self.digest = ObjectDigest(os.fstat(self.buf.fd).st_size, header.digest)
        return self.digest

    def commit_local(self) -> Path:
        """Publish the object in this node's tree (atomic rename)."""
        assert self.buf is not None and self.digest is not None, "finalize() first"
        fault_point("before_local_commit", self.step)
        self.path = self.store.commit_local(self.step, self.buf)
        self._committed_locally = True
        fault_point("after_local_commit", self.step)
        return self.path

    def replicate(self, replicator: Replicator | None) -> ReplicationOutcome | None:
        """Push the object to its holder nodes; reports, never raises."""
        if replicator is None:
            return None
        self.outcome = replicator.replicate(self.step)
        fault_point("after_replicate", self.step)
        return self.outcome

    def complete(
        self, vote: Vote, blobs: Mapping[str, bytes] | None = None
    ) -> tuple[StepManifest, bool]:
        """Vote; on success write the manifest here and return (manifest, all replicated).

        On a failed vote this rank's object and the replicas it holds of the step are
        rolled back (a replaced committed copy comes back) and CommitError names the
        ranks that failed and why.
        """
        replicated = self.outcome is not None and self.outcome.ok
        bad = self.staged.non_finite if self.staged is not None else []
        nf = NonFinite(len(bad), tuple(bad[:MAX_NON_FINITE_NAMES])) if bad else self._non_finite
        ballot = Ballot(self.store.rank, True, "", replicated, self.digest, dict(blobs or {}),
                        time.time(), nf)  # fmt: skip
        try:
            ballots = list(vote(self.step, ballot))
        except BaseException:
            self.rollback()
            raise
        failed = [b for b in ballots if not b.ok]
        if failed and all(b.skipped for b in failed):
            self.rollback()
            raise SaveSkipped("; ".join(f"rank {b.rank} {b.error}" for b in failed))
        if failed:
            self.rollback()
            detail = "; ".join(f"rank {b.rank}: {b.error}" for b in failed)
            raise CommitError(
                f"step {self.step} was not committed because other ranks failed ({detail}); "
                "the previous checkpoint is kept"
            )
        fault_point("after_vote", self.step)
        merged: dict[str, bytes] = {}
        for b in ballots:
            merged.update(b.blobs)
        digests = {b.rank: b.object for b in ballots if b.object is not None}
        # built from the ballots alone, so every node writes the very same bytes
        non_finite = {b.rank: b.non_finite for b in ballots if b.non_finite is not None}
        manifest = new_manifest(self.store.job_id, self.step, len(ballots), digests, merged,
                                created_unix=max(b.unix for b in ballots),
                                non_finite=non_finite)  # fmt: skip
        self.manifest = manifest
        self.store.write_manifest(manifest)
        fault_point("after_manifest", self.step)
        self.store.settle(self.step, (self.store.rank, *self.held))
        return manifest, all(b.replicated for b in ballots)

    def fail(self, vote: Vote, error: BaseException) -> None:
        """Vote no (the other ranks learn why instead of timing out), then roll back."""
        try:
            vote(self.step, Ballot(self.store.rank, False, f"{type(error).__name__}: {error}"))
        finally:
            self.rollback()

    def skip(self, vote: Vote, reason: str) -> None:
        """Vote that this rank has no room for the step (every rank skips it), roll back."""
        try:
            vote(self.step, Ballot(self.store.rank, False, reason, skipped=True))
        finally:
            self.rollback()

    def rollback(self) -> None:
        """Undo this rank's part: before the local commit free the buffer, after it restore."""
        if self._committed_locally:
            self.store.rollback(self.step, (self.store.rank, *self.held))
        else:
            self.store.abort(self.step, self.buf)
            self.store.rollback(self.step, self.held)
        self.buf = None

    def result_fields(self) -> dict[str, Any]:
        """Figures for SaveResult."""
        staged = self.staged
        return {
            "nbytes": staged.layout.data_bytes if staged else self._restored_bytes,
            "file_bytes": self.file_bytes,
            "num_tensors": len(staged.flat_names) if staged else 0,
            "stage_s": staged.stage_s if staged else 0.0,
            "checksum_s": self.hash_s,
            "path": str(self.path),
            "replication_bytes": self.outcome.nbytes if self.outcome else 0,
            "replication_s": self.outcome.seconds if self.outcome else 0.0,
            "non_finite": tuple(staged.non_finite) if staged else (),
            "step_finite": self.manifest.finite if self.manifest is not None else True,
        }
