"""The Lightning adapter at the job tree's trust boundary: what it reads, deletes and survives.

- Choosing between memory and a persistent checkpoint reads the persistent step with
  ``weights_only=True`` unless the fit passed ``weights_only=False``; a file that read
  refuses has an unknown step (it wins, and Lightning applies its own rule to it).
- A job directory without a job id of its own (``"BASE/"``) is refused, so train end
  never deletes a base directory.
- A memory save that fails is logged and recorded, and training goes on.
"""

from __future__ import annotations

import inspect
import logging
import os
import pathlib
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("lightning.pytorch")

from lightning_workers import fit
from memckpt.adapters.lightning import MemoryCheckpointCallback, MemoryTier, wrap_trainer
from memckpt.adapters.lightning.checkpoint_dict import persistent_step
from memckpt.adapters.lightning.tier import split_base_container
from memckpt.errors import CommitError, InvalidNameError


class _TouchOnLoad:
    """Unpickles into a call of ``Path.touch(path)``: a marker that foreign code ran."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


def _fit_takes_weights_only() -> bool:
    import lightning.pytorch as pl

    return "weights_only" in inspect.signature(pl.Trainer.fit).parameters


needs_fit_weights_only = pytest.mark.skipif(
    not _fit_takes_weights_only(), reason="Trainer.fit has no weights_only before Lightning 2.6"
)


def _write_foreign_checkpoint(path: Path, marker: Path, step: int) -> None:
    torch.save({"global_step": step, "state_dict": {}, "extra": _TouchOnLoad(marker)}, path)


# -- what the resume decision reads -----------------------------------------------------------


def test_persistent_step_reads_plain_data_and_refuses_foreign_classes_unless_trusted(tmp_path):
    # Given a plain checkpoint, and one whose pickle would run code when rebuilt
    plain, foreign, marker = tmp_path / "plain.ckpt", tmp_path / "last.ckpt", tmp_path / "ran"
    torch.save({"global_step": 5, "state_dict": {"w": torch.ones(3)}}, plain)
    _write_foreign_checkpoint(foreign, marker, step=2)
    # Then the plain one's step is read, and a name with step=N is not even opened
    assert persistent_step(plain) == persistent_step(plain, weights_only=True) == 5
    assert persistent_step(tmp_path / "absent" / "epoch=0-step=7.ckpt") == 7
    # and the foreign one is refused without running its code (weights_only None or True)
    for weights_only in (None, True):
        with pytest.raises(pickle.UnpicklingError):
            persistent_step(foreign, weights_only)
    assert not marker.exists()
    # unless the user trusts the file for the load (weights_only=False)
    assert persistent_step(foreign, weights_only=False) == 2
    assert marker.exists()


@pytest.fixture
def memory_and_foreign_last(shm_dir: Path) -> tuple[Path, Path]:
    """Memory steps 4 and 8, and a ``last.ckpt`` at step 2 whose pickle touches a marker."""
    fit(0, 1, str(shm_dir), max_steps=8, every=4, persist_every=3)
    last = shm_dir / "persistent" / "last.ckpt"
    assert last.is_file()
    marker = shm_dir / "payload-ran"
    _write_foreign_checkpoint(last, marker, step=2)
    return shm_dir, marker


@pytest.mark.parametrize("weights_only", [None, pytest.param(True, marks=needs_fit_weights_only)])
def test_resume_from_last_does_not_unpickle_a_file_weights_only_refuses(
    memory_and_foreign_last, caplog, weights_only
):
    base, marker = memory_and_foreign_last
    # When the fit resumes with ckpt_path="last" (and the user's weights_only, or none)
    caplog.set_level(logging.WARNING, logger="memckpt")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        fit(0, 1, str(base), max_steps=12, every=4, persist_every=3, ckpt_path="last",
            weights_only=weights_only)  # fmt: skip
    # Then the file's code never ran: its step is unknown, so it won, and Lightning's own
    # load refused it as plain Lightning does
    assert not marker.exists()
    assert "could not be read (weights_only=True refused it: Unsupported global" in caplog.text
    assert "last.ckpt" in caplog.text
    # and the memory checkpoints are still there for a fit that names them
    assert (base / "node0" / "job" / "step-8").is_dir()


@needs_fit_weights_only
def test_resume_from_last_reads_the_step_with_weights_only_false_when_the_fit_passes_it(
    memory_and_foreign_last,
):
    base, marker = memory_and_foreign_last
    # When the user trusts the file (fit(weights_only=False))
    out = fit(0, 1, str(base), max_steps=12, every=4, persist_every=3, ckpt_path="last",
              weights_only=False)  # fmt: skip
    # Then its step (2) was read as the user allowed, and the newer memory step 8 won
    assert marker.exists()
    assert (out["source"], out["step"]) == ("memory", 8)
    assert out["global_step"] == 12


def test_a_last_ckpt_lightning_wrote_is_read_safely_and_loses_to_newer_memory(shm_dir, caplog):
    # Given memory steps 4 and 8 and Lightning's own last.ckpt at step 6
    fit(0, 1, str(shm_dir), max_steps=8, every=4, persist_every=3)
    # When the fit resumes from "last" under Lightning's default weights_only
    caplog.set_level(logging.WARNING, logger="memckpt")
    out = fit(0, 1, str(shm_dir), max_steps=12, every=4, persist_every=3, ckpt_path="last")
    # Then the step was read with weights_only=True, and memory 8 won over 6
    assert (out["source"], out["step"]) == ("memory", 8)
    assert "could not be read" not in caplog.text


# -- the job directory's name -----------------------------------------------------------------


@pytest.mark.parametrize("suffix", [os.sep, os.sep + ".", os.sep + "..", os.sep + "job" + os.sep])
def test_a_job_directory_without_a_job_id_of_its_own_is_refused(tmp_path, suffix):
    import lightning.pytorch as pl

    job_dir = str(tmp_path / "base") + suffix
    for make in (
        split_base_container,
        lambda d: MemoryCheckpointCallback(d, every_n_steps=2),
        lambda d: MemoryTier(d),
    ):
        with pytest.raises(InvalidNameError, match=r"has no job id.*<base_dir>/<job_id>"):
            make(job_dir)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    with pytest.raises(InvalidNameError, match=r"e\.g\. '.*job-7'"):
        wrap_trainer(trainer, job_dir, every_n_steps=2)
    for empty in ("", Path("."), "."):
        with pytest.raises(InvalidNameError, match="has no job id"):
            split_base_container(empty)
    assert split_base_container(tmp_path / "base" / "job") == (tmp_path / "base", "job")


def test_a_trailing_slash_job_directory_never_deletes_the_base_at_train_end(shm_dir):
    # Given a base directory holding another job's memory checkpoints and a user's file
    base = shm_dir / "base"
    fit(0, 1, str(shm_dir), max_steps=4, every=2, job_dir=str(base / "other"))
    (base / "notes.txt").write_text("mine")
    kept = sorted(p.relative_to(base) for p in base.rglob("*"))
    assert Path("other/step-4") in kept
    # When a fit is given the base with a trailing slash, to be deleted at train end
    with pytest.raises(InvalidNameError, match=r"has no job id.*e\.g\. '.*base/job-7'"):
        fit(0, 1, str(shm_dir), max_steps=4, every=2, keep=False, job_dir=str(base) + "/")
    # Then it was refused before anything ran, and the other job and the file are intact
    assert sorted(p.relative_to(base) for p in base.rglob("*")) == kept
    assert (base / "notes.txt").read_text() == "mine"
    out = fit(0, 1, str(shm_dir), max_steps=6, every=2, job_dir=str(base / "other"))
    assert (out["source"], out["step"]) == ("memory", 4)


# -- a failed save ----------------------------------------------------------------------------


def test_a_failed_blocking_save_is_recorded_and_training_goes_on(shm_dir, caplog):
    # Given saves that return committed (async_save=False) into a 256-byte buffer limit
    out = fit(0, 1, str(shm_dir), max_steps=4, every=2,
              options={"limit_bytes": 256, "async_save": False})  # fmt: skip
    # Then each failed save is logged and recorded, and the fit reaches its last step
    assert out["failed"] == [2, 4] and out["global_step"] == 4
    assert "memory checkpoint of step 2 failed" in caplog.text


@pytest.mark.parametrize("async_save", [True, False])
def test_a_save_the_manager_refuses_with_a_memckpt_error_does_not_stop_training(
    shm_dir, caplog, monkeypatch, async_save
):
    from memckpt.manager import CheckpointManager

    save = CheckpointManager.save

    def failing(self: Any, step: int, *args: Any, **kwargs: Any) -> Any:
        if step == 2:
            raise CommitError(f"step {step}: injected")
        return save(self, step, *args, **kwargs)

    monkeypatch.setattr(CheckpointManager, "save", failing)
    out = fit(0, 1, str(shm_dir), max_steps=6, every=2, options={"async_save": async_save})
    assert out["failed"] == [2] and out["global_step"] == 6
    assert "memory checkpoint of step 2 failed: step 2: injected" in caplog.text
    resumed = fit(0, 1, str(shm_dir), max_steps=8, every=2)
    assert (resumed["source"], resumed["step"]) == ("memory", 6)
