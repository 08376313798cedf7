"""The preemption report from synthetic events, and the events IterManager writes. No processes."""

from __future__ import annotations

import json
from typing import Any

import pytest

from memckpt.errors import ScheduleConfigError
from memckpt.schedule import IterManager
from memckpt.storage.events import EVENTS_FILE_ENV, read_events
from memckpt.tools.simulate import (
    End,
    RunOutcome,
    SimulationConfig,
    build_report,
    classify_end,
    shell_command,
    steps_run,
    summarize_events,
)

T0 = 1_767_225_600.0


def ev(event: str, at: float, **fields: Any) -> dict[str, Any]:
    return {"event": event, "time": T0 + at, "pid": 1, **fields}


def outcome(index: int, start: float, end: float, code: int | None = 0, **kw: Any) -> RunOutcome:
    return RunOutcome(index, T0 + start, T0 + end, code, **kw)


def preempted(index: int, start: float, end: float, code: int = 0) -> RunOutcome:
    """A run that got SIGTERM at ``end`` - 1 and exited at ``end``."""
    return outcome(index, start, end, code, deadline_unix=T0 + end - 1, sigterm_unix=T0 + end - 1)


def test_steps_and_time_after_the_last_save_are_lost() -> None:
    # Given a run killed at step 25 after saving 10 and 20, and a restart that resumes at 20
    run0 = [
        ev("step", 1.0, iter=1, step=1),
        ev("saved", 2.0, step=10, rank=0),
        ev("saved", 3.0, step=20, rank=0),
        ev("step", 3.5, iter=25, step=25),
    ]
    run1 = [
        ev("loaded", 12.0, step=20, rank=0),
        ev("step", 12.5, iter=1, step=21),
        ev("saved", 14.0, step=40, rank=0),
        ev("step", 14.0, iter=20, step=40, final=True),
    ]
    # When the report is built
    report = build_report(
        "train",
        [outcome(0, 0.0, 5.0, -9, sigterm_unix=T0 + 4.0, killed=True), outcome(1, 10.0, 15.0)],
        [run0, run1],
    )
    # Then run 0 lost the 5 steps after step 20 and the 2 s after its commit
    r0, r1 = report.runs
    assert (r0.end, r0.last_saved_step, r0.last_step, r0.resume_point) == (End.KILLED, 20, 25, 20)
    assert r0.steps_lost == 5 and r0.time_lost_s == pytest.approx(2.0)
    assert r0.sigterm_after_s == pytest.approx(4.0)
    # and run 1 resumed where run 0 saved, finished, and lost nothing
    assert (r1.end, r1.resumed_step, r1.restore_s, r1.steps_lost) == (End.FINISHED, 20, 2.0, 0)
    assert report.ok and report.steps_lost == 5 and report.problems == ()


def test_deadline_save_before_the_sigterm_loses_no_steps() -> None:
    run0 = [
        ev("step", 1.0, iter=1, step=1),
        ev("exit_requested", 4.0, iter=30, step=30, trigger="deadline"),
        ev("saved", 4.1, step=30, rank=0),
        ev("step", 4.1, iter=30, step=30, final=True),
    ]
    run1 = [ev("loaded", 7.0, step=30, rank=0), ev("step", 8.0, iter=1, step=31)]
    report = build_report(
        "train",
        [outcome(0, 0.0, 5.0, 0, deadline_unix=T0 + 5.5), outcome(1, 6.0, 9.0)],
        [run0, run1],
    )
    r0 = report.runs[0]
    assert r0.end is End.EXITED_AT_DEADLINE and r0.exit_trigger == "deadline"
    assert (r0.steps_lost, r0.time_lost_s, r0.timeout_s) == (0, pytest.approx(0.9), 5.5)
    assert report.to_dict()["runs"][0]["label"] == "saved and exited before the deadline"


def test_restart_from_an_older_step_than_saved_is_a_problem() -> None:
    run0 = [ev("saved", 2.0, step=20, rank=0), ev("step", 3.0, iter=22, step=22)]
    run1 = [ev("loaded", 7.0, step=10, rank=0), ev("step", 8.0, iter=1, step=11)]
    report = build_report("train", [preempted(0, 0.0, 5.0), outcome(1, 6.0, 9.0)], [run0, run1])
    # run 0 loses everything after step 10, where the job really went on from
    assert report.runs[0].steps_lost == 12 and report.runs[0].resume_point == 10
    assert report.problems == ("run 1 started from step 10, but step 20 was saved before it",)
    assert not report.ok


