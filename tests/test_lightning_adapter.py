"""The Lightning adapter: memory checkpoints from a callback, auto-resume at fit start."""

from __future__ import annotations

import functools
import multiprocessing as mp
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("lightning.pytorch")

from lightning_workers import fit
from memckpt.adapters.lightning import (
    MemoryCheckpointCallback,
    MemoryCheckpointIO,
    check_strategy,
    choose_resume,
    to_storable,
    wrap_trainer,
)
from memckpt.errors import MemckptError, UnsupportedValueError
from multiproc import _rank_main, free_port, run_ranks


def assert_same_weights(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["weights"].keys() == b["weights"].keys()
    for k in a["weights"]:
        assert a["weights"][k] == b["weights"][k], k


# -- pure parts -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("memory", "path", "step", "expected"),
    [
        (None, None, None, "none"),
        (4, None, None, "memory"),
        (None, "p.ckpt", 3, "persistent"),
        (8, "p.ckpt", 6, "memory"),
        (4, "p.ckpt", 6, "persistent"),
        (6, "p.ckpt", 6, "memory"),  # equal: memory (the engine's tier rule)
        (6, "last.ckpt", None, "persistent"),  # unknown step: what the user asked for
    ],
)
def test_resume_goes_to_the_newer_tier_and_to_memory_on_a_tie(memory, path, step, expected):
    assert choose_resume(memory, path, step) == expected


def test_checkpoint_dict_is_mapped_to_stored_values_and_others_refused():
    from lightning.pytorch.utilities.parsing import AttributeDict

    t = torch.ones(2)
    out = to_storable({"hyper_parameters": AttributeDict(lr=0.1), "hparams_type": dict, "t": t})
    assert type(out["hyper_parameters"]) is dict and out["hyper_parameters"] == {"lr": 0.1}
    assert out["hparams_type"] == "builtins.dict"
    assert out["t"] is t  # tensors are not copied
    with pytest.raises(UnsupportedValueError, match=r"checkpoint\.callbacks\.x holds a .*object"):
        to_storable({"callbacks": {"x": object()}})


def test_should_save_every_n_steps_but_not_on_skip_steps(tmp_path):
    cb = MemoryCheckpointCallback(tmp_path / "job", every_n_steps=2, skip_every_n_steps=3)
    assert [s for s in range(13) if cb.should_save(s)] == [2, 4, 8, 10]
    off = MemoryCheckpointCallback(tmp_path / "job", every_n_steps=1, enabled=False)
    assert not any(off.should_save(s) for s in range(5))
    with pytest.raises(ValueError, match="every_n_steps"):
        MemoryCheckpointCallback(tmp_path / "job", every_n_steps=0)


def test_sharding_strategies_are_refused_with_the_reason():
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, SingleDeviceStrategy

    check_strategy(SingleDeviceStrategy("cpu"))
    check_strategy(DDPStrategy())
    with pytest.raises(MemckptError, match="does not support FSDPStrategy: FSDP gathers"):
        check_strategy(FSDPStrategy())
    # NeMo's MegatronStrategy derives from DDPStrategy (megatron-core is needed to build it)
    megatron = type("MegatronStrategy", (DDPStrategy,), {})
    with pytest.raises(MemckptError, match="Megatron sharded state dicts"):
        check_strategy(megatron())


# -- single-device fits in this process --------------------------------------------------------


@pytest.mark.parametrize("ns", ["lightning", "pl"])
def test_single_device_resume_from_memory_is_bit_exact(shm_dir, ns):
    # Given a fit that stopped at step 8 with memory checkpoints at steps 3 and 6
    first = fit(0, 1, str(shm_dir / "a"), ns=ns, max_steps=8, every=3)
    assert first["source"] == "none" and first["io"] == "MemoryCheckpointIO"
    # When it is run again to step 12
    resumed = fit(0, 1, str(shm_dir / "a"), ns=ns, max_steps=12, every=3)
    # Then it resumed from memory step 6 and ends bit-exact with an uninterrupted run
    assert (resumed["source"], resumed["step"]) == ("memory", 6)
    straight = fit(0, 1, str(shm_dir / "b"), ns=ns, max_steps=12, every=3)
    assert_same_weights(resumed, straight)
    assert resumed["batches"] == straight["batches"] == 12  # callbacks' state came back
    assert resumed["lr"] == straight["lr"] == 0.05 * 0.5**4  # the LR scheduler's too


