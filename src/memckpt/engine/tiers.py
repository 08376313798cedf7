"""The tier policy: the memory tier and a persistent tier behind one resume rule.

Every API that keeps both tiers (the recipes, Lightning/NeMo, ``State``,
``CheckpointManager(persist_every=...)``, the DCP writer's ``persist_every``) resumes by
this rule, agreed across ranks:

- the newest intact step wins; **on equal steps, memory** (it is verified on load and
  faster to read);
- memory steps are tried newest first, and only those at or above the persistent step:
  a memory step whose data turns out damaged falls back to the next older memory step
  still at or above it, else to the persistent checkpoint;
- a persistent checkpoint whose step cannot be read wins over memory (the user named
  it, and nothing says memory is newer).

Call sequence (every rank, collective where marked)::

    persistent = agreed persistent step (the caller reads it once and shares it)
    choice = resume_tiers(load_memory, persistent_step, persistent_exists)
        load_memory(floor)     collective: load the newest memory step >= floor,
                               falling back over damaged ones; None if none loaded
    choice.tier == "persistent": the caller loads its persistent checkpoint

At a normal end of training, once the newest step is persisted, ``release_memory_tier``
gives the job's memory back (tmpfs pages are RAM the next job on the node needs).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from memckpt import ids
from memckpt.engine.drain import finish_drains
from memckpt.engine.runtime import NodeRuntime
from memckpt.replication.replicator import default_node_id
from memckpt.storage.store import delete_job

__all__ = [
    "ResumeChoice",
    "choose_tier",
    "close_and_release",
    "memory_home",
    "newest_step_persisted",
    "release_memory_tier",
    "resume_tiers",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResumeChoice:
    """Where a job resumes from: ``tier`` is "memory", "persistent" or "none".

    ``step`` is the step actually loaded (memory) or the persistent step (None when
    unknown); ``memory_step`` the memory step loaded, ``persistent_step`` the persistent
    step seen.
    """

    tier: str
    step: int | None
    memory_step: int | None = None
    persistent_step: int | None = None


def choose_tier(
    memory_step: int | None, persistent_step: int | None, persistent_exists: bool
) -> str:
    """The rule on two known steps (pure): newest wins, memory on a tie.

    A persistent checkpoint that exists but whose step is unknown wins.
    """
    if persistent_exists and persistent_step is None:
        return "persistent"
    if memory_step is not None and (persistent_step is None or memory_step >= persistent_step):
        return "memory"
    return "persistent" if persistent_exists else "none"


def memory_floor(persistent_step: int | None, persistent_exists: bool) -> int | None:
    """The lowest memory step worth loading: memory wins a tie, so the persistent step."""
    if not persistent_exists:
        return None
    return persistent_step


def resume_tiers(
    load_memory: Callable[[int | None], int | None] | None,
    persistent_step: int | None,
    persistent_exists: bool,
) -> ResumeChoice:
    """Apply the rule (see the module docstring); collective through ``load_memory``.

    ``load_memory(floor)`` loads the newest memory step >= ``floor`` (None: any), falling
    back over damaged steps, and returns the step it loaded or None. Every rank passes
    the same ``persistent_step`` and ``persistent_exists``.
    """
    if persistent_exists and persistent_step is None:
        return ResumeChoice("persistent", None, None, None)
    loaded = None
    if load_memory is not None:
        loaded = load_memory(memory_floor(persistent_step, persistent_exists))
    tier = choose_tier(loaded, persistent_step, persistent_exists)
    step = loaded if tier == "memory" else persistent_step if tier == "persistent" else None
    return ResumeChoice(tier, step, loaded, persistent_step)


def memory_home(
    base_dir: str | os.PathLike[str], job_id: str, rank: int, node_id: str | None = None
) -> tuple[str, str]:
    """(node id, real path of the job's memory tier) of this rank: where its tree lives.

    The same path on two hosts is two trees, so the node id is part of it (default:
    ``MEMCKPT_NODE_ID``, else the host name, as the replicator names nodes).
    """
    root = os.path.realpath(ids.JobLayout(base_dir, job_id).root)
    return (node_id or default_node_id(rank), root)


def release_memory_tier(
    base_dir: str | os.PathLike[str],
    job_id: str,
    homes: Sequence[tuple[str, str]],
    rank: int,
    why: str,
) -> bool:
    """Delete this node's memory tier of the job, by one rank per home (``memory_home``).

    ``homes`` are every rank's home, all-gathered by the caller; call it after every rank
    has closed its runtime (a barrier), at a normal end. The lowest rank of each home
    deletes, in one log line saying ``why``. Returns whether this rank deleted.
    """
    if rank != min(r for r, home in enumerate(homes) if home == homes[rank]):
        return False
    delete_job(ids.JobLayout(base_dir, job_id))
    log.info("rank %d: removed the memory tier of job %s (%s): %s", rank, job_id,
             homes[rank][1], why)  # fmt: skip
    return True


def newest_step_persisted(runtime: NodeRuntime, persisted: Callable[[int], bool]) -> bool:
    """Whether the job's newest committed step is persisted, on every rank's view (collective).

    Waits for the save in flight and for every drain first (a remote drain at most its
    ``DrainPolicy.close_wait_s``, then it is abandoned and its step is not persisted).
    """
    runtime.engine.wait_idle()
    ended = finish_drains()  # False: abandoned, so not persisted (and the store not asked)
    newest = max(runtime.engine.committed_steps(), default=None)
    ok = ended and newest is not None and persisted(newest)
    return all(runtime.coll.all_gather_object(ok, "memory tier release: persisted"))


def close_and_release(runtime: NodeRuntime, close: Callable[[], None]) -> None:
    """Close the runtime with ``close()``, then delete each node's memory tier (collective).

    Call at a normal end once ``newest_step_persisted`` said yes. A rank whose process
    still has other users of the runtime keeps its node's tree.
    """
    coll, rank = runtime.coll, runtime.rank
    base, job = runtime.store.base_dir, runtime.store.job_id
    homes = coll.all_gather_object(
        memory_home(base, job, rank, runtime.options.node_id), "memory tier release"
    )
    sole = runtime.users == 1
    close()
    everyone = coll.all_gather_object(sole, "memory tier release: closed")  # all closed now
    if sole and all(everyone):
        release_memory_tier(base, job, homes, rank, "training ended with its newest step persisted")
