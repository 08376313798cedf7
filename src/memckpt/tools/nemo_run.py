"""Launch a recipe through NeMo-Run, with memckpt's launch plugins as NeMo-Run plugins.

Needs the ``nemo-run`` extra (``pip install 'memckpt[nemo-run]'``: nemo-run 0.11.1,
which resolves only with leptonai 0.27.3 pinned). In a NeMo-Run script::

    import nemo_run as run
    from memckpt.recipes import build_config
    from memckpt.tools.nemo_run import NemoRunProfilerPlugin, recipe_script

    cfg = build_config("gpt_tiny", overrides=["train.steps=50"])
    script = recipe_script(cfg, "runs/gpt-tiny")     # writes runs/gpt-tiny/config.yaml
    executor = run.LocalExecutor(launcher="torchrun", ntasks_per_node=2)
    run.run(script, executor=executor, plugins=[NemoRunProfilerPlugin(start=5, steps=3)])

The task is a ``run.Script`` running ``python -m memckpt.recipes.entry --config
<run_dir>/config.yaml`` on every rank, the worker ``memckpt run`` starts under torchrun.
A plugin's ``setup(task, executor)`` reads that config, lets the matching
``memckpt.tools.launch`` plugin edit it and the launch environment, writes the config
back and puts the environment into ``executor.env_vars``. ``launch_nemo_run`` is
``memckpt run --launcher nemo-run``: one node, ``spec.nproc_per_node`` ranks, through
``LocalExecutor(launcher="torchrun")``.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:
    import nemo_run as run
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "memckpt.tools.nemo_run needs NeMo-Run: pip install 'memckpt[nemo-run]' "
        f"(nemo-run==0.11.1 with leptonai==0.27.3) ({e})"
    ) from e

from memckpt.errors import ConfigError, MemckptError
from memckpt.recipes.config import ConfigContainer
from memckpt.recipes.config_yaml import from_yaml, to_yaml
from memckpt.settings import BASE_DIR_ENV, NODE_ID_ENV, RESULT_DIR_ENV, TRANSFER_HOST_ENV
from memckpt.tools.launch import (
    FaultInjectionPlugin,
    LaunchResult,
    LaunchSpec,
    Plugin,
    ProfilerPlugin,
    node_base_dir,
    write_config,
)

__all__ = [
    "NemoRunFaultInjectionPlugin",
    "NemoRunProfilerPlugin",
    "as_nemo_run_plugin",
    "launch_nemo_run",
    "local_executor",
    "recipe_script",
]

log = logging.getLogger(__name__)

_ENTRY = "memckpt.recipes.entry"
_TASK = "train"


def recipe_script(
    cfg: ConfigContainer, run_dir: str | os.PathLike[str], *, threads_per_proc: int = 1
) -> run.Script:
    """A ``run.Script`` that trains ``cfg`` on every rank; writes ``<run_dir>/config.yaml``.

    The script's environment is that of node 0 of ``memckpt run``: node id ``node0``,
    memory under ``<checkpoint.memory.base_dir>/node0``, transfer servers on loopback,
    each rank's ``TrainResult`` in ``<run_dir>/results/rank<r>.json``.
    """
    run_dir = Path(run_dir)
    config_path = write_config(cfg, run_dir).resolve()
    result_dir = (run_dir / "results").resolve()
    result_dir.mkdir(parents=True, exist_ok=True)
    env = {
        NODE_ID_ENV: "node0",
        BASE_DIR_ENV: str(node_base_dir(cfg, 0)),
        TRANSFER_HOST_ENV: "127.0.0.1",
        "OMP_NUM_THREADS": str(threads_per_proc),
        RESULT_DIR_ENV: str(result_dir),
    }
    return run.Script(
        path=_ENTRY, m=True, entrypoint="python", args=["--config", str(config_path)], env=env
    )


def local_executor(nproc_per_node: int, **kwargs: Any) -> run.LocalExecutor:
    """``run.LocalExecutor(launcher="torchrun", ntasks_per_node=nproc_per_node, ...)``.

    torchx starts ``torchrun`` from ``PATH``: this interpreter's directory goes first,
    so a virtual environment that is not activated still runs its own torchrun.
    """
    env_vars = dict(kwargs.pop("env_vars", {}))
    path = os.environ.get("PATH", "")
    env_vars.setdefault("PATH", f"{Path(sys.executable).parent}{os.pathsep}{path}")
    return run.LocalExecutor(
        launcher="torchrun", ntasks_per_node=nproc_per_node, env_vars=env_vars, **kwargs
    )


def _config_path(task: Any) -> Path:
    args = list(getattr(task, "args", None) or [])
    if getattr(task, "path", None) != _ENTRY or "--config" not in args[:-1]:
        raise ConfigError(
            f"memckpt's NeMo-Run plugins apply to tasks made by recipe_script() "
            f"(python -m {_ENTRY} --config FILE), got {task!r}"
        )
    return Path(args[args.index("--config") + 1])


def _apply(plugin: Plugin, task: Any, executor: Any) -> None:
    """Run ``plugin.setup`` on the task's config and a spec of the executor's layout."""
    path = _config_path(task)
    cfg = from_yaml(ConfigContainer, path)
    spec = LaunchSpec(
        nnodes=executor.nnodes(), nproc_per_node=executor.nproc_per_node(), run_dir=path.parent
    )
    plugin.setup(cfg, spec)
    if any(spec.node_env.values()):
        if spec.nnodes != 1:
            raise ConfigError(
                f"{plugin.name} plugin: it sets variables per node, which a NeMo-Run executor "
                "of several nodes cannot express; use memckpt run's torchrun launcher"
            )
        spec.env.update(spec.node_env.get(0, {}))
    path.write_text(to_yaml(cfg))
    executor.env_vars.update(spec.env)
    log.info("%s plugin: %s", plugin.name, ", ".join(f"{k}={v}" for k, v in spec.env.items()))


@dataclass(kw_only=True)
class NemoRunProfilerPlugin(run.Plugin):  # type: ignore[misc]
    """``memckpt.tools.launch.ProfilerPlugin`` for NeMo-Run: trace steps ``start..start+steps-1``.

    Every rank writes ``<run_dir>/profile/rank<r>.json`` (Chrome trace format).
    """

    start: int = 5
    steps: int = 3

    def setup(self, task: Any, executor: Any) -> None:
        _apply(ProfilerPlugin(start=self.start, steps=self.steps), task, executor)


@dataclass(kw_only=True)
class NemoRunFaultInjectionPlugin(run.Plugin):  # type: ignore[misc]
    """``memckpt.tools.launch.FaultInjectionPlugin`` for NeMo-Run: SIGKILL before ``step``.

    Every process of node ``node`` (``node0`` is the only one of a ``LocalExecutor``)
    kills itself right before that step, in the first attempt only.
    """

    node: int = 0
    step: int = 30

    def setup(self, task: Any, executor: Any) -> None:
        _apply(FaultInjectionPlugin(node=self.node, step=self.step), task, executor)


def as_nemo_run_plugin(plugin: Plugin) -> run.Plugin:
    """The NeMo-Run twin of a ``memckpt.tools.launch`` plugin (profiler or fault)."""
    if isinstance(plugin, ProfilerPlugin):
        return NemoRunProfilerPlugin(start=plugin.start, steps=plugin.steps)
    if isinstance(plugin, FaultInjectionPlugin):
        return NemoRunFaultInjectionPlugin(node=plugin.node, step=plugin.step)
    raise ConfigError(
        f"plugin {getattr(plugin, 'name', plugin)!r} has no NeMo-Run form; "
        "the NeMo-Run launcher takes the profiler and fault plugins"
    )


def launch_nemo_run(
    cfg: ConfigContainer,
    spec: LaunchSpec,
    plugins: Sequence[Plugin] = (),
    *,
    quiet: bool = False,
) -> LaunchResult:
    """Run ``cfg`` through NeMo-Run's ``LocalExecutor(launcher="torchrun")``; wait for the end.

    One node of ``spec.nproc_per_node`` ranks. NeMo-Run keeps its experiment under
    ``<run_dir>/nemo_run``; the job is cancelled after ``spec.timeout_s``. The exit code
    of node 0 is 0 when NeMo-Run reports the job SUCCEEDED, else 1.
    """
    if spec.nnodes != 1:
        raise ConfigError(
            f"--launcher nemo-run runs one node (NeMo-Run's LocalExecutor), got --nnodes "
            f"{spec.nnodes}; use --nproc-per-node, or the torchrun launcher for simulated nodes"
        )
    nemo_plugins = [as_nemo_run_plugin(p) for p in plugins]
    script = recipe_script(cfg, spec.run_dir, threads_per_proc=spec.threads_per_proc)
    executor = local_executor(spec.nproc_per_node, env_vars=dict(spec.env))
    base_dir = (spec.run_dir / "nemo_run").resolve()
    t0 = time.monotonic()
    timed_out = threading.Event()
    timer: threading.Timer | None = None
    try:
        with run.Experiment(
            title=cfg.checkpoint.job_id,
            executor=executor,
            base_dir=str(base_dir),
            log_level="WARN",
            enable_goodbye_message=False,
            skip_status_at_exit=quiet,
        ) as exp:
            exp.add(script, name=_TASK, plugins=nemo_plugins, tail_logs=not quiet)
            exp.run(detach=False)

            def cancel() -> None:
                timed_out.set()
                exp.cancel(_TASK)

            timer = threading.Timer(spec.timeout_s, cancel)
            timer.daemon = True
            timer.start()
        # leaving the block waited for the job
    finally:
        if timer is not None:
            timer.cancel()
    seconds = time.monotonic() - t0
    if timed_out.is_set():
        raise MemckptError(f"the job ran past its {spec.timeout_s:.0f}s limit; cancelled")
    state = (exp.status(return_dict=True) or {}).get(_TASK, {}).get("status")
    name = getattr(state, "name", str(state))
    log.info("NeMo-Run job %s: %s in %.1fs (%s)", _TASK, name, seconds, base_dir)
    return LaunchResult({0: 0 if name == "SUCCEEDED" else 1}, seconds, spec.run_dir)
