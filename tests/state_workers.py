"""Rank functions for tests/test_state.py (module level, so spawned processes can import them)."""

from __future__ import annotations

from typing import Any

import torch

import memckpt


def _ddp_model() -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    model = DDP(
        torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Dropout(0.2), torch.nn.Linear(8, 2))
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    return model, opt, sched


def _ddp_step(
    model: torch.nn.Module, opt: torch.optim.Optimizer, sched: Any, rank: int, step: int
) -> None:
    g = torch.Generator().manual_seed(1000 * step + rank)
    model(torch.randn(4, 6, generator=g)).pow(2).mean().backward()  # dropout: the global RNG
    opt.step()
    opt.zero_grad()
    sched.step()


def ddp_save_then_resume(rank: int, world_size: int, base: str) -> dict[str, Any]:
    """Train 3 steps, save with per-rank extra state, go on; a fresh State resumes it."""
    model, opt, sched = _ddp_model()
    seen = {"rank": rank, "batches": [rank, 7]}
    state = memckpt.State(model=model, optimizer=opt, framework="ddp", lr_scheduler=sched,
                          get_extra_fn=lambda: dict(seen), include_rng=True, base_dir=base,
                          job_id="ddp", timeout_s=60)  # fmt: skip
    assert state.maybe_resume_from_ckpt() is None and state.step == 0
    for s in range(3):
        _ddp_step(model, opt, sched, rank, s)
    state.save(3, sync=False).wait()
    want = {k: v.clone() for k, v in model.module.state_dict().items()}
    want_rand = torch.rand(3)  # what the RNG gives after the save
    _ddp_step(model, opt, sched, rank, 3)  # diverge from the checkpoint
    state.close()

    model2, opt2, sched2 = _ddp_model()
    state2 = memckpt.State(model=model2, optimizer=opt2, framework="ddp", lr_scheduler=sched2,
                           get_extra_fn=lambda: {}, include_rng=True, base_dir=base,
                           job_id="ddp", timeout_s=60)  # fmt: skip
    extra = state2.maybe_resume_from_ckpt()
    try:
        for k, v in want.items():
            assert torch.equal(model2.module.state_dict()[k], v), k
        return {
            "extra": extra,
            "step": state2.step,
            "rand_equal": torch.equal(torch.rand(3), want_rand),
            "lr": sched2.get_last_lr(),
            "opt_steps": int(opt2.state_dict()["state"][0]["step"]),
        }
    finally:
        state2.close()


# -- FSDP2 -------------------------------------------------------------------------------------


def _fsdp_model(world_size: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.ReLU(), torch.nn.Linear(24, 8))
    mesh = init_device_mesh("cpu", (world_size,))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _full_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd, osd = get_state_dict(model, opt, options=options)
    return {"model": msd, "optim": osd.get("state", {})}


def fsdp_save(
    rank: int, world_size: int, base: str, reference: str, persist_dir: str | None = None
) -> bool:
    model, opt = _fsdp_model(world_size)
    durable = {} if persist_dir is None else {"persist_dir": persist_dir, "persist_every": 1}
    state = memckpt.State(model, opt, framework="fsdp", base_dir=base, job_id="fsdp",
                          get_extra_fn=lambda: {"rank": rank, "x": torch.full((2,), float(rank))},
                          include_rng=True, timeout_s=60, **durable)  # fmt: skip
    for s in range(3):
        g = torch.Generator().manual_seed(s)
        model(torch.randn(8, 16, generator=g)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    state.save(2, sync=True)  # an older step, then the newest one asynchronously
    state.step = 3
    handle = state.save(sync=False)
    assert handle.wait().step == 3 and state.last_save is handle
    full = _full_state(model, opt)
    if rank == 0:
        torch.save(full, reference)
    state.close()
    return True


def fsdp_resume(
    rank: int, world_size: int, base: str, reference: str, persist_dir: str | None = None
) -> dict[str, Any]:
    model, opt = _fsdp_model(world_size)  # fresh weights: the load must overwrite them
    durable = {} if persist_dir is None else {"persist_dir": persist_dir}
    state = memckpt.State(model, opt, framework="fsdp", base_dir=base, job_id="fsdp",
                          include_rng=True, timeout_s=60, **durable)  # fmt: skip
    extra = state.maybe_resume_from_ckpt()
    got = _full_state(model, opt)
    state.close()
    assert extra is not None
    if rank == 0:  # the full state (cpu_offload) is gathered on rank 0 only
        want = torch.load(reference, weights_only=True)
        assert want["model"].keys() == got["model"].keys()
        for k, v in want["model"].items():
            assert torch.equal(got["model"][k], v), k
        for pid, st in want["optim"].items():
            for k, v in st.items():
                assert torch.equal(torch.as_tensor(got["optim"][pid][k]), torch.as_tensor(v)), (
                    pid,
                    k,
                )
    return {"step": state.step, "rank": extra["rank"], "x": extra["x"].tolist()}
