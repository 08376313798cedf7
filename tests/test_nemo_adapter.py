"""The NeMo 2.0 wrapper against the real ``nemo.lightning.AutoResume`` (NeMo 2.7.3).

Skipped unless ``nemo.lightning`` imports; ``scripts/test_nemo.sh`` installs NeMo into
its own venv and runs this file there.
"""

from __future__ import annotations

import pytest

nl = pytest.importorskip("nemo.lightning")

from lightning_workers import fit  # noqa: E402
from memckpt.adapters.nemo import MemoryAutoResume, wrap_trainer_and_auto_resume  # noqa: E402
from memckpt.errors import CheckpointNotFoundError  # noqa: E402


def assert_same_weights(a: dict, b: dict) -> None:
    for k in b["weights"]:
        assert a["weights"][k] == b["weights"][k], k


def test_the_returned_auto_resume_is_nemos_with_the_users_settings(shm_dir):
    trainer = nl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    user = nl.AutoResume(resume_if_exists=True, resume_ignore_no_checkpoint=True)
    resume = wrap_trainer_and_auto_resume(
        trainer, shm_dir / "job", default_auto_resume=user, every_n_steps=5
    )
    assert isinstance(resume, nl.AutoResume) and isinstance(resume, MemoryAutoResume)
    assert resume.resume_if_exists and resume.resume_ignore_no_checkpoint
    assert resume.memory_tier.job_id == "job"
    assert type(trainer.strategy.checkpoint_io).__name__ == "MemoryCheckpointIO"
    with pytest.raises(TypeError, match=r"must be a nemo\.lightning\.AutoResume"):
        wrap_trainer_and_auto_resume(trainer, shm_dir / "job", default_auto_resume=object())


def test_nemo_fit_resumes_from_memory_when_nemo_finds_no_checkpoint(shm_dir):
    # Given a NeMo fit stopped at step 8 with memory checkpoints at 3 and 6
    base = str(shm_dir / "a")
    fit(0, 1, base, ns="nemo", max_steps=8, every=3)
    # When it restarts with an AutoResume that requires a checkpoint and finds none on disk
    (shm_dir / "empty").mkdir()
    required = {"resume_if_exists": True, "resume_ignore_no_checkpoint": False,
                "resume_from_directory": str(shm_dir / "empty")}  # fmt: skip
    out = fit(0, 1, base, ns="nemo", max_steps=12, every=3, auto_resume=required)
    # Then it resumes from memory step 6 and ends bit-exact with an uninterrupted run
    assert (out["source"], out["step"]) == ("memory", 6)
    straight = fit(0, 1, str(shm_dir / "b"), ns="nemo", max_steps=12, every=3)
    assert_same_weights(out, straight)
    assert out["batches"] == straight["batches"] == 12
    # and with nothing in memory either, the requirement fails the fit
    with pytest.raises(CheckpointNotFoundError, match="resume_ignore_no_checkpoint"):
        fit(0, 1, str(shm_dir / "c"), ns="nemo", max_steps=4, every=3, auto_resume=required)
    # and with memory checkpoints turned off, NeMo's own error comes from setup, as without memckpt
    from nemo.utils.exp_manager import NotFoundError

    with pytest.raises(NotFoundError):
        fit(0, 1, base, ns="nemo", max_steps=12, every=3, auto_resume=required, enabled=False)


@pytest.mark.parametrize(("name", "source", "step"),
                         [("epoch=0-step=9.ckpt", "persistent", 9),
                          ("epoch=0-step=6.ckpt", "memory", 8)])  # fmt: skip
def test_nemo_resume_from_path_loses_to_a_newer_memory_checkpoint(shm_dir, name, source, step):
    # Given memory checkpoints at 4 and 8, persistent ones at 3, 6 and 9
    base = str(shm_dir)
    fit(0, 1, base, ns="nemo", max_steps=9, every=4, persist_every=3)
    # When the user's AutoResume names a persistent checkpoint
    resume = {"resume_from_path": str(shm_dir / "persistent" / name)}
    out = fit(0, 1, base, ns="nemo", max_steps=12, every=4, persist_every=3, auto_resume=resume)
    # Then the newer of the two is loaded
    assert (out["source"], out["step"]) == (source, step)
    assert out["global_step"] == 12 and out["batches"] == 12
