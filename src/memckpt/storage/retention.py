"""Which steps to delete: one pure policy for the engine, ``memckpt gc`` and the persistent tier.

The caller lists what exists and what is committed; the policy answers what to
keep and what to delete, and the caller deletes with its own ``delete(step)``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from memckpt.errors import ConfigError

__all__ = ["RetentionPlan", "check_keep_last", "plan_retention"]


def check_keep_last(keep_last: object, what: str = "keep_last") -> int:
    """``keep_last`` as an int >= 1, else ConfigError naming it (the one check every API uses)."""
    if not isinstance(keep_last, int) or isinstance(keep_last, bool) or keep_last < 1:
        raise ConfigError(f"{what} must be >= 1 (a whole number of steps), got {keep_last!r}")
    return keep_last


@dataclass(frozen=True)
class RetentionPlan:
    keep: frozenset[int]
    delete: tuple[int, ...]


def plan_retention(
    present: Iterable[int],
    committed: Iterable[int],
    *,
    keep_last: int,
    newest: int | None = None,
    replicated: int | None = None,
    draining: Iterable[int] = (),
    abandoned: Iterable[int] = (),
    non_finite: Iterable[int] = (),
) -> RetentionPlan:
    """Keep the newest ``keep_last`` committed steps up to ``newest``; delete older others.

    - ``newest`` is the step just committed (default: the newest committed one). Nothing
      is deleted before a step is committed, so the newest complete step always stays.
    - ``replicated``, the newest step whose every rank's data reached its peers, is
      kept until a newer one is replicated (a node loss must still find a copy).
    - ``draining`` steps (being written to persistent storage) are kept.
    - Steps newer than ``newest`` are kept (a faster peer may be saving them) unless
      they are ``abandoned``: left behind by a restart from an older step.
    - ``non_finite`` steps (saved holding NaN/Inf) count toward ``keep_last`` but the
      newest committed finite step is always kept: non-finite saves never push out the
      last step recovery would load.
    """
    check_keep_last(keep_last)
    done = sorted(set(committed))
    if newest is None:
        if not done:
            return RetentionPlan(frozenset(present), ())
        newest = done[-1]
    kept_committed = [s for s in done if s <= newest][-keep_last:]
    if newest not in kept_committed:
        kept_committed = [*kept_committed[1:], newest] if kept_committed else [newest]
    keep = set(kept_committed) | set(draining)
    bad = set(non_finite)
    good = [s for s in done if s <= newest and s not in bad]
    if good:
        keep.add(good[-1])
    if replicated is not None and replicated <= newest:
        keep.add(replicated)
    gone = set(abandoned)
    delete = sorted(s for s in set(present) if s not in keep and (s < newest or s in gone))
    return RetentionPlan(frozenset(keep), tuple(delete))