def test_run_without_a_save_loses_its_whole_time_and_restart_starts_from_scratch() -> None:
    run0 = [ev("step", 2.0, iter=1, step=1), ev("step", 3.0, iter=7, step=7)]
    run1 = [ev("step", 7.0, iter=1, step=1)]
    report = build_report(
        "train", [preempted(0, 0.0, 5.0, -15), outcome(1, 6.0, 9.0)], [run0, run1]
    )
    r0 = report.runs[0]
    assert (r0.end, r0.exit_code, r0.resumed_step, r0.last_saved_step) == (
        End.EXITED_AFTER_SIGTERM,
        -15,
        None,
        None,
    )
    assert (r0.steps_lost, r0.time_lost_s) == (7, 5.0)
    assert report.ok  # nothing was saved, so starting from scratch is right


def test_ranks_repeating_events_count_once() -> None:
    events = [
        ev("loaded", 1.0, step=10, rank=0),
        ev("loaded", 1.1, step=10, rank=1),
        ev("saved", 2.2, step=20, rank=1),
        ev("saved", 2.0, step=20, rank=0),
        ev("step", 3.0, iter=12, step=22),
        ev("step", 3.0, iter=11, step=21),
    ]
    progress = summarize_events(events)
    assert (progress.resumed_step, progress.resumed_unix) == (10, T0 + 1.0)
    assert progress.saved == ((20, T0 + 2.0),)
    assert (progress.last_step, progress.iters) == (22, 12)


def test_without_step_numbers_steps_lost_is_unknown() -> None:
    run0 = [ev("saved", 2.0, step=20, rank=0), ev("step", 3.0, iter=25)]
    run1 = [ev("loaded", 7.0, step=20, rank=0), ev("step", 8.0, iter=1)]
    report = build_report("train", [preempted(0, 0.0, 5.0), outcome(1, 6.0, 9.0)], [run0, run1])
    assert not report.steps_tracked
    assert report.steps_lost is None and report.runs[0].steps_lost is None
    assert report.runs[0].time_lost_s == pytest.approx(3.0)


def test_last_run_that_does_not_finish_is_a_problem() -> None:
    run0 = [ev("saved", 2.0, step=20, rank=0), ev("step", 3.0, iter=22, step=22)]
    report = build_report("train", [preempted(0, 0.0, 5.0)], [run0], planned_runs=1)
    assert not report.completed
    assert report.problems == ("the last run did not finish: exited cleanly after SIGTERM",)
    # the last run's resume point is the newest saved step
    assert (report.runs[0].resume_point, report.runs[0].steps_lost) == (20, 2)


def test_failed_run_is_a_problem() -> None:
    report = build_report("train", [outcome(0, 0.0, 1.0, 3)], [[]], planned_runs=3)
    assert report.runs[0].end is End.FAILED
    assert report.problems == ("run 0 failed with exit code 3 before any signal",)
    assert json.loads(json.dumps(report.to_dict()))["planned_runs"] == 3


@pytest.mark.parametrize(
    ("kwargs", "exit_requested", "end"),
    [
        ({"code": 0}, False, End.FINISHED),
        ({"code": 0}, True, End.EXITED_AT_DEADLINE),
        ({"code": 1}, False, End.FAILED),
        ({"code": 0, "sigterm_unix": T0}, True, End.EXITED_AFTER_SIGTERM),
        ({"code": -15, "sigterm_unix": T0}, False, End.EXITED_AFTER_SIGTERM),
        ({"code": -9, "sigterm_unix": T0, "killed": True}, True, End.KILLED),
    ],
)
def test_how_a_run_ended(kwargs: dict[str, Any], exit_requested: bool, end: End) -> None:
    assert classify_end(outcome(0, 0.0, 1.0, **kwargs), exit_requested) is end


@pytest.mark.parametrize(
    "kwargs",
    [
        {"command": " ", "timeout_s": 1.0},
        {"command": "x", "timeout_s": 0},
        {"command": "x", "timeout_s": 1.0, "grace_s": -1},
        {"command": "x", "timeout_s": 1.0, "restarts": -1},
        {"command": "x", "timeout_s": 1.0, "restarts": 1.5},
        {"command": "x", "timeout_s": 1.0, "final_timeout_s": 0},
        {"command": "x"},
        {"command": "x", "steps_per_run": 0},
        {"command": "x", "steps_per_run": 2.5},
        {"command": "x", "steps_per_run": True},
    ],
)
def test_config_rejects_nonsense(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ScheduleConfigError):
        SimulationConfig(**kwargs)


