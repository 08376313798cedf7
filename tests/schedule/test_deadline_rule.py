"""Deadline saves: due exactly when remaining < save + iteration + margin; deadline sources."""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone

import pytest

from memckpt.schedule import (
    MEMCKPT_DEADLINE_ENV,
    MLP_DEADLINE_ENV,
    DeadlineFormatError,
    ScheduleConfigError,
    Trigger,
    parse_deadline,
)
from memckpt.schedule.deadline import Deadline, coerce_deadline, deadline_from_env
from memckpt.schedule.policy import LocalView, Votes, assess, decide, predict
from memckpt.schedule.signals import SignalEvent

START_UNIX = 1_767_225_600.0  # what the fake wall clock reads at the start (conftest)


def test_deadline_save_is_due_exactly_when_remaining_drops_below_the_budget(make_manager, train):
    # Given a deadline 100 s away, 1 s iterations, saves of 2 s and a 5 s margin: budget 8 s
    im = make_manager(deadline=START_UNIX + 100, save_ckpt_time=2.0, redundant_time=5.0)

    # When training runs to step 92, 8.0 s before the deadline: not below the budget yet
    assert train(im, 92, 1.0) == []
    assert im.explain() == "not yet: deadline: 8.0s left, due below 8.0s"

    # Then step 93 (7.0 s left) is due, and only once
    assert train(im, 1, 1.0) == [93]
    assert im.last_decision.trigger is Trigger.DEADLINE
    assert im.explain() == (
        "deadline: 7.0s left < save 2.0s + iteration 1.0s + margin 5.0s (from deadline argument)"
    )
    assert im.exit_requested
    assert train(im, 5, 1.0) == []
    assert im.explain() == "not yet: exit requested after the deadline save"


def test_deadline_counts_the_longest_iteration_by_default(make_manager, train):
    # Given mostly 1 s iterations with one 10 s outlier
    im = make_manager(deadline=START_UNIX + 200, save_ckpt_time=2.0, redundant_time=5.0)
    saved = train(im, 175, lambda step: 10.0 if step == 20 else 1.0)

    # Then the budget is 2 + 10 + 5 = 17 s: due at 16 s left (t = 184 after 175 steps)
    assert saved == [175]
    assert "iteration 10.0s" in im.last_decision.reason


def test_deadline_can_count_the_p95_iteration_instead(make_manager, train):
    im = make_manager(
        deadline=START_UNIX + 200, save_ckpt_time=2.0, redundant_time=5.0, iteration_estimate="p95"
    )
    saved = train(im, 190, lambda step: 10.0 if step == 20 else 1.0)

    # Budget 2 + 1 + 5 = 8 s: due at 7 s left (t = 193 after 184 steps)
    assert saved == [184]


def test_measured_save_time_replaces_the_configured_one(make_manager, train):
    # Given a pessimistic 30 s guess but saves measured at 2 s in total
    im = make_manager(deadline=START_UNIX + 100, save_ckpt_time=30.0, redundant_time=5.0)
    train(im, 10, 1.0)
    im.record_save(2.0)

    # Then the deadline save waits for the 8 s budget, not 36 s
    assert train(im, 90, 1.0) == [93]


def test_persistent_save_time_is_part_of_the_deadline_budget(make_manager, train):
    im = make_manager(
        deadline=START_UNIX + 100, save_ckpt_time=2.0, redundant_time=5.0, persistent_save_time=20.0
    )
    # Budget 2 + 20 + 1 + 5 = 28 s: due at 27 s left
    assert train(im, 100, 1.0) == [73]


def test_deadline_already_passed_is_due_at_once(make_manager, train):
    im = make_manager(deadline=START_UNIX - 60)
    assert train(im, 1, 1.0) == [1]
    assert im.explain().startswith("deadline: -61.0s left < save 0.0s")


def test_deadline_is_read_from_the_velastic_variable_in_seconds(make_manager, train):
    env = {MLP_DEADLINE_ENV: str(START_UNIX + 100)}
    im = make_manager(environ=env, save_ckpt_time=2.0, redundant_time=5.0)
    assert train(im, 93, 1.0) == [93]
    assert im.explain().endswith(f"(from {MLP_DEADLINE_ENV})")


def test_deadline_variable_set_after_construction_is_seen(make_manager, train):
    # velastic reads the variable at every decision; so does IterManager
    env: dict[str, str] = {}
    im = make_manager(environ=env, redundant_time=5.0)
    assert train(im, 3, 1.0) == []
    env[MEMCKPT_DEADLINE_ENV] = str(int((START_UNIX + 3 + 4) * 1000))  # milliseconds
    assert train(im, 1, 1.0) == [4]


def test_earliest_of_argument_and_variables_wins(make_manager):
    env = {MLP_DEADLINE_ENV: str(START_UNIX + 500), MEMCKPT_DEADLINE_ENV: str(START_UNIX + 300)}
    im = make_manager(environ=env, deadline=START_UNIX + 400)
    assert im.deadline == Deadline(START_UNIX + 300, MEMCKPT_DEADLINE_ENV)
    assert im.remaining_time == 300.0


