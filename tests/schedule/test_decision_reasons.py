"""What an operator reads (explain, last_decision) and the exit path after a deadline save."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from memckpt.schedule import SaveDecision, ScheduleConfigError, Trigger, save_times
from memckpt.schedule.policy import Assessment, Votes, decide

START_UNIX = 1_767_225_600.0


def test_explain_before_any_decision_says_so(make_manager):
    assert make_manager().explain() == "no decision yet: should_save_ckpt() was not called"


def test_not_yet_reason_counts_steps_towards_the_interval(make_manager, train):
    im = make_manager(save_interval=48)
    train(im, 10, 1.0)
    assert im.explain() == "not yet: 10 of 48 steps"
    assert im.last_decision == SaveDecision(False, Trigger.NONE, "not yet: 10 of 48 steps", 10)


def test_interval_reason_says_how_many_steps_passed(make_manager, train):
    im = make_manager(save_interval=48)
    train(im, 48, 1.0)
    assert im.explain() == "interval: 48 steps since last save >= 48"
    assert str(im.last_decision) == im.explain()


def test_not_yet_reason_lists_interval_and_deadline_together(make_manager, train):
    im = make_manager(save_interval=48, deadline=START_UNIX + 3600, redundant_time=5.0)
    train(im, 10, 1.0)
    assert im.explain() == "not yet: 10 of 48 steps; deadline: 3590.0s left, due below 6.0s"


def test_interval_save_does_not_request_an_exit(make_manager, train):
    im = make_manager(save_interval=5)
    assert train(im, 5, 1.0) == [5]
    assert not im.exit_requested


@pytest.mark.parametrize(
    ("agreed", "trigger"),
    [
        (Votes(signal=15, deadline=True, interval=True), Trigger.SIGNAL),
        (Votes(deadline=True, interval=True), Trigger.DEADLINE),
        (Votes(interval=True), Trigger.INTERVAL),
        (Votes(), Trigger.NONE),
    ],
)
def test_signal_outranks_deadline_which_outranks_interval(agreed, trigger):
    assessment = Assessment(agreed, "s", "d", "i", "not yet: n")
    assert decide(assessment, agreed, step=3).trigger is trigger


def test_a_vote_from_another_rank_is_named_as_such():
    mine = Assessment(Votes(), not_yet="not yet: 3 of 10 steps")
    assert decide(mine, Votes(signal=10), 7).reason == "signal SIGUSR1 received on another rank"
    assert decide(mine, Votes(deadline=True), 7).reason == "deadline: due on another rank"
    assert decide(mine, Votes(interval=True), 7).reason == (
        "interval: due on another rank (not yet: 3 of 10 steps)"
    )


def test_deadline_save_then_persistent_save_then_exit(make_manager, fake_time):
    # Given a training loop with a persistent save registered
    im = make_manager(deadline=START_UNIX + 20, save_ckpt_time=1.0, redundant_time=2.0)
    events: list[tuple[str, int]] = []

    def dcp_save(step: int) -> None:
        events.append(("dcp", step))
        fake_time.sleep(3.0)

    im.register_persistent_save(dcp_save)
    im.register_persistent_save(lambda step: events.append(("manifest", step)))

    # When the loop follows the documented pattern
    step = 0
    while True:
        step += 1
        im.iter()
        fake_time.sleep(1.0)
        if im.should_save_ckpt():
            events.append(("memory", step))
            im.record_save(SimpleNamespace(blocking_s=0.1, total_s=1.0))
            if im.exit_requested:
                assert im.finalize(step) == 3.0
                break

    # Then the memory save comes first, the persistent saves in registration order, then exit
    assert events == [("memory", 17), ("dcp", 17), ("manifest", 17)]


def test_finalize_propagates_a_failed_persistent_save(make_manager):
    im = make_manager()

    def broken(step: int) -> None:
        raise OSError(f"disk full at step {step}")

    im.register_persistent_save(broken)
    with pytest.raises(OSError, match="disk full at step 9"):
        im.finalize(9)


def test_persistent_save_must_be_callable(make_manager):
    with pytest.raises(ScheduleConfigError, match="callable"):
        make_manager().register_persistent_save("save.pt")


def test_save_times_read_seconds_or_result_attributes():
    assert save_times(2.5) == (2.5, 2.5)
    assert save_times(3) == (3.0, 3.0)
    assert save_times(SimpleNamespace(step=1, nbytes=8, blocking_s=0.2, total_s=1.5)) == (0.2, 1.5)
    assert save_times(SimpleNamespace(total_s=4.0)) == (4.0, 4.0)
    assert save_times(SimpleNamespace(blocking_s=0.3, total_s=None)) == (0.3, 0.3)


@pytest.mark.parametrize("bad", ["2s", None, True, object(), -1.0, float("inf")])
def test_record_save_rejects_what_is_not_a_save_time(make_manager, bad):
    with pytest.raises(ScheduleConfigError):
        make_manager().record_save(bad)


def test_each_save_decision_logs_one_info_line(make_manager, train, caplog):
    im = make_manager(save_interval=3)
    with caplog.at_level(logging.INFO, logger="memckpt.schedule"):
        train(im, 6, 1.0)
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    # without a State or a step from the loop, the unit is named: iterations
    assert infos == [
        "save at iteration 3: interval: 3 steps since last save >= 3",
        "save at iteration 6: interval: 3 steps since last save >= 3",
    ]


def test_the_save_line_names_the_training_step_the_loop_gives(make_manager, caplog):
    im = make_manager(save_interval=3)
    with caplog.at_level(logging.INFO, logger="memckpt.schedule"):
        for step in range(51, 57):  # a job resumed at step 50
            im.iter(step=step)
            im.should_save_ckpt()
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert infos and all(m.startswith("save at step 5") for m in infos), infos


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"predict_freq": 0}, "predict_freq"),
        ({"redundant_time": -1.0}, "redundant_time"),
        ({"warmup_iters": -1}, "warmup_iters"),
        ({"iteration_estimate": "mean"}, "iteration_estimate"),
        ({"total_iters": 1.5}, "total_iters"),
        ({"signal_grace_s": "30"}, "signal_grace_s"),
    ],
)
def test_bad_arguments_are_rejected_by_name(make_manager, kwargs, match):
    with pytest.raises(ScheduleConfigError, match=match):
        make_manager(**kwargs)


class FakeHandle:
    """A save in flight, shaped like memckpt's SaveHandle."""

    def __init__(self, result=None, error: Exception | None = None) -> None:
        self.finished = False
        self.waited = 0
        self._result, self._error = result, error

    def done(self) -> bool:
        return self.finished

    def wait(self, timeout: float | None = None):
        self.waited += 1
        self.finished = True
        if self._error is not None:
            raise self._error
        return self._result


