"""memckpt.State (velastic-style) and IterManager(state=...): save, resume, errors, schedule."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import memckpt
import state_workers
from memckpt.adapters.state import State
from memckpt.errors import (
    CorruptCheckpointError,
    MemckptError,
    StateDictMismatchError,
    StateModifiedError,
    UnsupportedValueError,
)
from memckpt.schedule import IterManager
from memckpt.storage.reader import ObjectReader
from multiproc import run_ranks


@dataclasses.dataclass
class Counter:
    """A user class in the extra state: loads only when allowed."""

    seen: int


def make(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)
    return model, opt, sched


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, sched: Any, steps: int) -> None:
    for _ in range(steps):
        model(torch.randn(4, 5)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        sched.step()


def flip_tensor_byte(path: Path) -> None:
    with ObjectReader(path) as reader:
        offset = reader.index.tensors[0].offset
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0xFF
    path.write_bytes(bytes(raw))


def new_state(base: Path, model: Any, opt: Any, sched: Any = None, **kw: Any) -> State:
    kw.setdefault("job_id", "job")
    return State(model, opt, "single", lr_scheduler=sched, base_dir=base, **kw)


def test_resume_restores_model_optimizer_scheduler_extra_rng_and_step(shm_dir: Path) -> None:
    # Given a trained model saved at step 4 with extra state of several kinds and RNG states
    model, opt, sched = make()
    train(model, opt, sched, 4)
    batch = torch.arange(6).reshape(2, 3)
    extra = {"iter_num": 4, "best": 1.5, "X": batch, "arr": np.arange(3.0), "names": ["a"]}
    with new_state(shm_dir, model, opt, sched, get_extra_fn=lambda: extra, include_rng=True) as s:
        s.save(4, sync=True)
        after_save = (torch.rand(2), np.random.rand(2))
        want = {k: v.clone() for k, v in model.state_dict().items()}
        want_opt = copy.deepcopy(opt.state_dict())
        train(model, opt, sched, 2)  # the live state moves on
    # When a fresh process state resumes
    model2, opt2, sched2 = make(seed=1)
    with new_state(shm_dir, model2, opt2, sched2, include_rng=True) as s2:
        got = s2.maybe_resume_from_ckpt()
        # Then everything is back, and the step counter is the checkpoint's
        assert s2.step == 4 and s2.resumed_step == 4
        assert got is not None and got["iter_num"] == 4 and got["best"] == 1.5
        assert torch.equal(got["X"], batch) and np.array_equal(got["arr"], np.arange(3.0))
        assert got["names"] == ["a"]
        for k, v in want.items():
            assert torch.equal(model2.state_dict()[k], v), k
        for pid, st in want_opt["state"].items():
            for k, v in st.items():
                assert torch.equal(opt2.state_dict()["state"][pid][k], v), (pid, k)
        assert sched2.last_epoch == 4 and sched2.get_last_lr() == pytest.approx([1e-2 * 0.9**4])
        assert torch.equal(torch.rand(2), after_save[0])
        assert np.array_equal(np.random.rand(2), after_save[1])


def test_no_checkpoint_returns_none_and_keeps_the_step(shm_dir: Path) -> None:
    model, opt, _ = make()
    with new_state(shm_dir, model, opt, step=7) as s:
        assert s.maybe_resume_from_ckpt() is None
        assert s.step == 7 and s.resumed_step is None and s.wait() is None


def test_a_persist_dir_url_resumes_from_s3_with_memory_lost(shm_dir: Path, s3: Any) -> None:
    from memckpt.engine import drain

    durable = {"persist_dir": s3.url, "persist_options": s3.options()}
    # Given a state saved at steps 2 and 4, drained to S3
    model, opt, sched = make()
    with new_state(shm_dir, model, opt, sched, persist_every=2, **durable) as s:
        for step in (2, 4):
            train(model, opt, sched, 1)
            s.save(step, sync=True)
        drain.wait_for_drains(timeout=30)
        want = {k: v.clone() for k, v in model.state_dict().items()}
    # When the node's memory is lost and a fresh process resumes with the same arguments
    shutil.rmtree(shm_dir / "job", ignore_errors=True)
    model2, opt2, sched2 = make(seed=1)
    with new_state(shm_dir, model2, opt2, sched2, **durable) as s2:
        assert s2.maybe_resume_from_ckpt() == {}
        # Then step 4 came from S3, whole
        assert s2.step == 4 and s2._manager.last_load.tier == "persistent"
        for k, v in want.items():
            assert torch.equal(model2.state_dict()[k], v), k
        assert sched2.last_epoch == 2


def test_an_unknown_persist_scheme_is_a_config_error_at_construction(shm_dir: Path) -> None:
    model, opt, _ = make()
    with pytest.raises(memckpt.ConfigError, match="'nosuch'"):
        new_state(shm_dir, model, opt, persist_every=1, persist_dir="nosuch://bucket/x")
    with pytest.raises(memckpt.ConfigError, match="persist_options apply"):
        new_state(shm_dir, model, opt, persist_dir=shm_dir / "d", persist_options={"a": 1})
    assert not (shm_dir / "job").exists()


def test_without_get_extra_fn_a_resume_returns_an_empty_dict(shm_dir: Path) -> None:
    model, opt, _ = make()
    with new_state(shm_dir, model, opt) as s:
        s.step = 2
        result = s.save(sync=False).wait()  # saves self.step
        assert result.step == 2 and s.wait() is result
    with new_state(shm_dir, *make()[:2]) as s2:
        assert s2.maybe_resume_from_ckpt() == {} and s2.step == 2


def test_damaged_only_checkpoint_raises_instead_of_starting_fresh(shm_dir: Path) -> None:
    # Given the one checkpoint of the job, with a flipped byte in its tensor data
    model, opt, _ = make()
    with new_state(shm_dir, model, opt) as s:
        s.save(3, sync=True)
        path = s._manager.store.object_path(3, 0)
    flip_tensor_byte(path)
    # When a new run resumes, Then it raises: velastic would have returned None here
    with (
        new_state(shm_dir, *make()[:2]) as s2,
        pytest.raises((CorruptCheckpointError, StateModifiedError)),
    ):
        s2.maybe_resume_from_ckpt()


def test_damaged_newest_step_falls_back_to_the_older_one(shm_dir: Path) -> None:
    model, opt, _ = make()
    with new_state(shm_dir, model, opt, keep_last=2) as s:
        s.save(1, sync=True)
        s.save(2, sync=True)
        path = s._manager.store.object_path(2, 0)
    flip_tensor_byte(path)
    with new_state(shm_dir, *make()[:2]) as s2:
        assert s2.maybe_resume_from_ckpt() == {} and s2.step == 1


def test_extra_state_with_a_user_class_needs_safe_globals_and_is_never_dropped(
    shm_dir: Path,
) -> None:
    model, opt, _ = make()
    with new_state(shm_dir, model, opt, get_extra_fn=lambda: {"c": Counter(5)}) as s:
        s.save(1, sync=True)
    with (
        new_state(shm_dir, *make()[:2]) as s2,
        pytest.raises(UnsupportedValueError, match="Counter"),
    ):
        s2.maybe_resume_from_ckpt()
    with new_state(shm_dir, *make()[:2], safe_globals=[Counter]) as s3:
        assert s3.maybe_resume_from_ckpt() == {"c": Counter(5)}


def test_scheduler_in_checkpoint_but_not_in_state_is_an_error(shm_dir: Path) -> None:
    model, opt, sched = make()
    with new_state(shm_dir, model, opt, sched) as s:
        s.save(1, sync=True)
    with (
        new_state(shm_dir, *make()[:2]) as s2,
        pytest.raises(StateDictMismatchError, match="lr_scheduler"),
    ):
        s2.maybe_resume_from_ckpt()


def test_extra_state_of_plain_python_and_numpy_values_round_trips(shm_dir: Path) -> None:
    model, opt, sched = make()
    extra = {"f": 1.5, "i": 3, "s": "x", "l": [1, "a", 2.0], "a": np.arange(3.0), "n": None}
    with new_state(shm_dir, model, opt, sched, get_extra_fn=lambda: extra) as s:
        s.save(4, sync=False).wait()
    with new_state(shm_dir, *make()) as s2:
        got = s2.maybe_resume_from_ckpt()
        assert s2.step == 4
    assert got is not None and {k: v for k, v in got.items() if k != "a"} == {
        k: v for k, v in extra.items() if k != "a"
    }
    np.testing.assert_array_equal(got["a"], extra["a"])


def test_a_user_class_error_names_states_safe_globals(shm_dir: Path) -> None:
    model, opt, _ = make()
    with new_state(shm_dir, model, opt, get_extra_fn=lambda: {"c": Counter(5)}) as s:
        s.save(1, sync=True)
    with (
        new_state(shm_dir, *make()[:2]) as s2,
        pytest.raises(UnsupportedValueError, match=r"memckpt\.State\(\.\.\., safe_globals"),
    ):
        s2.maybe_resume_from_ckpt()


def test_wrong_argument_types_are_refused_at_construction(shm_dir: Path) -> None:
    model, opt, _ = make()
    with pytest.raises(MemckptError, match=r"torch\.nn\.Module"):
        State({"w": 1}, opt, "single", base_dir=shm_dir)  # type: ignore[arg-type]
    with pytest.raises(MemckptError, match="optimizer"):
        State(model, "adam", "single", base_dir=shm_dir)  # type: ignore[arg-type]
    with pytest.raises(MemckptError, match="lr_scheduler"):
        State(model, opt, "single", base_dir=shm_dir, lr_scheduler=0.1)


def test_extra_state_must_be_a_dict(shm_dir: Path) -> None:
    model, opt, _ = make()
    with (
        new_state(shm_dir, model, opt, get_extra_fn=lambda: [1, 2]) as s,
        pytest.raises(UnsupportedValueError, match="dict"),
    ):
        s.save(1)


def test_ddp_needs_a_process_group_and_framework_is_checked(shm_dir: Path) -> None:
    model, opt, _ = make()
    with pytest.raises(MemckptError, match="init_process_group"):
        State(model, opt, "ddp", base_dir=shm_dir)
    with pytest.raises(MemckptError, match="framework"):
        State(model, opt, "deepspeed", base_dir=shm_dir)  # type: ignore[arg-type]


# -- IterManager(state=...) ------------------------------------------------------------------


def one_rank(values: list[float]) -> list[float]:
    return values


def test_iter_manager_advances_the_resumed_step_and_times_state_saves(shm_dir: Path) -> None:
    # Given a job resumed at step 3
    model, opt, sched = make()
    with new_state(shm_dir, model, opt, sched) as s:
        s.save(3, sync=True)
    model, opt, sched = make()
    with new_state(shm_dir, model, opt, sched) as s:
        im = IterManager(save_interval=2, signals=(), all_reduce_max=one_rank, state=s)
        assert s.maybe_resume_from_ckpt() == {}
        saved = []
        # When velastic's loop runs: iter() first, save before the step's work
        for _ in range(5):
            im.iter()
            if im.should_save_ckpt():
                saved.append(s.save(sync=False).step)
            train(model, opt, sched, 1)
        im.finalize()
        # Then the counter continued from the checkpoint and the saves were timed
        assert s.step == 7 and saved == [4, 6]
        assert s.last_save is not None and s.last_save.done()
        assert im._saves.count == 2 and im.prediction.save_cost_s is not None
        # iter(step) sets the counter
        im.iter(20)
        assert s.step == 20
        im.close()


def test_deadline_save_goes_through_the_state_and_finalize_waits(shm_dir: Path) -> None:
    clock = [1000.0]
    env = {"MEMCKPT_DEADLINE": "1010"}
    model, opt, sched = make()
    with new_state(shm_dir, model, opt, sched) as s:
        im = IterManager(redundant_time=5, save_ckpt_time=1, signals=(), environ=env,
                         wall_clock=lambda: clock[0], all_reduce_max=one_rank, state=s)  # fmt: skip
        persisted: list[int] = []
        im.register_persistent_save(persisted.append)
        for _ in range(20):
            im.iter()
            if im.should_save_ckpt():
                s.save(sync=False)
                if im.exit_requested:
                    im.finalize()
                    break
            train(model, opt, sched, 1)
            clock[0] += 1.0
        assert im.last_decision is not None and im.last_decision.trigger.value == "deadline"
        assert persisted == [s.step] and s.last_save is not None and s.last_save.done()
        assert s._manager.latest() == s.step


def test_loop_that_ignores_exit_requested_has_the_signal_raised_again(shm_dir: Path) -> None:
    # Given a previous SIGUSR1 handler and velastic's loop, which never checks exit_requested
    calls: list[int] = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: calls.append(signum))
    try:
        model, opt, sched = make()
        with new_state(shm_dir, model, opt, sched) as s:
            im = IterManager(signals=(signal.SIGUSR1,), signal_grace_s=0,
                             all_reduce_max=one_rank, state=s)  # fmt: skip
            saved = []
            for i in range(6):
                im.iter()
                if im.should_save_ckpt():
                    saved.append(s.save(sync=False).step)
                train(model, opt, sched, 1)
                if i == 2:
                    os.kill(os.getpid(), signal.SIGUSR1)
            # Then the save happened once, was committed before the signal was raised again
            # (to the restored handler), and the handlers are back
            assert saved == [3]
            assert calls == [signal.SIGUSR1, signal.SIGUSR1]
            assert s._manager.latest() == 3
            assert not im.signals_installed
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_iter_manager_refuses_a_state_without_step_and_save() -> None:
    with pytest.raises(memckpt.errors.ScheduleConfigError, match="state"):
        IterManager(signals=(), state=object())  # type: ignore[arg-type]
    with pytest.raises(memckpt.errors.ScheduleConfigError, match="step"):
        IterManager(signals=()).finalize()  # no state: the step must be given


# -- several ranks -------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_ddp_ranks_resume_their_own_extra_state_and_rng(shm_dir: Path) -> None:
    out = run_ranks(state_workers.ddp_save_then_resume, 2, str(shm_dir), timeout=90)
    for rank, got in out.items():
        assert got["extra"] == {"rank": rank, "batches": [rank, 7]}
        assert got["step"] == 3 and got["rand_equal"] and got["opt_steps"] == 3
        assert got["lr"] == pytest.approx([5e-3])


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_fsdp_state_saved_by_two_ranks_resumes_on_three(shm_dir: Path, tmp_path: Path) -> None:
    reference = str(tmp_path / "reference.pt")
    run_ranks(state_workers.fsdp_save, 2, str(shm_dir), reference, timeout=90)
    three = run_ranks(state_workers.fsdp_resume, 3, str(shm_dir), reference, timeout=120)
    # ranks that saved get their own part back; a rank that did not exist gets rank 0's
    assert [three[r]["rank"] for r in range(3)] == [0, 1, 0]
    assert [three[r]["x"] for r in range(3)] == [[0.0, 0.0], [1.0, 1.0], [0.0, 0.0]]
    assert all(three[r]["step"] == 3 for r in range(3))


def test_fsdp_state_resumes_from_the_durable_tier_with_memory_gone(
    shm_dir: Path, tmp_path: Path
) -> None:
    # Given an "fsdp" State that drained every step to persist_dir (DCP's own layout)
    reference, durable = str(tmp_path / "reference.pt"), str(tmp_path / "durable")
    run_ranks(state_workers.fsdp_save, 2, str(shm_dir), reference, durable, timeout=90)
    # When every node's memory is gone
    shutil.rmtree(shm_dir / "fsdp")
    # Then a restart with the same persist_dir resumes step 3 from it, on 2 ranks
    two = run_ranks(state_workers.fsdp_resume, 2, str(shm_dir), reference, durable, timeout=120)
    assert [two[r]["step"] for r in range(2)] == [3, 3]
    assert [two[r]["rank"] for r in range(2)] == [0, 1]


# -- the nanoGPT example under preemption -------------------------------------------------------

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "nanogpt_state.py"


def _torchrun(base: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
            "2", str(EXAMPLE), "--base-dir", str(base), "--max-iters", "500",
            "--save-interval", "100", "--out", str(out), *extra]  # fmt: skip


def _stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_nanogpt_example_preempted_on_two_ranks_ends_with_the_weights_of_an_uninterrupted_run(
    shm_dir: Path, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMCKPT_")}
    # Given the job under `memckpt simulate-preemption`: a 40 s deadline, which the first
    # run meets with a 15 s margin (a deadline save 25 s after its start, after the 3 to
    # 18 s torchrun takes to start on 2 busy cores; each iteration sleeps 0.05 s, so it
    # cannot finish first), then a restart without a deadline
    reference, preempted, logs_dir = (tmp_path / "reference.pt", tmp_path / "preempted.pt",
                                      tmp_path / "logs")  # fmt: skip
    cmd = shlex.join(
        _torchrun(shm_dir / "drill", preempted, "--margin", "15", "--step-time", "0.05")
    )
    drill = subprocess.Popen(
        [sys.executable, "-m", "memckpt", "simulate-preemption", "--cmd", cmd, "--timeout",
         "40", "--restarts", "1", "--grace", "5", "--final-timeout", "150", "--log-dir",
         str(logs_dir), "--json"],
        env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    ref: subprocess.Popen[bytes] | None = None
    try:
        # and the same job uninterrupted, started with the second run (the first run's
        # start-up must not compete with it: it has to train before its deadline save)
        wait_until = time.monotonic() + 120
        while not (logs_dir / "run-1.log").exists() and drill.poll() is None:
            assert time.monotonic() < wait_until, "the drill's second run did not start"
            time.sleep(0.2)
        ref = subprocess.Popen(_torchrun(shm_dir / "ref", reference), env=env,
                               start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)  # fmt: skip
        out, err = drill.communicate(timeout=200)
        _, ref_err = ref.communicate(timeout=120)
    finally:
        _stop(drill)
        if ref is not None:
            _stop(ref)
    assert ref.returncode == 0, ref_err.decode()[-3000:]
    report = json.loads(out)
    logs = "\n".join(p.read_text()[-2000:] for p in sorted((tmp_path / "logs").glob("*.log")))
    # Then the first run saved for the deadline, the second resumed that step and finished
    assert drill.returncode == 0 and report["ok"], (report, err.decode()[-2000:], logs)
    first, last = report["runs"]
    assert first["end"] in ("exited_at_deadline", "exited_after_sigterm"), (first, logs)
    assert first["last_saved_step"] > 0 and last["resumed_step"] == first["last_saved_step"]
    assert last["end"] == "finished"
    # and its weights are bit for bit those of the uninterrupted run
    want = torch.load(reference, weights_only=True)
    got = torch.load(preempted, weights_only=True)
    assert want.keys() == got.keys()
    for k, v in want.items():
        assert torch.equal(got[k], v), k


def test_state_pauses_and_resumes_its_jobs_replication(shm_dir: Path) -> None:
    # Given a State (the velastic API) and IterManager(pause_replication=state)
    model, opt, sched = make()
    with new_state(shm_dir, model, opt, sched) as state:
        throttle = state._manager.runtime.throttle
        # When a block is paused (nested with an explicit pause)
        state.pause_replication()
        with state.replication_paused():
            assert throttle._holds == 2
        assert throttle._holds == 1
        state.resume_replication()
        state.resume_replication()  # one too many: nothing to give back
        assert throttle._holds == 0
        iters = IterManager(total_iters=2, pause_replication=state, save_interval=1)
        iters.iter()
        assert throttle._holds == 1  # paused during the step
        assert iters.should_save_ckpt()
        assert throttle._holds == 0  # resumed for the decision and the save
        state.pause_replication()
    # Then close gives back a pause left held
    assert throttle._holds == 0
