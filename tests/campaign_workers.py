"""Training bodies of the recovery campaign, one per API (run by tests/campaign.py).

Every body trains the same kind of job: a tiny MLP under DDP on the simulated node's
single rank, Adam, the batch of step s on rank r drawn from a generator seeded by
(s, r), a memory save every ``every`` steps with pairwise replication. At start it
resumes through the API's documented restart path (nothing there: from scratch); at
``kill_step`` it waits for its saves to commit and calls ``pause_for_kill``. The
frameworks are imported inside the bodies, so each test pays only for its own.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from campaign import holds_manifest, optimizer_tensors, pause_for_kill, result

warnings.filterwarnings("ignore")

REPLICATION = "pairwise"
TIMEOUT_S = 30


def mlp(dropout: float = 0.0) -> nn.Module:
    """A 212-parameter MLP, the same on every rank; dropout draws from torch's global RNG."""
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(8, 16), nn.Tanh()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers, nn.Linear(16, 4))


def ddp(module: nn.Module) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, step: int, rank: int) -> None:
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(4, 8, generator=g)
    loss = nn.functional.mse_loss(model(x), x[:, :4].sin())
    opt.zero_grad()
    loss.backward()
    opt.step()


def model_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {f"model.{k}": v for k, v in module.state_dict().items()}


def final(
    resumed: int | None, step: int, module: nn.Module, opt: torch.optim.Optimizer, **extra: Any
) -> dict[str, Any]:
    return result(resumed, step, {**model_tensors(module), **optimizer_tensors(opt)}, **extra)


# -- memckpt.CheckpointManager (README "Use", docs/guide.md) -----------------------------------