def test_save_handle_is_timed_once_it_completes_without_blocking(make_manager, train):
    # Given a save handle still running when passed to record_save
    im = make_manager(mtbf_s=100.0, interval_formula="young", warmup_iters=0)
    train(im, 2, 1.0)
    handle = FakeHandle(SimpleNamespace(blocking_s=0.5, total_s=3.0))
    im.record_save(handle)

    # When iterations go on while it runs, nothing waits for it
    train(im, 2, 1.0)
    assert handle.waited == 0
    assert im.prediction.save_cost_s is None

    # Then the first iteration after it finished records its times
    handle.finished = True
    train(im, 1, 1.0)
    assert (im.prediction.save_cost_s, im.prediction.save_s) == (0.5, 3.0)


def test_failed_save_handle_is_logged_and_not_timed(make_manager, train, caplog):
    im = make_manager()
    handle = FakeHandle(error=OSError("tmpfs full"))
    im.record_save(handle)
    handle.finished = True
    with caplog.at_level(logging.WARNING, logger="memckpt.schedule"):
        train(im, 1, 1.0)
    assert "tmpfs full" in caplog.text
    assert im.prediction.save_s == 0.0


def test_finalize_waits_for_the_exit_save_before_the_persistent_save(make_manager):
    # Given the exit step's memory save still in flight
    im = make_manager()
    order: list[str] = []
    handle = FakeHandle(SimpleNamespace(blocking_s=0.1, total_s=0.4))
    original_wait = handle.wait

    def wait(timeout: float | None = None):
        order.append("memory save complete")
        return original_wait(timeout)

    handle.wait = wait
    im.register_persistent_save(lambda step: order.append(f"persistent save {step}"))
    im.record_save(handle)

    # When finalize runs, Then it waits for the memory save first
    im.finalize(12)
    assert order == ["memory save complete", "persistent save 12"]


def test_finalize_raises_when_the_exit_save_failed(make_manager):
    im = make_manager()
    persisted: list[int] = []
    im.register_persistent_save(persisted.append)
    im.record_save(FakeHandle(error=OSError("peer 3 unreachable")))
    with pytest.raises(OSError, match="peer 3 unreachable"):
        im.finalize(5)
    assert persisted == []
