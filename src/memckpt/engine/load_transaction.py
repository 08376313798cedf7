"""One collective load of a checkpoint, as a transaction mirroring the save transaction.

Call sequence, on every rank (``LoadTransaction.run`` drives it for per-rank APIs)::

    txn = LoadTransaction(runtime, step=None)    # nothing touched yet
    plan = txn.plan()                            # inventories exchanged (collective), then the
                                                 # pure plan: newest complete, undamaged step
    txn.locator()                                # where each object is: a local copy whose
                                                 # digest the manifest names, else each holder
                                                 # in turn, whatever strategy put it there
    ... read into the destination, verifying every chunk (the caller's read function) ...
    decision = txn.vote(error, written)          # all-gather every rank's outcome (collective)
                                                 # -> decide_after_vote (pure): done, fall back
                                                 # to an older step, or raise
    txn.finish()                                 # the manifest on every node (collective), then
                                                 # re-replication in the background

Readers that DCP or Megatron drive (their planners decide what each rank reads) use
``plan``, ``locator`` and ``finish`` and let their framework's own collective report
failures; damage they find is recorded by the locator, so the next ``plan`` of every
rank and every restart passes over the step.

A step the tier policy takes from the durable tier (``memckpt.engine.tiers``: no memory
step at or above it) loads through ``load_persisted``, the same shape::

    with open_copy(step) as copy                 # this rank's persisted object, here and
                                                 # checked against the persisted manifest
    ... read into the destination, verifying every chunk ...
    vote                                         # all-gather (collective); a failure raises
    engine.reseed(step, copy.path)               # back into the memory tier, committed as a
                                                 # save is (vote and manifest in the background)

The rule "never return None after touching the caller's tensors" lives here: once a
failed attempt has written into the destination on any rank, the load ends with a step
that rewrote every touched tensor or with ``StateModifiedError``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from memckpt.engine.recovery_plan import (
    NON_FINITE_REASON,
    RecoveryPlan,
    check_on_non_finite,
    plan_recovery,
)
from memckpt.engine.runtime import NodeRuntime
from memckpt.engine.sources import ObjectLocator, ObjectSource
from memckpt.errors import (
    CheckpointNotFoundError,
    ConfigError,
    CorruptCheckpointError,
    MemckptError,
    NonFiniteStateError,
    StateModifiedError,
    StorageIOError,
    TransferError,
    WorldSizeMismatchError,
)
from memckpt.ids import validate_step
from memckpt.replication.replicator import plan_copies
from memckpt.settings import ON_NON_FINITE_ENV
from memckpt.storage import events
from memckpt.storage.inventory import Inventory
from memckpt.storage.manifest import StepManifest
from memckpt.storage.reader import ObjectReader

__all__ = [
    "LoadDecision",
    "LoadInfo",
    "LoadTransaction",
    "PersistedCopy",
    "RankOutcome",
    "decide_after_vote",
    "load_persisted",
    "world_size_error",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

RETRYABLE: tuple[str, ...] = (
    CorruptCheckpointError.__name__,
    "DataDamagedError",
    TransferError.__name__,
    StateModifiedError.__name__,
    CheckpointNotFoundError.__name__,
)
"""Failures that say "this step's bytes could not be had": an older step may still load."""


@dataclass(frozen=True)
class LoadInfo:
    """What the last load did on this rank."""

    step: int
    path: str
    seconds: float
    fell_back_from: tuple[int, ...] = ()
    source_rank: int = -1
    sources: dict[int, int] | None = None
    fetched_bytes: int = 0
    fetch_s: float = 0.0
    tier: str = "memory"  # or "persistent": the tier policy resumed from the drained copy

    @property
    def fetched(self) -> bool:
        """Whether this rank's data came from a peer's node."""
        return self.fetched_bytes > 0


@dataclass(frozen=True)
class RankOutcome:
    """One rank's word on an attempt: did its read succeed, and had it touched the state."""

    ok: bool
    kind: str = ""
    message: str = ""
    touched: bool = False


@dataclass(frozen=True)
class LoadDecision:
    """What every rank does after a vote: ``action`` is "done", "fallback" or "raise"."""

    action: str
    failed: tuple[tuple[int, str, str], ...] = ()
    any_touched: bool = False
    reason: str = ""