def test_resume_from_a_save_on_an_epochs_last_batch_is_bit_exact(shm_dir):
    # Given 4-batch epochs from a shuffled loader without its own generator, and a fit
    # that stopped at step 6 with a memory checkpoint at step 4, an epoch's last batch
    first = fit(0, 1, str(shm_dir / "a"), max_steps=6, every=4, epoch_len=4)
    assert first["source"] == "none"
    # When it is run again to step 10
    resumed = fit(0, 1, str(shm_dir / "a"), max_steps=10, every=4, epoch_len=4)
    # Then the next epoch's loader drew from the restored RNG, as the uninterrupted run's did
    assert (resumed["source"], resumed["step"]) == ("memory", 8 - 4)
    straight = fit(0, 1, str(shm_dir / "b"), max_steps=10, every=4, epoch_len=4)
    assert_same_weights(resumed, straight)


@pytest.mark.parametrize(
    ("ckpt_path", "source", "step"),
    [("last", "persistent", 9), ("epoch=0-step=6.ckpt", "memory", 8), ("step-4", "memory", 4)],
)
def test_the_newer_of_memory_and_persistent_wins(shm_dir, ckpt_path, source, step):
    # Given memory checkpoints at 4 and 8 and persistent ones at 3, 6, 9 (and last = 9)
    base = str(shm_dir)
    fit(0, 1, base, max_steps=9, every=4, persist_every=3)
    if ckpt_path.startswith("step-"):  # a memory checkpoint named explicitly
        ckpt_path = str(shm_dir / "node0" / "job" / ckpt_path)
    elif ckpt_path != "last":
        ckpt_path = str(shm_dir / "persistent" / ckpt_path)
    # When the fit restarts from the persistent checkpoint the user names
    out = fit(0, 1, base, max_steps=12, every=4, persist_every=3, ckpt_path=ckpt_path)
    # Then it resumes from whichever is newer, and finishes the run
    assert (out["source"], out["step"]) == (source, step)
    assert out["global_step"] == 12 and out["batches"] == 12


def test_damaged_newest_memory_step_falls_back_to_the_older_one(shm_dir):
    """Every copy of step 4 has a flipped byte: the fit resumes from step 2, and says so."""
    from reshard_workers import flip_first_tensor_byte

    fit(0, 1, str(shm_dir), max_steps=4, every=2)  # memory steps 2 and 4, kept at train end
    flip_first_tensor_byte(shm_dir / "node0" / "job" / "step-4" / "rank-0.mck")
    out = fit(0, 1, str(shm_dir), max_steps=6, every=2)
    assert (out["source"], out["step"], out["memory_step"]) == ("memory", 2, 2)
    assert out["global_step"] == 6 and out["batches"] == 6
    assert_same_weights(out, fit(0, 1, str(shm_dir / "b"), max_steps=6, every=2))
    # and a restart after that agrees (the damage is remembered in the job's tree)
    again = fit(0, 1, str(shm_dir), max_steps=6, every=2)
    assert again["source"] == "memory" and again["step"] == 6


def test_skip_steps_are_not_saved_and_train_end_removes_the_job(shm_dir):
    saved: list[int] = []
    out = fit(0, 1, str(shm_dir), max_steps=12, every=2, skip=3, keep=False, saved_steps=saved)
    assert saved == [2, 4, 8, 10] and out["failed"] == []
    assert not (shm_dir / "node0" / "job").exists()


