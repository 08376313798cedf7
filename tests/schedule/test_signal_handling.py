"""Signals: recorded by the handler only, seen by the next decision, previous handlers chained
and restored. Each signal test runs a real Python subprocess so pytest's own handlers stay put."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

import memckpt.schedule
from memckpt.schedule import IterManager, SignalInstallError, SignalWatcher

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGUSR1"), reason="POSIX signals")

SRC = str(Path(memckpt.schedule.__file__).resolve().parents[2])


def _python(script: str, **kwargs) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
    for name in memckpt.schedule.DEADLINE_ENV_VARS:
        env.pop(name, None)
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        **kwargs,
    )


def _run(script: str) -> dict:
    proc = _python(script)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def test_signal_sent_to_itself_is_recorded_and_seen_by_the_next_decision():
    result = _run(
        """
        import json, os, signal
        from memckpt.schedule import IterManager

        chained = []
        def previous(signum, frame):
            chained.append(signum)
        signal.signal(signal.SIGTERM, previous)

        im = IterManager(signal_grace_s=0.0)
        saves = []
        im.register_persistent_save(saves.append)
        im.iter()
        before = im.should_save_ckpt()
        os.kill(os.getpid(), signal.SIGTERM)
        in_handler = {
            "event": im.signal_event.name,
            "reason": im.explain(),
            "saves": list(saves),
            "chained": list(chained),
        }
        im.iter()
        after = im.should_save_ckpt()
        reason, exit_requested = im.explain(), im.exit_requested
        im.finalize(im.iter_count)
        print(json.dumps({
            "before": before, "in_handler": in_handler, "after": after, "reason": reason,
            "exit_requested": exit_requested, "saves": saves,
            "restored": signal.getsignal(signal.SIGTERM) is previous,
        }))
        """
    )
    # Then the handler recorded the signal, chained to the previous handler, decided nothing
    assert result["before"] is False
    assert result["in_handler"] == {
        "event": "SIGTERM",
        "reason": "not yet: no interval, deadline or signal",
        "saves": [],
        "chained": [signal.SIGTERM],
    }
    # And the next decision saves for the signal and asks to exit; finalize saved persistently
    assert result["after"] is True
    assert result["reason"].startswith("signal SIGTERM received: ")
    assert result["exit_requested"] is True
    assert result["saves"] == [2]
    # And the previous handler is back
    assert result["restored"] is True


def test_sigterm_from_the_parent_ends_training_with_a_save_instead_of_a_kill():
    # Given a training loop in a child process, with the default SIGTERM action
    proc = _python(
        """
        import json, signal, sys, time
        from memckpt.schedule import IterManager

        im = IterManager(signal_grace_s=0.0)
        print("ready", flush=True)
        for step in range(1, 100_000):
            im.iter()
            time.sleep(0.005)
            if im.should_save_ckpt():
                break
        reason, exit_requested = im.explain(), im.exit_requested
        im.close()
        print(json.dumps({
            "step": step, "reason": reason, "exit_requested": exit_requested,
            "restored_default": signal.getsignal(signal.SIGTERM) == signal.SIG_DFL,
        }))
        """
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        # When the parent sends SIGTERM
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    # Then the child was not killed: it saved at the next decision and exited cleanly
    assert proc.returncode == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["reason"].startswith("signal SIGTERM received: ")
    assert result["exit_requested"] is True
    assert result["restored_default"] is True


def test_close_restores_every_previous_handler_and_sigusr1_is_watched_too():
    result = _run(
        """
        import json, os, signal
        from memckpt.schedule import IterManager

        def mine(signum, frame):
            pass
        signal.signal(signal.SIGUSR1, mine)
        with IterManager(signal_grace_s=0.0) as im:
            installed = signal.getsignal(signal.SIGUSR1) is not mine
            os.kill(os.getpid(), signal.SIGUSR1)
            im.iter()
            saved = im.should_save_ckpt()
            reason = im.explain()
        print(json.dumps({
            "installed": installed, "saved": saved, "reason": reason,
            "usr1_restored": signal.getsignal(signal.SIGUSR1) is mine,
            "term_restored": signal.getsignal(signal.SIGTERM) == signal.SIG_DFL,
        }))
        """
    )
    assert result["installed"] and result["saved"]
    assert result["reason"].startswith("signal SIGUSR1 received: ")
    assert result["usr1_restored"] and result["term_restored"]


def test_installing_handlers_off_the_main_thread_is_a_clear_error():
    # Given a watcher used from a worker thread
    errors: list[BaseException] = []
    before = signal.getsignal(signal.SIGUSR1)

    def install() -> None:
        try:
            SignalWatcher((signal.SIGUSR1,)).install()
        except SignalInstallError as e:
            errors.append(e)

    worker = threading.Thread(target=install, name="loader")
    worker.start()
    worker.join(timeout=10)

    # Then it says why and what to do, and leaves the handlers alone
    assert len(errors) == 1
    assert "main thread" in str(errors[0]) and "'loader'" in str(errors[0])
    assert signal.getsignal(signal.SIGUSR1) is before


def test_iter_manager_off_the_main_thread_skips_handlers_with_a_warning(caplog):
    managers: list[IterManager] = []
    with caplog.at_level(logging.WARNING, logger="memckpt.schedule"):
        worker = threading.Thread(target=lambda: managers.append(IterManager(environ={})))
        worker.start()
        worker.join(timeout=10)

    assert not managers[0].signals_installed
    assert "signal handlers not installed" in caplog.text
    assert "SIGTERM" in caplog.text
