"""Preemption drills: run a training command to a deadline, stop it like a scheduler, restart it.

Two layers, kept apart so the arithmetic is testable without processes:

* the report: ``summarize_events``, ``classify_end`` and ``build_report`` are pure
  functions from what happened to each run (``RunOutcome``) and the events it wrote
  (``memckpt.storage.events``) to a ``SimulationReport``;
* process control: ``run_command`` starts one run in its own process group, sends
  SIGTERM to the group at its deadline and SIGKILL after the grace period, and always
  leaves the group dead; ``simulate`` chains the runs and builds the report.

Runs: ``restarts + 1`` in all. Every run but the last is preempted: with ``timeout_s``
it gets ``MEMCKPT_DEADLINE`` (its start + ``timeout_s``) and SIGTERM at that time; with
``steps_per_run`` it gets SIGTERM once its events show that many steps trained in that
run, whatever the machine's speed (with both, whichever comes first). The last run has
no deadline and runs to completion (bounded only by ``final_timeout_s``), as the job
would on a healthy allocation. A run that finishes before it is preempted ends the
drill early; a run that fails (non-zero exit before any signal) ends it with a problem.

One unit throughout, the training *step*: the numbers passed to
``CheckpointManager.save`` and ``IterManager.iter(step)`` (or a ``memckpt.State``'s
step), never a count of iterations. Definitions:

* *resume point* of a run: the step the next run resumed from (its ``loaded`` event; 0
  when it loaded nothing); for the last run, the newest step saved so far;
* *steps lost*: the newest step the run reached minus its resume point: steps computed
  and then computed again (0 for a run that finished);
* *time lost*: seconds from the commit of the resume point to the end of the run
  (redone work plus shutdown); the whole run when the resume point was saved by an
  earlier run; 0 for a run that finished;
* *restore*: seconds from the start of a run to its ``loaded`` event (start-up and load);
* *steps run*: steps a run trained itself: its IterManager's iteration count (``iter`` in
  its ``step`` events), else its newest step minus the step it resumed from.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import IO, Any, Final

from memckpt.errors import ScheduleConfigError
from memckpt.settings import DEADLINE_ENV, EVENTS_FILE_ENV
from memckpt.storage.events import read_events

__all__ = [
    "End",
    "RunOutcome",
    "RunProgress",
    "RunReport",
    "SimulationConfig",
    "SimulationReport",
    "build_report",
    "classify_end",
    "run_command",
    "shell_command",
    "simulate",
    "steps_run",
    "summarize_events",
]

log = logging.getLogger(__name__)

DEFAULT_GRACE_S: Final = 10.0
DEFAULT_TIMEOUT_S: Final = 120.0
"""Seconds to the deadline when a drill names neither a timeout nor steps per run."""
_EVENTS_POLL_S: Final = 0.25  # how often a run's events are read for its progress
# After SIGKILL a process group is gone within milliseconds; a member that stays longer is
# a zombie nobody reaps, and waiting for it would never end.
_AFTER_KILL_WAIT_S: Final = 2.0


class End(str, Enum):
    """How a run ended."""

    FINISHED = "finished"
    """Exited 0 on its own, without a deadline save: training is complete."""
    EXITED_AT_DEADLINE = "exited_at_deadline"
    """Saved for the deadline (``exit_requested`` event) and exited on its own, before SIGTERM."""
    EXITED_AFTER_SIGTERM = "exited_after_sigterm"
    """Received SIGTERM at the deadline and its whole process group left within the grace."""
    KILLED = "killed"
    """A process of the group was still alive after the grace period and got SIGKILL."""
    FAILED = "failed"
    """Exited non-zero before any signal."""


def end_label(end: End, exit_code: int | None, *, short: bool = False) -> str:
    """Words for an operator: ``exited cleanly after SIGTERM``, ``killed (SIGKILL)``...

    ``short`` gives one word, for a table column.
    """
    if short:
        return {
            End.FINISHED: "finished",
            End.EXITED_AT_DEADLINE: "deadline",
            End.EXITED_AFTER_SIGTERM: "SIGTERM",
            End.KILLED: "SIGKILL",
            End.FAILED: "failed",
        }[end]
    if end is End.EXITED_AFTER_SIGTERM:
        return "exited cleanly after SIGTERM" if exit_code == 0 else "exited after SIGTERM"
    return {
        End.FINISHED: "finished",
        End.EXITED_AT_DEADLINE: "saved and exited before the deadline",
        End.KILLED: "killed (SIGKILL after the grace)",
        End.FAILED: "failed",
    }[end]


@dataclass(frozen=True)
class RunOutcome:
    """What process control saw of one run. Times are unix seconds.

    ``exit_code`` is the process group leader's (the shell, or the command when the
    shell execs it); negative: killed by that signal.
    """

    index: int
    started_unix: float
    ended_unix: float
    exit_code: int | None
    deadline_unix: float | None = None
    sigterm_unix: float | None = None
    killed: bool = False
    sigterm_after_steps: int | None = None
    """Steps the run had trained when its SIGTERM was sent for ``steps_per_run``."""


@dataclass(frozen=True)
class RunProgress:
    """What one run's events say: resume, commits, progress, exit request."""

    resumed_step: int | None = None
    resumed_unix: float | None = None
    saved: tuple[tuple[int, float], ...] = ()
    """(step, unix time of its commit), oldest first, one entry per step."""
    last_step: int | None = None
    """Newest step in ``step`` events; None when no event carried a step."""
    iters: int | None = None
    exit_requested: bool = False
    exit_trigger: str | None = None

    @property
    def last_saved_step(self) -> int | None:
        return self.saved[-1][0] if self.saved else None

    def commit_unix(self, step: int) -> float | None:
        """When ``step`` was committed in this run; None if it was not saved here."""
        return next((t for s, t in self.saved if s == step), None)


