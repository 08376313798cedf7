"""The recipes' training loop: loss falls, resumes are bit-identical from either tier, faults."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import train_workers as w

from memckpt.recipes.checkpointing import persistent_job_dir
from memckpt.recipes.config import ConfigContainer
from memckpt.recipes.train import KILL_AT_STEP_ENV, RESTART_COUNT_ENV, train
from multiproc import run_ranks

pytestmark = [pytest.mark.timeout(90), pytest.mark.usefixtures("one_thread")]


def logged_steps(cfg: ConfigContainer) -> list[dict[str, Any]]:
    assert cfg.logger.metrics_file is not None
    lines = Path(cfg.logger.metrics_file).read_text().splitlines()
    return [doc for doc in map(json.loads, lines) if "event" not in doc]


def events(cfg: ConfigContainer) -> list[dict[str, Any]]:
    assert cfg.logger.metrics_file is not None
    lines = Path(cfg.logger.metrics_file).read_text().splitlines()
    return [doc for doc in map(json.loads, lines) if "event" in doc]


def default_sized(root: Path, kind: str, steps: int) -> ConfigContainer:
    """The default model sizes (the recipes' ones), checkpointing under ``root``."""
    cfg = ConfigContainer()
    cfg.model.kind = kind
    cfg.data.kind = "arithmetic" if kind == "gpt" else "regression"
    cfg.train.steps = steps
    cfg.train.progress = False
    cfg.checkpoint.job_id = kind
    cfg.checkpoint.memory.base_dir = str(root / "mem")
    cfg.checkpoint.persistent.dir = str(root / "persistent")
    cfg.logger.metrics_file = str(root / "metrics.jsonl")
    return cfg


def test_gpt_loss_falls_on_arithmetic_text(shm_dir: Path) -> None:
    cfg = default_sized(shm_dir, "gpt", steps=60)

    result = train(cfg)

    first = logged_steps(cfg)[0]["loss"]
    assert result.completed and result.final_step == 60
    assert result.final_loss is not None and result.final_loss < first - 0.25, (first, result)
    assert result.memory_saves == 6 and result.persistent_saves == 2


def test_mlp_loss_falls_on_teacher_regression(shm_dir: Path) -> None:
    cfg = default_sized(shm_dir, "mlp", steps=40)

    result = train(cfg)

    first = logged_steps(cfg)[0]["loss"]
    assert result.final_loss is not None and result.final_loss < 0.5 * first, (first, result)


def test_metrics_file_has_a_line_per_logged_step_and_the_resume_event(shm_dir: Path) -> None:
    train(w.stopped_at(w.tiny_config(shm_dir, "run"), 4))
    cfg = w.tiny_config(shm_dir, "run")

    train(cfg)

    steps = logged_steps(cfg)
    assert [d["step"] for d in steps] == list(range(1, 13))
    assert set(steps[-1]) == {"step", "loss", "time", "lr", "save_blocking_s"}
    assert steps[-1]["save_blocking_s"] is not None
    resume = [e for e in events(cfg) if e["event"] == "resume"]
    assert len(resume) == 1 and resume[0]["step"] == 4 and resume[0]["tier"] == "memory"
    assert {"seconds", "sources", "time"} <= set(resume[0])


def test_resume_from_memory_is_bit_identical_to_an_uninterrupted_run(shm_dir: Path) -> None:
    reference = train(w.tiny_config(shm_dir, "ref"))
    stopped = train(w.stopped_at(w.tiny_config(shm_dir, "run"), 7))

    resumed = train(w.tiny_config(shm_dir, "run"))

    assert (stopped.final_step, stopped.completed) == (7, False)
    assert resumed.resumed_from is not None
    assert (resumed.resumed_from.tier, resumed.resumed_from.step) == ("memory", 7)
    assert (resumed.steps_run, resumed.final_step, resumed.completed) == (5, 12, True)
    assert resumed.weights_sha256 == reference.weights_sha256
    assert resumed.final_loss == reference.final_loss


def test_persistent_tier_alone_resumes_when_memory_is_empty(shm_dir: Path) -> None:
    reference = train(w.tiny_config(shm_dir, "ref"))
    train(w.stopped_at(w.tiny_config(shm_dir, "run"), 7))
    cfg = w.tiny_config(shm_dir, "run")
    shutil.rmtree(cfg.checkpoint.memory.base_dir)
    half_written = persistent_job_dir(cfg.checkpoint) / "step-11"  # no completion marker
    half_written.mkdir()
    (half_written / "__0_0.distcp").write_bytes(b"torn")

    resumed = train(cfg)

    assert resumed.resumed_from is not None
    assert (resumed.resumed_from.tier, resumed.resumed_from.step) == ("persistent", 7)
    assert resumed.weights_sha256 == reference.weights_sha256


def test_newer_persistent_step_wins_over_an_older_memory_step(shm_dir: Path) -> None:
    cfg = w.stopped_at(w.tiny_config(shm_dir, "run"), 10)
    cfg.checkpoint.memory.interval = 4  # memory holds 4, 8 and the stop step 10
    train(cfg)
    shutil.rmtree(Path(cfg.checkpoint.memory.base_dir) / "run" / "step-10")

    resumed = train(w.tiny_config(shm_dir, "run"))

    assert resumed.resumed_from is not None
    assert (resumed.resumed_from.tier, resumed.resumed_from.step) == ("persistent", 10)


@pytest.mark.slow
def test_two_ranks_resume_bit_identically_from_either_tier(shm_dir: Path) -> None:
    # Two simulated nodes of one rank each: MEMCKPT_BASE_DIR gives each its own memory
    # tier, so replication is on and node 1's data survives on node 0.
    nodes = {r: {"MEMCKPT_NODE_ID": f"node{r}", "MEMCKPT_BASE_DIR": str(shm_dir / f"node{r}")}
             for r in (0, 1)}  # fmt: skip
    reference = w.tiny_config(shm_dir, "ref")
    stopping = w.stopped_at(w.tiny_config(shm_dir, "run"), 7)
    persistent_copy = w.tiny_config(shm_dir, "copy")  # its memory tier stays empty
    copy = [str(persistent_job_dir(c.checkpoint)) for c in (stopping, persistent_copy)]
    first = run_ranks(w.train_reference_and_stop, 2, reference, stopping, copy,
                      env_per_rank=nodes, timeout=60)  # fmt: skip
    # the completed reference run gave each node's RAM back; the stopped run kept its own
    assert [(shm_dir / f"node{r}" / "ref").exists() for r in (0, 1)] == [False, False]
    assert [(shm_dir / f"node{r}" / "run").is_dir() for r in (0, 1)] == [True, True]
    shutil.rmtree(shm_dir / "node1")  # node 1 lost its memory

    second = run_ranks(w.train_configs, 2,
                       {"memory": w.tiny_config(shm_dir, "run"), "persistent": persistent_copy},
                       env_per_rank=nodes, timeout=60)  # fmt: skip

    ref_hash = first[0]["reference"].weights_sha256
    for rank in (0, 1):
        assert first[rank]["reference"].weights_sha256 == ref_hash
        assert first[rank]["stopped"].final_step == 7
        for tier in ("memory", "persistent"):
            resumed = second[rank][tier]
            assert resumed.resumed_from is not None
            assert (resumed.resumed_from.tier, resumed.resumed_from.step) == (tier, 7)
            assert resumed.weights_sha256 == ref_hash, (rank, tier)
            assert resumed.final_loss == first[rank]["reference"].final_loss
        assert second[rank]["memory"].resumed_from.sources == {0: 0, 1: 0}


@pytest.mark.slow
def test_fault_hook_kills_the_process_before_the_step_and_a_restart_recovers(
    shm_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    workers = Path(w.__file__).parent
    code = (
        "import sys; from pathlib import Path; import torch; torch.set_num_threads(1); "
        f"sys.path.insert(0, {str(workers)!r}); import train_workers as w; "
        "from memckpt.recipes.train import train; "
        "train(w.tiny_config(Path(sys.argv[1]), 'run'))"
    )
    env = {**os.environ, KILL_AT_STEP_ENV: "8"}
    env.pop(RESTART_COUNT_ENV, None)
    env.pop("TORCHELASTIC_RESTART_COUNT", None)

    proc = subprocess.run([sys.executable, "-c", code, str(shm_dir)], env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip

    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    cfg = w.tiny_config(shm_dir, "run")
    assert max(d["step"] for d in logged_steps(cfg)) == 7
    assert "SIGKILL before step 8" in proc.stderr

    monkeypatch.setenv(KILL_AT_STEP_ENV, "8")
    monkeypatch.setenv(RESTART_COUNT_ENV, "1")
    reference = train(w.tiny_config(shm_dir, "ref"))
    resumed = train(cfg)

    assert resumed.resumed_from is not None and resumed.resumed_from.step in (5, 6)
    assert resumed.completed and resumed.weights_sha256 == reference.weights_sha256
