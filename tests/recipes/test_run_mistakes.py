"""memckpt run: config mistakes cost one line before launch; a failed run says why and what next.

Exit codes: 0 the run succeeded, 1 it failed, 2 a usage or config error (nothing launched).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import pytest

from memckpt.errors import ConfigError
from memckpt.recipes import build_config
from memckpt.recipes.rank_log import (
    DATE_FORMAT,
    failure_message,
    first_failure,
    line_format,
    parse_failures,
)
from memckpt.recipes.validate import check_config, check_placement, config_problems
from memckpt.tools import launch
from memckpt.tools.cli import main


@pytest.fixture
def no_launch(monkeypatch):
    """Any attempt to start processes fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("the job was launched")

    monkeypatch.setattr(launch, "launch_local", refuse)


@pytest.mark.parametrize(
    ("override", "line"),
    [
        ("model.n_head=3", "model.n_embd (64) must be a multiple of n_head (3)"),
        ("checkpoint.memory.keep_last=0", "checkpoint.memory.keep_last must be >= 1, got 0"),
        ("train.steps=-5", "train.steps must be >= 0, got -5"),
        ("model.n_head=0", "model.n_head must be >= 1, got 0"),
        ("logger.level=LOUD", "logger.level must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL"),
        ("checkpoint.replication.strategy=mirror", "unknown replication strategy 'mirror'"),
        ("data.num_samples=3", "too few for windows of 64 (model.block_size)"),
        ("model.dropout=2", "model.dropout must be in [0, 1], got 2.0"),
        ("schedule.mtbf_s=-1", "schedule: mtbf_s must be > 0"),
        ("optimizer.beta2=1", "optimizer.beta2 must be in [0, 1), got 1.0"),
        ("checkpoint.job_id=a/b", "checkpoint.job_id: invalid job id 'a/b'"),
    ],
)
def test_a_config_error_is_one_line_and_exit_2_before_anything_is_launched(
    override, line, tmp_path, capsys, no_launch
):
    # Given a config that type-checks but cannot train
    # When it is run
    rc = main(["run", "gpt_tiny", override, "--run-dir", str(tmp_path / "run")])
    # Then one line on stderr says why, it exits 2, and nothing was started or written
    out, err = capsys.readouterr()
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("memckpt: error: "), err
    assert line in err, err
    assert out == ""
    assert not (tmp_path / "run").exists()


def test_every_problem_is_named_at_once_in_one_line():
    cfg = build_config("gpt_tiny", overrides=["model.n_head=3", "train.steps=-5"])
    problems = config_problems(cfg)
    assert problems == [
        "train.steps must be >= 0, got -5",
        "model.n_embd (64) must be a multiple of n_head (3)",
    ]
    with pytest.raises(ConfigError, match="; ") as e:
        check_config(cfg)
    assert "\n" not in str(e.value)
    for recipe in ("gpt_tiny", "mlp_synthetic", "gpt_small_lm"):  # every recipe is valid as is
        assert config_problems(build_config(recipe)) == [], recipe


def test_nccl_without_a_gpu_for_every_local_rank_is_refused_before_launch():
    cfg = build_config("gpt_tiny", overrides=["dist.backend=nccl"])
    with pytest.raises(ConfigError, match="torch sees none here"):
        check_placement(cfg, 1, devices=lambda: (False, 0))
    with pytest.raises(ConfigError, match="local rank 2 has no GPU"):
        check_placement(cfg, 3, devices=lambda: (True, 2))
    check_placement(cfg, 2, devices=lambda: (True, 2))


