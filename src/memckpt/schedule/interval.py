"""How often to save: a fixed number of steps, or the Young/Daly optimum from cost and MTBF."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from memckpt.errors import ScheduleConfigError

__all__ = [
    "FixedInterval",
    "IntervalPlan",
    "OptimalInterval",
    "daly_interval_s",
    "interval_steps",
    "young_interval_s",
]


def _check(cost_s: float, mtbf_s: float) -> None:
    if not (math.isfinite(cost_s) and cost_s >= 0):
        raise ScheduleConfigError(f"save cost must be a finite number >= 0 s, got {cost_s!r}")
    if not (math.isfinite(mtbf_s) and mtbf_s > 0):
        raise ScheduleConfigError(f"mean time between failures must be > 0 s, got {mtbf_s!r}")


def young_interval_s(cost_s: float, mtbf_s: float) -> float:
    """Young's first-order optimum: sqrt(2 C M) seconds between saves."""
    _check(cost_s, mtbf_s)
    return math.sqrt(2.0 * cost_s * mtbf_s)


def daly_interval_s(cost_s: float, mtbf_s: float) -> float:
    """Daly's higher-order optimum in seconds; M itself once a save costs 2 M or more.

    For C < 2M: sqrt(2CM) * (1 + sqrt(C/(2M))/3 + C/(2M)/9) - C.
    """
    _check(cost_s, mtbf_s)
    if cost_s >= 2.0 * mtbf_s:
        return mtbf_s
    ratio = cost_s / (2.0 * mtbf_s)
    return math.sqrt(2.0 * cost_s * mtbf_s) * (1.0 + math.sqrt(ratio) / 3.0 + ratio / 9.0) - cost_s


def interval_steps(interval_s: float, mean_iteration_s: float) -> int:
    """Seconds between saves converted to whole steps (at least 1) at the mean step time."""
    if mean_iteration_s <= 0:
        return 1
    return max(1, round(interval_s / mean_iteration_s))


@dataclass(frozen=True)
class IntervalPlan:
    """The interval in force: ``steps`` between saves and why."""

    steps: int
    why: str


@dataclass(frozen=True)
class FixedInterval:
    """Save every ``steps`` steps."""

    steps: int

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ScheduleConfigError(f"save_interval must be an int >= 1, got {self.steps!r}")

    def plan(self, cost_s: float | None, mean_iteration_s: float | None) -> IntervalPlan:
        return IntervalPlan(self.steps, "fixed")


@dataclass(frozen=True)
class OptimalInterval:
    """Save every Young/Daly optimum, from the save cost C and the mean time between failures."""

    mtbf_s: float
    formula: Literal["young", "daly"] = "daly"

    def __post_init__(self) -> None:
        if not (isinstance(self.mtbf_s, (int, float)) and math.isfinite(self.mtbf_s)):
            raise ScheduleConfigError(f"mtbf_s must be a finite number, got {self.mtbf_s!r}")
        if self.mtbf_s <= 0:
            raise ScheduleConfigError(f"mtbf_s must be > 0 seconds, got {self.mtbf_s!r}")
        if self.formula not in ("young", "daly"):
            raise ScheduleConfigError(
                f"interval_formula must be 'young' or 'daly', got {self.formula!r}"
            )

    def interval_s(self, cost_s: float) -> float:
        if self.formula == "young":
            return young_interval_s(cost_s, self.mtbf_s)
        return daly_interval_s(cost_s, self.mtbf_s)

    def plan(self, cost_s: float | None, mean_iteration_s: float | None) -> IntervalPlan | None:
        """None while the cost or the iteration time is unknown."""
        if cost_s is None or mean_iteration_s is None:
            return None
        seconds = self.interval_s(cost_s)
        steps = interval_steps(seconds, mean_iteration_s)
        name = "Young" if self.formula == "young" else "Daly"
        why = (
            f"{name}: C={cost_s:.2f}s, MTBF={self.mtbf_s:.0f}s -> {seconds:.1f}s"
            f" / {mean_iteration_s:.3g}s per step"
        )
        return IntervalPlan(steps, why)
