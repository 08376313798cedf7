"""Launch a memckpt recipe through NeMo-Run's LocalExecutor on 2 local processes.

Needs the nemo-run extra (``pip install 'memckpt[nemo-run]'``; scripts/test_nemo_run.sh
installs it into its own venv and runs this file). Two launches of the same job:

1. ``gpt_tiny`` under ``run.LocalExecutor(launcher="torchrun", ntasks_per_node=2)`` with
   memckpt's fault plugin as a NeMo-Run plugin: both ranks SIGKILL themselves right
   before step ``--kill-step`` (the profiler plugin traces two steps on the way);
2. the same job again, no plugins: every rank resumes from its newest memory
   checkpoint and trains to the end.

It prints what happened and exits 0 when the second launch resumed from the memory
tier, finished, and both ranks hold the same final weights.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import nemo_run as run

from memckpt.recipes import build_config
from memckpt.recipes.overrides import quote_value
from memckpt.tools.nemo_run import (
    NemoRunFaultInjectionPlugin,
    NemoRunProfilerPlugin,
    recipe_script,
)


def launch(script: run.Script, plugins: list[run.Plugin], nproc: int, nemo_dir: Path) -> str:
    """One NeMo-Run experiment of one task; returns its final state (SUCCEEDED, FAILED, ...)."""
    executor = run.LocalExecutor(
        launcher="torchrun",
        ntasks_per_node=nproc,
        # torchx starts "torchrun" from PATH: take this interpreter's, venv activated or not
        env_vars={"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"},
    )
    with run.Experiment("memckpt-nemo-run-example", executor=executor, base_dir=str(nemo_dir),
                        log_level="WARN", enable_goodbye_message=False) as exp:  # fmt: skip
        exp.add(script, name="train", plugins=plugins, tail_logs=True)
        exp.run(detach=False)
    state = exp.status(return_dict=True)["train"]["status"]
    return getattr(state, "name", str(state))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", default="runs/nemo-run-example")
    ap.add_argument("--nproc", type=int, default=2, help="ranks (default 2)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--kill-step", type=int, default=23)
    ap.add_argument("--memory-dir", default=f"/dev/shm/memckpt-nemo-run-example-{os.getuid()}")
    args = ap.parse_args()

    run_dir = Path(args.run_dir).resolve()
    for d in (run_dir, Path(args.memory_dir)):
        shutil.rmtree(d, ignore_errors=True)  # a fresh job: nothing to resume from
    cfg = build_config(
        "gpt_tiny",
        overrides=[
            f"train.steps={args.steps}",
            "train.progress=false",
            "train.log_every=5",
            "checkpoint.job_id=nemo-run-example",
            "checkpoint.memory.interval=5",
            # paths may hold characters Hydra's grammar refuses unquoted (spaces are fine)
            f"checkpoint.memory.base_dir={quote_value(args.memory_dir)}",
            f"checkpoint.persistent.dir={quote_value(str(run_dir / 'checkpoints'))}",
            "checkpoint.persistent.interval=1000",
        ],
    )
    script = recipe_script(cfg, run_dir)  # run_dir/config.yaml, results in run_dir/results
    try:
        first = launch(
            script,
            [NemoRunFaultInjectionPlugin(node=0, step=args.kill_step),
             NemoRunProfilerPlugin(start=3, steps=2)],
            args.nproc,
            run_dir / "nemo_run",
        )  # fmt: skip
        results_first = sorted((run_dir / "results").glob("rank*.json"))
        second = launch(script, [], args.nproc, run_dir / "nemo_run")
    finally:
        shutil.rmtree(args.memory_dir, ignore_errors=True)
    results = [json.loads(p.read_text()) for p in sorted((run_dir / "results").glob("rank*.json"))]
    traces = sorted(p.name for p in (run_dir / "profile").glob("rank*.json"))
    resumed = [r["resumed_from"] for r in results]
    summary = {
        "first_launch": first,
        "first_launch_results": len(results_first),
        "second_launch": second,
        "ranks": len(results),
        "resumed_from": resumed,
        "final_step": [r["final_step"] for r in results],
        "final_loss": results[0]["final_loss"] if results else None,
        "same_weights_on_every_rank": len({r["weights_sha256"] for r in results}) == 1,
        "profiles": traces,
    }
    print(json.dumps(summary, indent=2))
    ok = (
        first != "SUCCEEDED"
        and not results_first
        and second == "SUCCEEDED"
        and len(results) == args.nproc
        and all(r and r["tier"] == "memory" and r["step"] < args.kill_step for r in resumed)
        and all(r["final_step"] == args.steps for r in results)
        and summary["same_weights_on_every_rank"]
        and len(traces) == args.nproc
    )
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