def test_json_errors_have_error_and_kind_with_the_same_exit_codes(tmp_path, capsys, no_launch):
    rc = main(["run", "gpt_tiny", "--json", "model.n_head=3", "--run-dir", str(tmp_path)])
    out, err = capsys.readouterr()
    assert rc == 2 and err == ""
    doc = json.loads(out)
    assert doc["error"] == "model.n_embd (64) must be a multiple of n_head (3)"
    assert doc["kind"] and doc.get("exit", 2) == 2, doc
    # an option among the overrides that does not parse is a usage error
    assert main(["run", "gpt_tiny", "--nnodes", "x", "--json"]) == 2
    doc = json.loads(capsys.readouterr().out)
    assert doc["kind"] == "usage" and "--nnodes" in doc["error"], doc
    # --json before the recipe is accepted too
    assert main(["run", "--json", "gpt_tiny", "--slurm", "--run-dir", str(tmp_path)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is True and doc["sbatch"].endswith("job.sbatch") and doc["exit"] == 0


def test_run_timeout_help_gives_its_unit(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--timeout SECONDS" in help_text
    assert "this many seconds of wall time (default 3600)" in help_text


def _log_line(rank: int, when: float, level: str, name: str, message: str) -> str:
    """A line as the entry point's log handler writes it, logged at unix time ``when``."""
    record = logging.LogRecord(name, getattr(logging, level), __file__, 1, message, None, None)
    record.created, record.msecs = when, (when % 1) * 1000
    return logging.Formatter(line_format(rank), DATE_FORMAT).format(record)


def test_the_first_failure_line_of_the_run_names_the_rank_that_failed_first(tmp_path):
    t = time.time()
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "rank0.log").write_text("\n".join([
        _log_line(0, t - 100, "ERROR", "memckpt.recipes.entry", "rank 0 failed: Old: last run"),
        _log_line(0, t + 1, "INFO", "memckpt.engine", "step 3 committed"),
        _log_line(0, t + 3, "ERROR", "memckpt.recipes.entry",
                  "rank 0 failed: CollectiveError: rank 1 did not answer"),
        "Traceback (most recent call last):",
    ]) + "\n")  # fmt: skip
    (logs / "rank1.log").write_text("\n".join([
        _log_line(1, t + 1.5, "ERROR", "memckpt.engine", "save of step 4 failed: disk"),
        _log_line(1, t + 2, "ERROR", "memckpt.recipes.entry",
                  failure_message(1, NotADirectoryError("not a directory: 'p/step-4'"))),
    ]) + "\n")  # fmt: skip
    # the earliest failure line since the launch wins over earlier ERROR lines and older runs
    f = first_failure(logs, since=t)
    assert (f.rank, f.why, f.log) == (1, "NotADirectoryError: not a directory: 'p/step-4'",
                                      logs / "rank1.log")  # fmt: skip
    # without failure lines, the earliest ERROR line
    only_errors = parse_failures([_log_line(2, t + 5, "ERROR", "x", "boom")], since=t)
    assert [(p.rank, p.why, p.failed) for p in only_errors] == [(2, "boom", False)]
    assert first_failure(tmp_path / "nothing-here", since=t) is None


def test_resume_point_reads_both_tiers_and_says_where_a_rerun_starts(tmp_path):
    cfg = build_config("mlp_synthetic", overrides=[
        f"checkpoint.memory.base_dir={tmp_path / 'mem'}",
        f"checkpoint.persistent.dir={tmp_path / 'disk'}",
    ])  # fmt: skip
    none = launch.resume_point(cfg, 2)
    assert none.tier is None and none.note.startswith("re-running starts from step 0: no complete")
    assert "mlp-synthetic" in none.note and str(tmp_path / "disk") in none.note
    step = tmp_path / "disk" / "mlp-synthetic" / "step-50"
    step.mkdir(parents=True)
    (step / ".metadata").write_bytes(b"x")
    disk = launch.resume_point(cfg, 2)
    assert (disk.tier, disk.step) == ("persistent", 50)
    assert disk.note.startswith("re-running resumes from step 50 (persistent tier")
    cfg.checkpoint.resume = False
    assert launch.resume_point(cfg, 2).note.endswith("checkpoint.resume is false")


def test_resume_point_counts_the_steps_the_memory_tier_drained(tmp_path):
    # Given a job whose memory tier drained step 60 to persist_dir, its memory gone
    durable = tmp_path / "durable"
    cfg = build_config("mlp_synthetic", overrides=[
        f"checkpoint.memory.base_dir={tmp_path / 'mem'}",
        f"checkpoint.persistent.dir={tmp_path / 'disk'}",
        f"checkpoint.memory.persist_dir={durable}",
    ])  # fmt: skip
    import torch

    import memckpt

    with memckpt.CheckpointManager(tmp_path / "drainer", "mlp-synthetic", persist_every=60,
                                   persist_dir=durable) as m:  # fmt: skip
        m.save(60, {"w": torch.ones(4)}).wait()
    # Then a re-run resumes from it (the workers' rule: the newer of memory and drained)
    point = launch.resume_point(cfg, 2)
    assert (point.tier, point.step) == ("memory", 60)
    assert f"{durable} (durable)" in point.note


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_failed_run_says_why_and_that_rerunning_resumes_from_memory(tmp_path, shm_dir, capsys):
    # Given a run whose persistent directory cannot be created (its parent is a file)
    (tmp_path / "afile").write_text("")
    args = ["run", "mlp_synthetic", "train.steps=6", "train.progress=false",
            "checkpoint.memory.interval=1", "checkpoint.persistent.interval=3",
            f"checkpoint.memory.base_dir={shm_dir}",
            f"checkpoint.persistent.dir={tmp_path / 'afile' / 'p'}",
            "--run-dir", str(tmp_path / "run"), "--json"]  # fmt: skip
    # When it runs and fails at its first persistent save (step 3)
    rc = main(args)
    summary = json.loads(capsys.readouterr().out)
    # Then it exits 1, quoting rank 0's first error line from its log
    assert rc == 1 and summary["ok"] is False and summary["kind"] == "run_failed"
    assert summary["exit"] == 1
    assert summary["error"].startswith("rank 0: NotADirectoryError: "), summary
    assert summary["failed_rank"] == 0
    assert Path(summary["log"]) == (tmp_path / "run" / "logs" / "rank0.log").resolve()
    # and says a re-run resumes from the memory checkpoint committed before the failure
    assert summary["resume"]["tier"] == "memory" and summary["resume"]["step"] >= 2, summary
    assert summary["resume"]["note"].startswith("re-running resumes from step")


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_run_past_its_timeout_is_a_failed_run_not_a_usage_error(tmp_path, shm_dir, capsys):
    rc = main(["run", "mlp_synthetic", "train.steps=100000", "train.progress=false",
               f"checkpoint.memory.base_dir={shm_dir}",
               f"checkpoint.persistent.dir={tmp_path / 'disk'}",
               "--run-dir", str(tmp_path / "run"), "--timeout", "3", "--json"])  # fmt: skip
    summary = json.loads(capsys.readouterr().out)
    assert rc == 1 and summary["kind"] == "run_failed"
    assert summary["error"].startswith("the job ran past its --timeout of 3 s and was killed")
    assert not any(p.name.startswith("rank") for p in os.scandir(tmp_path / "run" / "results"))
    # and its ranks were killed with their agent (each runs in a session of its own)
    assert _processes_running(str(tmp_path / "run" / "config.yaml")) == []


def _processes_running(text: str) -> list[int]:
    """Processes whose command line contains ``text``; each found one is killed."""
    found = []
    for entry in os.scandir("/proc"):
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError):
            continue
        if entry.name.isdigit() and text in cmdline:
            found.append(int(entry.name))
            os.kill(int(entry.name), 9)  # leave nothing behind, even when the test fails
    return found
