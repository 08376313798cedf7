"""Recovery campaign harness: simulated nodes, a killed job, a wiped node, a restart.

One rank per simulated node (``MEMCKPT_NODE_ID=node<i>``, its own base directory under
the test's ``tmp_path``), gloo on 127.0.0.1. A campaign for one API runs its training
body (tests/campaign_workers.py) three times with the same arguments:

1. the reference: straight to the last step;
2. the job: SIGKILLed, every process of every rank, once each rank reports that it
   reached the plan's kill step with its saves committed (``pause_for_kill``);
3. after one node's base directory is deleted (the node was replaced), the restart:
   the same body, which resumes through the API's documented restart path.

A body is ``fn(rank, world_size, node_dir, config) -> dict`` with the default process
group already initialised; ``config`` holds ``steps``, ``every``, ``kill_step`` and
``job``. It returns ``result(...)``: the resumed step and the final tensors as bytes
(tensors put on a multiprocessing queue are shared through file descriptors that die
with the child).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import queue
import random
import shutil
import signal
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from multiproc import free_port

SEED_ENV = "MEMCKPT_CAMPAIGN_SEED"
JOB = "campaign"

# set in each rank process by _rank_main: the run's report queue and this rank
_reports: Any = None
_rank = -1


# -- the plan ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """Where one API's job is killed and which node loses its memory, drawn from a seed."""

    api: str
    seed: int
    steps: int
    every: int
    kill_step: int
    wiped_node: int

    @classmethod
    def draw(cls, api: str, default_seed: int, *, steps: int, every: int, nodes: int = 2) -> Plan:
        """Draw the kill step (after the first save) and the wiped node from the seed.

        ``$MEMCKPT_CAMPAIGN_SEED`` overrides ``default_seed``, to replay a failure.
        """
        seed = int(os.environ.get(SEED_ENV, default_seed))
        rng = random.Random(seed)
        kill_step = rng.randint(every, steps - 1)
        return cls(api, seed, steps, every, kill_step, rng.randrange(nodes))

    @property
    def resume_step(self) -> int:
        """The newest step committed when the job dies: the restart must resume from it."""
        return self.kill_step // self.every * self.every

    def config(self, *, kill: bool) -> dict[str, Any]:
        """What the training body is given."""
        return {
            "steps": self.steps,
            "every": self.every,
            "kill_step": self.kill_step if kill else None,
            "job": JOB,
        }

    def __str__(self) -> str:
        return (
            f"campaign {self.api}: seed {self.seed}, {self.steps} steps saving every "
            f"{self.every}, kill at step {self.kill_step} (resume from {self.resume_step}), "
            f"wipe node{self.wiped_node}; replay with {SEED_ENV}={self.seed}"
        )


# -- what a rank reports -----------------------------------------------------------------------


def pause_for_kill(step: int) -> None:
    """Report that this rank reached the kill step, its saves committed; wait to be killed."""
    _reports.put((_rank, "paused", step))
    while True:
        time.sleep(60)


def snapshot(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """Tensors as (dtype, shape, raw bytes), to cross a process boundary bit for bit."""
    out = {}
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        out[name] = (
            str(t.dtype).removeprefix("torch."),
            tuple(t.shape),
            t.reshape(-1).view(torch.uint8).numpy().tobytes(),
        )
    return out


def tensors(snap: Mapping[str, tuple[str, tuple[int, ...], bytes]]) -> dict[str, torch.Tensor]:
    """The tensors of a ``snapshot``."""
    out = {}
    for name, (dtype, shape, raw) in snap.items():
        flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0)
        out[name] = flat.view(getattr(torch, dtype)).reshape(shape)
    return out


def result(
    resumed: int | None, step: int, state: Mapping[str, torch.Tensor], **extra: Any
) -> dict[str, Any]:
    """What a training body returns: the step it resumed from, where it ended, its tensors."""
    return {"resumed": resumed, "step": step, "tensors": snapshot(state), **extra}