def test_a_step_count_alone_preempts_without_a_deadline() -> None:
    config = SimulationConfig("train", steps_per_run=50)
    assert (config.timeout_s, config.steps_per_run) == (None, 50)


def test_steps_run_counts_iterations_else_steps_since_the_resume() -> None:
    # Given a run resumed at step 100 whose IterManager counted its iterations
    counted = [
        ev("loaded", 1.0, step=100, rank=0),
        ev("step", 2.0, iter=1, step=101),
        ev("step", 2.5, iter=30, step=130),
        ev("step", 2.6, iter=12, step=112),  # another rank, behind
    ]
    # and one whose job emits only its steps
    bare = [ev("loaded", 1.0, step=100, rank=0), ev("step", 2.0, step=140)]
    # Then both count the steps trained in the run, never the step numbers themselves
    assert steps_run(counted) == 30
    assert steps_run(bare) == 40
    assert steps_run([ev("step", 1.0, step=7)]) == 7  # started from scratch
    assert steps_run([ev("loaded", 1.0, step=100, rank=0)]) is None


def test_the_steps_at_the_sigterm_are_in_the_report() -> None:
    run0 = [ev("step", 1.0, iter=20, step=20), ev("saved", 2.0, step=21, rank=0)]
    run1 = [ev("loaded", 7.0, step=21, rank=0), ev("step", 8.0, iter=1, step=22)]
    first = preempted(0, 0.0, 5.0)
    first = RunOutcome(**{**first.__dict__, "sigterm_after_steps": 20})
    report = build_report("train", [first, outcome(1, 6.0, 9.0)], [run0, run1])
    assert [r.sigterm_after_steps for r in report.runs] == [20, None]
    assert report.to_dict()["runs"][0]["sigterm_after_steps"] == 20


@pytest.mark.parametrize(
    ("command", "runs_as"),
    [
        ("python train.py --steps 5", "exec python train.py --steps 5"),
        ("$PY train.py --dir ${BASE}", "exec $PY train.py --dir ${BASE}"),
        ("cd work && python train.py", "cd work && python train.py"),
        ("python train.py > log", "python train.py > log"),
        ("python -c 'import a; a.b()'", "python -c 'import a; a.b()'"),
        ("STEPS=5 python train.py", "STEPS=5 python train.py"),
        ("exec python train.py", "exec python train.py"),
        ("python 'unbalanced", "python 'unbalanced"),
    ],
)
def test_single_simple_command_is_execed(command: str, runs_as: str) -> None:
    assert shell_command(command) == runs_as


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_iter_manager_writes_throttled_step_events_and_a_final_one(tmp_path, monkeypatch) -> None:
    # Given an events file and iterations of 0.125 s each
    path = tmp_path / "events.jsonl"
    monkeypatch.setenv(EVENTS_FILE_ENV, str(path))
    clock = FakeClock()
    im = IterManager(signals=(), environ={}, clock=clock, wall_clock=lambda: T0 + clock.now)
    # When 12 iterations run (steps 101..112) and the manager finalizes
    for step in range(101, 113):
        im.iter(step)
        clock.now += 0.125
    im.finalize(112)
    # Then there is a step event at most every 0.5 s, and a final one with the last step
    steps = [e for e in read_events(path) if e["event"] == "step"]
    assert [(e["iter"], e["step"]) for e in steps] == [(1, 101), (5, 105), (9, 109), (12, 112)]
    assert steps[-1]["final"] is True and "final" not in steps[0]


def test_iter_manager_writes_exit_requested_on_a_deadline_save(tmp_path, monkeypatch) -> None:
    path = tmp_path / "events.jsonl"
    monkeypatch.setenv(EVENTS_FILE_ENV, str(path))
    clock = FakeClock()
    im = IterManager(
        signals=(),
        environ={},
        redundant_time=1.0,
        deadline=T0 + clock.now + 3.0,
        clock=clock,
        wall_clock=lambda: T0 + clock.now,
    )
    step = 0
    while not im.exit_requested and step < 100:
        step += 1
        im.iter(step)
        clock.now += 0.5
        im.should_save_ckpt()
    (exit_event,) = [e for e in read_events(path) if e["event"] == "exit_requested"]
    assert (exit_event["step"], exit_event["trigger"]) == (step, "deadline")
    # the progress up to the save is on record before the exit request
    assert read_events(path)[-2] == {**read_events(path)[-2], "event": "step", "step": step}
    im.close()


def test_iter_manager_writes_nothing_without_the_variable(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv(EVENTS_FILE_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    im = IterManager(signals=(), environ={})
    im.iter(1)
    im.finalize(1)
    assert list(tmp_path.iterdir()) == []
