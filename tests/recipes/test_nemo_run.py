"""memckpt under NeMo-Run: the recipe script, the plugins as NeMo-Run plugins, memckpt run.

Skipped where nemo-run is not installed (it is an optional extra of about 90 packages);
scripts/test_nemo_run.sh installs it into its own venv and runs this file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

run = pytest.importorskip("nemo_run")

from memckpt.errors import ConfigError  # noqa: E402
from memckpt.recipes import ConfigContainer, build_config, from_yaml  # noqa: E402
from memckpt.tools.cli import main  # noqa: E402
from memckpt.tools.launch import FaultInjectionPlugin, ProfilerPlugin  # noqa: E402
from memckpt.tools.nemo_run import (  # noqa: E402
    NemoRunFaultInjectionPlugin,
    NemoRunProfilerPlugin,
    as_nemo_run_plugin,
    local_executor,
    recipe_script,
)


def small_config(tmp_path: Path, shm_dir: Path, steps: int = 12) -> ConfigContainer:
    return build_config(
        "mlp_synthetic",
        overrides=[
            f"train.steps={steps}",
            "train.progress=false",
            "checkpoint.memory.interval=5",
            f"checkpoint.memory.base_dir={shm_dir}",
            "checkpoint.persistent.enabled=false",
        ],
    )


def summary_of(stdout: str) -> dict:
    """The JSON summary memckpt run prints last (NeMo-Run prints its own lines before it)."""
    return json.loads(stdout[stdout.rindex('{\n  "ok"') :])


def test_recipe_script_runs_the_entry_with_the_environment_of_node0(tmp_path, shm_dir):
    cfg = small_config(tmp_path, shm_dir)
    script = recipe_script(cfg, tmp_path / "run")
    config_path = (tmp_path / "run" / "config.yaml").resolve()
    assert (script.path, script.m, script.entrypoint) == ("memckpt.recipes.entry", True, "python")
    assert script.args == ["--config", str(config_path)]
    assert from_yaml(ConfigContainer, config_path) == cfg
    assert script.env["MEMCKPT_NODE_ID"] == "node0"
    assert script.env["MEMCKPT_BASE_DIR"] == str(shm_dir / "node0")
    assert script.env["MEMCKPT_RESULT_DIR"] == str((tmp_path / "run" / "results").resolve())
    assert (tmp_path / "run" / "results").is_dir()


def test_local_executor_runs_torchrun_with_this_interpreters_path():
    executor = local_executor(2)
    assert (executor.launcher, executor.ntasks_per_node, executor.nnodes()) == ("torchrun", 2, 1)
    assert executor.env_vars["PATH"].startswith(str(Path(sys.executable).parent))


def test_plugins_put_their_environment_on_the_executor(tmp_path, shm_dir):
    script = recipe_script(small_config(tmp_path, shm_dir), tmp_path / "run")
    executor = local_executor(2)
    NemoRunProfilerPlugin(start=3, steps=2).setup(script, executor)
    NemoRunFaultInjectionPlugin(node=0, step=8).setup(script, executor)
    env = executor.env_vars
    assert env["MEMCKPT_PROFILE_STEPS"] == "3:2"
    assert env["MEMCKPT_PROFILE_DIR"] == str((tmp_path / "run" / "profile").resolve())
    assert (env["MEMCKPT_KILL_AT_STEP"], env["MEMCKPT_KILL_NODE"]) == ("8", "node0")


def test_fault_plugin_checks_the_step_and_node_against_the_task(tmp_path, shm_dir):
    script = recipe_script(small_config(tmp_path, shm_dir, steps=12), tmp_path / "run")
    with pytest.raises(ConfigError, match=r"outside 1\.\.12"):
        NemoRunFaultInjectionPlugin(node=0, step=50).setup(script, local_executor(2))
    with pytest.raises(ConfigError, match=r"node 1 is not one of 0\.\.0"):
        NemoRunFaultInjectionPlugin(node=1, step=5).setup(script, local_executor(2))


def test_plugins_refuse_tasks_that_are_not_a_recipe_script():
    other = run.Script(inline="echo hi")
    with pytest.raises(ConfigError, match="tasks made by recipe_script"):
        NemoRunProfilerPlugin().setup(other, local_executor(1))


def test_launch_plugins_map_to_their_nemo_run_twins():
    assert as_nemo_run_plugin(ProfilerPlugin(start=2, steps=4)) == NemoRunProfilerPlugin(
        start=2, steps=4
    )
    assert as_nemo_run_plugin(FaultInjectionPlugin(node=0, step=9)) == (
        NemoRunFaultInjectionPlugin(node=0, step=9)
    )
    with pytest.raises(ConfigError, match="has no NeMo-Run form"):
        as_nemo_run_plugin(object())  # type: ignore[arg-type]


def test_an_experiment_saves_the_plugins_and_rebuilds_them(tmp_path, shm_dir):
    import fiddle as fdl
    from nemo_run.core.serialization.zlib_json import ZlibJSONSerializer

    script = recipe_script(small_config(tmp_path, shm_dir), tmp_path / "run")
    plugins = [NemoRunProfilerPlugin(start=2, steps=1), NemoRunFaultInjectionPlugin(step=4)]
    with run.Experiment("dry", executor=local_executor(2), base_dir=str(tmp_path / "nr"),
                        log_level="WARN", enable_goodbye_message=False) as exp:  # fmt: skip
        exp.add(script, name="train", plugins=plugins)
        exp.dryrun(log=False, delete_exp_dir=False)
    assert exp.jobs[0].executor.env_vars["MEMCKPT_KILL_AT_STEP"] == "4"
    (tasks_file,) = (tmp_path / "nr").rglob("_TASKS")
    job_cfg = ZlibJSONSerializer().deserialize(json.loads(tasks_file.read_text())[0][0])
    rebuilt = [fdl.build(p) for p in job_cfg.plugins]
    assert isinstance(rebuilt[0], NemoRunProfilerPlugin)
    assert (rebuilt[0].start, rebuilt[0].steps) == (2, 1)
    assert isinstance(rebuilt[1], NemoRunFaultInjectionPlugin)
    assert (rebuilt[1].node, rebuilt[1].step) == (0, 4)


def test_memckpt_run_refuses_several_nodes_with_nemo_run(capsys):
    assert main(["run", "mlp_synthetic", "--launcher", "nemo-run", "--nnodes", "2"]) == 2
    assert "--launcher nemo-run runs one node" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_memckpt_run_with_nemo_run_is_killed_by_the_fault_plugin_then_resumes(
    tmp_path, shm_dir, capsys
):
    run_dir = tmp_path / "run"
    common = [
        *("train.steps=12", "train.progress=false", "checkpoint.memory.interval=5"),
        *(f"checkpoint.memory.base_dir={shm_dir}", "checkpoint.persistent.enabled=false"),
        *("--launcher", "nemo-run", "--nproc-per-node", "2", "--run-dir", str(run_dir)),
        "--json",
    ]
    assert main(["run", "mlp_synthetic", *common, "--plugin", "fault:node=0,step=8"]) == 1
    first = summary_of(capsys.readouterr().out)
    assert (first["ok"], first["exit_codes"]) == (False, {"0": 1})
    assert not list((run_dir / "results").glob("rank*.json"))

    assert main(["run", "mlp_synthetic", *common]) == 0
    summary = summary_of(capsys.readouterr().out)
    assert summary["ok"] and summary["launcher"] == "nemo-run"
    assert summary["final_step"] == 12
    assert summary["resumed_from"]["tier"] == "memory"
    assert summary["resumed_from"]["step"] == 5
    results = [json.loads(p.read_text()) for p in sorted((run_dir / "results").glob("rank*"))]
    assert len(results) == 2
    assert results[0]["weights_sha256"] == results[1]["weights_sha256"]
