"""Interval policy: fixed steps, and the Young/Daly optimum from measured save cost and MTBF."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from memckpt.schedule import (
    OptimalInterval,
    ScheduleConfigError,
    daly_interval_s,
    interval_steps,
    young_interval_s,
)


def test_fixed_interval_saves_every_n_steps(make_manager, train):
    im = make_manager(save_interval=4)
    assert train(im, 13, 1.0) == [4, 8, 12]


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_fixed_interval_must_be_a_positive_int(make_manager, bad):
    with pytest.raises(ScheduleConfigError, match="save_interval"):
        make_manager(save_interval=bad)


def test_young_interval_matches_hand_computation():
    # sqrt(2 * 2 s * 3600 s) = sqrt(14400) = 120 s
    assert young_interval_s(2.0, 3600.0) == pytest.approx(120.0)
    assert young_interval_s(0.5, 100.0) == pytest.approx(10.0)


def test_daly_interval_matches_hand_computation():
    # C/(2M) = 2/7200 = 1/3600, so 120 * (1 + (1/60)/3 + (1/3600)/9) - 2
    expected = 120.0 * (1.0 + 1.0 / 180.0 + 1.0 / 32400.0) - 2.0
    assert daly_interval_s(2.0, 3600.0) == pytest.approx(expected)
    assert daly_interval_s(2.0, 3600.0) == pytest.approx(118.67037, abs=1e-5)


def test_daly_interval_is_the_mtbf_once_a_save_costs_twice_the_mtbf():
    assert daly_interval_s(200.0, 100.0) == 100.0
    assert daly_interval_s(200.0, 100.0 + 1e-9) < 100.0 + 1e-9


def test_daly_and_young_agree_for_cheap_saves():
    assert daly_interval_s(0.01, 1e6) == pytest.approx(young_interval_s(0.01, 1e6), rel=1e-3)


@pytest.mark.parametrize(("cost", "mtbf"), [(-1.0, 10.0), (1.0, 0.0), (math.nan, 10.0)])
def test_formulas_reject_negative_cost_and_non_positive_mtbf(cost, mtbf):
    with pytest.raises(ScheduleConfigError):
        young_interval_s(cost, mtbf)
    with pytest.raises(ScheduleConfigError):
        daly_interval_s(cost, mtbf)


def test_interval_seconds_become_whole_steps_at_the_mean_iteration_time():
    assert interval_steps(120.0, 1.0) == 120
    assert interval_steps(118.67, 2.0) == 59
    assert interval_steps(0.2, 1.0) == 1


def test_optimal_interval_first_measures_then_saves_every_optimum(make_manager, train):
    # Given MTBF 3600 s, 1 s iterations and no save time known in advance
    im = make_manager(mtbf_s=3600.0, interval_formula="young", warmup_iters=0)

    # When the first save (right after the first measured iteration) reports 2 s
    assert train(im, 2, 1.0) == [2]
    assert im.explain() == "interval: first save after warm-up, to measure the save cost"
    im.record_save(2.0)

    # Then saves follow every sqrt(2 * 2 * 3600) = 120 s = 120 steps
    assert train(im, 240, 1.0) == [122, 242]
    assert im.explain() == (
        "interval: 120 steps since last save >= 120 (Young: C=2.00s, MTBF=3600s -> 120.0s"
        " / 1s per step)"
    )


def test_optimal_interval_waits_for_record_save_after_the_measuring_save(make_manager, train):
    im = make_manager(mtbf_s=3600.0, warmup_iters=0)
    assert train(im, 50, 1.0) == [2]
    assert im.explain() == "not yet: interval waits for record_save() to report the save cost"


def test_optimal_interval_waits_for_an_iteration_after_warmup(make_manager, train):
    im = make_manager(mtbf_s=3600.0, warmup_iters=3)
    assert train(im, 3, 1.0) == []
    assert im.explain() == "not yet: interval waits for an iteration measured after warm-up"


def test_optimal_interval_starts_from_save_ckpt_time_without_measuring(make_manager, train):
    im = make_manager(mtbf_s=8.0, save_ckpt_time=1.0, interval_formula="young", warmup_iters=0)
    # sqrt(2 * 1 * 8) = 4 s = 4 steps of 1 s
    assert train(im, 13, 1.0) == [4, 8, 12]


def test_optimal_interval_adapts_when_the_save_cost_changes(make_manager, train):
    # Given saves measured at 2 s blocking: an interval of 120 steps
    im = make_manager(mtbf_s=3600.0, interval_formula="young", save_ckpt_time=2.0, warmup_iters=0)
    train(im, 3, 1.0)
    for _ in range(3):
        im.record_save(2.0)
    assert im.prediction.interval.steps == 120

    # When a single save is slow, the median holds the interval
    im.record_save(50.0)
    assert im.prediction.interval.steps == 120

    # When saves become consistently slower (8 s), the interval grows to sqrt(2*8*3600) = 240 s
    for _ in range(3):
        im.record_save(8.0)
    assert im.prediction.save_cost_s == 8.0
    assert im.prediction.interval.steps == 240


def test_optimal_interval_uses_blocking_time_and_deadline_uses_total_time(make_manager, train):
    # Given a save result as memckpt's SaveHandle.wait() returns it
    im = make_manager(mtbf_s=100.0, interval_formula="young", warmup_iters=0)
    train(im, 2, 1.0)
    im.record_save(SimpleNamespace(step=2, nbytes=1 << 20, blocking_s=0.5, total_s=4.0))

    prediction = im.prediction
    assert prediction.save_cost_s == 0.5
    assert prediction.interval.steps == 10  # sqrt(2 * 0.5 * 100) = 10 s
    assert prediction.save_s == 4.0


def test_interval_configured_twice_is_rejected(make_manager):
    with pytest.raises(ScheduleConfigError, match="not both"):
        make_manager(save_interval=10, mtbf_s=3600.0)


def test_unknown_formula_and_bad_mtbf_are_rejected():
    with pytest.raises(ScheduleConfigError, match="interval_formula"):
        OptimalInterval(3600.0, "daily")  # type: ignore[arg-type]
    with pytest.raises(ScheduleConfigError, match="mtbf_s"):
        OptimalInterval(-1.0)
