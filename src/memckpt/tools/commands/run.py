"""``memckpt run RECIPE [overrides] --nnodes N --nproc-per-node P``: train with torchrun.

``--launcher nemo-run`` launches through NeMo-Run's ``LocalExecutor(launcher="torchrun")``
instead (one node; the ``nemo-run`` extra), with the plugins as NeMo-Run plugins.

The whole config is checked before anything starts: a mistake is one line on stderr
and exit 2. A finished run prints a summary; a failed one says why (the first error
line of the rank that failed first, from <run-dir>/logs/rank<r>.log) and whether
re-running resumes. Exit codes: 0 the run succeeded, 1 it failed, 2 a usage or config
error (nothing was launched). ``--json`` prints the summary as JSON, and errors as
{"error": ..., "kind": ..., "exit": 2}.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, NoReturn

__all__ = ["handler", "register"]

log = logging.getLogger(__name__)


class _Parser(argparse.ArgumentParser):
    """Parses the options found among the overrides; a mistake is a usage error (exit 2)."""

    def error(self, message: str) -> NoReturn:
        from memckpt.tools.tables import CommandError

        raise CommandError(f"{message} (memckpt run --help lists the options)")


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
    p.add_argument(
        "--timeout",
        type=float,
        default=3600.0,
        metavar="SECONDS",
        help="kill the job after this many seconds of wall time (default 3600); it then "
        "counts as failed",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help='print the summary as JSON; errors as {"error": ..., "kind": ..., "exit": 2}',
    )


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
    """Run the job; see the module docstring for the output and the exit codes.

    Usage and config errors are raised (``memckpt.tools.cli.main`` prints them, as JSON
    under ``--json``, and exits 2); a run that fails returns 1.
    """
    return _run(args)


def _parse(args: argparse.Namespace) -> argparse.Namespace:
    rest = _Parser(prog=args.run_parser.prog, add_help=False)
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
    return tail


def _run(args: argparse.Namespace) -> int:
    from memckpt.errors import ConfigError
    from memckpt.recipes import build_config
    from memckpt.recipes.validate import check_config, check_placement
    from memckpt.settings import LOG_DIR_ENV
    from memckpt.tools.launch import (
        LaunchSpec,
        explain_failure,
        launch_local,
        plugin_from_spec,
        sbatch_script,
        write_config,
    )

    tail = _parse(args)
    cfg = build_config(args.recipe, tail.yaml, tail.overrides)
    run_dir = Path(tail.run_dir or f"runs/{cfg.checkpoint.job_id}")
    spec = LaunchSpec(tail.nnodes, tail.nproc_per_node, run_dir, timeout_s=tail.timeout)
    plugins = [plugin_from_spec(p) for p in tail.plugin]
    if tail.slurm and tail.launcher == "nemo-run":
        raise ConfigError("--slurm writes an sbatch script for torchrun; drop --launcher nemo-run")
    check_config(cfg)  # every check a rank makes at start, before anything is launched
    if tail.slurm:
        for p in plugins:
            p.setup(cfg, spec)
        config_path = write_config(cfg, run_dir)
        script = sbatch_script(cfg, config_path.resolve(), nnodes=spec.nnodes,
                               nproc_per_node=spec.nproc_per_node, partition=tail.partition,
                               time_limit=tail.time)  # fmt: skip
        path = run_dir / "job.sbatch"
        path.write_text(script)
        if tail.json:
            doc = {"ok": True, "sbatch": str(path), "config": str(config_path), "exit": 0}
            print(json.dumps(doc, indent=2))
        else:
            print(f"wrote {path} (config {config_path}); submit it with: sbatch {path}")
        return 0
    check_placement(cfg, spec.nproc_per_node)  # the ranks start on this machine
    if tail.launcher == "nemo-run":
        try:
            from memckpt.tools.nemo_run import launch_nemo_run
        except ImportError as e:
            raise ConfigError(f"--launcher nemo-run: {e}") from e
        spec.env.setdefault(LOG_DIR_ENV, str((run_dir / "logs").resolve()))
        result = launch_nemo_run(cfg, spec, plugins)
    else:
        result = launch_local(cfg, spec, plugins)
    summary: dict[str, Any] = {
        "ok": result.ok,
        "launcher": tail.launcher,
        "exit_codes": result.returncodes,
        "seconds": result.seconds,
        "run_dir": str(run_dir),
        "exit": 0 if result.ok else 1,
    }
    results = sorted((run_dir / "results").glob("rank*.json"))
    if result.ok and results:
        r0 = json.loads(results[0].read_text())
        summary.update(final_step=r0.get("final_step"), final_loss=r0.get("final_loss"),
                       resumed_from=r0.get("resumed_from"),
                       completed=r0.get("completed"))  # fmt: skip
    if not result.ok:
        report = explain_failure(cfg, spec, result)
        summary.update(error=report.why, kind="run_failed", failed_rank=report.rank,
                       log=str(report.log) if report.log else None,
                       resume={"tier": report.resume.tier, "step": report.resume.step,
                               "memory_step": report.resume.memory_step,
                               "persistent_step": report.resume.persistent_step,
                               "note": report.resume.note})  # fmt: skip
    if tail.json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        _print_summary(summary, cfg.train.steps)
    return 0 if result.ok else 1


def _print_summary(s: dict[str, Any], total_steps: int) -> None:
    took = f"{s['seconds']:.1f} s, {s['launcher']}"
    if s["ok"]:
        loss = s.get("final_loss")
        line = f"run ok ({took}): step {s.get('final_step')} of {total_steps}"
        if loss is not None:
            line += f", loss {loss:.4f}"
        resumed = s.get("resumed_from")
        if resumed:
            line += f", resumed from step {resumed['step']} ({resumed['tier']} tier)"
        print(line)
        print(f"run dir: {s['run_dir']} (config.yaml, logs/, results/)")
        return
    print(f"run failed ({took}): {s['error']}", file=sys.stderr)
    if s.get("log"):
        print(f"log: {s['log']}", file=sys.stderr)
    print(s["resume"]["note"], file=sys.stderr)