def decide_after_vote(
    outcomes: Sequence[RankOutcome], *, explicit_step: bool, floor: int | None = None
) -> LoadDecision:
    """The pure decision after an attempt's vote (every rank decides the same).

    All ok: done. Else, when the caller did not name the step and every failure is one
    of ``RETRYABLE`` (damaged or unreachable bytes), fall back to an older step. Anything
    else (a state dict that does not fit, a class not allowed to load) is raised: an
    older step would fail the same way.
    """
    failed = tuple((r, o.kind, o.message) for r, o in enumerate(outcomes) if not o.ok)
    touched = any(o.touched for o in outcomes)
    if not failed:
        return LoadDecision("done", (), touched)
    if not explicit_step and all(kind in RETRYABLE for _, kind, _ in failed):
        return LoadDecision("fallback", failed, touched, "damaged or unreachable data")
    return LoadDecision("raise", failed, touched)


def resolve_on_non_finite(value: str | None) -> str:
    """The policy for steps saved holding NaN/Inf: ``value``, else the environment's, else skip."""
    if value is None:
        value = os.environ.get(ON_NON_FINITE_ENV) or "skip"
        try:
            return check_on_non_finite(value)
        except ConfigError as e:
            raise ConfigError(f"{ON_NON_FINITE_ENV}: {e}") from None
    return check_on_non_finite(value)


def world_size_error(job_id: str, world_size: int, plan: RecoveryPlan) -> WorldSizeMismatchError:
    assert plan.world_size_mismatch is not None
    step, saved = plan.world_size_mismatch
    return WorldSizeMismatchError(
        f"step {step} of job {job_id!r} was saved by {saved} ranks; this job runs "
        f"{world_size}. A memory checkpoint loads only into the world size that "
        "saved it (loading a subset would drop other ranks' shards). To change the "
        "number of ranks, reshard through torch.distributed.checkpoint (the DCP "
        "adapter) or load your persistent checkpoint; to ignore such steps pass "
        "on_world_size_mismatch='skip'."
    )


@dataclass
class _Attempt:
    plan: RecoveryPlan
    inventories: list[Inventory]
    locator: ObjectLocator | None = None
    started: float = field(default_factory=time.perf_counter)


