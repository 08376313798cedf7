"""The save decision as pure functions: predictions and one rank's view in, votes and reasons out.

A decision takes three steps, the middle one collective:

1. ``assess(view)`` on every rank: its own votes (signal, deadline, interval) and the text
   that explains each;
2. the votes travel through an element-wise max across ranks (``Votes.to_list``);
3. ``decide(assessment, agreed, step)`` on every rank: the same ``save`` and ``trigger``
   everywhere, because they depend on the agreed votes only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Literal

from memckpt.schedule.deadline import Deadline
from memckpt.schedule.interval import FixedInterval, IntervalPlan, OptimalInterval
from memckpt.schedule.signals import SignalEvent, signal_name
from memckpt.schedule.stats import IterationStats

__all__ = [
    "Assessment",
    "LocalView",
    "Prediction",
    "SaveDecision",
    "Trigger",
    "Votes",
    "assess",
    "decide",
    "predict",
]


class Trigger(str, Enum):
    """What made a save due; NONE when none is."""

    SIGNAL = "signal"
    DEADLINE = "deadline"
    INTERVAL = "interval"
    NONE = "none"


@dataclass(frozen=True)
class SaveDecision:
    """Whether to save at ``step`` (the count of ``iter()`` calls) and why.

    ``save`` and ``trigger`` are identical on every rank; ``reason`` may carry this
    rank's numbers ("on another rank" when another rank's vote decided).
    """

    save: bool
    trigger: Trigger
    reason: str
    step: int

    def __str__(self) -> str:
        return self.reason


@dataclass(frozen=True)
class Prediction:
    """What the schedule expects, recomputed every ``predict_freq`` iterations (seconds).

    ``iteration_s`` is one iteration as the deadline rule counts it (p95 or max; 0 before
    any was measured); ``save_s`` is a whole save plus the persistent save after a deadline;
    ``save_cost_s`` is what a save blocks training (C of Young/Daly). ``interval_waiting``
    names the measurement an interval policy still needs before it has a plan.
    """

    iteration: IterationStats | None
    iteration_s: float
    save_s: float
    save_cost_s: float | None
    interval: IntervalPlan | None = None
    interval_waiting: Literal["iteration time", "save cost"] | None = None
    iters_left: int | None = None
    time_to_finish_s: float | None = None


def predict(
    *,
    iteration: IterationStats | None,
    estimate: Literal["max", "p95"],
    save_blocking_s: float | None,
    save_total_s: float | None,
    save_ckpt_time: float,
    persistent_save_time: float,
    policy: FixedInterval | OptimalInterval | None,
    step: int,
    total_iters: int,
) -> Prediction:
    """Combine measurements and fallbacks into a Prediction (pure).

    Until a save was measured, ``save_ckpt_time`` stands in for both its blocking and
    total time (a cost of 0 counts as unknown for Young/Daly).
    """
    iteration_s = 0.0
    if iteration is not None:
        iteration_s = iteration.max_s if estimate == "max" else iteration.p95_s
    total = save_total_s if save_total_s is not None else save_ckpt_time
    cost = save_blocking_s
    if cost is None and save_ckpt_time > 0:
        cost = save_ckpt_time
    mean = iteration.mean_s if iteration is not None and not iteration.warmup_only else None
    plan = None
    waiting: Literal["iteration time", "save cost"] | None = None
    if policy is not None:
        plan = policy.plan(cost, mean)
        if plan is None:
            waiting = "iteration time" if mean is None else "save cost"
    iters_left = max(0, total_iters - step) if total_iters > 0 else None
    finish = None
    if iters_left is not None and iteration is not None:
        finish = iters_left * iteration.mean_s
    return Prediction(
        iteration=iteration,
        iteration_s=iteration_s,
        save_s=total + persistent_save_time,
        save_cost_s=cost,
        interval=plan,
        interval_waiting=waiting,
        iters_left=iters_left,
        time_to_finish_s=finish,
    )


@dataclass(frozen=True)
class Votes:
    """One rank's (or, after the max, all ranks') wish to save.

    ``signal`` is the number of a signal whose grace period is about to run out (0: none).
    """

    signal: int = 0
    deadline: bool = False
    interval: bool = False

    def to_list(self) -> list[float]:
        return [float(self.signal), float(self.deadline), float(self.interval)]

    @classmethod
    def from_list(cls, values: Sequence[float]) -> Votes:
        if len(values) != 3:
            raise ValueError(f"expected 3 reduced values, got {len(values)}")
        return cls(int(values[0]), values[1] > 0, values[2] > 0)


@dataclass(frozen=True)
class LocalView:
    """What one rank knows when it decides (times in seconds, unix time for ``now_unix``).

    ``saves_decided`` counts earlier save decisions; ``exit_requested`` is set once a
    deadline or signal save was decided, after which neither triggers again.
    """

    step: int
    steps_since_save: int
    saves_decided: int
    now_unix: float
    margin_s: float
    prediction: Prediction
    deadline: Deadline | None = None
    signal: SignalEvent | None = None
    signal_grace_s: float = 30.0
    exit_requested: bool = False


@dataclass(frozen=True)
class Assessment:
    """A rank's votes, the text explaining each due vote, and what is not due yet."""

    votes: Votes
    signal_reason: str = ""
    deadline_reason: str = ""
    interval_reason: str = ""
    not_yet: str = ""


