"""The recipes' training loop: DDP on CPU (gloo) or GPUs (NCCL), two checkpoint tiers, auto-resume.

``train(cfg)`` runs on every rank. Everything a step depends on is checkpointed
(``memckpt.recipes.checkpointing``), and the data of a step is a pure function of the
step (``memckpt.recipes.data``), so a run that is killed and resumed ends with the
same weights, bit for bit, as one that was never interrupted.

Where a rank trains follows ``dist.backend`` (``choose_placement``): ``gloo`` on the
CPU; ``nccl`` on the GPU of its local rank, with model, batches, gradient reduction
and the loop's own collectives there, while memckpt's collectives stay on their own
gloo groups; ``auto`` picks ``nccl`` when this rank has a GPU, else ``gloo``.

Steps count from 1: step N is the N-th optimizer step, and the checkpoint of step N
holds the state after it. Call sequence on every rank (collectives in this order)::

    choose the placement; on a GPU: set the device, deterministic kernels
    init process group from the environment (when WORLD_SIZE > 1 and none exists)
    build data, model (same seed everywhere, moved to the device), DDP, AdamW,
    warm-up/cosine scheduler
    CheckpointManager(...)                         collective
    resume: newest complete persistent step        rank 0 looks, broadcasts
            mgr.latest() then mgr.load(...)        collective; the newer tier wins
    each step: fault hook, forward/backward/step,
               IterManager.should_save_ckpt()      collective
               memory save (async), persistent DCP save (collective), loss mean (collective)
    persistent save of the last step, mgr.close()
    completed, and the last step persisted:        barrier; then one rank per node
               deletes the job's memory tier (its RAM goes back)
    final loss mean (collective)

Both tiers are keyed by ``checkpoint.job_id``: memory under
``<memory.base_dir>/<job_id>``, persistent under ``<persistent.dir>/<job_id>``.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
import signal
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import torch
import torch.distributed as dist
from torch import nn

import memckpt
from memckpt.engine.tiers import memory_home, release_memory_tier, resume_tiers
from memckpt.errors import ConfigError
from memckpt.recipes.checkpointing import (
    TrainingState,
    latest_persistent_step,
    persistent_job_dir,
    prune_persistent,
    seed_process,
    weights_sha256,
)
from memckpt.recipes.config import CheckpointConfig, ConfigContainer, OptimizerConfig
from memckpt.recipes.data import build_data
from memckpt.recipes.models import build_model, loss_function
from memckpt.recipes.profiling import StepProfiler
from memckpt.recipes.reporting import TrainingReporter, describe_newest, newest_step_per_tier
from memckpt.recipes.validate import BACKENDS, check_config
from memckpt.settings import (
    BASE_DIR_ENV,
    KILL_AT_STEP_ENV,
    KILL_NODE_ENV,
    NODE_ID_ENV,
    RESTART_COUNT_ENV,
)

__all__ = [
    "BACKENDS",
    "BASE_DIR_ENV",
    "KILL_AT_STEP_ENV",
    "KILL_NODE_ENV",
    "NODE_ID_ENV",
    "RESTART_COUNT_ENV",
    "Placement",
    "ResumeInfo",
    "TrainResult",
    "choose_placement",
    "fault_kill_step",
    "local_placement",
    "lr_at",
    "memory_manager_kwargs",
    "ordered_mean_hook",
    "train",
]

log = logging.getLogger(__name__)

# BASE_DIR_ENV overrides checkpoint.memory.base_dir; NODE_ID_ENV names this node (default: the
# host name for replication, GROUP_RANK for the fault hook); the KILL_* and RESTART_COUNT_ENV
# variables drive the fault hook (see fault_kill_step). Names: memckpt.settings.
TORCHELASTIC_RESTART_COUNT_ENV: Final = "TORCHELASTIC_RESTART_COUNT"
GROUP_RANK_ENV: Final = "GROUP_RANK"
LOCAL_RANK_ENV: Final = "LOCAL_RANK"  # set by torchrun: this rank's number on its node
# cuBLAS reproducibility (CUDA docs): read when cuBLAS starts, so set before the first GPU op
CUBLAS_WORKSPACE_CONFIG_ENV: Final = "CUBLAS_WORKSPACE_CONFIG"


@dataclass(frozen=True)
class Placement:
    """Where a rank trains: the backend of the training process group and the device."""

    backend: str  # "gloo" or "nccl"
    device: torch.device

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"


@dataclass(frozen=True)
class ResumeInfo:
    """Where a run resumed from: ``tier`` is "memory", "durable" (the memory tier's drained
    copy, ``checkpoint.memory.persist_dir``) or "persistent" (the DCP tier)."""

    step: int
    tier: str
    seconds: float
    sources: dict[int, int] | None = None  # memory tier: rank -> rank whose node gave its data


@dataclass(frozen=True)
class TrainResult:
    """What ``train`` did on this rank."""

    final_step: int  # optimizer steps done, the resumed ones included
    final_loss: float | None  # the last step's loss, averaged over ranks (None: no step yet)
    resumed_from: ResumeInfo | None
    steps_run: int  # steps computed by this process
    wall_s: float
    memory_saves: int  # memory checkpoints this process committed
    persistent_saves: int  # persistent (DCP) checkpoints this process wrote
    weights_sha256: str  # of the final model state dict (checkpointing.weights_sha256)
    final_weights_path: str | None  # where rank 0 saved the final weights, if it did
    completed: bool  # reached train.steps (False: left early, see train.stop_after)
    rank: int = 0
    world_size: int = 1
    # the newest step per durability tier: "local", "replicated", "persisted" (None: none)
    newest_by_tier: dict[str, int | None] = field(default_factory=dict)


# ---- pure decisions


def lr_at(step: int, opt: OptimizerConfig, total_steps: int) -> float:
    """Learning rate after ``step`` steps: linear warm-up, then cosine decay to ``min_lr``."""
    if step < opt.warmup_steps:
        return opt.lr * (step + 1) / opt.warmup_steps
    span = max(1, total_steps - opt.warmup_steps)
    progress = min(1.0, (step - opt.warmup_steps) / span)
    return opt.min_lr + 0.5 * (opt.lr - opt.min_lr) * (1.0 + math.cos(math.pi * progress))


def choose_placement(
    backend: str, *, cuda_available: bool, device_count: int, local_rank: int
) -> Placement:
    """The backend and device of a rank with local rank ``local_rank``, given its GPUs.

    ``gloo``: the CPU. ``nccl``: GPU ``local_rank`` (NCCL needs a GPU per rank; ranks
    sharing one are refused); a ConfigError when there is none. ``auto``: ``nccl`` when
    GPU ``local_rank`` exists, else ``gloo``.
    """
    if backend not in BACKENDS:
        raise ConfigError(
            f"dist.backend must be one of {', '.join(BACKENDS)}, got {backend!r} "
            "(gloo: CPU, nccl: GPUs, auto: nccl where each rank has a GPU)"
        )
    has_gpu = cuda_available and 0 <= local_rank < device_count
    if backend == "gloo" or (backend == "auto" and not has_gpu):
        return Placement("gloo", torch.device("cpu"))
    if not cuda_available or device_count < 1:
        raise ConfigError(
            "dist.backend=nccl trains on GPUs, but torch sees none here "
            f"(torch.cuda.is_available() is False, torch {torch.__version__}); "
            "use dist.backend=gloo for the CPU, or auto to pick"
        )
    if not has_gpu:
        raise ConfigError(
            f"dist.backend=nccl: local rank {local_rank} has no GPU of its own "
            f"({device_count} visible); NCCL needs one GPU per rank, so start at most "
            f"{device_count} ranks per node (--nproc-per-node)"
        )
    return Placement("nccl", torch.device("cuda", local_rank))


def local_placement(backend: str, environ: Mapping[str, str]) -> Placement:
    """``choose_placement`` for this process: its GPUs and ``LOCAL_RANK`` (default 0)."""
    raw = environ.get(LOCAL_RANK_ENV, "0").strip() or "0"
    try:
        local_rank = int(raw)
    except ValueError:
        raise ConfigError(f"{LOCAL_RANK_ENV} must be an integer, got {raw!r}") from None
    available = torch.cuda.is_available()
    count = torch.cuda.device_count() if available else 0
    return choose_placement(
        backend, cuda_available=available, device_count=count, local_rank=local_rank
    )


def fault_kill_step(environ: Mapping[str, str]) -> int | None:
    """The step before which this process SIGKILLs itself, or None when the hook is off.

    Armed when ``MEMCKPT_KILL_AT_STEP=N`` is set, the restart count is 0
    (``MEMCKPT_RESTART_COUNT``, else torchrun's ``TORCHELASTIC_RESTART_COUNT``, else 0),
    and ``MEMCKPT_KILL_NODE`` is unset or names this node (``MEMCKPT_NODE_ID``, else
    ``GROUP_RANK``). A restarted process therefore never kills itself again.
    """
    raw = environ.get(KILL_AT_STEP_ENV, "").strip()
    if not raw:
        return None
    try:
        step = int(raw)
    except ValueError:
        raise ConfigError(f"{KILL_AT_STEP_ENV} must be a step number, got {raw!r}") from None
    restarts = environ.get(RESTART_COUNT_ENV) or environ.get(TORCHELASTIC_RESTART_COUNT_ENV) or "0"
    try:
        restarted = int(restarts) > 0
    except ValueError:
        raise ConfigError(f"the restart count must be an integer, got {restarts!r}") from None
    if restarted:
        return None
    target = environ.get(KILL_NODE_ENV)
    if target and (environ.get(NODE_ID_ENV) or environ.get(GROUP_RANK_ENV)) != target:
        return None
    return step


def memory_manager_kwargs(ckpt: CheckpointConfig, num_nodes: int, node_id: str) -> dict[str, Any]:
    """Keyword arguments for ``CheckpointManager`` besides base_dir, job_id and keep_last.

    The one place replication is wired in: ``replication`` and ``node_id`` are passed
    only when replication is enabled and the world spans more than one node. With
    ``memory.persist_dir`` the manager drains to that durable tier every
    ``memory.persist_every`` steps (default: every memory interval) and resumes from it
    when memory holds nothing newer.
    """
    kwargs: dict[str, Any] = {"timeout_s": ckpt.memory.timeout_s}
    if ckpt.replication.enabled and num_nodes > 1:
        kwargs["replication"] = ckpt.replication.strategy
        kwargs["node_id"] = node_id
    if ckpt.memory.persist_dir is not None:
        kwargs["persist_dir"] = ckpt.memory.persist_dir
        kwargs["persist_every"] = ckpt.memory.persist_every or ckpt.memory.interval
    return kwargs


# ---- process group and gradient reduction


def ordered_mean_hook(state: object, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: the mean of every rank's gradients, summed in rank order.

    DDP re-buckets gradients after its first iteration, so a resumed process reduces
    its first step with another bucket layout than the uninterrupted run did. Gloo's
    ring all-reduce sums 3 or more ranks in an order that depends on the layout, which
    changes the last bits. Gathering the buckets and adding them in rank order makes
    every element's sum independent of the layout (at ``world_size`` times the traffic,
    fine for the small CPU models of the recipes). NCCL's reductions depend on the layout
    as well, so the hook serves both backends.
    """
    buffer = bucket.buffer()
    world_size = dist.get_world_size()
    parts = [torch.empty_like(buffer) for _ in range(world_size)]
    work = dist.all_gather(parts, buffer, async_op=True)
    assert work is not None

    def mean(fut: torch.futures.Future[Any]) -> torch.Tensor:
        total = parts[0].clone()
        for part in parts[1:]:
            total += part
        return total.div_(world_size)

    return work.get_future().then(mean)


# DDP checks the hook's annotations against the real types; postponed ones are strings.
ordered_mean_hook.__annotations__.update(
    {"bucket": dist.GradBucket, "return": torch.futures.Future[torch.Tensor]}
)


def _prepare_gpu(device: torch.device) -> None:
    """Bind this process to ``device`` and make its kernels deterministic.

    The recipes promise bit-identical weights after a resume; on a GPU that needs
    deterministic kernels (atomics in embedding backward, cuBLAS workspaces). An op
    without a deterministic kernel warns rather than fails (``warn_only``).
    """
    torch.cuda.set_device(device)
    os.environ.setdefault(CUBLAS_WORKSPACE_CONFIG_ENV, ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


def _init_process_group(timeout_s: float, backend: str) -> bool:
    """Initialise torch.distributed from the environment when WORLD_SIZE > 1; True if we did."""
    if not dist.is_available() or dist.is_initialized():
        return False
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    log.info("rank %d/%d: process group initialised (%s)", dist.get_rank(),
             dist.get_world_size(), backend)  # fmt: skip
    return True


# ---- the run


class _Run:
    """One process's share of a training run; the module docstring gives the sequence."""

    def __init__(self, cfg: ConfigContainer, placement: Placement) -> None:
        self.cfg = cfg
        self.device = placement.device
        distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if distributed else 0
        self.world_size = dist.get_world_size() if distributed else 1
        self.distributed = distributed and self.world_size > 1

        self.data = build_data(cfg.data, cfg.model)
        torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
        # Built on the CPU, then moved: the same initial weights on every device.
        module = build_model(cfg.model, self.data.vocab_size).to(self.device)
        # Dropout (and anything else random) differs per rank, reproducibly.
        seed_process(cfg.train.seed + 7919 * (self.rank + 1))
        self.model: nn.Module = module
        if self.distributed:
            device_ids = [self.device.index] if placement.on_gpu else None
            self.model = nn.parallel.DistributedDataParallel(module, device_ids=device_ids)
            self.model.register_comm_hook(None, ordered_mean_hook)
        self.loss_fn = loss_function(cfg.model)
        optimizer = self._optimizer(module)
        total, base_lr = cfg.train.steps, cfg.optimizer.lr
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_at(s, cfg.optimizer, total) / base_lr
        )
        self.state = TrainingState(module, optimizer, scheduler, rank=self.rank,
                                   world_size=self.world_size,
                                   distributed=self.distributed,
                                   device=self.device)  # fmt: skip
        self.memory_base_dir = os.environ.get(BASE_DIR_ENV) or cfg.checkpoint.memory.base_dir
        self._memory_homes: list[tuple[str, str]] = []  # every rank's (node, job directory)
        self.manager = self._manager() if cfg.checkpoint.memory.enabled else None
        self.memory_handles: list[memckpt.SaveHandle] = []
        self.persistent_saves = 0
        self._last_persistent_step: int | None = None

    def _optimizer(self, module: nn.Module) -> torch.optim.Optimizer:
        o = self.cfg.optimizer
        params = [p for p in module.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": o.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2))

    def _manager(self) -> memckpt.CheckpointManager:
        ckpt = self.cfg.checkpoint
        node_id = os.environ.get(NODE_ID_ENV) or socket.gethostname()
        home = memory_home(self.memory_base_dir, ckpt.job_id, self.rank, node_id)
        nodes: list[Any] = [home]
        if self.distributed:
            nodes = [None] * self.world_size
            dist.all_gather_object(nodes, home)
        self._memory_homes = [tuple(h) for h in nodes]
        num_nodes = len({node for node, _ in self._memory_homes})
        kwargs = memory_manager_kwargs(ckpt, num_nodes, node_id)
        return memckpt.CheckpointManager(
            self.memory_base_dir, ckpt.job_id, ckpt.memory.keep_last, **kwargs
        )

    # -- checkpoints

    def save_persistent(self, step: int) -> None:
        """Persistent save of the current state (collective); once per step."""
        if self._last_persistent_step == step or not self.cfg.checkpoint.persistent.enabled:
            return
        assert step == self.state.step
        persistent = self.cfg.checkpoint.persistent
        directory = persistent_job_dir(self.cfg.checkpoint)
        self.state.save_persistent(directory)
        if persistent.keep_last is not None and self.rank == 0:
            prune_persistent(directory, persistent.keep_last)
        self._last_persistent_step = step
        self.persistent_saves += 1

    def save_memory(self, im: Any) -> None:
        assert self.manager is not None
        handle = self.manager.save(self.state.step, self.state.memory_state())
        self.memory_handles.append(handle)
        if im is not None:
            im.record_save(handle)

    def resume(self) -> ResumeInfo | None:
        """Load the newer of the newest complete memory and persistent checkpoints."""
        t0 = time.perf_counter()
        persistent_dir = persistent_job_dir(self.cfg.checkpoint)
        persistent_step = None
        if self.cfg.checkpoint.persistent.enabled:
            found = latest_persistent_step(persistent_dir) if self.rank == 0 else None
            persistent_step = self.state.broadcast_from_rank0(found)
        manager = self.manager
        load_memory = None
        if manager is not None:

            def load_memory(floor: int | None) -> int | None:
                return self.state.load_memory(manager, at_least=floor)

        # the engine's tier rule: newest intact step, memory on a tie, damaged ones skipped
        choice = resume_tiers(load_memory, persistent_step, persistent_step is not None)
        tier: str | None = None if choice.tier == "none" else choice.tier
        sources = None
        if tier == "memory":
            assert manager is not None
            sources = getattr(manager.last_load, "sources", None)
            if getattr(manager.last_load, "tier", "memory") == "persistent":
                tier, sources = "durable", None
        if tier == "persistent":
            assert persistent_step is not None
            self.state.load_persistent(persistent_dir, persistent_step)
            self._last_persistent_step = persistent_step
        if tier is None:
            log.info("rank %d: no checkpoint to resume from; starting at step 0", self.rank)
            return None
        info = ResumeInfo(self.state.step, tier, time.perf_counter() - t0, sources)
        log.info("rank %d: resumed step %d from the %s tier in %.3fs", self.rank, info.step,
                 tier, info.seconds)  # fmt: skip
        return info

    # -- steps

    def _train_step(self, step: int) -> float:
        """One optimizer step on this rank's batch of ``step``; returns the learning rate used."""
        s = self.state
        x, y = self.data.batch(step, self.rank, self.world_size, self.cfg.train.micro_batch_size)
        x, y = x.to(self.device), y.to(self.device)  # the same tensors on the CPU
        self.model.train()
        loss = self.loss_fn(self.model(x), y)
        s.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.train.grad_clip > 0:
            nn.utils.clip_grad_norm_(s.module.parameters(), self.cfg.train.grad_clip)
        lr = float(s.optimizer.param_groups[0]["lr"])
        s.optimizer.step()
        s.scheduler.step()
        s.step = step
        s.local_loss = float(loss.item())
        return lr

    def _mean_over_ranks(self, value: float) -> float:
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)  # NCCL: on the GPU
        dist.all_reduce(t)
        return float(t.item()) / self.world_size

    def _last_blocking_s(self) -> float | None:
        """Blocking time of the newest memory save that has finished, without waiting."""
        for handle in reversed(self.memory_handles):
            if handle.done():
                return None if handle.exception() is not None else handle.wait().blocking_s
        return None

    def _iter_manager(self, steps_left: int) -> Any:
        if not self.cfg.schedule.enabled:
            return None
        from memckpt.schedule import DEFAULT_SIGNALS, IterManager

        s = self.cfg.schedule
        im = IterManager(
            total_iters=steps_left,
            redundant_time=s.redundant_time,
            mtbf_s=s.mtbf_s,
            signals=DEFAULT_SIGNALS if s.handle_signals else (),
        )
        im.register_persistent_save(self.save_persistent)
        return im

    def run(self) -> TrainResult:
        t0 = time.perf_counter()
        cfg = self.cfg
        resumed = self.resume() if cfg.checkpoint.resume else None
        start, total = self.state.step, cfg.train.steps
        stop = total if cfg.train.stop_after is None else min(total, cfg.train.stop_after)
        kill_at = fault_kill_step(os.environ)
        reporter = TrainingReporter(rank=self.rank, total_steps=total, start_step=start,
                                    progress=cfg.train.progress,
                                    metrics_file=cfg.logger.metrics_file)  # fmt: skip
        if resumed is not None:
            reporter.event("resume", step=resumed.step, tier=resumed.tier,
                           seconds=resumed.seconds, sources=resumed.sources)  # fmt: skip
        im = self._iter_manager(total - start)
        profiler = StepProfiler(self.rank)
        steps_run = 0
        try:
            for step in range(start + 1, stop + 1):
                if kill_at == step:
                    log.warning("rank %d: fault hook %s=%d: SIGKILL before step %d", self.rank,
                                KILL_AT_STEP_ENV, kill_at, step)  # fmt: skip
                    reporter.close()
                    os.kill(os.getpid(), signal.SIGKILL)
                if im is not None:
                    im.iter(step)
                profiler.before(step)
                lr = self._train_step(step)
                steps_run += 1
                scheduled = im.should_save_ckpt() if im is not None else False
                exiting = im is not None and im.exit_requested
                leaving = exiting or step == stop  # stop_after also saves both tiers
                memory_due = step % cfg.checkpoint.memory.interval == 0
                if self.manager is not None and (memory_due or scheduled or leaving):
                    self.save_memory(im)
                elif scheduled and not exiting:
                    self.save_persistent(step)  # no memory tier: the scheduled save goes to disk
                if step % cfg.checkpoint.persistent.interval == 0:
                    self.save_persistent(step)
                loss = self.state.local_loss
                assert loss is not None
                blocking = self._last_blocking_s()
                profiler.after(step)
                reporter.step(step, loss, blocking)
                if step % cfg.train.log_every == 0 or step in (start + 1, stop):
                    reporter.logged(step, self._mean_over_ranks(loss), lr, blocking)
                if exiting:
                    log.info("rank %d: leaving at step %d: %s", self.rank, step, im.explain())
                    im.finalize(step)  # waits for the memory save, then the persistent save
                    reporter.event("exit", step=step, reason=im.explain())
                    break
            if steps_run:
                self.save_persistent(self.state.step)
        finally:
            profiler.stop()
            reporter.close()
            if im is not None:
                im.close()
            if self.manager is not None:
                self.manager.close()  # waits for the save in flight
        self._release_memory_tier()
        return self._result(t0, resumed, steps_run, reporter)

    def _release_memory_tier(self) -> None:
        """Delete this job's memory tier once the run is complete and persisted (every rank).

        The same decision on every rank (the step, the config); after the barrier every
        rank has closed its manager, and one rank per job directory deletes it.
        """
        persisted = self._last_persistent_step == self.state.step
        completed = self.state.step >= self.cfg.train.steps
        if self.manager is None or not (completed and persisted):
            return
        if self.distributed:
            if self.device.type == "cuda":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()
        release_memory_tier(self.memory_base_dir, self.cfg.checkpoint.job_id,
                            self._memory_homes, self.rank,
                            f"run complete and step {self.state.step} persisted")  # fmt: skip

    def _result(
        self,
        t0: float,
        resumed: ResumeInfo | None,
        steps_run: int,
        reporter: TrainingReporter,
    ) -> TrainResult:
        memory_saves = 0
        for handle in self.memory_handles:
            error = handle.exception()
            if error is None:
                memory_saves += 1
            else:
                log.warning("rank %d: memory save of step %d failed: %s", self.rank, handle.step,
                            error)  # fmt: skip
        s = self.state
        final_loss = None if s.local_loss is None else self._mean_over_ranks(s.local_loss)
        completed = s.step >= self.cfg.train.steps
        weights_path = None
        if completed and self.cfg.train.final_weights and self.rank == 0:
            weights_path = _save_weights(s.module.state_dict(), self.cfg.train.final_weights)
        result = TrainResult(
            final_step=s.step,
            final_loss=final_loss,
            resumed_from=resumed,
            steps_run=steps_run,
            wall_s=time.perf_counter() - t0,
            memory_saves=memory_saves,
            persistent_saves=self.persistent_saves,
            weights_sha256=weights_sha256(s.module.state_dict()),
            final_weights_path=weights_path,
            completed=completed,
            rank=self.rank,
            world_size=self.world_size,
            newest_by_tier=newest_step_per_tier(self.memory_handles, self._last_persistent_step),
        )
        reporter.event("end", step=s.step, loss=final_loss, steps_run=steps_run,
                       wall_s=result.wall_s, completed=completed,
                       newest_by_tier=result.newest_by_tier)  # fmt: skip
        log.info("rank %d: %s at step %d after %d steps in %.1fs, loss %s; newest step: %s",
                 self.rank, "finished" if completed else "stopped", s.step, steps_run,
                 result.wall_s, "n/a" if final_loss is None else f"{final_loss:.4f}",
                 describe_newest(result.newest_by_tier))  # fmt: skip
        return result


def _save_weights(state_dict: Mapping[str, torch.Tensor], path: str) -> str:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    torch.save({k: v.cpu() for k, v in state_dict.items()}, tmp)  # loads without a GPU
    os.replace(tmp, target)
    log.info("final weights saved to %s", target)
    return str(target)


def train(cfg: ConfigContainer) -> TrainResult:
    """Train ``cfg`` on this rank; every rank of the job calls it (see the module docstring).

    Without torch.distributed it runs as one process, unless the environment says
    ``WORLD_SIZE`` > 1: then it initialises the process group from the environment
    (``cfg.dist``, the backend as ``choose_placement`` resolves it) and destroys it on
    the way out. On a GPU it binds the process to the device and turns on
    deterministic kernels for the rest of the process. With ``cfg.checkpoint.resume``
    it resumes from the newer of the two checkpoint tiers.
    """
    check_config(cfg)
    logging.getLogger("memckpt").setLevel(cfg.logger.level.upper())
    placement = local_placement(cfg.dist.backend, os.environ)
    if placement.on_gpu:
        _prepare_gpu(placement.device)
    owns_group = _init_process_group(cfg.dist.timeout_s, placement.backend)
    try:
        return _Run(cfg, placement).run()
    finally:
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()
