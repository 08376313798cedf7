"""``memckpt run RECIPE [overrides] --nnodes N --nproc-per-node P``: train with torchrun.

``--launcher nemo-run`` launches through NeMo-Run's ``LocalExecutor(launcher="torchrun")``
instead (one node; the ``nemo-run`` extra), with the plugins as NeMo-Run plugins.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

__all__ = ["handler", "register"]

log = logging.getLogger(__name__)


def _options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nnodes", type=int, default=1, help="simulated nodes (default 1)")
    p.add_argument("--nproc-per-node", type=int, default=1, help="ranks per node (default 1)")
    p.add_argument("--yaml", metavar="FILE", help="YAML merged on top of the recipe")
    p.add_argument("--run-dir", help="config, logs and results go here (default runs/<job_id>)")
    p.add_argument(
        "--plugin",
        action="append",
        default=[],
        metavar="SPEC",
        help="profiler[:start=5,steps=3] or fault[:node=1,step=30]; repeatable",
    )
    p.add_argument(
        "--launcher",
        choices=("torchrun", "nemo-run"),
        default="torchrun",
        help="torchrun agents per simulated node (default), or NeMo-Run's LocalExecutor "
        "(one node; pip install 'memckpt[nemo-run]')",
    )
    p.add_argument("--slurm", action="store_true", help="write an sbatch script; do not run")
    p.add_argument("--partition", help="with --slurm: the partition")
    p.add_argument("--time", default="04:00:00", help="with --slurm: the time limit")
    p.add_argument("--timeout", type=float, default=3600.0, help="kill the job after this long")


def register(sub: Any) -> None:
    sp = sub.add_parser(
        "run",
        help="train a recipe with torchrun on simulated nodes, or write an sbatch script",
        description=(__doc__ or "").replace("``", ""),
    )
    sp.add_argument("recipe", help="recipe name (memckpt config list) or package.module:function")
    sp.add_argument("overrides", nargs=argparse.REMAINDER, metavar="OVERRIDE",
                    help="key=value, +key=value, ++key=value or ~key")  # fmt: skip
    _options(sp)
    sp.set_defaults(fn=handler, run_parser=sp)


def handler(args: argparse.Namespace) -> int:
    from memckpt.errors import ConfigError
    from memckpt.recipes import build_config
    from memckpt.tools.launch import (
        LaunchSpec,
        launch_local,
        plugin_from_spec,
        sbatch_script,
        write_config,
    )

    rest = argparse.ArgumentParser(prog=args.run_parser.prog, add_help=False)
    _options(rest)
    rest.add_argument("overrides", nargs="*")
    tail = rest.parse_intermixed_args(args.overrides)
    # options may come before the recipe (args) or among the overrides (tail)
    for action in rest._actions:
        name = action.dest
        if name in ("overrides", "help") or not hasattr(args, name):
            continue
        if name == "plugin":
            tail.plugin = args.plugin + tail.plugin
        elif getattr(tail, name) == action.default:
            setattr(tail, name, getattr(args, name))
    cfg = build_config(args.recipe, tail.yaml, tail.overrides)
    run_dir = Path(tail.run_dir or f"runs/{cfg.checkpoint.job_id}")
    spec = LaunchSpec(tail.nnodes, tail.nproc_per_node, run_dir, timeout_s=tail.timeout)
    plugins = [plugin_from_spec(p) for p in tail.plugin]
    if tail.slurm and tail.launcher == "nemo-run":
        raise ConfigError("--slurm writes an sbatch script for torchrun; drop --launcher nemo-run")
    if tail.slurm:
        for p in plugins:
            p.setup(cfg, spec)
        config_path = write_config(cfg, run_dir)
        script = sbatch_script(cfg, config_path.resolve(), nnodes=spec.nnodes,
                               nproc_per_node=spec.nproc_per_node, partition=tail.partition,
                               time_limit=tail.time)  # fmt: skip
        path = run_dir / "job.sbatch"
        path.write_text(script)
        print(f"wrote {path} (config {config_path}); submit it with: sbatch {path}")
        return 0
    if tail.launcher == "nemo-run":
        try:
            from memckpt.tools.nemo_run import launch_nemo_run
        except ImportError as e:
            raise ConfigError(f"--launcher nemo-run: {e}") from e
        result = launch_nemo_run(cfg, spec, plugins)
    else:
        result = launch_local(cfg, spec, plugins)
    summary = {
        "ok": result.ok,
        "launcher": tail.launcher,
        "exit_codes": result.returncodes,
        "seconds": result.seconds,
    }
    results = sorted((run_dir / "results").glob("rank*.json"))
    if results:
        r0 = json.loads(results[0].read_text())
        summary.update(final_step=r0.get("final_step"), final_loss=r0.get("final_loss"),
                       resumed_from=r0.get("resumed_from"))  # fmt: skip
    print(json.dumps(summary, indent=2, default=str))
    return 0 if result.ok else 1