def _s(seconds: float) -> str:
    # Tenths hide sub-second saves and iterations ("0.0s"); show those with 2 digits.
    if seconds == 0 or abs(seconds) >= 0.95:
        return f"{seconds:.1f}s"
    return f"{seconds:.2g}s"


def _deadline_due(deadline: Deadline, view: LocalView) -> tuple[bool, str]:
    p = view.prediction
    left = deadline.remaining_s(view.now_unix)
    need = p.save_s + p.iteration_s + view.margin_s
    if left < need:
        return True, (
            f"{_s(left)} left < save {_s(p.save_s)} + iteration {_s(p.iteration_s)}"
            f" + margin {_s(view.margin_s)}"
        )
    return False, f"{_s(left)} left, due below {_s(need)}"


def assess(view: LocalView) -> Assessment:
    """This rank's votes and their reasons (pure)."""
    signal = 0
    signal_reason = deadline_reason = interval_reason = ""
    pending: list[str] = []
    p = view.prediction

    if p.interval is not None:
        if view.steps_since_save >= p.interval.steps:
            interval_reason = (
                f"interval: {view.steps_since_save} steps since last save >= {p.interval.steps}"
            )
            if p.interval.why != "fixed":
                interval_reason += f" ({p.interval.why})"
        else:
            pending.append(f"{view.steps_since_save} of {p.interval.steps} steps")
    elif p.interval_waiting == "save cost" and view.saves_decided == 0:
        interval_reason = "interval: first save after warm-up, to measure the save cost"
    elif p.interval_waiting == "save cost":
        pending.append("interval waits for record_save() to report the save cost")
    elif p.interval_waiting == "iteration time":
        pending.append("interval waits for an iteration measured after warm-up")

    if view.exit_requested:
        pending.append("exit requested after the deadline save")
    else:
        if view.signal is not None:
            grace_end = Deadline(view.signal.received_unix + view.signal_grace_s, "signal")
            due, text = _deadline_due(grace_end, view)
            if due:
                signal = view.signal.signum
                signal_reason = f"signal {view.signal.name} received: {text}"
            else:
                pending.append(f"signal {view.signal.name}: {text}")
        if view.deadline is not None:
            due, text = _deadline_due(view.deadline, view)
            if due:
                deadline_reason = f"deadline: {text} (from {view.deadline.source})"
            else:
                pending.append(f"deadline: {text}")

    votes = Votes(signal, bool(deadline_reason), bool(interval_reason))
    not_yet = "not yet: " + ("; ".join(pending) if pending else "no interval, deadline or signal")
    return Assessment(votes, signal_reason, deadline_reason, interval_reason, not_yet)


def decide(assessment: Assessment, agreed: Votes, step: int) -> SaveDecision:
    """The decision from the votes agreed across ranks; signal, then deadline, then interval."""
    mine = assessment.votes
    if agreed.signal:
        reason = (
            assessment.signal_reason
            if mine.signal == agreed.signal
            else f"signal {signal_name(agreed.signal)} received on another rank"
        )
        return SaveDecision(True, Trigger.SIGNAL, reason, step)
    if agreed.deadline:
        reason = assessment.deadline_reason if mine.deadline else "deadline: due on another rank"
        return SaveDecision(True, Trigger.DEADLINE, reason, step)
    if agreed.interval:
        reason = (
            assessment.interval_reason
            if mine.interval
            else f"interval: due on another rank ({assessment.not_yet})"
        )
        return SaveDecision(True, Trigger.INTERVAL, reason, step)
    return SaveDecision(False, Trigger.NONE, assessment.not_yet, step)