def _int(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return int(value)


def summarize_events(events: Sequence[Mapping[str, Any]]) -> RunProgress:
    """Fold one run's events (every rank's) into a ``RunProgress``.

    Ranks repeat ``saved`` and ``loaded``: a step counts once, at its first commit time,
    and the resumed step is the first ``loaded`` event's.
    """
    resumed_step: int | None = None
    resumed_unix: float | None = None
    saved: dict[int, float] = {}
    last_step: int | None = None
    iters: int | None = None
    exit_requested = False
    trigger: str | None = None
    for ev in events:
        kind = ev.get("event")
        step = _int(ev.get("step"))
        when = float(ev.get("time", 0.0))
        if kind == "loaded" and step is not None and resumed_step is None:
            resumed_step, resumed_unix = step, when
        elif kind == "saved" and step is not None:
            saved[step] = min(when, saved.get(step, when))
        elif kind == "step":
            if step is not None:
                last_step = step if last_step is None else max(last_step, step)
            n = _int(ev.get("iter"))
            if n is not None:
                iters = n if iters is None else max(iters, n)
        elif kind == "exit_requested":
            exit_requested = True
            trigger = trigger or ev.get("trigger")
            if step is not None:
                last_step = step if last_step is None else max(last_step, step)
    ordered = tuple(sorted(saved.items(), key=lambda item: (item[1], item[0])))
    return RunProgress(
        resumed_step, resumed_unix, ordered, last_step, iters, exit_requested, trigger
    )


def steps_run(events: Sequence[Mapping[str, Any]]) -> int | None:
    """Steps a run trained itself, from its events; None before its first ``step`` event.

    The iteration count of its IterManager (``iter``) when the events carry one, else its
    newest step minus the step it resumed from (0 without a ``loaded`` event).
    """
    base: int | None = None
    done: int | None = None
    for ev in events:
        kind = ev.get("event")
        if kind == "loaded" and base is None:
            base = _int(ev.get("step"))
        elif kind == "step":
            n = _int(ev.get("iter"))
            if n is None:
                step = _int(ev.get("step"))
                n = None if step is None else step - (base or 0)
            if n is not None:
                done = n if done is None else max(done, n)
    return done


def classify_end(outcome: RunOutcome, exit_requested: bool) -> End:
    """How a run ended, from the signals it got, its exit code and its exit request."""
    if outcome.killed:
        return End.KILLED
    if outcome.sigterm_unix is not None:
        return End.EXITED_AFTER_SIGTERM
    if outcome.exit_code == 0:
        return End.EXITED_AT_DEADLINE if exit_requested else End.FINISHED
    return End.FAILED


@dataclass(frozen=True)
class RunReport:
    """One run of the drill; see the module docstring for the definitions."""

    run: int
    end: End
    exit_code: int | None
    duration_s: float
    timeout_s: float | None
    sigterm_after_s: float | None
    sigterm_after_steps: int | None
    resumed_step: int | None
    restore_s: float | None
    saves: int
    last_saved_step: int | None
    last_step: int | None
    resume_point: int | None
    steps_lost: int | None
    time_lost_s: float | None
    exit_trigger: str | None

    @property
    def label(self) -> str:
        return end_label(self.end, self.exit_code)

    def to_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["end"] = self.end.value
        doc["label"] = self.label
        return doc


@dataclass(frozen=True)
class SimulationReport:
    """The drill: one ``RunReport`` per run, totals, and what went wrong."""

    command: str
    planned_runs: int
    runs: tuple[RunReport, ...]
    problems: tuple[str, ...] = ()
    steps_tracked: bool = False
    """Whether the job reported its steps (``IterManager.iter(step)``); else steps lost is None."""

    @property
    def completed(self) -> bool:
        """Whether the last run finished the training."""
        return bool(self.runs) and self.runs[-1].end is End.FINISHED

    @property
    def ok(self) -> bool:
        return self.completed and not self.problems

    @property
    def steps_lost(self) -> int | None:
        if not self.steps_tracked:
            return None
        return sum(r.steps_lost or 0 for r in self.runs)

    @property
    def time_lost_s(self) -> float:
        return sum(r.time_lost_s or 0.0 for r in self.runs)

    @property
    def restore_s(self) -> float:
        return sum(r.restore_s or 0.0 for r in self.runs)

    @property
    def wall_s(self) -> float:
        return sum(r.duration_s for r in self.runs)

    def to_dict(self) -> dict[str, Any]:
        return {
            "command": self.command,
            "planned_runs": self.planned_runs,
            "completed": self.completed,
            "ok": self.ok,
            "steps_tracked": self.steps_tracked,
            "steps_lost": self.steps_lost,
            "time_lost_s": round(self.time_lost_s, 3),
            "restore_s": round(self.restore_s, 3),
            "wall_s": round(self.wall_s, 3),
            "problems": list(self.problems),
            "runs": [r.to_dict() for r in self.runs],
        }


def build_report(
    command: str,
    outcomes: Sequence[RunOutcome],
    events_per_run: Sequence[Sequence[Mapping[str, Any]]],
    planned_runs: int | None = None,
) -> SimulationReport:
    """The report of a drill from each run's outcome and events (same order, same length)."""
    if len(outcomes) != len(events_per_run):
        raise ValueError(f"{len(outcomes)} outcomes but {len(events_per_run)} event lists")
    progress = [summarize_events(ev) for ev in events_per_run]
    tracked = any(p.last_step is not None for p in progress)
    runs: list[RunReport] = []
    problems: list[str] = []
    newest_saved: int | None = None  # newest step committed so far, over all runs
    for i, (outcome, prog) in enumerate(zip(outcomes, progress)):
        end = classify_end(outcome, prog.exit_requested)
        if i > 0 and newest_saved is not None and prog.resumed_step != newest_saved:
            resumed = prog.resumed_step
            started = "from scratch" if resumed is None else f"from step {resumed}"
            problems.append(
                f"run {i} started {started}, but step {newest_saved} was saved before it"
            )
        if prog.last_saved_step is not None:
            newest_saved = prog.last_saved_step
        if end is End.FAILED:
            problems.append(f"run {i} failed with exit code {outcome.exit_code} before any signal")

        reached = _reached(prog)
        resume_point: int | None
        steps_lost: int | None
        time_lost: float | None
        if end is End.FINISHED:
            resume_point, steps_lost, time_lost = None, 0, 0.0
        else:
            if i + 1 < len(progress):
                resume_point = progress[i + 1].resumed_step or 0
            else:
                resume_point = newest_saved if newest_saved is not None else 0
            steps_lost = max(0, (reached or 0) - resume_point) if tracked else None
            committed = prog.commit_unix(resume_point)
            since = committed if committed is not None else outcome.started_unix
            time_lost = max(0.0, outcome.ended_unix - since)
        runs.append(
            RunReport(
                run=i,
                end=end,
                exit_code=outcome.exit_code,
                duration_s=round(outcome.ended_unix - outcome.started_unix, 3),
                timeout_s=_rounded_delta(outcome.deadline_unix, outcome.started_unix),
                sigterm_after_s=_rounded_delta(outcome.sigterm_unix, outcome.started_unix),
                sigterm_after_steps=outcome.sigterm_after_steps,
                resumed_step=prog.resumed_step,
                restore_s=_rounded_delta(prog.resumed_unix, outcome.started_unix),
                saves=len(prog.saved),
                last_saved_step=prog.last_saved_step,
                last_step=reached if tracked else None,
                resume_point=resume_point,
                steps_lost=steps_lost,
                time_lost_s=None if time_lost is None else round(time_lost, 3),
                exit_trigger=prog.exit_trigger,
            )
        )
    if runs and runs[-1].end is not End.FINISHED and runs[-1].end is not End.FAILED:
        problems.append(f"the last run did not finish: {runs[-1].label}")
    return SimulationReport(
        command=command,
        planned_runs=len(outcomes) if planned_runs is None else planned_runs,
        runs=tuple(runs),
        problems=tuple(problems),
        steps_tracked=tracked,
    )


def _steps_line(prog: RunProgress) -> str:
    """``resumed from step 26, newest committed step 54, reached step 54`` (training steps)."""

    def show(step: int | None) -> str:
        return "-" if step is None else str(step)

    return (
        f"resumed from step {show(prog.resumed_step)}, newest committed step "
        f"{show(prog.last_saved_step)}, reached step {show(_reached(prog))}"
    )


def _reached(prog: RunProgress) -> int | None:
    """Newest step a run is known to have reached: progress, saves and its resume."""
    known = [s for s in (prog.last_step, prog.last_saved_step, prog.resumed_step) if s is not None]
    return max(known) if known else None


def _rounded_delta(later: float | None, earlier: float) -> float | None:
    return None if later is None else round(later - earlier, 3)


# ---- process control


@dataclass(frozen=True)
class SimulationConfig:
    """A drill: ``command`` (a shell string), preempted ``restarts`` times.

    How each run but the last is preempted (one at least; with both, the first that
    comes): ``timeout_s``, seconds from its start to its SIGTERM; ``steps_per_run``,
    SIGTERM once it has trained that many steps (see ``steps_run``; its events come at
    most every 0.5 s, so it may be a few steps further by then). ``grace_s``: seconds
    from SIGTERM to SIGKILL; ``final_timeout_s``: seconds from the start of the last run
    to its SIGTERM, without ``MEMCKPT_DEADLINE`` (None: it runs until it exits);
    ``announce_deadline``: set ``MEMCKPT_DEADLINE`` (from ``timeout_s``) so the job can
    save ahead of the SIGTERM (False: the job learns of the preemption from the signal
    only).
    """

    command: str
    timeout_s: float | None = None
    restarts: int = 1
    grace_s: float = DEFAULT_GRACE_S
    final_timeout_s: float | None = None
    announce_deadline: bool = True
    steps_per_run: int | None = None
    poll_s: float = field(default=0.05, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.command, str) or not self.command.strip():
            raise ScheduleConfigError("the training command is empty; pass --cmd '<command>'")
        for name in ("grace_s", "poll_s"):
            _check_seconds(name, getattr(self, name))
        for name in ("timeout_s", "final_timeout_s"):
            if getattr(self, name) is not None:
                _check_seconds(name, getattr(self, name))
        restarts = self.restarts
        if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 0:
            raise ScheduleConfigError(f"restarts must be an int >= 0, got {self.restarts!r}")
        n = self.steps_per_run
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ScheduleConfigError(f"steps_per_run must be an int >= 1, got {n!r}")
        if self.timeout_s is None and n is None:
            raise ScheduleConfigError(
                "a drill needs a way to preempt its runs: a timeout (--timeout SECONDS), "
                "steps per run (--steps-per-run N), or both"
            )


def _check_seconds(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ScheduleConfigError(f"{name} must be a number of seconds > 0, got {value!r}")


class _ProcessGroup:
    """The command's process group: the leader is the shell Popen started with setsid."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.pgid = proc.pid  # start_new_session: the leader's pid is the group id

    def alive(self) -> bool:
        """Whether a process of the group still runs; zombies do not count.

        An orphan's zombie stays in the group until init reaps it, which some container
        inits do only every second or two; it can do no more work, so it counts as gone.
        """
        try:
            os.killpg(self.pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # a member changed its user; it still exists
            return True
        return _group_has_live_member(self.pgid)

    def signal(self, signum: int) -> bool:
        """Send ``signum`` to every process of the group; False when it is gone."""
        try:
            os.killpg(self.pgid, signum)
        except ProcessLookupError:
            return False
        except PermissionError as e:  # a member changed its user: the rest got the signal
            log.warning("cannot signal every process of group %d: %s", self.pgid, e)
        return True

    def wait_gone(self, until_monotonic: float, poll_s: float) -> bool:
        """Reap the leader and wait for the rest of the group until the given time."""
        while True:
            if self.proc.poll() is not None and not self.alive():
                return True
            if time.monotonic() >= until_monotonic:
                return False
            time.sleep(poll_s)

    def kill(self) -> None:
        """SIGKILL the group and reap the leader; bounded, never raises for a gone group."""
        self.signal(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=_AFTER_KILL_WAIT_S)
        if not self.wait_gone(time.monotonic() + _AFTER_KILL_WAIT_S, 0.02):
            log.warning("process group %d still has live members after SIGKILL", self.pgid)


def _group_has_live_member(pgid: int) -> bool:
    """Whether a process of group ``pgid`` is not a zombie (True where /proc cannot tell)."""
    try:
        entries = os.listdir("/proc")
    except OSError:
        return True
    found_any = False
    for name in entries:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", encoding="ascii", errors="replace") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        found_any = True
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] not in ("Z", "X"):
            return True
    return not found_any


# Words that cannot follow ``exec``: shell keywords and special built-ins.
_SHELL_WORDS: Final = (
    "! { } [[ case if for while until function select time . : break cd continue eval exec "
    "exit export readonly return set shift source trap ulimit umask unset wait alias"
)
_NOT_EXECUTABLE: Final = frozenset(_SHELL_WORDS.split())


def shell_command(command: str) -> str:
    """``command`` with ``exec`` in front when it is a single simple command.

    Then the command itself leads the process group, so its exit code is the one
    reported, and no shell stands between it and SIGTERM (dash, a common ``/bin/sh``,
    dies of the SIGTERM while the command is still saving). Anything with shell syntax
    beyond words, quotes and ``$NAME`` (lists, pipes, redirections, substitutions, a
    leading assignment or built-in) runs as written.
    """
    if any(c in _without_variables(command) for c in "`$\n;&|<>()#"):
        return command
    try:
        words = shlex.split(command)
    except ValueError:  # unbalanced quotes: let the shell say so
        return command
    if not words or words[0] in _NOT_EXECUTABLE or "=" in words[0].split("/", 1)[0]:
        return command
    return f"exec {command}"


def _without_variables(command: str) -> str:
    return re.sub(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?", "", command)


def run_command(
    command: str,
    *,
    index: int = 0,
    timeout_s: float | None,
    grace_s: float = DEFAULT_GRACE_S,
    env: Mapping[str, str] | None = None,
    announce_deadline: bool = True,
    stdout: IO[Any] | int | None = None,
    poll_s: float = 0.05,
    steps_per_run: int | None = None,
    events_path: str | os.PathLike[str] | None = None,
) -> RunOutcome:
    """Run ``command`` with ``/bin/sh -c`` in a new session; SIGTERM at the deadline.

    A single simple command is run with ``exec`` (see ``shell_command``).

    With ``timeout_s``, ``MEMCKPT_DEADLINE`` (when ``announce_deadline``) is the start
    plus ``timeout_s``, and at that time the whole process group gets SIGTERM, then
    SIGKILL ``grace_s`` later if any member is left. With ``steps_per_run`` (and the
    ``events_path`` the command writes its events to), the SIGTERM comes once the run has
    trained that many steps (``steps_run``), or at the deadline if that is first.
    Processes the command leaves behind after a normal exit get the same treatment. The
    group is dead when this returns or raises, KeyboardInterrupt included. ``stdout``
    receives the command's stdout and stderr (default: this process's).
    """
    if steps_per_run is not None and events_path is None:
        raise ScheduleConfigError("steps_per_run needs the events_path the command writes to")
    run_env = dict(os.environ if env is None else env)
    run_env.pop(DEADLINE_ENV, None)
    started = time.time()
    t0 = time.monotonic()
    deadline_unix = None if timeout_s is None else started + timeout_s
    if deadline_unix is not None and announce_deadline:
        run_env[DEADLINE_ENV] = f"{deadline_unix:.3f}"
    term_at = None if timeout_s is None else t0 + timeout_s
    proc = subprocess.Popen(
        shell_command(command),
        shell=True,
        start_new_session=True,
        env=run_env,
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=subprocess.STDOUT if stdout is not None else None,
    )
    group = _ProcessGroup(proc)
    when = [f"in {timeout_s:g}s"] if timeout_s is not None else []
    if steps_per_run is not None:
        when.insert(0, f"after {steps_per_run} steps")
    log.info(
        "run %d: started pid %d%s",
        index,
        proc.pid,
        f", SIGTERM {' or '.join(when)}" if when else "",
    )
    sigterm_unix: float | None = None
    sigterm_after_steps: int | None = None
    killed = False
    next_look = time.monotonic()
    try:
        # 1. until the leader exits, the deadline comes or the run has trained its steps
        while proc.poll() is None:
            if term_at is not None and time.monotonic() >= term_at:
                break
            if steps_per_run is not None and time.monotonic() >= next_look:
                assert events_path is not None
                next_look = time.monotonic() + _EVENTS_POLL_S
                done = steps_run(read_events(events_path))
                if done is not None and done >= steps_per_run:
                    sigterm_after_steps = done
                    break
            wait = poll_s if term_at is None else min(poll_s, term_at - time.monotonic())
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(wait, 0.0))
        # 2. SIGTERM: at the deadline, or to members left behind by a leader that exited
        if proc.poll() is None or group.alive():
            leader_alive = proc.poll() is None  # read before the signal: it may die at once
            if not leader_alive:
                log.warning(
                    "run %d: the command exited and left processes behind; sending them SIGTERM",
                    index,
                )
            if group.signal(signal.SIGTERM) and leader_alive:
                sigterm_unix = time.time()
                why = (
                    "deadline reached"
                    if sigterm_after_steps is None
                    else f"{sigterm_after_steps} steps trained in this run"
                )
                log.info("run %d: %s, SIGTERM sent to process group %d", index, why, group.pgid)
            # 3. SIGKILL after the grace if anything is left
            if not group.wait_gone(time.monotonic() + grace_s, poll_s):
                killed = sigterm_unix is not None
                log.warning(
                    "run %d: still running %gs after SIGTERM; sending SIGKILL", index, grace_s
                )
                group.kill()
    finally:
        # also on errors and KeyboardInterrupt: nothing of the run may outlive it
        if proc.poll() is None or group.alive():
            group.kill()
    ended = time.time()
    outcome = RunOutcome(
        index,
        started,
        ended,
        proc.returncode,
        deadline_unix,
        sigterm_unix,
        killed,
        sigterm_after_steps=sigterm_after_steps if sigterm_unix is not None else None,
    )
    log.info("run %d: exit code %s after %.1fs", index, proc.returncode, ended - started)
    return outcome


def simulate(
    config: SimulationConfig,
    *,
    env: Mapping[str, str] | None = None,
    stdout: IO[Any] | int | None = None,
    log_dir: str | os.PathLike[str] | None = None,
) -> SimulationReport:
    """Run the drill of ``config`` and return its report.

    Each run's events go to a file named in ``MEMCKPT_EVENTS_FILE``: in ``log_dir``
    (``run-<i>.events.jsonl``, kept, next to ``run-<i>.log`` with the run's output) or in
    a temporary directory removed at the end. Stops after a run that finished or failed.
    """
    planned = config.restarts + 1
    keep = log_dir is not None
    work = Path(log_dir) if keep else Path(tempfile.mkdtemp(prefix="memckpt-simulate-"))
    work.mkdir(parents=True, exist_ok=True)
    base_env = dict(os.environ if env is None else env)
    outcomes: list[RunOutcome] = []
    events_per_run: list[list[dict[str, Any]]] = []
    try:
        for i in range(planned):
            last = i == planned - 1
            events_path = work / f"run-{i}.events.jsonl"
            events_path.unlink(missing_ok=True)
            run_env = {**base_env, EVENTS_FILE_ENV: str(events_path)}
            with contextlib.ExitStack() as stack:
                out: IO[Any] | int | None = stdout
                if keep:
                    out = stack.enter_context(open(work / f"run-{i}.log", "wb"))
                outcome = run_command(
                    config.command,
                    index=i,
                    timeout_s=config.final_timeout_s if last else config.timeout_s,
                    grace_s=config.grace_s,
                    env=run_env,
                    # the final limit guards against a hang; the job is not told of it
                    announce_deadline=config.announce_deadline and not last,
                    stdout=out,
                    poll_s=config.poll_s,
                    steps_per_run=None if last else config.steps_per_run,
                    events_path=events_path,
                )
            events = read_events(events_path)
            outcomes.append(outcome)
            events_per_run.append(events)
            progress = summarize_events(events)
            end = classify_end(outcome, progress.exit_requested)
            log.info("run %d: %s; %s", i, end_label(end, outcome.exit_code), _steps_line(progress))
            if not last and end in (End.FINISHED, End.FAILED):
                log.info("run %d %s: no restart", i, end.value)
                break
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    return build_report(config.command, outcomes, events_per_run, planned_runs=planned)
