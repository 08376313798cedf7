"""IterManager: times the training loop and says at which steps to save."""

from __future__ import annotations

import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any, Final, Literal, Protocol

from memckpt.errors import ScheduleConfigError
from memckpt.schedule.agreement import AllReduceMax, default_all_reduce_max
from memckpt.schedule.deadline import Deadline, coerce_deadline, deadline_from_env, earliest
from memckpt.schedule.interval import FixedInterval, OptimalInterval
from memckpt.schedule.policy import (
    LocalView,
    Prediction,
    SaveDecision,
    Trigger,
    Votes,
    assess,
    decide,
    predict,
)
from memckpt.schedule.progress import ProgressEvents
from memckpt.schedule.signals import DEFAULT_SIGNALS, SignalEvent, SignalWatcher, signal_name
from memckpt.schedule.stats import IterationStats, IterationTimer, SaveCosts
from memckpt.storage import events

__all__ = [
    "COMPILE_WARMUP_ITERS",
    "DEFAULT_WARMUP_ITERS",
    "IterManager",
    "PausesReplication",
    "SavesThroughState",
    "save_times",
]

log = logging.getLogger(__name__)

DEFAULT_WARMUP_ITERS: Final = 1
COMPILE_WARMUP_ITERS: Final = 5


class SavesThroughState(Protocol):
    """What ``IterManager(state=...)`` uses of a ``memckpt.State``."""

    step: int
    last_save: Any

    def save(self, step: int | None = None, *, sync: bool = True) -> Any: ...


class PausesReplication(Protocol):
    """What ``IterManager(pause_replication=...)`` uses of a ``CheckpointManager``."""

    def pause_replication(self) -> None: ...

    def resume_replication(self) -> None: ...


