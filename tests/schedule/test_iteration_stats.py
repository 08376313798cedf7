"""Iteration timing: statistics, warm-up exclusion, and when predictions are recomputed."""

from __future__ import annotations

import pytest

from memckpt.schedule import IterationStats
from memckpt.schedule.iter_manager import COMPILE_WARMUP_ITERS, DEFAULT_WARMUP_ITERS
from memckpt.schedule.stats import IterationTimer, SaveCosts, summarize


def test_summary_reports_count_mean_nearest_rank_p95_and_max():
    # Given twenty durations 1..20 s, When summarised
    stats = summarize([float(d) for d in range(20, 0, -1)])

    # Then the 95th percentile is the 19th smallest (nearest rank) and the rest as expected
    assert stats == IterationStats(count=20, mean_s=10.5, p95_s=19.0, max_s=20.0)


def test_summary_of_no_durations_is_none():
    assert summarize([]) is None


def test_warmup_iterations_stay_out_of_statistics(make_manager, train):
    # Given two warm-up iterations of 10 s followed by five of 1 s
    im = make_manager(warmup_iters=2)
    train(im, 8, lambda step: 10.0 if step <= 2 else 1.0)

    # Then only the five (completed) fast iterations count
    assert im.stats == IterationStats(count=5, mean_s=1.0, p95_s=1.0, max_s=1.0)
    assert im.avg_iter_time == 1.0
    assert im.max_iter_time == 1.0


def test_torch_compile_sets_more_warmup_iterations_apart(make_manager, train):
    # Given compiled training whose first five iterations compile for 30 s each
    im = make_manager(use_torch_compile=True)
    train(im, 12, lambda step: 30.0 if step <= COMPILE_WARMUP_ITERS else 0.5)

    # Then none of the compiling iterations reach the statistics
    assert im.warmup_iters == COMPILE_WARMUP_ITERS > DEFAULT_WARMUP_ITERS
    assert make_manager().warmup_iters == DEFAULT_WARMUP_ITERS
    assert im.max_iter_time == 0.5


def test_statistics_fall_back_to_warmup_iterations_until_others_are_measured(make_manager, train):
    # Given three warm-up iterations (4 s, 6 s, ...) of which only two have completed
    im = make_manager(warmup_iters=3)
    train(im, 3, lambda step: 2.0 * step + 2.0)

    # Then the statistics come from warm-up and say so: better slow than nothing
    stats = im.stats
    assert stats is not None and stats.warmup_only
    assert (stats.count, stats.max_s) == (2, 6.0)


def test_no_iteration_time_before_the_second_iteration_starts(make_manager):
    im = make_manager()
    im.iter()
    assert im.stats is None
    assert (im.avg_iter_time, im.max_iter_time) == (0.0, 0.0)


def test_iteration_that_also_saved_stays_out_of_statistics(make_manager, fake_time):
    # Given 1 s iterations where every third one also blocks 5 s on a save
    im = make_manager(save_interval=3, warmup_iters=0)
    for _ in range(10):
        im.iter()
        fake_time.sleep(1.0)
        if im.should_save_ckpt():
            fake_time.sleep(5.0)

    # Then the save's blocking time does not inflate the iteration time
    assert im.max_iter_time == 1.0
    assert im.stats.count == 6


def test_timer_keeps_only_the_newest_window_of_durations(fake_time):
    timer = IterationTimer(fake_time.monotonic, warmup=0, window=3)
    for seconds in (9.0, 1.0, 2.0, 3.0, 0.0):
        timer.tick()
        fake_time.sleep(seconds)
    assert timer.stats() == IterationStats(3, 2.0, 3.0, 3.0)


def test_prediction_is_recomputed_every_predict_freq_iterations(make_manager, train):
    # Given predictions every 5 iterations from step 2 (the first with a measured iteration)
    im = make_manager(predict_freq=5, warmup_iters=0)
    train(im, 6, 1.0)

    # When iterations slow down to 3 s for steps 7..11
    train(im, 5, 3.0)
    # Then step 11 still uses the prediction of step 7, when all iterations took 1 s
    assert im.prediction.iteration.max_s == 1.0

    # And step 12 recomputes it
    train(im, 1, 3.0)
    assert im.prediction.iteration.max_s == 3.0


def test_remaining_iterations_and_time_to_finish_are_predicted(make_manager, train):
    im = make_manager(total_iters=100, predict_freq=1, warmup_iters=0)
    train(im, 40, 2.0)

    prediction = im.prediction
    assert prediction.iters_left == 60
    assert prediction.time_to_finish_s == pytest.approx(120.0)


def test_unknown_total_iters_predicts_no_finish(make_manager, train):
    im = make_manager(warmup_iters=0)
    train(im, 5, 1.0)
    assert (im.prediction.iters_left, im.prediction.time_to_finish_s) == (None, None)


def test_save_cost_is_the_median_of_recent_saves():
    # Given one slow first save (fresh pages) and then fast ones
    costs = SaveCosts(window=5)
    for blocking, total in [(10.0, 12.0), (1.0, 3.0), (1.2, 3.2)]:
        costs.add(blocking, total)

    # Then the slow one does not dominate
    assert (costs.blocking_s, costs.total_s) == (1.2, 3.2)
    assert costs.count == 3
