"""The main job: train, lose a node, recover it from its peer, finish bit-identical.

``memckpt demo`` runs ``gpt_tiny`` on 2 simulated nodes (1 rank each) three times
through the real launcher (torchrun, gloo, one transfer server per rank):

1. reference: uninterrupted, to the end;
2. interrupted: the fault plugin SIGKILLs node 1 right before step K; node 0 sees
   its peer vanish and stops; then node 1's memory directory is wiped;
3. restart: the same job again; rank 0 resumes from its own memory, rank 1 fetches
   its lost state from node 0, and training finishes.

With ``persist`` (``memckpt demo --persist s3://bucket/prefix``) the job's memory saves also
drain to that durable tier (``checkpoint.memory.persist_dir``), and before the restart *both*
nodes' memory is wiped: the restart restores every rank from the durable tier. The job id is
fresh (``demo-<hex>``), so an earlier demo's steps in the store are never resumed; its steps
are deleted from the store at the end unless ``keep``. Credentials and endpoint come from the
environment (``AWS_*``, ``AWS_ENDPOINT_URL``), as for training.

Then it compares the final weights with the reference (they must be identical),
prints a summary, and plots both loss curves to ``loss.png`` (without matplotlib:
a one-line note, no plot).

The memory tiers live in a fresh directory on ``/dev/shm``, deleted at the end (the
summary says so). ``keep=True`` (``memckpt demo --keep``) keeps the job's tree, with
the restarted run's steps in it (that run keeps its memory tier instead of handing it
back once persisted), and the summary ends with the ``memckpt status`` command that
shows it.

``device="cuda"`` trains each simulated node on a GPU of its own (NCCL; memckpt's
collectives stay on gloo and its saves stage through pinned memory); ``"auto"`` does
so when there are GPUs for both nodes, else trains on the CPU.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from memckpt.errors import MemckptError
from memckpt.settings import RESTART_COUNT_ENV

__all__ = ["DEVICES", "DemoPlacement", "DemoReport", "choose_demo_placement", "run_demo"]

log = logging.getLogger(__name__)

NODES: Final = 2  # simulated nodes, one rank each
DEVICES: Final = ("cpu", "cuda", "auto")
CUDA_VISIBLE_DEVICES_ENV: Final = "CUDA_VISIBLE_DEVICES"


@dataclass(frozen=True)
class DemoPlacement:
    """Where the demo trains: ``dist.backend`` and each simulated node's extra environment."""

    device: str  # "cpu" or "cuda"
    backend: str  # "gloo" or "nccl"
    node_env: dict[int, dict[str, str]]


def choose_demo_placement(
    device: str, *, cuda_available: bool, visible_gpus: Sequence[str], nodes: int = NODES
) -> DemoPlacement:
    """The placement of ``--device`` on a machine whose visible GPUs are ``visible_gpus``.

    ``cuda`` gives simulated node ``i`` the GPU ``visible_gpus[i]`` alone
    (``CUDA_VISIBLE_DEVICES``): NCCL needs a GPU per rank, so it needs ``nodes`` GPUs.
    ``auto`` takes ``cuda`` when that holds, else ``cpu``.
    """
    if device not in DEVICES:
        raise MemckptError(f"--device must be one of {', '.join(DEVICES)}, got {device!r}")
    enough = cuda_available and len(visible_gpus) >= nodes
    if device == "cpu" or (device == "auto" and not enough):
        return DemoPlacement("cpu", "gloo", {})
    if not cuda_available or not visible_gpus:
        raise MemckptError(
            "--device cuda: torch sees no GPU here (torch.cuda.is_available() is False); "
            "run with --device cpu, or --device auto (the GPUs where 2 are visible, else the CPU)"
        )
    if not enough:
        raise MemckptError(
            f"--device cuda: the demo's {nodes} simulated nodes need a GPU each (NCCL does "
            f"not share a GPU between ranks), and {len(visible_gpus)} is visible; "
            "run with --device cpu"
        )
    env = {i: {CUDA_VISIBLE_DEVICES_ENV: visible_gpus[i]} for i in range(nodes)}
    return DemoPlacement("cuda", "nccl", env)


def _visible_gpus(environ: Mapping[str, str]) -> tuple[bool, list[str]]:
    """Whether CUDA works here, and the ids of the GPUs this process may hand out."""
    import torch

    if not torch.cuda.is_available():
        return False, []
    count = torch.cuda.device_count()
    listed = [d.strip() for d in environ.get(CUDA_VISIBLE_DEVICES_ENV, "").split(",") if d.strip()]
    return True, (listed if len(listed) == count else [str(i) for i in range(count)])


