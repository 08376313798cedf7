"""Every tier of a recipe run is keyed by ``checkpoint.job_id``; a finished run frees its RAM."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import train_workers as w

from memckpt import ids
from memckpt.recipes.checkpointing import latest_persistent_step, persistent_job_dir
from memckpt.recipes.config import ConfigContainer
from memckpt.recipes.train import train

pytestmark = [pytest.mark.timeout(90), pytest.mark.usefixtures("one_thread")]


def job(root: Path, job_id: str) -> ConfigContainer:
    """A tiny run whose tiers share their roots with every other job of ``root``."""
    cfg = w.tiny_config(root, "shared")
    cfg.checkpoint.job_id = job_id
    cfg.logger.metrics_file = str(root / f"{job_id}.jsonl")
    return cfg


def memory_job_dir(cfg: ConfigContainer) -> Path:
    return ids.JobLayout(cfg.checkpoint.memory.base_dir, cfg.checkpoint.job_id).root


@pytest.mark.parametrize("first_stops_at", [None, 7])
def test_a_run_with_another_job_id_starts_fresh_beside_the_first_job(
    shm_dir: Path, first_stops_at: int | None
) -> None:
    # Given: a job that checkpointed both tiers (to the end, or stopped at step 7)
    first = job(shm_dir, "first")
    first.train.stop_after = first_stops_at
    train(first)

    # When: a job with another job_id runs with the same tier roots
    second = train(job(shm_dir, "second"))

    # Then: it trained from step 0, and each job's persistent steps are under its own id
    assert second.resumed_from is None
    assert (second.steps_run, second.final_step) == (12, 12)
    assert latest_persistent_step(persistent_job_dir(first.checkpoint)) == (first_stops_at or 12)
    assert latest_persistent_step(persistent_job_dir(job(shm_dir, "second").checkpoint)) == 12
    assert persistent_job_dir(first.checkpoint) == Path(first.checkpoint.persistent.dir) / "first"


def test_a_completed_run_deletes_its_memory_tier_and_resumes_from_the_persistent_one(
    shm_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Given: a run that checkpoints to memory during training
    cfg = job(shm_dir, "done")

    # When: it completes every step
    with caplog.at_level(logging.INFO, logger="memckpt.recipes.train"):
        result = train(cfg)

    # Then: its memory tier is gone, said once, and the job resumes from the persistent tier
    assert result.completed and result.memory_saves > 0
    assert not memory_job_dir(cfg).exists()
    assert Path(cfg.checkpoint.memory.base_dir).is_dir()  # other jobs' memory tiers stay
    removed = [r for r in caplog.records if "removed the memory tier" in r.getMessage()]
    assert len(removed) == 1 and removed[0].levelno == logging.INFO
    again = train(job(shm_dir, "done"))
    assert again.resumed_from is not None and again.steps_run == 0
    assert (again.resumed_from.tier, again.resumed_from.step) == ("persistent", 12)


def test_a_run_that_stops_early_keeps_its_memory_tier(shm_dir: Path) -> None:
    cfg = w.stopped_at(job(shm_dir, "stopped"), 7)

    result = train(cfg)

    assert (result.completed, result.final_step) == (False, 7)
    assert (memory_job_dir(cfg) / ids.step_dir_name(7)).is_dir()


def test_a_completed_run_without_the_persistent_tier_keeps_its_memory_tier(
    shm_dir: Path,
) -> None:
    cfg = job(shm_dir, "memory-only")
    cfg.checkpoint.persistent.enabled = False

    result = train(cfg)

    assert result.completed
    assert (memory_job_dir(cfg) / ids.step_dir_name(12)).is_dir()