def test_gradient_accumulation_saves_once_per_optimizer_step_and_resumes_exactly(shm_dir):
    saved: list[int] = []
    fit(0, 1, str(shm_dir / "a"), max_steps=5, every=2, accumulate=2, saved_steps=saved)
    assert saved == [2, 4]  # not again on the accumulating batch after each
    out = fit(0, 1, str(shm_dir / "a"), max_steps=8, every=2, accumulate=2)
    assert (out["source"], out["step"]) == ("memory", 4)
    import lightning.pytorch as pl

    if tuple(int(x) for x in pl.__version__.split(".")[:2]) < (2, 6):
        # Lightning 2.4 restarts any checkpoint saved at a batch's end one batch early (its
        # own ModelCheckpoint's too), which shifts the accumulation boundaries
        pytest.skip(f"Lightning {pl.__version__} resumes mid-accumulation one batch early")
    assert_same_weights(out, fit(0, 1, str(shm_dir / "b"), max_steps=8, every=2, accumulate=2))


def test_a_failed_memory_save_is_recorded_and_training_goes_on(shm_dir, caplog):
    out = fit(0, 1, str(shm_dir), max_steps=4, every=2, options={"limit_bytes": 256})
    assert out["failed"] == [2, 4] and out["global_step"] == 4
    assert "memory checkpoint of step 2 failed" in caplog.text


def test_memory_checkpoints_drained_to_s3_resume_a_fit_whose_memory_was_lost(shm_dir, s3):
    from memckpt.engine import drain

    durable = {"persist_every": 3, "persist_dir": s3.url, "persist_options": s3.options()}
    # Given a fit that stopped at step 8; its memory steps 3 and 6 drained to S3
    fit(0, 1, str(shm_dir / "a"), max_steps=8, every=3, options=durable)
    drain.wait_for_drains(timeout=30)
    # When the node's memory is lost and the fit is run again with the same arguments
    shutil.rmtree(shm_dir / "a" / "node0", ignore_errors=True)
    resumed = fit(0, 1, str(shm_dir / "a"), max_steps=12, every=3, options=durable)
    # Then it resumed from step 6 of the durable tier, bit-exact with an uninterrupted run
    assert (resumed["source"], resumed["step"], resumed["load_tier"]) == ("memory", 6,
                                                                          "persistent")  # fmt: skip
    assert_same_weights(resumed, fit(0, 1, str(shm_dir / "b"), max_steps=12, every=3))


def test_an_unknown_persist_scheme_is_refused_when_wrapping(shm_dir):
    import lightning.pytorch as pl

    from memckpt.errors import ConfigError

    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    with pytest.raises(ConfigError, match="'nosuch'"):
        wrap_trainer(trainer, shm_dir / "job", every_n_steps=2, persist_every=2,
                     persist_dir="nosuch://bucket/x")  # fmt: skip
    assert not list(Path.cwd().glob("nosuch:*")) and not (shm_dir / "job").exists()


def test_disabled_callback_leaves_the_trainer_as_it_is(shm_dir):
    fit(0, 1, str(shm_dir), max_steps=4, every=2)  # memory checkpoints exist
    out = fit(0, 1, str(shm_dir), max_steps=6, every=2, enabled=False)
    assert out["source"] is None and out["io"] != "MemoryCheckpointIO"
    assert out["global_step"] == 6 and out["batches"] == 6  # from scratch


def test_trainer_save_checkpoint_to_a_memory_path_is_refused(shm_dir):
    import lightning.pytorch as pl

    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    with pytest.raises(TypeError, match=r"unknown options \['replicaton'\]"):
        wrap_trainer(trainer, shm_dir / "job", every_n_steps=2, replicaton="pairwise")
    assert not any(isinstance(cb, MemoryCheckpointCallback) for cb in trainer.callbacks)
    tier = wrap_trainer(trainer, shm_dir / "job", every_n_steps=2)
    io = trainer.strategy.checkpoint_io
    assert isinstance(io, MemoryCheckpointIO)
    with pytest.raises(MemckptError, match="rank 0 only"):
        io.save_checkpoint({}, tier.checkpoint_path(3))
    with pytest.raises(MemckptError, match="already called"):
        wrap_trainer(trainer, shm_dir / "job")


