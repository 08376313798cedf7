"""Preemption drills with real processes: process-group control, the training example, the command.

Every test bounds its time, and every process it starts is dead when it ends.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import memckpt
from memckpt.storage.events import EVENTS_FILE_ENV, read_events
from memckpt.tools.cli import main as cli_main
from memckpt.tools.commands.simulate_preemption import handle
from memckpt.tools.simulate import End, SimulationConfig, run_command, simulate

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "examples" / "preemptible_train.py"
PY = shlex.quote(sys.executable)


def dead(pid: int) -> bool:
    """Gone, or a zombie waiting for a parent that is not us."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def wait_for(predicate, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


@pytest.fixture
def pidfile(tmp_path: Path) -> Iterator[Path]:
    """A file a command writes a background pid to; that process is killed at teardown."""
    path = tmp_path / "bg.pid"
    yield path
    if path.exists() and path.read_text().strip():
        pid = int(path.read_text())
        if not dead(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.timeout(30)
def test_sigterm_reaches_the_group_at_the_deadline() -> None:
    out = run_command("sleep 30", timeout_s=0.5, grace_s=5.0, stdout=subprocess.DEVNULL)
    assert out.exit_code == -signal.SIGTERM and not out.killed
    assert out.sigterm_unix is not None and out.sigterm_unix - out.started_unix >= 0.5
    assert out.ended_unix - out.started_unix < 5.0


@pytest.mark.timeout(30)
def test_process_ignoring_sigterm_is_killed_after_the_grace(pidfile: Path) -> None:
    # Given a shell whose background child ignores SIGTERM, as a stuck job would
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
    cmd = f"{PY} -c '{code}' & echo $! > {pidfile}; wait"
    # When its deadline passes
    # (3 s: the child must have set SIG_IGN before then, even on a loaded CI machine)
    out = run_command(cmd, timeout_s=3.0, grace_s=0.5, stdout=subprocess.DEVNULL)
    # Then SIGKILL came after the grace and nothing of the group is left
    assert out.killed
    assert 3.5 <= out.ended_unix - out.started_unix < 12.0
    assert dead(int(pidfile.read_text()))


@pytest.mark.timeout(30)
def test_run_without_deadline_sees_the_deadline_variable_removed(tmp_path: Path) -> None:
    seen = tmp_path / "env"
    env = {**os.environ, "MEMCKPT_DEADLINE": "1"}
    out = run_command(f'echo "[$MEMCKPT_DEADLINE]" > {seen}', timeout_s=None, env=env)
    assert out.exit_code == 0 and out.sigterm_unix is None
    assert seen.read_text().strip() == "[]"
    out = run_command(f'echo "$MEMCKPT_DEADLINE" > {seen}', timeout_s=30.0, env=env)
    assert float(seen.read_text()) == pytest.approx(out.deadline_unix, abs=1e-3)


@pytest.mark.timeout(30)
def test_keyboard_interrupt_kills_the_process_group(pidfile: Path) -> None:
    # Given a command with a background child, and Ctrl-C arriving while it runs
    cmd = f"sleep 60 & echo $! > {pidfile}; wait"

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.5)
        with pytest.raises(KeyboardInterrupt):
            run_command(cmd, timeout_s=None, stdout=subprocess.DEVNULL)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    # Then the child is gone with the shell
    wait_for(pidfile.exists, 5, "the pid file")
    assert dead(int(pidfile.read_text()))