def _number(name: str, value: Any, *, minimum: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ScheduleConfigError(f"{name} must be a number of seconds, got {value!r}")
    if not math.isfinite(value) or value < minimum:
        raise ScheduleConfigError(f"{name} must be a finite number >= {minimum}, got {value!r}")
    return float(value)


def save_times(result: Any) -> tuple[float, float]:
    """(blocking_s, total_s) of a save: from a number of seconds or a result's attributes.

    A result needs ``total_s`` or ``blocking_s`` (memckpt's SaveResult has both); one
    stands in for the other when missing.
    """
    if isinstance(result, (int, float)) and not isinstance(result, bool):
        seconds = _number("save time", result)
        return seconds, seconds
    blocking = getattr(result, "blocking_s", None)
    total = getattr(result, "total_s", None)
    if blocking is None and total is None:
        raise ScheduleConfigError(
            f"record_save() needs seconds or an object with total_s/blocking_s (such as "
            f"the result of memckpt's SaveHandle.wait()), got {type(result).__name__}"
        )
    blocking = _number("blocking_s", blocking if blocking is not None else total)
    total = _number("total_s", total if total is not None else blocking)
    return blocking, total


class IterManager:
    """Decides at which steps to save: on an interval, before a deadline, after a signal.

    Call sequence, the same on every rank; ``should_save_ckpt`` is collective once
    torch.distributed is initialised or ``all_reduce_max`` is given::

        im.iter(step)                          # at the start of every iteration
        ...train...
        if im.should_save_ckpt():              # once per iteration, on every rank
            im.record_save(mgr.save(step, sd))  # timed when the handle completes
            if im.exit_requested:              # the save was for a deadline or signal
                im.finalize(step)              # wait for it, persistent saves, handlers back
                break

    Args:
        total_iters: iterations of the whole run (-1: unknown); only for predictions.
        redundant_time: safety margin (s) of the deadline rule.
        save_ckpt_time: a save's duration (s) until ``record_save`` measured one.
        use_torch_compile: the first iterations compile; more of them count as warm-up.
        predict_freq: recompute statistics and the interval every this many iterations.
        save_interval: save every this many steps; excludes ``mtbf_s``.
        mtbf_s: mean time between failures (s); the interval becomes the Young/Daly
            optimum from the measured blocking time of saves.
        deadline: end of the allocation (unix seconds, ISO-8601 string or aware datetime),
            besides the environment variables in ``memckpt.schedule.DEADLINE_ENV_VARS``.
        signals: signals meaning "the job ends ``signal_grace_s`` from now"; () for none.
            Handlers are installed only from the main thread (skipped with a warning
            elsewhere) and restored by ``close()`` or ``finalize()``.
        warmup_iters: iterations kept out of the statistics (default 1, 5 with compile).
        iteration_estimate: "max" or "p95" of iteration times in the deadline rule.
        persistent_save_time: expected seconds of the persistent save that follows a
            deadline save; added to the save time of the deadline rule.
        clock: monotonic seconds for iteration times; wall_clock: unix seconds for deadlines.
        environ: where deadline variables are read, at every decision (default os.environ).
        all_reduce_max: element-wise max across ranks; default torch.distributed's when
            initialised at decision time, else decisions stay local.
        state: a ``memckpt.State`` whose saves this manager times and waits for. Each
            ``iter()`` after the first advances ``state.step`` by one (``iter(step)`` sets
            it), so the step counter starts from the checkpoint's. ``finalize()`` waits
            for the state's latest save. A loop that goes on iterating after a deadline or
            signal save (velastic's loop has no ``exit_requested`` check) is finalized at
            the next ``iter()``: the save is waited for, the signal handlers are put back,
            and a signal that already arrived is raised again, so it ends the process as
            it would have without this manager, with the checkpoint committed.
        pause_replication: a ``CheckpointManager`` whose replication is paused during
            each step, for steps whose collectives need the whole network: ``iter()``
            pauses it, ``should_save_ckpt()`` resumes it (so the decision and the save
            run with replication going), and so do ``finalize()`` and ``close()``.
            Replication then runs between steps and while a save waits for the
            previous one; a step's commit waits for its replication, so it comes later.
    """

    def __init__(
        self,
        total_iters: int = -1,
        redundant_time: float = 5.0,
        save_ckpt_time: float = 0.0,
        use_torch_compile: bool = False,
        predict_freq: int = 5,
        *,
        save_interval: int | None = None,
        mtbf_s: float | None = None,
        interval_formula: Literal["young", "daly"] = "daly",
        deadline: float | str | datetime | None = None,
        signals: Sequence[int] = DEFAULT_SIGNALS,
        signal_grace_s: float = 30.0,
        warmup_iters: int | None = None,
        iteration_estimate: Literal["max", "p95"] = "max",
        persistent_save_time: float = 0.0,
        window: int = 1000,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        environ: Mapping[str, str] | None = None,
        all_reduce_max: AllReduceMax | None = None,
        state: SavesThroughState | None = None,
        pause_replication: PausesReplication | None = None,
    ) -> None:
        if isinstance(total_iters, bool) or not isinstance(total_iters, int):
            raise ScheduleConfigError(
                f"total_iters must be an int (-1: unknown), got {total_iters!r}"
            )
        if isinstance(predict_freq, bool) or not isinstance(predict_freq, int) or predict_freq < 1:
            raise ScheduleConfigError(f"predict_freq must be an int >= 1, got {predict_freq!r}")
        if save_interval is not None and mtbf_s is not None:
            raise ScheduleConfigError(
                "pass save_interval (fixed steps) or mtbf_s (Young/Daly optimum), not both"
            )
        if iteration_estimate not in ("max", "p95"):
            raise ScheduleConfigError(
                f"iteration_estimate must be 'max' or 'p95', got {iteration_estimate!r}"
            )
        if warmup_iters is None:
            warmup_iters = COMPILE_WARMUP_ITERS if use_torch_compile else DEFAULT_WARMUP_ITERS
        if isinstance(warmup_iters, bool) or not isinstance(warmup_iters, int) or warmup_iters < 0:
            raise ScheduleConfigError(f"warmup_iters must be an int >= 0, got {warmup_iters!r}")

        self.total_iters = total_iters
        self.redundant_time = _number("redundant_time", redundant_time)
        self.save_ckpt_time = _number("save_ckpt_time", save_ckpt_time)
        self.use_torch_compile = use_torch_compile
        self.predict_freq = predict_freq
        self.signal_grace_s = _number("signal_grace_s", signal_grace_s)
        self.persistent_save_time = _number("persistent_save_time", persistent_save_time)
        self.iteration_estimate: Literal["max", "p95"] = iteration_estimate
        self.warmup_iters = warmup_iters
        self._policy: FixedInterval | OptimalInterval | None = None
        if save_interval is not None:
            self._policy = FixedInterval(save_interval)
        elif mtbf_s is not None:
            self._policy = OptimalInterval(mtbf_s, interval_formula)

        self._clock = clock
        self._wall_clock = wall_clock
        self._environ: Mapping[str, str] = os.environ if environ is None else environ
        self._explicit_deadline = None if deadline is None else coerce_deadline(deadline)
        deadline_from_env(self._environ)  # a malformed variable fails here, not at the deadline
        self._all_reduce_max = all_reduce_max

        self._timer = IterationTimer(clock, warmup_iters, window)
        self._saves = SaveCosts()
        self._prediction: Prediction | None = None
        self._predicted_at = 0
        self._steps_since_save = 0
        self._saves_decided = 0
        self._exit_requested = False
        self._persistent_saves: list[Callable[[int], Any]] = []
        self._pending: list[Any] = []  # save handles whose result is not recorded yet
        self.last_decision: SaveDecision | None = None
        self._step: int | None = None
        self._progress = ProgressEvents(clock)
        if state is not None and not (
            hasattr(state, "step") and callable(getattr(state, "save", None))
        ):
            raise ScheduleConfigError(
                f"state must be a memckpt.State (with step and save()), got {state!r}"
            )
        self._state = state
        self._adopted: Any = None  # the state's latest save handle already recorded
        self._finalized = False
        if pause_replication is not None and not all(
            callable(getattr(pause_replication, name, None))
            for name in ("pause_replication", "resume_replication")
        ):
            raise ScheduleConfigError(
                "pause_replication must be the CheckpointManager whose replication to pause "
                "during each step (anything with pause_replication() and "
                f"resume_replication()), got {pause_replication!r}"
            )
        self._replication = pause_replication
        self._replication_held = False

        self._watcher: SignalWatcher | None = None
        if signals:
            watcher = SignalWatcher(signals, wall_clock)
            if threading.current_thread() is threading.main_thread():
                watcher.install()
                self._watcher = watcher
            else:
                log.warning(
                    "IterManager created outside the main thread: signal handlers not "
                    "installed, so %s will not trigger a save",
                    "/".join(signal_name(s) for s in watcher.signals),
                )

    # ---- the training loop

    def iter(self, step: int | None = None) -> None:
        """Mark the start of an iteration (call it first thing in every iteration).

        ``step`` is the training step this iteration computes (optional). With
        ``MEMCKPT_EVENTS_FILE`` set, progress goes there as ``step`` events (at most one
        per 0.5 s), which is how ``memckpt simulate-preemption`` counts lost steps.
        """
        if self._state is not None:
            if step is not None:
                self._state.step = step
            elif self._timer.ticks > 0:
                self._state.step += 1
            step = self._state.step
            if self._exit_requested and not self._finalized:
                self._leave_after_exit_save()
            self._adopt_state_save()
        self._timer.tick()
        self._steps_since_save += 1
        if step is not None:
            self._step = step
        if self._pending:
            self._collect_finished_saves()
        self._progress.tick(self._timer.ticks, self._step)
        self._hold_replication()

    def _hold_replication(self) -> None:
        if self._replication is not None and not self._replication_held:
            self._replication.pause_replication()
            self._replication_held = True

    def _release_replication(self) -> None:
        if self._replication is not None and self._replication_held:
            self._replication_held = False
            self._replication.resume_replication()

    def should_save_ckpt(self) -> bool:
        """Whether every rank saves at this step; ``last_decision`` says why.

        Collective when a reduction is in use: all ranks call it once per iteration.
        With ``pause_replication``, the step is over: replication resumes first.
        """
        self._release_replication()
        step = self._timer.ticks
        view = LocalView(
            step=step,
            steps_since_save=self._steps_since_save,
            saves_decided=self._saves_decided,
            now_unix=self._wall_clock(),
            margin_s=self.redundant_time,
            prediction=self.prediction,
            deadline=self._deadline_now(),
            signal=self.signal_event,
            signal_grace_s=self.signal_grace_s,
            exit_requested=self._exit_requested,
        )
        assessment = assess(view)
        agreed = self._agree(assessment.votes)
        decision = decide(assessment, agreed, step)
        self.last_decision = decision
        if decision.save:
            self._steps_since_save = 0
            self._saves_decided += 1
            self._timer.exclude_current()
            if decision.trigger in (Trigger.SIGNAL, Trigger.DEADLINE):
                self._exit_requested = True
                self._progress.flush()
                events.emit(
                    "exit_requested",
                    iter=step,
                    step=self._step,
                    trigger=decision.trigger.value,
                    reason=decision.reason,
                )
            log.info("save at %s: %s", self._position(step), decision.reason)
        else:
            log.debug("%s: %s", self._position(step), decision.reason)
        return decision.save

    def _position(self, iteration: int) -> str:
        """Where training is, in the unit the checkpoint carries: the training step when a
        State or the loop (``iter(step=...)``) gives it, else the iteration count, named."""
        if self._state is not None:
            return f"step {self._state.step}"
        if self._step is not None:
            return f"step {self._step}"
        return f"iteration {iteration}"

    def record_save(self, result: Any) -> None:
        """Feed a save's timing: seconds, a SaveResult, or a SaveHandle still running.

        A result needs ``blocking_s``/``total_s`` (memckpt's ``SaveHandle.wait()`` returns
        one). A handle (anything with ``done()`` and ``wait()``) is timed without blocking:
        its result is recorded at the first ``iter()`` after it finished, and ``finalize``
        waits for it. The median of the latest saves replaces ``save_ckpt_time``.
        """
        if callable(getattr(result, "done", None)) and callable(getattr(result, "wait", None)):
            self._pending.append(result)
            return
        blocking, total = save_times(result)
        self._saves.add(blocking, total)
        self._prediction = None
        log.debug("save took %.3fs blocking, %.3fs in total", blocking, total)

    def _adopt_state_save(self) -> None:
        handle = getattr(self._state, "last_save", None)
        if handle is not None and handle is not self._adopted:
            self._adopted = handle
            self.record_save(handle)

    def _leave_after_exit_save(self) -> None:
        decision = self.last_decision
        why = decision.reason if decision is not None else "exit requested"
        log.warning(
            "iter() called after the save for %s: the loop does not stop at exit_requested; "
            "waiting for the save and restoring the signal handlers",
            why,
        )
        self.finalize()
        event = self.signal_event
        if event is not None:
            log.warning("raising %s again now that the checkpoint is committed", event.name)
            signal.raise_signal(event.signum)

    def _collect_finished_saves(self) -> None:
        still_running = []
        for handle in self._pending:
            if not handle.done():
                still_running.append(handle)
                continue
            try:
                result = handle.wait()
            except Exception as e:
                # The failure itself is the caller's to handle (it holds the handle too);
                # here it only means there is no timing to learn from.
                log.warning("a tracked save failed, its time is not recorded: %s", e)
                continue
            self.record_save(result)
        self._pending = still_running

    def explain(self) -> str:
        """The reason of the latest decision, for an operator's log."""
        if self.last_decision is None:
            return "no decision yet: should_save_ckpt() was not called"
        return self.last_decision.reason

    # ---- leaving at a deadline

    @property
    def exit_requested(self) -> bool:
        """True once a deadline or signal save was decided: save persistently, then exit."""
        return self._exit_requested

    def register_persistent_save(self, fn: Callable[[int], Any]) -> None:
        """Have ``finalize(step)`` call ``fn(step)``, e.g. a DCP save to shared storage.

        Functions run in registration order on every rank that calls ``finalize``, so
        ``fn`` may be collective.
        """
        if not callable(fn):
            raise ScheduleConfigError(f"persistent save must be callable, got {fn!r}")
        self._persistent_saves.append(fn)

    def finalize(self, step: int | None = None) -> float:
        """Run the registered persistent saves for ``step``, then restore signal handlers.

        Call on every rank after the memory save of the exit step; save handles passed to
        ``record_save`` (and the state's latest save) are waited for first. ``step``
        defaults to ``state.step`` with a state. Errors of a save propagate (the signal
        handlers are restored all the same). Returns the seconds it took.
        """
        if step is None:
            if self._state is None:
                raise ScheduleConfigError(
                    "finalize() needs the step (or an IterManager(state=...))"
                )
            step = self._state.step
        start = self._clock()
        self._finalized = True
        self._release_replication()  # the saves waited for below may wait for replication
        try:
            if self._state is not None:
                self._adopt_state_save()
            pending, self._pending = self._pending, []
            for handle in pending:
                self.record_save(handle.wait())
            for fn in self._persistent_saves:
                fn(step)
        finally:
            self._progress.flush(final=True, step=step)
            self.close()
        elapsed = self._clock() - start
        deadline = self.deadline
        if deadline is None:
            log.info("persistent save of step %d took %.1fs", step, elapsed)
        else:
            log.info(
                "persistent save of step %d took %.1fs; %.1fs left before the deadline (%s)",
                step,
                elapsed,
                deadline.remaining_s(self._wall_clock()),
                deadline.source,
            )
        return elapsed

    def close(self) -> None:
        """Restore the signal handlers found at construction and resume replication if
        this manager paused it; safe to call twice."""
        self._release_replication()
        self._progress.flush()
        if self._watcher is not None:
            self._watcher.uninstall()

    def __enter__(self) -> IterManager:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ---- what the decision is based on

    @property
    def iter_count(self) -> int:
        """Number of ``iter()`` calls so far."""
        return self._timer.ticks

    @property
    def stats(self) -> IterationStats | None:
        """Iteration times after warm-up (the warm-up ones until there are others)."""
        return self._timer.stats()

    @property
    def avg_iter_time(self) -> float:
        """Mean iteration time in seconds, 0.0 before any (velastic's name)."""
        stats = self.stats
        return stats.mean_s if stats is not None else 0.0

    @property
    def max_iter_time(self) -> float:
        """Longest iteration time in seconds, 0.0 before any (velastic's name)."""
        stats = self.stats
        return stats.max_s if stats is not None else 0.0

    @property
    def prediction(self) -> Prediction:
        """Statistics, save times and interval; recomputed every ``predict_freq`` iterations.

        Also recomputed after ``record_save`` and at every iteration during warm-up.
        """
        step = self._timer.ticks
        cached = self._prediction
        if (
            cached is None
            or step - self._predicted_at >= self.predict_freq
            # until an iteration after warm-up is measured, every new one is news
            or cached.iteration is None
            or cached.iteration.warmup_only
        ):
            self._prediction = predict(
                iteration=self._timer.stats(),
                estimate=self.iteration_estimate,
                save_blocking_s=self._saves.blocking_s,
                save_total_s=self._saves.total_s,
                save_ckpt_time=self.save_ckpt_time,
                persistent_save_time=self.persistent_save_time,
                policy=self._policy,
                step=step,
                total_iters=self.total_iters,
            )
            self._predicted_at = step
        return self._prediction

    @property
    def signal_event(self) -> SignalEvent | None:
        """The first watched signal received, if any."""
        return self._watcher.event if self._watcher is not None else None

    @property
    def signals_installed(self) -> bool:
        return self._watcher is not None and self._watcher.installed

    @property
    def deadline(self) -> Deadline | None:
        """The earliest deadline known to this rank: argument, environment, or signal + grace."""
        event = self.signal_event
        from_signal = None
        if event is not None:
            from_signal = Deadline(
                event.received_unix + self.signal_grace_s, f"signal {event.name}"
            )
        return earliest([self._deadline_now(), from_signal])

    @property
    def remaining_time(self) -> float | None:
        """Seconds until ``deadline`` (negative once passed); None without a deadline."""
        deadline = self.deadline
        return None if deadline is None else deadline.remaining_s(self._wall_clock())

    def _deadline_now(self) -> Deadline | None:
        return earliest([self._explicit_deadline, deadline_from_env(self._environ)])

    def _agree(self, votes: Votes) -> Votes:
        reduce = self._all_reduce_max
        if reduce is None:
            reduce = default_all_reduce_max()
            if reduce is None:
                return votes
            self._all_reduce_max = reduce
        return Votes.from_list(reduce(votes.to_list()))