def test_wrap_trainer_disabled_needs_no_callback_and_is_refused_inside_fit(shm_dir):
    import lightning.pytorch as pl
    from lightning.pytorch.trainer.states import TrainerStatus

    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    io = trainer.strategy.checkpoint_io
    tier = wrap_trainer(trainer, shm_dir / "job", enabled=False)  # no callback, no every_n_steps
    assert not tier.enabled and trainer.strategy.checkpoint_io is io
    assert not any(isinstance(cb, MemoryCheckpointCallback) for cb in trainer.callbacks)
    running = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    running.state.status = TrainerStatus.RUNNING  # what a callback inside fit sees
    with pytest.raises(MemckptError, match="while the Trainer is running"):
        wrap_trainer(running, shm_dir / "job", every_n_steps=2)
    assert not isinstance(running.strategy.checkpoint_io, MemoryCheckpointIO)


# -- DDP on two processes (gloo, CPU), one simulated node each ----------------------------------


def _fit_until_killed(base: str, **kw: Any) -> None:
    """Run ``fit`` on 2 ranks that SIGKILL themselves at ``kill_at``; wait for both to die."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    fn = functools.partial(fit, **kw)
    procs = [
        ctx.Process(target=_rank_main, args=(fn, r, 2, port, {}, (base,), results))
        for r in range(2)
    ]
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + 150
        for p in procs:
            p.join(timeout=max(1.0, deadline - time.monotonic()))
        codes = [p.exitcode for p in procs]
        if codes != [-signal.SIGKILL] * 2:
            reports = []
            while not results.empty():
                reports.append(results.get(timeout=1))
            raise AssertionError(f"exit codes {codes}, expected both killed; reports: {reports}")
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(timeout=5)
        results.close()


DDP = {"max_steps": 8, "every": 2, "replication": "pairwise"}


@pytest.fixture(scope="module")
def uninterrupted() -> Iterator[dict[int, Any]]:
    """The final state of each rank of a 2-rank DDP fit run straight to its end."""
    base = Path(tempfile.mkdtemp(prefix="memckpt-test-", dir=_shm_root()))
    try:
        yield run_ranks(functools.partial(fit, **DDP), 2, str(base), timeout=150)
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def killed() -> Iterator[Path]:
    """The node directories a 2-rank DDP fit left when killed at step 5 (saved: 2 and 4)."""
    base = Path(tempfile.mkdtemp(prefix="memckpt-test-", dir=_shm_root()))
    try:
        _fit_until_killed(str(base), kill_at=5, **DDP)
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _shm_root() -> str | None:
    return "/dev/shm" if os.access("/dev/shm", os.W_OK) else None


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("wipe_node", [None, 1])
def test_ddp_killed_between_saves_resumes_bit_exact(shm_dir, uninterrupted, killed, wipe_node):
    # Given the memory a 2-rank DDP fit left when killed at step 5, after its save of step 4
    shutil.copytree(killed, shm_dir, dirs_exist_ok=True)
    if wipe_node is not None:  # and, in one case, one node's memory lost with it
        shutil.rmtree(shm_dir / f"node{wipe_node}")
    # When the job restarts with the same job directory
    out = run_ranks(functools.partial(fit, **DDP), 2, str(shm_dir), timeout=150)
    # Then every rank resumed from memory step 4 (the wiped node's from its replica)
    for r in (0, 1):
        assert (out[r]["source"], out[r]["step"]) == ("memory", 4), out[r]
        assert out[r]["fetched"] == (r == wipe_node)
        assert out[r]["global_step"] == 8 and out[r]["failed"] == []
        # and the final weights equal the uninterrupted run's bit for bit
        assert_same_weights(out[r], uninterrupted[r])
        assert out[r]["batches"] == uninterrupted[r]["batches"] == 8
