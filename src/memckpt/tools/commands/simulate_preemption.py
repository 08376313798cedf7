"""``memckpt simulate-preemption``: run a training command to a deadline, SIGTERM it, restart it."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from memckpt.tools.simulate import SimulationReport

__all__ = ["handle", "register"]

log = logging.getLogger(__name__)

# Fits 80 columns; the JSON report has more (restore_s, resume_point, ...). Every number
# but the times is a training step (the step given to save() and IterManager.iter()).
_COLUMNS = ("run", "ended", "exit", "resumed", "saved", "reached", "lost", "lost s", "run s")
_UNITS = (
    "steps are training steps (resumed: loaded at start; saved: newest committed; "
    "reached: newest trained; lost: trained twice)"
)

_DESCRIPTION = """\
Run a training command as a preempted job would run, then restart it. Every run but
the last is preempted: SIGTERM to its process group at its deadline (--timeout
seconds after its start, announced to the job as MEMCKPT_DEADLINE) or once it has
trained --steps-per-run steps (whichever comes first), SIGKILL --grace seconds later.
The last run is not preempted and runs until it exits (or --final-timeout). Each run
writes memckpt events (MEMCKPT_EVENTS_FILE); the report gives, per run, the step it
resumed from, its newest committed step, the newest step it reached, the steps and
seconds lost, its exit code and how it ended. Steps are training steps throughout (the
numbers given to save() and IterManager.iter()), never iteration counts. Exit status 0
when the last run finished and every restart resumed from the newest saved step, 1
otherwise.
"""


def register(subparsers: Any) -> None:
    """Add the ``simulate-preemption`` subcommand."""
    p = subparsers.add_parser(
        "simulate-preemption",
        help="run a training command under deadlines and restarts; report what each cost",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--cmd", required=True, help="training command, run by /bin/sh -c")
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds from a run's start to its deadline and SIGTERM (default 120, or none "
        "with --steps-per-run)",
    )
    p.add_argument(
        "--steps-per-run",
        type=int,
        default=None,
        metavar="N",
        help="SIGTERM a run once it has trained N steps (its IterManager counted N "
        "iterations): a preemption that does not depend on the machine's speed",
    )
    p.add_argument(
        "--restarts",
        type=int,
        default=1,
        help="preempted runs before the final one (default 1: 2 runs)",
    )
    p.add_argument(
        "--grace", type=float, default=10.0, help="seconds from SIGTERM to SIGKILL (default 10)"
    )
    p.add_argument(
        "--final-timeout",
        type=float,
        default=None,
        help="seconds until the last run gets SIGTERM, unannounced (default: none)",
    )
    p.add_argument(
        "--no-deadline-env",
        action="store_true",
        help="do not set MEMCKPT_DEADLINE: the job learns of the end from SIGTERM",
    )
    p.add_argument("--log-dir", help="keep each run's output and events here")
    p.add_argument("--json", action="store_true", help="machine-readable report on stdout")
    p.set_defaults(fn=handle)


def handle(args: argparse.Namespace) -> int:
    from memckpt.tools.simulate import DEFAULT_TIMEOUT_S, SimulationConfig, simulate

    timeout = args.timeout
    if timeout is None and args.steps_per_run is None:
        timeout = DEFAULT_TIMEOUT_S
    config = SimulationConfig(
        command=args.cmd,
        timeout_s=timeout,
        steps_per_run=args.steps_per_run,
        restarts=args.restarts,
        grace_s=args.grace,
        final_timeout_s=args.final_timeout,
        announce_deadline=not args.no_deadline_env,
    )
    sim_log = logging.getLogger("memckpt.tools.simulate")
    if sim_log.getEffectiveLevel() > logging.INFO:
        sim_log.setLevel(logging.INFO)  # progress of the runs on stderr
    # With --json the command's output goes to stderr, so stdout holds the report only.
    stdout = sys.stderr if args.json else None
    try:
        with _signals_raise_interrupt():
            report = simulate(config, stdout=stdout, log_dir=args.log_dir)
    except KeyboardInterrupt:
        log.error("interrupted: the command's process group was killed")
        return 130
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        _print_report(report)
    return 0 if report.ok else 1


@contextmanager
def _signals_raise_interrupt() -> Iterator[None]:
    """SIGTERM/SIGHUP to this process unwind like Ctrl-C, so the child group is killed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = {s: signal.signal(s, interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _show(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def _print_report(report: SimulationReport) -> None:
    from memckpt.tools.simulate import end_label
    from memckpt.tools.tables import print_table

    rows = [
        (
            r.run,
            end_label(r.end, r.exit_code, short=True),
            _show(r.exit_code),
            _show(r.resumed_step),
            _show(r.last_saved_step),
            _show(r.last_step),
            _show(r.steps_lost),
            _show(r.time_lost_s),
            _show(r.duration_s),
        )
        for r in report.runs
    ]
    print_table(f"simulate-preemption: {report.command}", _COLUMNS, rows)
    print(_UNITS)
    lost = report.steps_lost
    steps = "unknown (pass the step to IterManager.iter)" if lost is None else str(lost)
    print(
        f"{len(report.runs)} of {report.planned_runs} runs in {report.wall_s:.1f}s: "
        f"{steps} steps lost, {report.time_lost_s:.1f}s lost, "
        f"{report.restore_s:.1f}s restoring; "
        + ("training finished" if report.completed else "training did not finish")
    )
    for problem in report.problems:
        print(f"problem: {problem}")