class LoadTransaction:
    """See the module docstring. Every method marked collective is called by every rank.

    Args:
        runtime: the job's node runtime.
        step: the step to load, or None for the newest complete one (falls back).
        on_world_size_mismatch: ``"raise"``, ``"skip"`` (per-rank APIs) or ``"allow"``
            (resharding readers, which read any saved rank's object).
        newer_than: only steps newer than this are considered (a tier policy that
            prefers another tier at or below it).
        on_non_finite: what to do with a step saved holding NaN/Inf: ``"skip"`` (pass
            over it to the newest finite step, one log line per rank), ``"load"`` (load
            it like any other), ``"raise"`` (NonFiniteStateError). None: the
            ``MEMCKPT_ON_NON_FINITE`` environment variable, else ``"skip"``.
    """

    def __init__(
        self,
        runtime: NodeRuntime,
        step: int | None = None,
        *,
        on_world_size_mismatch: str = "raise",
        newer_than: int | None = None,
        on_non_finite: str | None = None,
    ) -> None:
        self.runtime = runtime
        self.step = validate_step(step) if step is not None else None
        self.on_world_size_mismatch = on_world_size_mismatch
        self.newer_than = newer_than
        self.on_non_finite = resolve_on_non_finite(on_non_finite)
        self._told_non_finite = False
        self.excluded: list[int] = []
        self.touched: set[str] = set()  # this rank's tensors a failed attempt wrote into
        self.any_touched = False
        self._attempt: _Attempt | None = None
        self._t0 = time.perf_counter()

    @property
    def rank(self) -> int:
        return self.runtime.rank

    @property
    def job_id(self) -> str:
        return self.runtime.store.job_id

    @property
    def inventories(self) -> list[Inventory]:
        """Every rank's inventory as the last ``plan()`` exchanged it."""
        assert self._attempt is not None, "plan() first"
        return self._attempt.inventories

    # -- collective steps ---------------------------------------------------------------
    def plan(self) -> RecoveryPlan:
        """Exchange inventories and plan the next attempt (collective).

        Raises WorldSizeMismatchError when asked to; the plan's step is None when nothing
        (more) can be loaded.
        """
        rt = self.runtime
        invs = rt.exchange_inventories()
        plan = plan_recovery(
            invs,
            rt.world_size,
            allow_fetch=True,
            step=self.step,
            exclude_steps=tuple(self.excluded),
            on_world_size_mismatch=self.on_world_size_mismatch,
            newer_than=self.newer_than,
            on_non_finite=self.on_non_finite,
        )
        if plan.world_size_mismatch is not None:
            raise world_size_error(self.job_id, rt.world_size, plan)
        if plan.non_finite is not None:
            bad, detail = plan.non_finite
            raise NonFiniteStateError(
                f"step {bad} of job {self.job_id!r} was saved holding NaN/Inf ({detail}); "
                "on_non_finite='raise' refuses it. Pass on_non_finite='skip' to resume from "
                "the newest finite step, or 'load' to load it anyway"
            )
        passed = [s for s, why in plan.skipped.items() if why.startswith(NON_FINITE_REASON)]
        if passed and not self._told_non_finite:  # once per load, on every rank
            self._told_non_finite = True
            log.warning("rank %d: passing over step(s) %s: %s; %s",
                        self.rank, sorted(passed, reverse=True), plan.skipped[max(passed)],
                        f"loading step {plan.step}" if plan.step is not None
                        else "no finite step to load")  # fmt: skip
        self._attempt = _Attempt(plan, invs)
        return plan

    def locator(self) -> ObjectLocator:
        """Where the planned step's objects are (collective the first time: the peers meet)."""
        a = self._attempt
        assert a is not None and a.plan.step is not None and a.plan.manifest is not None, "plan()"
        if a.locator is None:
            network = self.runtime.connect()
            m = a.plan.manifest
            a.locator = ObjectLocator(self.runtime.store, network, a.inventories, a.plan.step,
                                      dict(enumerate(m.digests)), m.checksum)  # fmt: skip
        return a.locator

    def vote(self, error: BaseException | None, written: Iterable[str] = ()) -> LoadDecision:
        """All-gather this attempt's outcome and decide (collective); see decide_after_vote."""
        a = self._attempt
        assert a is not None and a.plan.step is not None
        written = set(written)
        if error is None:
            missing = self.touched - written
            if missing:
                error = StateModifiedError(
                    f"step {a.plan.step} does not rewrite tensors {sorted(missing)[:5]} that "
                    "a failed load of a newer step had written into"
                )
        else:
            self.touched |= written
        mine = RankOutcome(error is None, type(error).__name__ if error else "",
                           str(error) if error else "", bool(self.touched))  # fmt: skip
        votes = self.runtime.coll.all_gather_object(mine, f"load vote for step {a.plan.step}")
        if a.locator is not None:  # every rank is past its reads of this attempt
            a.locator.set_aside_damaged()
        decision = decide_after_vote(votes, explicit_step=self.step is not None)
        self.any_touched = decision.any_touched
        if decision.action == "fallback":
            why = "; ".join(f"rank {r}: {m}" for r, _, m in decision.failed)
            log.warning("rank %d: step %d cannot be loaded (%s); trying an older one",
                        self.rank, a.plan.step, why)  # fmt: skip
            self.excluded.append(a.plan.step)
        return decision

    def finish(self, *, fetched_from: int | None = None) -> None:
        """The loaded step is the job's again (collective): manifest here, copies restored.

        Ranks whose node lacks the manifest get it from a node that has it; then
        ``restore_copies``.
        """
        a = self._attempt
        assert a is not None and a.plan.step is not None, "plan() first"
        self.runtime.ensure_manifest(a.plan)
        self.restore_copies(fetched_from=fetched_from)

    def restore_copies(self, *, fetched_from: int | None = None) -> None:
        """After this rank's part of the load succeeded: copies lost with a node come back.

        Not collective. Retention counts the loaded step as the job's current one. In the
        background, for a per-rank API loading the world size that saved the step, a rank
        that read its object from a peer (``fetched_from``) keeps a local copy again and
        pushes it to the strategy's holders that lack it; for a resharding reader (or
        another world size) each saved object is pushed, by its first holder, to as many
        nodes as the strategy keeps (``plan_copies``). A strategy that does not fit this
        layout skips re-replication, said in one log line.
        """
        a = self._attempt
        assert a is not None and a.plan.step is not None and a.plan.manifest is not None
        rt, plan, step = self.runtime, a.plan, a.plan.step
        rt.engine.note_loaded(step, replicated=False)
        net = rt.network
        if net is None:
            return
        if not net.pushes:  # no strategy, or one that does not fit (said once, at setup)
            return
        invs = a.inventories
        manifest = plan.manifest
        per_rank = self.on_world_size_mismatch != "allow" and manifest.world_size == rt.world_size
        if per_rank:
            digest = manifest.digests[self.rank]
        else:
            holders = {
                r: [h for h, inv in enumerate(invs)
                    if (held := inv.get(step)) is not None and held.objects.get(r) == d]
                for r, d in enumerate(manifest.digests)
            }  # fmt: skip
            mine = plan_copies(holders, net.topology.node_of, net.copies).get(self.rank, [])

        def rereplicate() -> None:
            try:
                if per_rank:
                    if fetched_from is not None:
                        net.fetch(step, self.rank, fetched_from)
                    outcome = net.rereplicate(step, invs, digest)
                else:
                    outcome = net.move_copies(step, mine)
            except MemckptError as e:
                log.warning("rank %d: could not restore the copies of step %d: %s", self.rank,
                            step, e)  # fmt: skip
                return
            if outcome.ok and outcome.holders:
                log.info("rank %d: step %d replicated again to ranks %s (%.1f MB, %.3fs)",
                         self.rank, step, outcome.holders, outcome.nbytes / 1e6,
                         outcome.seconds)  # fmt: skip

        rt.engine.submit_background(rereplicate)

    # -- the whole sequence for per-rank APIs ------------------------------------------
    def run(self, read: Callable[[ObjectSource, set[str]], T]) -> tuple[T, LoadInfo] | None:
        """Load this rank's object of the newest loadable step (collective).

        ``read(source, written)`` reads this rank's object into the destination, adding
        every destination tensor it wrote into to ``written``. Returns (its result, what
        the load did), or None when no step exists and nothing was touched. Raises
        CheckpointNotFoundError for an explicit step that cannot be loaded,
        StateModifiedError when a failed attempt touched the destination and no step
        rewrote it, and the first rank's error for failures an older step cannot cure.
        """
        while True:
            plan = self.plan()
            if plan.step is None:
                if self.any_touched:
                    raise StateModifiedError(
                        f"no complete step of job {self.job_id!r} could be loaded (tried "
                        f"{self.excluded}), and a failed attempt had already written into "
                        f"the state dict's tensors on some rank ({sorted(self.touched)[:5]} "
                        "here): they hold partly loaded values. Rebuild the model and "
                        "optimizer state (or load your persistent checkpoint) before training"
                    )
                if self.step is not None:
                    why = plan.skipped.get(self.step, "no rank holds it")
                    raise CheckpointNotFoundError(
                        f"step {self.step} of job {self.job_id!r} cannot be loaded: {why}"
                    )
                log.info("rank %d: no complete memory checkpoint of job %s", self.rank,
                         self.job_id)  # fmt: skip
                return None
            t_read = time.perf_counter()
            error: BaseException | None = None
            result: Any = None
            written: set[str] = set()
            received = [0]
            holder: int | None = None
            planned = plan.sources.get(self.rank, self.rank)
            try:
                locator = self.locator()

                def attempt(
                    src: ObjectSource, _w: set[str] = written, _r: list[int] = received
                ) -> Any:
                    out = read(src, _w)
                    _r[0] = getattr(src, "bytes_received", 0)
                    return out

                result, holder = locator.read(
                    self.rank, attempt, first=None if planned == self.rank else planned
                )
            except MemckptError as e:
                error = e
            decision = self.vote(error, written)
            if decision.action == "done":
                return result, self._done(plan, holder, received[0], time.perf_counter() - t_read)
            if decision.action == "fallback":
                continue
            if decision.any_touched and not isinstance(error, StateModifiedError):
                r, kind, msg = decision.failed[0]
                raise StateModifiedError(
                    f"step {plan.step} failed to load on rank {r} ({kind}: {msg}) after "
                    "damaged bytes had reached the state dict's tensors on some rank; "
                    "rebuild the state before training"
                )
            if error is not None:
                raise error
            r, kind, msg = decision.failed[0]
            raise MemckptError(f"step {plan.step} failed to load on rank {r}: {kind}: {msg}")

    def _done(
        self, plan: RecoveryPlan, holder: int | None, fetched: int, fetch_s: float
    ) -> LoadInfo:
        assert plan.step is not None
        source = self.rank if holder is None else holder
        path = self.runtime.store.object_path(plan.step, self.rank)
        # steps passed over because their data is damaged count as fallbacks, whether this
        # load found the damage or an earlier one did (the plan reads its marks)
        marked = [s for s, why in plan.skipped.items() if why.startswith("damaged")]
        info = LoadInfo(
            plan.step,
            str(path),
            time.perf_counter() - self._t0,
            tuple(sorted({*self.excluded, *marked}, reverse=True)),
            source_rank=source,
            sources={**plan.sources, self.rank: source},
            fetched_bytes=fetched if holder is not None else 0,
            fetch_s=fetch_s if holder is not None else 0.0,
        )
        log.info("rank %d: loaded step %d from %s%s", self.rank, plan.step, path,
                 f" (read from rank {source}'s node)" if info.fetched else "")  # fmt: skip
        events.emit("loaded", step=plan.step, rank=self.rank, source=source, job=self.job_id,
                    tier="peer" if info.fetched else "memory", seconds=info.seconds)  # fmt: skip
        self.finish(fetched_from=source if info.fetched else None)
        return info