def optimizer_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Every tensor of the optimizer's state, and each group's learning rate."""
    sd = opt.state_dict()
    out = {
        f"optim.{pid}.{k}": v
        for pid, st in sd["state"].items()
        for k, v in st.items()
        if isinstance(v, torch.Tensor)
    }
    for i, group in enumerate(sd["param_groups"]):
        out[f"optim.group{i}.lr"] = torch.tensor(float(group["lr"]), dtype=torch.float64)
    return out


def holds_manifest(node_dir: str | os.PathLike[str], step: int, job: str = JOB) -> bool:
    """Whether this node holds the committed manifest of ``step``."""
    return (Path(node_dir) / job / f"step-{step}" / "manifest.json").is_file()


def committed_steps(node_dir: str | os.PathLike[str], job: str = JOB) -> list[int]:
    """The steps whose manifest (written at the global commit) this node holds."""
    d = Path(node_dir) / job
    if not d.is_dir():
        return []
    steps = (p.name.removeprefix("step-") for p in d.glob("step-*") if p.is_dir())
    return sorted(int(s) for s in steps if s.isdigit() and holds_manifest(node_dir, int(s), job))


# -- processes -----------------------------------------------------------------------------------


def _rank_main(
    fn: Callable[..., Any],
    rank: int,
    world: int,
    node_dir: str,
    env: dict[str, str],
    args: tuple[Any, ...],
    reports: Any,
) -> None:
    global _reports, _rank
    # its own process group, so the kill reaches whatever the rank forks (Megatron's
    # checkpoint process) as a job kill would
    os.setpgid(0, 0)
    os.environ.update(env)
    _reports, _rank = reports, rank
    import torch.distributed as dist

    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        reports.put((rank, "done", fn(rank, world, node_dir, *args)))
    except BaseException as e:
        reports.put((rank, "error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    # the report is all the campaign needs from a rank that finished; skipping the
    # interpreter's teardown (torch's C++ state: seconds on 2 loaded cores) keeps it cheap
    reports.close()
    reports.join_thread()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


class SimulatedCluster:
    """``nodes`` simulated nodes of one rank each under ``root``; a context manager.

    Every exit kills whatever processes are left (with their children) and deletes
    ``root``, whether the campaign passed or not.
    """

    def __init__(self, root: Path, nodes: int = 2) -> None:
        self.root = Path(root)
        self.nodes = nodes
        self._procs: list[Any] = []
        for n in range(nodes):
            self.node_dir(n).mkdir(parents=True, exist_ok=True)

    def node_dir(self, node: int) -> Path:
        return self.root / f"node{node}"

    def node_env(self, node: int, port: int) -> dict[str, str]:
        """The environment of node ``node``'s single rank, as torchrun would set it."""
        return {
            "MEMCKPT_NODE_ID": f"node{node}",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(node),
            "WORLD_SIZE": str(self.nodes),
            "LOCAL_RANK": "0",
            "LOCAL_WORLD_SIZE": "1",
            "GROUP_RANK": str(node),
            "NODE_RANK": str(node),
            "OMP_NUM_THREADS": "1",  # two ranks share two cores with other test runs
        }

    def _start(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        self._kill_all()
        ctx = mp.get_context("spawn")
        reports = ctx.Queue()
        port = free_port()
        for n in range(self.nodes):
            rank_args = (fn, n, self.nodes, str(self.node_dir(n)), self.node_env(n, port), args)
            p = ctx.Process(target=_rank_main, args=(*rank_args, reports))
            p.start()
            self._procs.append(p)
        return reports

    def _collect(self, reports: Any, want: str, timeout: float) -> dict[int, Any]:
        """Every rank's report of kind ``want``; AssertionError on anything else."""
        out: dict[int, Any] = {}
        deadline = time.monotonic() + timeout
        while len(out) < self.nodes:
            left = deadline - time.monotonic()
            if left <= 0:
                missing = sorted(set(range(self.nodes)) - set(out))
                raise AssertionError(f"ranks {missing} sent no {want!r} report in {timeout}s")
            try:
                rank, kind, value = reports.get(timeout=min(left, 0.5))
            except queue.Empty:
                gone = {r: p.exitcode for r, p in enumerate(self._procs) if not p.is_alive()}
                if not gone:
                    continue
                try:  # a rank that reported and exited: its report may only now be readable
                    rank, kind, value = reports.get(timeout=1.0)
                except queue.Empty:
                    raise AssertionError(
                        f"ranks ended without a report: exit codes {gone}"
                    ) from None
            if kind != want:
                raise AssertionError(f"rank {rank} sent {kind!r}, expected {want!r}:\n{value}")
            out[rank] = value
        return out

    def run(self, fn: Callable[..., Any], *args: Any, timeout: float) -> dict[int, Any]:
        """Run ``fn`` on every node to its end; {rank: what it returned}."""
        reports = self._start(fn, args)
        try:
            out = self._collect(reports, "done", timeout)
            for p in self._procs:
                p.join(timeout=10)
            return out
        finally:
            self._kill_all()
            reports.close()

    def run_until_killed(
        self, fn: Callable[..., Any], *args: Any, timeout: float
    ) -> dict[int, int]:
        """Run ``fn`` until every rank pauses at its kill step, then SIGKILL every process.

        Returns {rank: the step it paused at}.
        """
        reports = self._start(fn, args)
        try:
            paused = self._collect(reports, "paused", timeout)
            procs = list(self._procs)
            self._kill_all()
            codes = [p.exitcode for p in procs]
            assert codes == [-signal.SIGKILL] * self.nodes, f"exit codes after the kill: {codes}"
            return paused
        finally:
            self._kill_all()
            reports.close()

    def wipe(self, node: int) -> None:
        """Node ``node`` is replaced: its base directory, and so its memory, is gone."""
        shutil.rmtree(self.node_dir(node))

    def _kill_all(self) -> None:
        for p in self._procs:
            if p.pid is None:
                continue
            # gone already, or it died before it made its own group: kill() below
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)
            if p.is_alive():
                p.kill()
        for p in self._procs:
            p.join(timeout=10)
        self._procs = []

    def close(self) -> None:
        self._kill_all()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> SimulatedCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- one campaign -------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What the three runs of one campaign returned, per rank."""

    plan: Plan
    reference: dict[int, Any]
    committed_at_kill: dict[int, list[int]]
    restarted: dict[int, Any]
    seconds: dict[str, float]


def run_campaign(
    tmp_path: Path, plan: Plan, fn: Callable[..., Any], *, timeout: float = 45.0
) -> Outcome:
    """Reference run, killed run, wipe of ``plan.wiped_node``, restart (each within ``timeout``)."""
    seconds: dict[str, float] = {}
    t0 = time.monotonic()
    with SimulatedCluster(tmp_path / "reference") as cluster:
        reference = cluster.run(fn, plan.config(kill=False), timeout=timeout)
    seconds["reference"] = time.monotonic() - t0
    with SimulatedCluster(tmp_path / "job") as cluster:
        t0 = time.monotonic()
        paused = cluster.run_until_killed(fn, plan.config(kill=True), timeout=timeout)
        seconds["killed"] = time.monotonic() - t0
        assert paused == dict.fromkeys(range(cluster.nodes), plan.kill_step), paused
        committed = {n: committed_steps(cluster.node_dir(n)) for n in range(cluster.nodes)}
        cluster.wipe(plan.wiped_node)
        t0 = time.monotonic()
        restarted = cluster.run(fn, plan.config(kill=False), timeout=timeout)
        seconds["restart"] = time.monotonic() - t0
    print("campaign runs took " + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()))
    return Outcome(plan, reference, committed, restarted, seconds)


def assert_resumed_bit_identical(out: Outcome) -> None:
    """The restart resumed from the newest step committed at the kill and ended as the reference."""
    plan = out.plan
    # the kill came after that step's commit, and before any newer one
    for node, steps in out.committed_at_kill.items():
        assert steps and steps[-1] == plan.resume_step, (node, steps)
    for rank, ref in out.reference.items():
        got = out.restarted[rank]
        assert ref["resumed"] is None and ref["step"] == plan.steps, (rank, ref["resumed"])
        assert got["resumed"] == plan.resume_step, (rank, got["resumed"], str(plan))
        assert got["step"] == plan.steps, (rank, got["step"])
        want, have = tensors(ref["tensors"]), tensors(got["tensors"])
        assert want.keys() == have.keys(), (rank, sorted(want), sorted(have))
        differ = [k for k in want if not torch.equal(want[k], have[k])]
        assert not differ, f"rank {rank}: {differ} differ from the reference ({plan})"