def test_no_deadline_anywhere_means_no_deadline_save(make_manager, train):
    im = make_manager()
    assert train(im, 20, 1.0) == []
    assert im.deadline is None and im.remaining_time is None
    assert im.explain() == "not yet: no interval, deadline or signal"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1767225600", 1767225600.0),
        (" 1767225600.5 ", 1767225600.5),
        ("1767225600000", 1767225600.0),
        ("1767225600500", 1767225600.5),
        ("2026-01-01T00:00:00Z", 1767225600.0),
        ("2026-01-01T02:00:00+02:00", 1767225600.0),
        ("2026-01-01 00:00:30.5+00:00", 1767225630.5),
    ],
)
def test_deadline_text_in_seconds_milliseconds_or_iso_8601(text, expected):
    assert parse_deadline(text, MEMCKPT_DEADLINE_ENV) == pytest.approx(expected)


@pytest.mark.parametrize(
    "text", ["soon", "", "-5", "0", "nan", "inf", "1e20", "2026-01-01T00:00:00", "2026-13-01Z"]
)
def test_malformed_deadline_text_is_a_clear_error_naming_the_variable(text):
    with pytest.raises(DeadlineFormatError, match=MEMCKPT_DEADLINE_ENV):
        parse_deadline(text, MEMCKPT_DEADLINE_ENV)


def test_iso_time_without_offset_is_rejected_as_ambiguous():
    with pytest.raises(DeadlineFormatError, match="no UTC offset"):
        parse_deadline("2026-01-01T00:00:00", MEMCKPT_DEADLINE_ENV)


def test_malformed_variable_fails_at_construction_not_at_the_deadline(make_manager):
    with pytest.raises(DeadlineFormatError, match=f"{MLP_DEADLINE_ENV}='tomorrow'"):
        make_manager(environ={MLP_DEADLINE_ENV: "tomorrow"})


def test_empty_variable_counts_as_unset():
    assert deadline_from_env({MLP_DEADLINE_ENV: "  ", MEMCKPT_DEADLINE_ENV: ""}) is None


def test_deadline_argument_accepts_aware_datetime_and_rejects_naive_or_bool():
    moment = datetime(2026, 1, 1, tzinfo=timezone.utc) + timedelta(minutes=5)
    assert coerce_deadline(moment).at_unix == START_UNIX + 300
    with pytest.raises(DeadlineFormatError, match="tzinfo"):
        coerce_deadline(datetime(2026, 1, 1))
    with pytest.raises(DeadlineFormatError, match="deadline=True"):
        coerce_deadline(True)


def _view(now: float, **kwargs) -> LocalView:
    prediction = predict(
        iteration=None,
        estimate="max",
        save_blocking_s=None,
        save_total_s=None,
        save_ckpt_time=2.0,
        persistent_save_time=0.0,
        policy=None,
        step=10,
        total_iters=-1,
    )
    defaults = dict(step=10, steps_since_save=10, saves_decided=0, now_unix=now, margin_s=5.0)
    return LocalView(prediction=prediction, **{**defaults, **kwargs})


def test_signal_means_deadline_is_now_plus_grace():
    # Given SIGTERM received at t=0 with 30 s grace and a 7 s budget (save 2 + margin 5)
    event = SignalEvent(15, START_UNIX)

    # When 23 s have passed (7.0 s left): not below the budget
    early = assess(_view(START_UNIX + 23.0, signal=event, signal_grace_s=30.0))
    assert early.votes == Votes()
    assert early.not_yet == "not yet: signal SIGTERM: 7.0s left, due below 7.0s"

    # Then at 6.5 s left the signal vote is cast
    late = assess(_view(START_UNIX + 23.5, signal=event, signal_grace_s=30.0))
    assert late.votes == Votes(signal=15)
    decision = decide(late, late.votes, step=10)
    assert decision.trigger is Trigger.SIGNAL
    assert decision.reason == (
        "signal SIGTERM received: 6.5s left < save 2.0s + iteration 0.0s + margin 5.0s"
    )


def test_zero_grace_makes_a_signal_due_at_the_next_decision():
    event = SignalEvent(10, START_UNIX)
    assert assess(_view(START_UNIX, signal=event, signal_grace_s=0.0)).votes == Votes(signal=10)


def test_no_signal_or_deadline_vote_after_the_exit_was_requested():
    view = _view(
        START_UNIX + 100,
        signal=SignalEvent(15, START_UNIX),
        deadline=Deadline(START_UNIX, "deadline argument"),
        exit_requested=True,
    )
    assert assess(view).votes == Votes()


def test_nan_is_not_accepted_as_a_save_time(make_manager):
    with pytest.raises(ScheduleConfigError, match="save_ckpt_time"):
        make_manager(save_ckpt_time=math.nan)
