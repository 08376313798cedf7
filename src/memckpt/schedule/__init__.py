"""When to save: iteration timing, interval policy, deadline and signal saves, rank agreement.

``IterManager`` is the entry point; the other names are its parts, usable on their own
(the decision functions in ``policy`` are pure and need no process group).
"""

from __future__ import annotations

from memckpt.errors import DeadlineFormatError, ScheduleConfigError, SignalInstallError
from memckpt.schedule.agreement import (
    AllReduceMax,
    local_all_reduce_max,
    torch_all_reduce_max,
)
from memckpt.schedule.deadline import (
    DEADLINE_ENV_VARS,
    MEMCKPT_DEADLINE_ENV,
    MLP_DEADLINE_ENV,
    Deadline,
    parse_deadline,
)
from memckpt.schedule.interval import (
    FixedInterval,
    OptimalInterval,
    daly_interval_s,
    interval_steps,
    young_interval_s,
)
from memckpt.schedule.iter_manager import IterManager, save_times
from memckpt.schedule.policy import Prediction, SaveDecision, Trigger
from memckpt.schedule.signals import DEFAULT_SIGNALS, SignalEvent, SignalWatcher
from memckpt.schedule.stats import IterationStats

__all__ = [
    "DEADLINE_ENV_VARS",
    "DEFAULT_SIGNALS",
    "MEMCKPT_DEADLINE_ENV",
    "MLP_DEADLINE_ENV",
    "AllReduceMax",
    "Deadline",
    "DeadlineFormatError",
    "FixedInterval",
    "IterManager",
    "IterationStats",
    "OptimalInterval",
    "Prediction",
    "SaveDecision",
    "ScheduleConfigError",
    "SignalEvent",
    "SignalInstallError",
    "SignalWatcher",
    "Trigger",
    "daly_interval_s",
    "interval_steps",
    "local_all_reduce_max",
    "parse_deadline",
    "save_times",
    "torch_all_reduce_max",
    "young_interval_s",
]
