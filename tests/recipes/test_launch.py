"""memckpt run end to end on simulated nodes, the sbatch script, plugins, and the demo."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from memckpt.errors import ConfigError
from memckpt.recipes import build_config
from memckpt.tools.cli import main
from memckpt.tools.launch import (
    FaultInjectionPlugin,
    LaunchSpec,
    ProfilerPlugin,
    plugin_from_spec,
    sbatch_script,
)


def test_plugin_specs_parse_and_reject_bad_input():
    assert plugin_from_spec("fault:node=1,step=30") == FaultInjectionPlugin(node=1, step=30)
    assert plugin_from_spec("profiler") == ProfilerPlugin()
    with pytest.raises(ConfigError, match="unknown plugin 'nope'"):
        plugin_from_spec("nope")
    with pytest.raises(ConfigError, match="takes node, step"):
        plugin_from_spec("fault:nodes=1")
    with pytest.raises(ConfigError, match="must be an integer"):
        plugin_from_spec("fault:node=x")


def test_plugins_adjust_environment_and_check_the_config(tmp_path):
    cfg = build_config("mlp_synthetic", overrides=["train.steps=50"])
    spec = LaunchSpec(nnodes=2, run_dir=tmp_path)
    FaultInjectionPlugin(node=1, step=20).setup(cfg, spec)
    ProfilerPlugin(start=3, steps=2).setup(cfg, spec)
    assert spec.env["MEMCKPT_KILL_AT_STEP"] == "20"
    assert spec.env["MEMCKPT_KILL_NODE"] == "node1"
    assert spec.env["MEMCKPT_PROFILE_STEPS"] == "3:2"
    with pytest.raises(ConfigError, match=r"node 2 is not one of 0\.\.1"):
        FaultInjectionPlugin(node=2, step=5).setup(cfg, spec)
    with pytest.raises(ConfigError, match=r"outside 1\.\.50"):
        FaultInjectionPlugin(node=0, step=99).setup(cfg, spec)
    with pytest.raises(ConfigError, match="--nnodes must be an integer >= 1"):
        LaunchSpec(nnodes=0)


def test_sbatch_script_wraps_torchrun_in_srun(tmp_path, capsys):
    assert main(["run", "gpt_tiny", "train.steps=7", "--nnodes", "4", "--nproc-per-node", "8",
                 "--slurm", "--partition", "gpu", "--run-dir", str(tmp_path)]) == 0  # fmt: skip
    script = (tmp_path / "job.sbatch").read_text()
    assert "steps: 7" in (tmp_path / "config.yaml").read_text()
    assert script.startswith("#!/bin/bash\n")
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --partition=gpu",
                 "#SBATCH --signal=TERM@120"):  # fmt: skip
        assert line in script.splitlines()
    srun = next(ln for ln in script.splitlines() if ln.startswith("srun "))
    inner = shlex.split(srun)[-1]  # what bash -c runs on each node
    argv = shlex.split(inner.split("exec ", 1)[1])
    assert argv[1:3] == ["-m", "torch.distributed.run"]
    assert "--nnodes=$SLURM_NNODES" in argv and "--nproc-per-node=8" in argv
    assert "--node-rank=$SLURM_NODEID" in argv and "--master-addr=$MASTER_ADDR" in argv
    assert argv[-3:] == [
        "memckpt.recipes.entry",
        "--config",
        str((tmp_path / "config.yaml").resolve()),
    ]
    assert 'MEMCKPT_NODE_ID="$(hostname)/$SLURM_NODEID"' in inner
    assert "scontrol show hostnames" in script
    # the script is valid bash
    subprocess.run(["bash", "-n", str(tmp_path / "job.sbatch")], check=True)
    cfg = build_config("gpt_tiny")
    assert "--partition" not in sbatch_script(cfg, "c.yaml", nnodes=1, nproc_per_node=1)


def test_run_with_the_nemo_run_launcher_names_the_extra_when_nemo_run_is_missing(
    monkeypatch, capsys, tmp_path
):
    monkeypatch.setitem(sys.modules, "nemo_run", None)  # import nemo_run raises ImportError
    monkeypatch.delitem(sys.modules, "memckpt.tools.nemo_run", raising=False)
    rc = main(["run", "mlp_synthetic", "--launcher", "nemo-run", "--run-dir", str(tmp_path)])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("memckpt: error: --launcher nemo-run: memckpt.tools.nemo_run needs")
    assert "pip install 'memckpt[nemo-run]'" in err


def test_run_refuses_slurm_with_the_nemo_run_launcher(capsys):
    assert main(["run", "gpt_tiny", "--slurm", "--launcher", "nemo-run"]) == 2
    assert "drop --launcher nemo-run" in capsys.readouterr().err


@pytest.mark.slow
def test_run_mlp_on_two_simulated_nodes_end_to_end(shm_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    # it leaves at step 24 of 30, as a preempted run would: a completed run deletes its memory tier
    rc = main(["run", "mlp_synthetic", "--nnodes", "2", "--nproc-per-node", "1",
               "--run-dir", str(run_dir), "train.steps=30", "train.stop_after=24",
               "checkpoint.memory.interval=8",
               f"checkpoint.memory.base_dir={shm_dir}", "train.progress=false",
               f"checkpoint.persistent.dir={tmp_path / 'persist'}",
               "--plugin", "profiler:start=2,steps=2", "--json"])  # fmt: skip
    out = json.loads(capsys.readouterr().out)
    assert rc == 0, out
    assert out["final_step"] == 24 and out["exit_codes"] == {"0": 0, "1": 0}
    assert out["completed"] is False and out["run_dir"] == str(run_dir)
    r0 = json.loads((run_dir / "results" / "rank0.json").read_text())
    r1 = json.loads((run_dir / "results" / "rank1.json").read_text())
    assert r0["world_size"] == 2 and r0["weights_sha256"] == r1["weights_sha256"]
    # each simulated node kept its memory checkpoints, with the peer's replica beside them
    for node in (0, 1):
        step24 = shm_dir / f"node{node}" / "mlp-synthetic" / "step-24"
        assert sorted(p.name for p in step24.glob("rank-*.mck")) == ["rank-0.mck", "rank-1.mck"]
    assert (tmp_path / "persist" / "mlp-synthetic" / "step-24").is_dir()
    traces = sorted((run_dir / "profile").glob("rank*.json"))
    assert [t.name for t in traces] == ["rank0.json", "rank1.json"]
    assert "traceEvents" in traces[0].read_text()[:2000]


@pytest.mark.slow
def test_demo_short_recovers_from_the_peer_with_identical_weights(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "memckpt.tools.cli", "demo", "--out", str(tmp_path / "demo"),
         "--steps", "40", "--interval", "5", "--kill-step", "28", "--json"],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(proc.stdout[proc.stdout.index("{") :])
    assert report["identical"] is True
    assert report["tier"] == "memory"
    assert report["recovered_step"] == 25 and report["steps_lost"] == 2
    assert report["sources"] == {"0": 0, "1": 0}  # rank 1's state came from node 0
    assert Path(report["plot"]).stat().st_size > 10_000
    assert not list(Path("/dev/shm").glob("memckpt-demo-*"))
