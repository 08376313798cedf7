"""Launch a recipe with torchrun: simulated nodes on this machine, or an sbatch script.

``memckpt run RECIPE [overrides] --nnodes N --nproc-per-node P`` writes the merged
config to ``<run_dir>/config.yaml`` and starts one ``torch.distributed.run`` agent
per simulated node (static rendezvous on 127.0.0.1). Each node gets its own memory
directory (``MEMCKPT_BASE_DIR=<base_dir>/node<i>``) and node id
(``MEMCKPT_NODE_ID=node<i>``), so replication and node loss behave as on separate
machines. The workers run ``python -m memckpt.recipes.entry --config config.yaml``,
the same entry a real multi-node torchrun uses; ``--slurm`` writes the sbatch
script that wraps that torchrun in ``srun`` on a cluster.

The config is checked whole before anything starts (``memckpt.recipes.validate``).
Every rank also logs to ``<run_dir>/logs/rank<r>.log`` (``MEMCKPT_LOG_DIR``); when a
run fails, :func:`explain_failure` reads the first error line of the rank that failed
first from there, and says whether re-running resumes (:func:`resume_point`: a complete
checkpoint of the job in memory or on the persistent tier).

Plugins adjust the config and the environment before launch, like NeMo-Run
plugins: :class:`ProfilerPlugin` and :class:`FaultInjectionPlugin`.
``memckpt.tools.nemo_run`` launches through NeMo-Run instead and wraps both as
``run.Plugin``s (the ``nemo-run`` extra).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from memckpt.errors import ConfigError, MemckptError
from memckpt.recipes.config import ConfigContainer
from memckpt.settings import (
    BASE_DIR_ENV,
    KILL_AT_STEP_ENV,
    KILL_NODE_ENV,
    LOG_DIR_ENV,
    NODE_ID_ENV,
    PROFILE_DIR_ENV,
    PROFILE_STEPS_ENV,
    RESULT_DIR_ENV,
    SECRET_ENV,
    TRANSFER_HOST_ENV,
)

__all__ = [
    "FailureReport",
    "FaultInjectionPlugin",
    "LaunchResult",
    "LaunchSpec",
    "Plugin",
    "ProfilerPlugin",
    "ResumePoint",
    "explain_failure",
    "launch_local",
    "plugin_from_spec",
    "resume_point",
    "sbatch_script",
    "torchrun_command",
]

log = logging.getLogger(__name__)


@dataclass
class LaunchSpec:
    """Where and how to launch; plugins may edit ``env`` and ``node_env``."""

    nnodes: int = 1
    nproc_per_node: int = 1
    run_dir: Path = Path("runs/latest")
    master_port: int = 0  # 0: pick a free one
    env: dict[str, str] = field(default_factory=dict)  # every node
    node_env: dict[int, dict[str, str]] = field(default_factory=dict)  # one node
    timeout_s: float = 1800.0
    threads_per_proc: int = 1

    def __post_init__(self) -> None:
        for name in ("nnodes", "nproc_per_node"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be an integer >= 1, got {v!r}")
        self.run_dir = Path(self.run_dir)


class Plugin(Protocol):
    """Adjusts the config and the launch environment before the job starts."""

    name: str

    def setup(self, cfg: ConfigContainer, spec: LaunchSpec) -> None: ...


@dataclass
class ProfilerPlugin:
    """Profile steps ``start .. start+steps-1`` with torch.profiler on every rank.

    Rank r writes a Chrome trace to ``<run_dir>/profile/rank<r>.json`` (open it in
    https://ui.perfetto.dev or chrome://tracing).
    """

    start: int = 5
    steps: int = 3
    name: str = "profiler"

    def setup(self, cfg: ConfigContainer, spec: LaunchSpec) -> None:
        spec.env[PROFILE_DIR_ENV] = str((spec.run_dir / "profile").resolve())
        spec.env[PROFILE_STEPS_ENV] = f"{self.start}:{self.steps}"


@dataclass
class FaultInjectionPlugin:
    """Kill every process of node ``node`` (SIGKILL) right before step ``step``.

    Armed only in a first run (restart count 0), so the relaunched job goes on; the
    launcher of the demo also wipes that node's memory directory.
    """

    node: int = 1
    step: int = 30
    name: str = "fault"

    def setup(self, cfg: ConfigContainer, spec: LaunchSpec) -> None:
        if not 0 <= self.node < spec.nnodes:
            raise ConfigError(f"fault plugin: node {self.node} is not one of 0..{spec.nnodes - 1}")
        if not 1 <= self.step <= cfg.train.steps:
            raise ConfigError(f"fault plugin: step {self.step} is outside 1..{cfg.train.steps}")
        spec.env[KILL_AT_STEP_ENV] = str(self.step)
        spec.env[KILL_NODE_ENV] = f"node{self.node}"


_PLUGINS = {"profiler": ProfilerPlugin, "fault": FaultInjectionPlugin}


def plugin_from_spec(text: str) -> Plugin:
    """``profiler`` / ``profiler:start=5,steps=3`` / ``fault:node=1,step=30``."""
    name, _, args = text.partition(":")
    cls = _PLUGINS.get(name.strip())
    if cls is None:
        raise ConfigError(f"unknown plugin {name!r}; known: {', '.join(sorted(_PLUGINS))}")
    kwargs: dict[str, int] = {}
    for item in filter(None, (a.strip() for a in args.split(","))):
        key, eq, value = item.partition("=")
        fields = [f for f in cls.__dataclass_fields__ if f != "name"]
        if not eq or key not in fields:
            raise ConfigError(f"plugin {name}: bad argument {item!r}; takes {', '.join(fields)}")
        try:
            kwargs[key] = int(value)
        except ValueError:
            raise ConfigError(f"plugin {name}: {key} must be an integer, got {value!r}") from None
    return cls(**kwargs)  # type: ignore[arg-type]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torchrun_command(
    config_path: str | os.PathLike[str],
    *,
    nnodes: int | str,
    nproc_per_node: int,
    node_rank: int | str,
    master_addr: str,
    master_port: int | str,
    python: str = sys.executable,
) -> list[str]:
    """The torchrun invocation of one node (static rendezvous)."""
    return [
        python, "-m", "torch.distributed.run",
        f"--nnodes={nnodes}", f"--nproc-per-node={nproc_per_node}",
        f"--node-rank={node_rank}", f"--master-addr={master_addr}",
        f"--master-port={master_port}", "--max-restarts=0",
        "-m", "memckpt.recipes.entry", "--config", str(config_path),
    ]  # fmt: skip


@dataclass
class LaunchResult:
    returncodes: dict[int, int]  # node -> exit code of its torchrun agent
    seconds: float
    run_dir: Path
    timed_out: bool = False  # ran past LaunchSpec.timeout_s and was killed
    started_unix: float = 0.0  # when the launch began (rank logs older than it are ignored)

    @property
    def ok(self) -> bool:
        return not self.timed_out and all(rc == 0 for rc in self.returncodes.values())


def write_config(cfg: ConfigContainer, run_dir: Path) -> Path:
    from memckpt.recipes.overrides import to_yaml

    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.yaml"
    path.write_text(to_yaml(cfg))
    return path


def node_base_dir(cfg: ConfigContainer, node: int) -> Path:
    return Path(cfg.checkpoint.memory.base_dir) / f"node{node}"


def launch_local(
    cfg: ConfigContainer,
    spec: LaunchSpec,
    plugins: Sequence[Plugin] = (),
    *,
    quiet: bool = False,
) -> LaunchResult:
    """Run ``cfg`` on ``spec.nnodes`` simulated nodes of this machine; wait for the end.

    The config is checked first (ConfigError, nothing started). If one node's agent
    fails, the others get up to ``cfg.dist.timeout_s`` to notice and are then killed.
    A job still running after ``spec.timeout_s`` is killed (``timed_out``). Every
    process is killed on the way out, even on Ctrl-C.
    """
    from memckpt.recipes.validate import check_config

    for p in plugins:
        p.setup(cfg, spec)
    check_config(cfg)
    config_path = write_config(cfg, spec.run_dir).resolve()
    port = spec.master_port or _free_port()
    result_dir = (spec.run_dir / "results").resolve()
    result_dir.mkdir(parents=True, exist_ok=True)
    log_dir = str((spec.run_dir / "logs").resolve())
    procs: dict[int, subprocess.Popen[bytes]] = {}
    logs = []
    started = time.time()
    t0 = time.monotonic()
    timed_out = False
    try:
        for node in range(spec.nnodes):
            env = dict(os.environ)
            env.update(
                {
                    NODE_ID_ENV: f"node{node}",
                    BASE_DIR_ENV: str(node_base_dir(cfg, node)),
                    TRANSFER_HOST_ENV: "127.0.0.1",
                    "OMP_NUM_THREADS": str(spec.threads_per_proc),
                    RESULT_DIR_ENV: str(result_dir),
                    LOG_DIR_ENV: log_dir,
                }
            )
            env.update(spec.env)
            env.update(spec.node_env.get(node, {}))
            cmd = torchrun_command(config_path, nnodes=spec.nnodes,
                                   nproc_per_node=spec.nproc_per_node, node_rank=node,
                                   master_addr="127.0.0.1", master_port=port)  # fmt: skip
            log.info("node %d: %s", node, shlex.join(cmd))
            out = open(spec.run_dir / f"node{node}.log", "ab")  # noqa: SIM115
            logs.append(out)
            procs[node] = subprocess.Popen(
                cmd,
                env=env,
                stdout=out if quiet or node > 0 else None,
                stderr=subprocess.STDOUT if quiet or node > 0 else None,
                start_new_session=True,
            )
        codes: dict[int, int] = {}
        first_fail: float | None = None
        grace = cfg.dist.timeout_s + 30
        while len(codes) < len(procs):
            for node, p in procs.items():
                if node not in codes and p.poll() is not None:
                    codes[node] = p.returncode
                    if p.returncode != 0 and first_fail is None:
                        first_fail = time.monotonic()
                        log.warning("node %d exited with %d", node, p.returncode)
            now = time.monotonic()
            if now - t0 > spec.timeout_s:
                log.warning("the job ran past its %.0fs limit; killing it", spec.timeout_s)
                timed_out = True
                break
            if first_fail is not None and now - first_fail > grace:
                log.warning("killing nodes still running %.0fs after a node failed", grace)
                break
            time.sleep(0.1)
        for node, p in procs.items():
            if node not in codes:
                _kill_group(p)
                codes[node] = p.wait()
        return LaunchResult(codes, time.monotonic() - t0, spec.run_dir, timed_out, started)
    finally:
        for p in procs.values():
            if p.poll() is None:
                _kill_group(p)
        for f in logs:
            f.close()


def _descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (Linux ``/proc``; empty elsewhere)."""
    if not os.path.isdir("/proc"):
        return []
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()  # after "pid (comm) ": state, ppid
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def _kill_group(p: subprocess.Popen[bytes]) -> None:
    """SIGKILL a node's torchrun agent and every process under it.

    The agent starts each rank in a session of its own, so killing the agent's process
    group alone would leave the ranks running (and writing to the terminal).
    """
    ranks = _descendants(p.pid)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(p.pid, signal.SIGKILL)
    own = os.getpgrp()
    for pid in ranks:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            group = os.getpgid(pid)
            if group != own:
                os.killpg(group, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        p.wait(timeout=10)


@dataclass(frozen=True)
class ResumePoint:
    """Where a re-run of the job would start: the newer complete checkpoint of its tiers."""

    tier: str | None  # "memory", "persistent", or None: it starts from step 0
    step: int | None
    memory_step: int | None  # newest complete step in the nodes' memory directories
    persistent_step: int | None  # newest complete persistent step
    note: str  # one line: "re-running resumes from step 20 (memory tier, ...)"


def resume_point(cfg: ConfigContainer, nnodes: int) -> ResumePoint:
    """Where re-running ``cfg`` on ``nnodes`` simulated nodes resumes (reads both tiers).

    Memory: a step is complete when its manifest and every rank's object are found,
    valid, in the nodes' directories (``memckpt ls`` over all of them), or drained to
    ``checkpoint.memory.persist_dir`` (the newer of the two); persistent: the
    newest complete DCP step. The newer wins, memory on a tie (the workers' rule).
    """
    from memckpt.recipes.checkpointing import (
        choose_resume_tier,
        latest_persistent_step,
        persistent_job_dir,
    )
    from memckpt.tools.catalog import scan_job

    ckpt = cfg.checkpoint
    job = ckpt.job_id
    nodes = "node0" if nnodes == 1 else f"node<0..{nnodes - 1}>"
    mem_where = str(Path(ckpt.memory.base_dir) / nodes / job)
    pers_dir = persistent_job_dir(ckpt)
    memory_step = persistent_step = None
    if ckpt.memory.enabled:
        try:
            steps = scan_job(*(node_base_dir(cfg, n) / job for n in range(nnodes)))
            memory_step = max((s.step for s in steps if s.complete), default=None)
        except (MemckptError, OSError) as e:
            log.warning("cannot read the memory tier of job %r (%s): %s", job, mem_where, e)
    durable = ckpt.memory.persist_dir if ckpt.memory.enabled else None
    durable_step = None
    if durable:  # the memory tier's drains: a restart resumes from it when it is newer
        try:
            durable_step = _newest_drained(durable, job)
        except (MemckptError, OSError) as e:
            log.warning("cannot read the durable tier of job %r (%s): %s", job, durable, e)
        if durable_step is not None and (memory_step is None or durable_step > memory_step):
            memory_step, mem_where = durable_step, f"{durable} (durable)"
    if ckpt.persistent.enabled:
        try:
            persistent_step = latest_persistent_step(pers_dir)
        except (MemckptError, OSError) as e:
            log.warning("cannot read the persistent tier of job %r (%s): %s", job, pers_dir, e)
    if not ckpt.resume:
        return ResumePoint(None, None, memory_step, persistent_step,
                           "re-running starts from step 0: checkpoint.resume is false")  # fmt: skip
    tier = choose_resume_tier(memory_step, persistent_step)
    if tier is not None:
        step = memory_step if tier == "memory" else persistent_step
        where = mem_where if tier == "memory" else str(pers_dir)
        note = f"re-running resumes from step {step} ({tier} tier, {where})"
        return ResumePoint(tier, step, memory_step, persistent_step, note)
    mem = f"in memory ({mem_where})" if ckpt.memory.enabled else "in memory (tier off)"
    pers = f"on disk ({pers_dir})" if ckpt.persistent.enabled else "on disk (tier off)"
    note = f"re-running starts from step 0: no complete checkpoint of job {job!r} {mem} or {pers}"
    return ResumePoint(None, None, memory_step, persistent_step, note)


def _newest_drained(persist_dir: str, job: str) -> int | None:
    """The newest step of ``job`` the memory tier drained to ``persist_dir`` (path or URL;
    credentials and endpoint from the environment, as the workers have them)."""
    from memckpt.engine.drain import persisted_steps
    from memckpt.storage.remote import RemoteTier, resolve_location

    where = resolve_location(persist_dir)
    if isinstance(where, str):
        quick = None  # a note after a failure: never minutes of retries against a dead store
        if where.startswith(("s3://", "s3a://")):
            quick = {"config_kwargs": {"connect_timeout": 5, "read_timeout": 15,
                                       "retries": {"max_attempts": 2}}}  # fmt: skip
        return max(RemoteTier(where, job, quick).persisted_steps(), default=None)
    return max(persisted_steps(where, job), default=None)


@dataclass(frozen=True)
class FailureReport:
    """Why a launch failed (one line) and whether re-running resumes."""

    why: str
    rank: int | None  # the rank whose error line ``why`` quotes
    log: Path | None  # that rank's log
    resume: ResumePoint


def explain_failure(cfg: ConfigContainer, spec: LaunchSpec, result: LaunchResult) -> FailureReport:
    """Why ``result`` failed: the earliest error line any rank logged during this launch
    (``<run_dir>/logs/rank<r>.log``), the timeout, or the agents' exit codes."""
    from memckpt.recipes.rank_log import first_failure

    failure = first_failure(spec.run_dir / "logs", since=result.started_unix)
    parts = []
    if result.timed_out:
        parts.append(f"the job ran past its --timeout of {spec.timeout_s:g} s and was killed")
    if failure is not None:
        parts.append(f"rank {failure.rank}: {failure.why}")
    elif not result.timed_out:
        bad = sorted((n, rc) for n, rc in result.returncodes.items() if rc != 0)
        codes = ", ".join(f"node {n} exited with {rc}" for n, rc in bad) or "no node failed"
        parts.append(
            f"{codes}; no rank logged an error (a rank killed by a signal, such as the fault "
            "plugin's or the OOM killer's, logs none: torchrun's report names it)"
        )
    return FailureReport(
        "; ".join(parts),
        failure.rank if failure is not None else None,
        failure.log if failure is not None else None,
        resume_point(cfg, spec.nnodes),
    )


def sbatch_script(
    cfg: ConfigContainer,
    config_path: str | os.PathLike[str],
    *,
    nnodes: int,
    nproc_per_node: int,
    job_name: str | None = None,
    time_limit: str = "04:00:00",
    partition: str | None = None,
    master_port: int = 29500,
    python: str = "python",
) -> str:
    """An sbatch script: one srun task per node, each running torchrun for its node.

    The memory tier stays on each node's tmpfs (``checkpoint.memory.base_dir``); the
    node id is the host name plus ``SLURM_NODEID``; the secret is generated on rank 0.
    """
    name = job_name or cfg.checkpoint.job_id
    torchrun = torchrun_command(
        config_path, nnodes="$SLURM_NNODES", nproc_per_node=nproc_per_node,
        node_rank="$SLURM_NODEID", master_addr="$MASTER_ADDR", master_port=master_port,
        python=python,
    )  # fmt: skip
    # $VARS must expand on each node inside srun, so the command is single-quoted for bash -c
    inner = " ".join(a if a.startswith("--node-rank") or "$" in a else shlex.quote(a)
                     for a in torchrun)  # fmt: skip
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={name}",
        f"#SBATCH --nodes={nnodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --time={time_limit}",
        "#SBATCH --signal=TERM@120",
    ]
    if partition:
        lines.append(f"#SBATCH --partition={partition}")
    lines += [
        "set -euo pipefail",
        "",
        "# the first node hosts the rendezvous; every rank reaches the others through it",
        'export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
        "# replicas go to other nodes: the node id must differ per node",
        f"export {SECRET_ENV}=\"${{{SECRET_ENV}:-$(python -c 'import secrets; "
        "print(secrets.token_hex(32))')}\"",
        "",
        "srun --kill-on-bad-exit=1 bash -c "
        + shlex.quote(f'{NODE_ID_ENV}="$(hostname)/$SLURM_NODEID" exec {inner}'),
        "",
    ]
    return "\n".join(lines)
