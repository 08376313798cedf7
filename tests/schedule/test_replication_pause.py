"""IterManager(pause_replication=mgr): replication is held during each step, not during saves."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from memckpt.errors import ScheduleConfigError
from memckpt.schedule import IterManager


class RecordingManager:
    """Counts the holds an IterManager puts on replication, and notes when a save runs."""

    def __init__(self) -> None:
        self.holds = 0
        self.calls: list[str] = []
        self.saved_with_holds: list[int] = []

    def pause_replication(self) -> None:
        self.holds += 1
        self.calls.append("pause")

    def resume_replication(self) -> None:
        self.holds -= 1
        self.calls.append("resume")

    def save(self, step: int) -> float:
        self.saved_with_holds.append(self.holds)
        return 0.1


def test_replication_is_paused_during_each_step_and_runs_for_the_save(
    make_manager: Callable[..., IterManager],
) -> None:
    # Given an IterManager that pauses a manager's replication during steps
    mgr = RecordingManager()
    im = make_manager(save_interval=2, pause_replication=mgr)
    held_during_steps = []
    for step in range(1, 5):
        # When a loop runs the documented sequence
        im.iter(step)
        held_during_steps.append(mgr.holds)
        if im.should_save_ckpt():
            im.record_save(mgr.save(step))
    # Then every step ran paused, and every save ran with replication going
    assert held_during_steps == [1, 1, 1, 1]
    assert mgr.saved_with_holds == [0, 0]
    assert mgr.calls == ["pause", "resume"] * 4
    im.close()
    assert mgr.holds == 0


def test_a_step_without_a_decision_keeps_one_hold_until_close(
    make_manager: Callable[..., IterManager],
) -> None:
    mgr = RecordingManager()
    im = make_manager(pause_replication=mgr)
    im.iter(1)
    im.iter(2)  # no should_save_ckpt() in between: still the one hold
    assert mgr.holds == 1
    im.close()
    im.close()
    assert mgr.holds == 0


def test_finalize_resumes_replication_before_waiting_for_saves(
    make_manager: Callable[..., IterManager],
) -> None:
    # Given a save whose completion depends on replication going on
    mgr = RecordingManager()
    im = make_manager(pause_replication=mgr)

    class Handle:
        def done(self) -> bool:
            return False

        def wait(self) -> float:
            assert mgr.holds == 0, "finalize waited for a save with replication paused"
            return 0.1

    im.iter(1)
    im.record_save(Handle())
    # When the loop finalizes mid-step, Then the wait sees replication running
    im.finalize(1)
    assert mgr.holds == 0


@pytest.mark.parametrize("value", [True, "mgr", object()])
def test_pause_replication_needs_the_manager(
    make_manager: Callable[..., IterManager], value: object
) -> None:
    with pytest.raises(ScheduleConfigError, match="CheckpointManager whose replication"):
        make_manager(pause_replication=value)


def test_a_checkpoint_manager_is_paused_during_steps(
    make_manager: Callable[..., IterManager], tmp_path: Path
) -> None:
    import memckpt

    with memckpt.CheckpointManager(tmp_path, "job", prefault=False) as mgr:
        im = make_manager(save_interval=1, pause_replication=mgr)
        im.iter(1)
        assert mgr.runtime.throttle.paused
        assert im.should_save_ckpt()
        assert not mgr.runtime.throttle.paused
        im.record_save(mgr.save(1, {"w": torch.ones(4)}, blocking=True).wait())
        im.iter(2)
        im.close()
        assert not mgr.runtime.throttle.paused