def train_manager(rank: int, world: int, node_dir: str, cfg: dict[str, Any]) -> dict[str, Any]:
    import memckpt

    model = ddp(mlp(dropout=0.1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    mgr = memckpt.CheckpointManager(
        node_dir, cfg["job"], keep_last=2, replication=REPLICATION, timeout_s=TIMEOUT_S
    )
    state = {
        "model": model.module.state_dict(),
        "optim": opt.state_dict(),
        "rng": torch.get_rng_state(),
        "step": 0,
    }
    resumed = None
    if mgr.load(state_dict=state) is not None:  # newest complete step, copied in place
        model.module.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
        torch.set_rng_state(state["rng"])
        resumed = state["step"]
    fetched = mgr.last_load.fetched if mgr.last_load else None
    handle = None
    for step in range(state["step"] + 1, cfg["steps"] + 1):
        train_step(model, opt, step, rank)
        if step % cfg["every"] == 0:
            handle = mgr.save(
                step,
                {
                    "model": model.module.state_dict(),
                    "optim": opt.state_dict(),
                    "rng": torch.get_rng_state(),
                    "step": step,
                },
            )
        if step == cfg["kill_step"]:
            assert handle is not None and handle.wait().committed
            pause_for_kill(step)
    if handle is not None:
        handle.wait()  # raises the last save's error, if any
    mgr.close()
    return final(resumed, cfg["steps"], model.module, opt, fetched=fetched)


# -- DCP: MemoryStorageWriter / MemoryStorageReader (docs/dcp.md) -------------------------------


def train_dcp(rank: int, world: int, node_dir: str, cfg: dict[str, Any]) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from memckpt.adapters.dcp import (
        MemoryStorageReader,
        MemoryStorageWriter,
        checkpoint_id,
        close,
        latest_checkpoint,
    )

    # the same options everywhere: the first call opens the job's runtime with them
    options = {"replication": REPLICATION, "timeout_s": TIMEOUT_S}
    model = ddp(mlp())
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    start, resumed, manifest_back = 0, None, None
    latest = latest_checkpoint(node_dir, cfg["job"], **options)  # collective
    if latest:
        msd, osd = get_state_dict(model, opt)
        state = {"model": msd, "optim": osd, "step": 0}
        dcp.load(state, checkpoint_id=latest, storage_reader=MemoryStorageReader(**options))
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        start = resumed = state["step"]
        assert latest == checkpoint_id(node_dir, cfg["job"], start), (latest, start)
        manifest_back = holds_manifest(node_dir, start, cfg["job"])
    for step in range(start + 1, cfg["steps"] + 1):
        train_step(model, opt, step, rank)
        if step % cfg["every"] == 0:  # returns committed and replicated
            msd, osd = get_state_dict(model, opt)
            dcp.save(
                {"model": msd, "optim": osd, "step": step},
                checkpoint_id=checkpoint_id(node_dir, cfg["job"], step),
                storage_writer=MemoryStorageWriter(**options),
            )
        if step == cfg["kill_step"]:
            pause_for_kill(step)
    close()
    return final(resumed, cfg["steps"], model.module, opt, manifest_back=manifest_back)


# -- NVRx-compatible LocalCheckpointManager (docs/nvrx.md) --------------------------------------


def train_nvrx(rank: int, world: int, node_dir: str, cfg: dict[str, Any]) -> dict[str, Any]:
    from memckpt.adapters.nvrx import (
        AsyncCallsQueue,
        BasicTensorAwareStateDict,
        CliqueReplicationStrategy,
        LocalCheckpointManager,
    )

    model = ddp(mlp(dropout=0.1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    # one rank per node: a jump of 1 puts ranks 0 and 1 (nodes 0 and 1) in one clique
    repl = CliqueReplicationStrategy.from_replication_params(
        replication_jump=1, replication_factor=2
    )
    ckpt_manager = LocalCheckpointManager(
        node_dir, session_id=cfg["job"], repl_strategy=repl, timeout_s=TIMEOUT_S
    )
    start, resumed, fetched = 0, None, None
    iteration = ckpt_manager.find_latest()  # collective; -1 when there is none
    if iteration != -1:
        ta_state_dict, ckpt_part_id = ckpt_manager.load()  # collective
        assert tuple(ckpt_part_id) == (iteration, rank, cfg["job"]), ckpt_part_id
        sd = ta_state_dict.state_dict
        model.module.load_state_dict(sd["model"])
        opt.load_state_dict(sd["optim"])
        torch.set_rng_state(sd["rng"])
        start = resumed = iteration
        fetched = ckpt_manager.manager.last_load.fetched
    queue = AsyncCallsQueue()
    for step in range(start + 1, cfg["steps"] + 1):
        train_step(model, opt, step, rank)
        if step % cfg["every"] == 0:
            ta_state_dict = BasicTensorAwareStateDict(
                {
                    "model": model.module.state_dict(),
                    "optim": opt.state_dict(),
                    "rng": torch.get_rng_state(),
                }
            )
            req = ckpt_manager.save(ta_state_dict, step, is_async=True)  # returns once copied
            queue.schedule_async_request(req)
        queue.maybe_finalize_async_calls(blocking=False)  # every rank, every iteration
        if step == cfg["kill_step"]:
            queue.maybe_finalize_async_calls(blocking=True)
            pause_for_kill(step)
    queue.maybe_finalize_async_calls(blocking=True)
    queue.close()
    ckpt_manager.close()
    return final(resumed, cfg["steps"], model.module, opt, fetched=fetched)


# -- memckpt.State (docs/state.md) ---------------------------------------------------------------


def train_state(rank: int, world: int, node_dir: str, cfg: dict[str, Any]) -> dict[str, Any]:
    import memckpt

    model = ddp(mlp(dropout=0.1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
    seen = {"batches": 0}
    state = memckpt.State(
        model=model,
        optimizer=opt,
        framework="ddp",
        lr_scheduler=sched,
        get_extra_fn=lambda: dict(seen),
        include_rng=True,
        base_dir=node_dir,
        job_id=cfg["job"],
        replication=REPLICATION,
        timeout_s=TIMEOUT_S,
    )
    extra = state.maybe_resume_from_ckpt()  # None, or what get_extra_fn returned at save time
    if extra is not None:
        seen.update(extra)
        assert seen["batches"] == state.step, (extra, state.step)
    for step in range(state.step + 1, cfg["steps"] + 1):
        train_step(model, opt, step, rank)
        sched.step()
        seen["batches"] += 1
        state.step = step
        if step % cfg["every"] == 0:
            state.save(sync=False)  # returns once the state is copied
        if step == cfg["kill_step"]:
            state.wait()
            pause_for_kill(step)
    state.close()
    return final(state.resumed_step, state.step, model.module, opt, batches=seen["batches"])


# -- Lightning: MemoryCheckpointCallback + wrap_trainer (docs/lightning.md) --------------------


def train_lightning(rank: int, world: int, node_dir: str, cfg: dict[str, Any]) -> dict[str, Any]:
    import lightning.pytorch as pl

    from lightning_workers import classes
    from memckpt.adapters.lightning import MemoryCheckpointCallback, wrap_trainer

    class PauseAt(pl.Callback):
        """At the end of the kill step: wait for the memory save in flight, then pause."""

        def __init__(self, step: int, memory: MemoryCheckpointCallback) -> None:
            self.step, self.memory = step, memory

        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            if trainer.global_step == self.step:
                self.memory.wait()
                pause_for_kill(self.step)

    c = classes("lightning")  # tests/lightning_workers.py: MLP with dropout, Adam, StepLR
    job_dir = Path(node_dir) / cfg["job"]  # the same path on every node and across restarts
    torch.manual_seed(0)
    model = c["Net"]()
    counter = c["BatchCounter"]()
    memory = MemoryCheckpointCallback(job_dir, every_n_steps=cfg["every"])
    callbacks = [counter, memory]
    if cfg["kill_step"] is not None:
        callbacks.append(PauseAt(cfg["kill_step"], memory))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        num_nodes=world,
        strategy="ddp",
        max_steps=cfg["steps"],
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        use_distributed_sampler=False,
        default_root_dir=str(Path(node_dir) / "lightning"),
    )
    tier = wrap_trainer(trainer, job_dir, replication=REPLICATION, timeout_s=TIMEOUT_S)
    loader = torch.utils.data.DataLoader(list(range(64)), batch_size=1)
    trainer.fit(model, train_dataloaders=loader, ckpt_path="last")
    resumed = tier.resumed
    memory_resumed = resumed.step if resumed and resumed.source == "memory" else None
    opt = trainer.optimizers[0]
    return result(
        memory_resumed,
        trainer.global_step,
        {**model_tensors(model), **optimizer_tensors(opt)},
        source=resumed.source if resumed else None,
        batches=counter.batches,
        fetched=tier.last_load.fetched if tier.last_load else None,
    )


# -- Megatron-Core dist_checkpointing (docs/megatron.md) ---------------------------------------


def train_megatron(rank: int, world: int, node_dir: str, cfg: dict[str, Any]) -> dict[str, Any]:
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

    from megatron_workers import patch_megatron_cuda
    from memckpt.adapters import megatron as mm

    patch_megatron_cuda()  # Megatron's own queue calls CUDA (tests/megatron_workers.py)
    model = ddp(mlp())
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    named = dict(model.module.named_parameters())

    def tensors_to_save() -> dict[str, torch.Tensor]:
        out = {f"model.{n}": p.detach() for n, p in named.items()}
        for n, p in named.items():
            st = opt.state[p]
            out[f"optim.{n}.exp_avg"] = st["exp_avg"]
            out[f"optim.{n}.exp_avg_sq"] = st["exp_avg_sq"]
        return out

    def sharded_state_dict(iteration: int) -> dict[str, Any]:
        # the ranks hold the same (data-parallel) tensors and each saves its half of every
        # one along axis 0, as Megatron's fully parallel save spreads replicated tensors
        sd: dict[str, Any] = {
            k: ShardedTensor.from_rank_offsets(k, t.chunk(world)[rank], (0, rank, world))
            for k, t in tensors_to_save().items()
        }
        adam_step = {int(st["step"]) for st in opt.state.values()}
        sd["iteration"], sd["adam_step"] = iteration, adam_step.pop()
        return sd

    def load_target() -> dict[str, Any]:
        # every rank loads the whole of every tensor (a replica): half of it is the
        # other rank's, on the other node
        return {
            k: ShardedTensor.from_rank_offsets(k, torch.empty_like(p.detach()), replica_id=rank)
            for n, p in named.items()
            for k in (f"model.{n}", f"optim.{n}.exp_avg", f"optim.{n}.exp_avg_sq")
        }

    mem_save = mm.MemoryAsyncSaveStrategy(replication=REPLICATION, timeout_s=TIMEOUT_S)
    mem_load = mm.MemoryLoadShardedStrategy(replication=REPLICATION, timeout_s=TIMEOUT_S)
    mem_queue = AsyncCallsQueue(persistent=False)
    start, resumed, manifest_back = 0, None, None
    latest = mm.latest_checkpoint(
        node_dir, cfg["job"], replication=REPLICATION, timeout_s=TIMEOUT_S
    )  # collective
    if latest is not None:
        # the common part (iteration, adam_step) comes back from the checkpoint's common.pt
        state_dict = dist_checkpointing.load(load_target(), latest, mem_load)
        with torch.no_grad():
            for n, p in named.items():
                p.copy_(state_dict[f"model.{n}"])
        opt_sd = opt.state_dict()
        opt_sd["state"] = {
            i: {
                "step": torch.tensor(float(state_dict["adam_step"])),
                "exp_avg": state_dict[f"optim.{n}.exp_avg"],
                "exp_avg_sq": state_dict[f"optim.{n}.exp_avg_sq"],
            }
            for i, n in enumerate(named)
        }
        opt.load_state_dict(opt_sd)
        start = resumed = state_dict["iteration"]
        assert latest == mm.checkpoint_id(node_dir, cfg["job"], start), (latest, start)
        manifest_back = holds_manifest(node_dir, start, cfg["job"])
    for step in range(start + 1, cfg["steps"] + 1):
        train_step(model, opt, step, rank)
        if step % cfg["every"] == 0:
            cid = mm.checkpoint_id(node_dir, cfg["job"], step)  # "<base>/<job>/step-<N>"
            request = mm.save(sharded_state_dict(step), cid, mem_save)  # blocks for the copy
            mem_queue.schedule_async_request(request)
        mem_queue.maybe_finalize_async_calls(blocking=False)  # every iteration
        if step == cfg["kill_step"]:
            mem_queue.maybe_finalize_async_calls(blocking=True)
            pause_for_kill(step)
    mem_queue.maybe_finalize_async_calls(blocking=True)
    mem_queue.close()
    mm.close()
    return final(resumed, cfg["steps"], model.module, opt, manifest_back=manifest_back)