@pytest.mark.timeout(30)
def test_sigterm_to_the_simulator_kills_the_run_and_exits_130(pidfile: Path) -> None:
    args = argparse.Namespace(
        cmd=f"sleep 60 & echo $! > {pidfile}; wait",
        timeout=60.0,
        steps_per_run=None,
        restarts=1,
        grace=5.0,
        final_timeout=None,
        no_deadline_env=False,
        log_dir=None,
        json=False,
    )
    timer = threading.Timer(0.8, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    try:
        assert handle(args) == 130
    finally:
        timer.cancel()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert dead(int(pidfile.read_text()))


@pytest.mark.timeout(30)
def test_only_the_last_run_goes_without_a_deadline() -> None:
    # a job that outlives any run with a deadline and finishes at once without one
    config = SimulationConfig(
        'if [ -n "$MEMCKPT_DEADLINE" ]; then sleep 30; fi',
        timeout_s=0.3,
        restarts=2,
        grace_s=2.0,
        final_timeout_s=10.0,
    )
    report = simulate(config, stdout=subprocess.DEVNULL)
    assert [r.end for r in report.runs] == [
        End.EXITED_AFTER_SIGTERM,
        End.EXITED_AFTER_SIGTERM,
        End.FINISHED,
    ]
    assert report.ok and not report.steps_tracked and report.steps_lost is None


# A job that writes IterManager's step events itself, one step per 10 ms, until it is
# stopped; a run that finds the marker of an earlier run finishes at once.
_STEPPING_JOB = """
import json, os, sys, time
events, marker = os.environ["MEMCKPT_EVENTS_FILE"], sys.argv[1]
if os.path.exists(marker):
    sys.exit(0)
open(marker, "w").close()
for i in range(1, 100000):
    with open(events, "a") as f:
        f.write(json.dumps({"event": "step", "time": time.time(), "iter": i, "step": i}) + "\\n")
    time.sleep(0.01)
"""


@pytest.mark.timeout(30)
def test_steps_per_run_preempts_at_a_step_count_without_a_deadline(tmp_path: Path) -> None:
    # Given a job that never stops by itself and a drill that preempts after 40 steps
    job = tmp_path / "job.py"
    job.write_text(_STEPPING_JOB)
    config = SimulationConfig(
        f"{PY} {job} {tmp_path / 'started'}", steps_per_run=40, restarts=1, grace_s=5.0
    )
    # When the drill runs
    report = simulate(config, stdout=subprocess.DEVNULL)
    # Then the first run got SIGTERM once it had 40 steps, with no deadline, and the
    # restart finished
    first, last = report.runs
    assert first.end is End.EXITED_AFTER_SIGTERM and first.timeout_s is None
    assert first.sigterm_after_steps is not None and first.sigterm_after_steps >= 40
    assert first.last_step is not None and first.last_step >= 40
    assert last.end is End.FINISHED and report.completed


@pytest.mark.timeout(30)
def test_failing_run_ends_the_drill_with_a_problem() -> None:
    report = simulate(SimulationConfig("exit 3", timeout_s=10.0, restarts=2))
    (run,) = report.runs
    assert (run.end, run.exit_code, report.planned_runs) == (End.FAILED, 3, 3)
    assert not report.ok and report.problems == ("run 0 failed with exit code 3 before any signal",)


def _start_training(base: Path, events: Path, *extra: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, EVENTS_FILE_ENV: str(events)}
    env.pop("MEMCKPT_DEADLINE", None)
    cmd = [sys.executable, str(TRAIN), "--base-dir", str(base), "--job", "j", *extra]
    return subprocess.Popen(
        cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


@pytest.mark.timeout(60)
def test_training_script_saves_on_sigterm_and_exits_0(shm_dir: Path, tmp_path: Path) -> None:
    # Given the example training well past its first interval save
    events = tmp_path / "events.jsonl"
    proc = _start_training(shm_dir, events, "--steps", "100000", "--every", "5")
    try:

        def training() -> bool:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            return any(e["event"] == "saved" for e in read_events(events))

        wait_for(training, 30, "the first save")
        # When the scheduler sends SIGTERM
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    # Then it saved for the signal and exited cleanly
    assert proc.returncode == 0, err.decode()
    log = read_events(events)
    (exit_event,) = [e for e in log if e["event"] == "exit_requested"]
    assert exit_event["trigger"] == "signal"
    saved = [e["step"] for e in log if e["event"] == "saved"]
    assert len(saved) >= 2 and saved[-1] == exit_event["step"]
    # and that step is the newest complete checkpoint, loadable by a new manager
    with memckpt.CheckpointManager(shm_dir, "j") as mgr:
        assert mgr.latest() == exit_event["step"]
        state = mgr.load()
        assert state is not None and state["step"] == exit_event["step"]


@pytest.mark.timeout(90)
def test_simulate_preemption_resumes_each_restart_and_finishes(
    shm_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given the example under a 6 s deadline, restarted twice, with more steps (150 x 40 ms)
    # than two runs can do, however fast the machine
    every, steps = 10, 150
    train = (
        f"{PY} {shlex.quote(str(TRAIN))} --base-dir {shlex.quote(str(shm_dir))} --job j "
        f"--steps {steps} --every {every} --step-time 0.04"
    )
    argv = shlex.split(
        f"simulate-preemption --cmd {shlex.quote(train)} --timeout 6 --restarts 2 --grace 3 "
        f"--final-timeout 30 --json --log-dir {shlex.quote(str(tmp_path))}"
    )
    # When the drill runs
    rc = cli_main(argv)
    doc = json.loads(capsys.readouterr().out)
    logs = "\n".join(p.read_text() for p in sorted(tmp_path.glob("run-*.log")))
    # Then the preempted runs stopped at their deadline, the last one finished
    assert rc == 0, (doc, logs)
    assert doc["ok"] and doc["completed"] and doc["problems"] == []
    runs = doc["runs"]
    assert len(runs) == 3
    preempted = {End.EXITED_AT_DEADLINE.value, End.EXITED_AFTER_SIGTERM.value}
    assert runs[0]["end"] in preempted and runs[1]["end"] in preempted, (runs, logs)
    assert runs[2]["end"] == End.FINISHED.value and runs[2]["exit_code"] == 0
    # each restart resumed from the newest step saved before it, losing at most an interval
    newest = None
    for run in runs:
        assert run["resumed_step"] == newest
        assert run["steps_lost"] is not None and 0 <= run["steps_lost"] <= every, run
        if run["end"] == End.EXITED_AT_DEADLINE.value:
            assert run["steps_lost"] == 0, run
        newest = run["last_saved_step"] if run["last_saved_step"] is not None else newest
    assert any(run["last_saved_step"] for run in runs[:2]), (runs, logs)
    assert runs[2]["last_step"] == steps and runs[2]["last_saved_step"] == steps
    with memckpt.CheckpointManager(shm_dir, "j") as mgr:
        assert mgr.latest() == steps