# -- from the durable tier ---------------------------------------------------------------------


@dataclass(frozen=True)
class PersistedCopy:
    """This rank's object of a persisted step, on this machine and checked against the
    persisted ``manifest`` (size and header digest); ``where`` names it for messages.

    ``scratch``: a download of the caller's own, next to the memory tier, that the re-seed
    may take over by a rename instead of copying it.
    """

    path: Path
    manifest: StepManifest
    where: str
    scratch: bool = False


def load_persisted(
    runtime: NodeRuntime,
    step: int,
    open_copy: Callable[[int], contextlib.AbstractContextManager[PersistedCopy]],
    read: Callable[[ObjectSource, set[str]], T],
    *,
    tier: str,
    reseed: bool = True,
) -> tuple[T, LoadInfo]:
    """Load persisted ``step`` into the destination and put it back into memory (collective).

    See the module docstring for the sequence. ``open_copy(step)`` gives this rank's
    verified object (downloading it from a URL); ``tier`` names the durable tier in
    messages. Any rank's failure raises on every rank, before anything is re-seeded. With
    ``reseed`` every rank then commits the step into the memory tier through the engine
    (``SaveEngine.reseed``: moved when ``copy.scratch``, else copied), so a failure right
    after this restart recovers from memory and peers; that commit runs in the background
    (``engine.wait_idle`` waits for it) and a failure of it is logged, never raised: the
    load succeeded.
    """
    t0 = time.perf_counter()
    rank, world = runtime.rank, runtime.world_size
    job = runtime.store.job_id
    result: Any = None
    error: MemckptError | None = None
    where = tier
    with contextlib.ExitStack() as stack:
        copy: PersistedCopy | None = None
        try:
            copy = stack.enter_context(open_copy(step))
            where = copy.where
            saved = copy.manifest.world_size
            if saved != world:
                raise WorldSizeMismatchError(
                    f"persisted step {step} of job {job!r} in {tier} was saved by {saved} "
                    f"ranks; this job runs {world}"
                )
            with ObjectReader(copy.path) as reader:
                result = read(reader, set())
        except MemckptError as e:
            error = e
        except OSError as e:  # the store: unreachable, refused, timed out
            error = StorageIOError(f"persisted step {step} in {tier}: {e}")
        votes = runtime.coll.all_gather_object(
            (error is None, f"{type(error).__name__}: {error}" if error else ""),
            f"persisted load vote for step {step}",
        )
        failed = [(r, msg) for r, (ok, msg) in enumerate(votes) if not ok]
        if failed:
            if error is not None:
                raise error
            r, msg = failed[0]
            raise MemckptError(f"persisted step {step} failed to load on rank {r}: {msg}")
        assert copy is not None
        info = LoadInfo(step, where, time.perf_counter() - t0, tier="persistent")
        log.info("rank %d: loaded persisted step %d from %s", rank, step, where)
        events.emit("loaded", step=step, rank=rank, source=rank, job=job, tier="persistent",
                    seconds=info.seconds)  # fmt: skip
        if reseed:
            _reseed(runtime, step, copy)
    return result, info


def _reseed(runtime: NodeRuntime, step: int, copy: PersistedCopy) -> None:
    """Every rank: commit its persisted object into the memory tier (vote in the background)."""
    rank = runtime.rank
    try:
        handle = runtime.engine.reseed(
            step,
            copy.path,
            digest=copy.manifest.objects[rank].digest,
            move=copy.scratch,
            blobs=copy.manifest.blobs if rank == 0 else None,
            non_finite=copy.manifest.non_finite.get(rank),
        )
    except (MemckptError, OSError) as e:  # this rank voted no: every rank's commit fails
        log.warning("rank %d: persisted step %d loaded but not put back into memory: %s",
                    rank, step, e)  # fmt: skip
        return

    def outcome(h: Any) -> None:
        err = h.exception()
        if err is not None:
            log.warning("rank %d: persisted step %d loaded but not put back into memory: %s",
                        rank, step, err)  # fmt: skip
        elif not h.wait().committed:
            log.warning("rank %d: persisted step %d loaded but not put back into memory: %s",
                        rank, step, h.wait().skipped)  # fmt: skip
        else:  # back in memory, and still in the store it came from: it is persisted
            runtime.engine.note_persisted(step, copy.where.rsplit("/", 1)[0])

    handle.add_done_callback(outcome)