@dataclass
class DemoReport:
    steps: int
    kill_step: int
    memory_interval: int
    recovered_step: int | None
    tier: str | None
    sources: dict[int, int]
    recovery_s: float | None
    identical: bool
    reference_sha256: str
    final_sha256: str
    run_seconds: dict[str, float]
    plot: str | None
    out_dir: str
    device: str = "cpu"
    final_loss: float | None = None
    first_loss: float | None = None
    notes: list[str] = field(default_factory=list)
    memory_tree: str | None = None  # the job's memory tier: one base directory per node
    kept: bool = False  # whether memory_tree is still there
    persist: str | None = None  # the durable tier's URL (--persist): both nodes lost memory
    persisted_job: str | None = None  # where the job's steps were in it

    @property
    def status_command(self) -> str | None:
        """The command that shows the kept memory tree (None when it was deleted)."""
        if not self.kept or self.memory_tree is None:
            return None
        nodes = " ".join(str(Path(self.memory_tree) / f"node{i}") for i in range(NODES))
        return f"memckpt status {nodes}"

    @property
    def steps_lost(self) -> int | None:
        """Steps computed before the kill that had to be computed again."""
        if self.recovered_step is None:
            return None
        return self.kill_step - 1 - self.recovered_step

    @property
    def ok(self) -> bool:
        if self.persist is not None:  # every node lost its memory: only the store had it
            return self.identical and self.tier == "durable"
        fetched = any(src != r for r, src in self.sources.items())
        return self.identical and self.tier == "memory" and fetched

    def as_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items()}
        d["steps_lost"] = self.steps_lost
        d["ok"] = self.ok
        d["status_command"] = self.status_command
        return d


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _plot(runs: dict[str, list[dict[str, Any]]], kill_step: int, recovered: int | None,
          path: Path) -> str | None:  # fmt: skip
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed (pip install 'memckpt[recipes]'); no plot")
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    styles = {
        "reference": {"color": "0.6", "lw": 3, "label": "uninterrupted reference"},
        "interrupted": {"color": "tab:red", "lw": 1.3, "label": "run killed at node loss"},
        "resumed": {"color": "tab:blue", "lw": 1.3, "label": "resumed from peer memory"},
    }
    for name, rows in runs.items():
        pts = [(r["step"], r["loss"]) for r in rows if "step" in r and "loss" in r]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, **styles[name])
    ax.axvline(kill_step, color="tab:red", ls="--", lw=1)
    ax.text(kill_step, ax.get_ylim()[1], f" node 1 lost before step {kill_step}", va="top",
            color="tab:red", fontsize=8)  # fmt: skip
    if recovered is not None:
        ax.axvline(recovered, color="tab:blue", ls=":", lw=1)
        ax.text(recovered, ax.get_ylim()[0], f" resumed at step {recovered}", va="bottom",
                color="tab:blue", fontsize=8)  # fmt: skip
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (char-level GPT)")
    ax.set_title("memckpt demo: node loss and recovery from peer memory")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def _weights_equal(a: str, b: str) -> bool:
    import torch

    wa = torch.load(a, map_location="cpu", weights_only=True)
    wb = torch.load(b, map_location="cpu", weights_only=True)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def run_demo(
    out_dir: str | os.PathLike[str] = "memckpt-demo",
    *,
    steps: int = 200,
    kill_step: int | None = None,
    memory_interval: int = 10,
    quiet: bool = True,
    device: str = "cpu",
    keep: bool = False,
    persist: str | None = None,
) -> DemoReport:
    """Run the three launches described in the module docstring; return the report.

    ``device``: "cpu", "cuda" or "auto" (``choose_demo_placement``). ``keep`` keeps the
    job's memory tree (``report.memory_tree``), also when the demo fails, and with
    ``persist`` the job's steps in the store. ``persist``: a durable tier's URL or path.
    """
    from memckpt.recipes import build_config
    from memckpt.recipes.overrides import quote_value
    from memckpt.tools.launch import FaultInjectionPlugin, LaunchSpec, launch_local

    if persist is not None:
        from memckpt.engine.drain import check_persist

        check_persist(None, persist)  # a bad scheme or a missing package: before any run
    job_id = "demo" if persist is None else f"demo-{uuid.uuid4().hex[:8]}"
    if steps < 3 * memory_interval:
        raise MemckptError(
            f"--steps {steps} must be at least 3 memory intervals "
            f"(3 x --interval {memory_interval} = {3 * memory_interval})"
        )
    if device == "cpu":  # no CUDA initialisation in this process
        placement = choose_demo_placement("cpu", cuda_available=False, visible_gpus=[])
    else:
        available, gpus = _visible_gpus(os.environ)
        placement = choose_demo_placement(device, cuda_available=available, visible_gpus=gpus)
        if placement.device == "cpu" and gpus:
            log.warning("demo: %d GPU visible, %d needed (one per node); training on the CPU",
                        len(gpus), NODES)  # fmt: skip
    log.info("demo: training on %s (%s)", placement.device, placement.backend)
    kill = kill_step if kill_step is not None else (steps * 3 // 5) + memory_interval // 2 + 1
    out = Path(out_dir).resolve()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    shm_root = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    mem_root = Path(tempfile.mkdtemp(prefix="memckpt-demo-", dir=shm_root))
    run_seconds: dict[str, float] = {}

    def config(name: str, *extra: str) -> Any:
        return build_config(
            "gpt_tiny",
            overrides=[
                *extra,
                f"train.steps={steps}",
                "train.log_every=2",
                "train.progress=false",
                f"train.final_weights={quote_value(str(out / name / 'final.pt'))}",
                f"checkpoint.memory.interval={memory_interval}",
                f"checkpoint.memory.base_dir={quote_value(str(mem_root / name))}",
                f"checkpoint.persistent.dir={quote_value(str(out / name / 'persistent'))}",
                f"checkpoint.persistent.interval={steps}",
                f"checkpoint.job_id={job_id}",
                f"logger.metrics_file={quote_value(str(out / name / 'metrics.jsonl'))}",
                "logger.level=WARNING",
                "dist.timeout_s=30",
                f"dist.backend={placement.backend}",
            ],
        )

    def launch(name: str, cfg: Any, run_dir: Path, plugins: list[Any], env: dict[str, str]) -> Any:
        spec = LaunchSpec(nnodes=NODES, nproc_per_node=1, run_dir=run_dir, env=env,
                          node_env={i: dict(e) for i, e in placement.node_env.items()},
                          timeout_s=600)  # fmt: skip
        log.info("demo: %s run", name)
        res = launch_local(cfg, spec, plugins, quiet=quiet)
        run_seconds[name] = res.seconds
        return res

    try:
        ref = launch("reference", config("reference"), out / "reference", [], {})
        if not ref.ok:
            raise MemckptError(f"the reference run failed ({ref.returncodes}); see {out}/reference")
        durable = [f"checkpoint.memory.persist_dir={quote_value(persist)}"] if persist else []
        cfg = config("job", *durable)
        first = launch("interrupted", cfg, out / "job" / "attempt1",
                       [FaultInjectionPlugin(node=1, step=kill)], {})  # fmt: skip
        if first.ok:
            raise MemckptError("the interrupted run was not interrupted: the fault did not fire")
        # node 1 is gone: its memory with it; --persist: every node's memory is gone
        for node in range(NODES) if persist else (1,):
            shutil.rmtree(mem_root / "job" / f"node{node}", ignore_errors=True)
        # a run that ends persisted hands its memory tier back; --keep keeps it to look at
        cfg = config("job", *durable,
                     *(["checkpoint.persistent.enabled=false"] if keep else []))  # fmt: skip
        second = launch("restart", cfg, out / "job" / "attempt2", [],
                        {RESTART_COUNT_ENV: "1"})  # fmt: skip
        if not second.ok:
            raise MemckptError(f"the restarted run failed ({second.returncodes}); see {out}/job")
        r_ref = json.loads((out / "reference" / "results" / "rank0.json").read_text())
        r_job = json.loads((out / "job" / "attempt2" / "results" / "rank0.json").read_text())
        resumed = r_job.get("resumed_from") or {}
        metrics = _read_jsonl(out / "job" / "metrics.jsonl")
        resume_at = next((i for i, m in enumerate(metrics) if m.get("event") == "resume"), None)
        runs = {
            "reference": _read_jsonl(out / "reference" / "metrics.jsonl"),
            "interrupted": metrics[:resume_at] if resume_at is not None else metrics,
            "resumed": metrics[resume_at:] if resume_at is not None else [],
        }
        ref_losses = [m["loss"] for m in runs["reference"] if "loss" in m]
        # a run that ends drained gives its memory back, --keep or not
        held = any((mem_root / "job" / f"node{i}" / job_id).exists() for i in range(NODES))
        report = DemoReport(
            steps=steps,
            kill_step=kill,
            memory_interval=memory_interval,
            recovered_step=resumed.get("step"),
            tier=resumed.get("tier"),
            sources={int(k): int(v) for k, v in (resumed.get("sources") or {}).items()},
            recovery_s=resumed.get("seconds"),
            identical=_weights_equal(r_ref["final_weights_path"], r_job["final_weights_path"]),
            reference_sha256=r_ref["weights_sha256"],
            final_sha256=r_job["weights_sha256"],
            run_seconds=run_seconds,
            plot=None,
            out_dir=str(out),
            device=placement.device,
            final_loss=r_job.get("final_loss"),
            first_loss=ref_losses[0] if ref_losses else None,
            memory_tree=str(mem_root / "job"),
            kept=keep and held,
            persist=persist,
            persisted_job=f"{persist.rstrip('/')}/{job_id}" if persist else None,
        )
        report.plot = _plot(runs, kill, report.recovered_step, out / "loss.png")
        (out / "summary.json").write_text(json.dumps(report.as_dict(), indent=2, default=str))
        return report
    finally:
        if persist and not keep:
            _delete_persisted_job(persist, job_id)
        if keep:
            log.info("demo: kept the memory tree %s", mem_root / "job")
        else:
            shutil.rmtree(mem_root, ignore_errors=True)
            log.info("demo: deleted the memory tree %s (--keep keeps it)", mem_root)


def _delete_persisted_job(persist: str, job_id: str) -> None:
    """Remove the demo job's steps from its durable tier (a path or a URL)."""
    from memckpt.storage.remote import RemoteTier, resolve_location

    where = resolve_location(persist)
    try:
        if isinstance(where, Path):
            shutil.rmtree(where / job_id, ignore_errors=True)
        else:
            tier = RemoteTier(where, job_id)
            for step in tier.step_dirs():
                tier.delete_persisted_step(step)
        log.info("demo: deleted the job's steps from %s/%s (--keep keeps them)", persist, job_id)
    except (OSError, MemckptError) as e:
        log.warning("demo: could not delete the job's steps from %s/%s: %s", persist, job_id, e)


def print_report(report: DemoReport) -> None:
    """The demo's summary; it ends with how to look at the memory tree."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    t = Table(
        title=f"memckpt demo: gpt_tiny on {NODES} simulated nodes ({report.device}), "
        "node 1 lost and recovered"
    )
    t.add_column("")
    t.add_column("")
    src = ", ".join(
        f"rank {r}: {'own memory (node' + str(r) + ')' if s == r else f'peer memory of node{s}'}"
        for r, s in sorted(report.sources.items())
    )
    rows = [
        ("steps done", f"{report.steps} (loss {report.first_loss:.3f} -> {report.final_loss:.3f})"
         if report.first_loss is not None and report.final_loss is not None
         else str(report.steps)),
        ("node 1 killed", f"right before step {report.kill_step} (memory save every "
                          f"{report.memory_interval} steps)"),
        ("recovered step", str(report.recovered_step)),
        ("steps lost", str(report.steps_lost)),
        ("recovery time", f"{report.recovery_s:.3f} s (plan + fetch + verify + load)"
         if report.recovery_s is not None else "-"),
        ("data came from", src or ("the durable tier" if report.tier == "durable" else "-")),
        ("tier", f"{report.tier} (persistent tier not needed)" if report.tier == "memory"
         else f"durable: {report.persisted_job} (both nodes' memory wiped)"
         if report.tier == "durable" else str(report.tier)),
        ("final weights", "IDENTICAL to the uninterrupted run" if report.identical
         else "DIFFERENT from the uninterrupted run"),
        ("wall time", ", ".join(f"{k} {v:.1f}s" for k, v in report.run_seconds.items())),
        ("loss plot", report.plot or "-"),
        ("files", report.out_dir),
        ("memory tree", f"kept: {report.memory_tree}" if report.kept
         else f"deleted ({report.memory_tree or '-'}); --keep keeps it"),
    ]  # fmt: skip
    for k, v in rows:
        t.add_row(escape(k), escape(v))
    Console().print(t)
    if report.status_command:
        print(f"look at the memory tree: {report.status_command}")
        print(f"delete it when done: rm -r {Path(report.memory_tree or '').parent}")
    else:
        print("to look at the memory tree after a run: memckpt demo --keep, then the "
              "memckpt status command it prints")  # fmt: skip
