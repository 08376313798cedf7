"""A tiny CPU training job that survives preemption: resume, periodic saves, a deadline save.

    python examples/preemptible_train.py --base-dir /dev/shm/ckpt [--job preemptible]
        [--steps 200] [--every 10] [--step-time 0.05] [--margin 2] [--signal-grace 0]

One process, no torchrun. At start it loads the newest checkpoint in place
(``CheckpointManager.load(state_dict=...)``) and continues from its step. ``IterManager``
saves every ``--every`` steps and once more before the deadline in ``MEMCKPT_DEADLINE``
(or after SIGTERM/SIGUSR1); after that save the job exits 0. Try it under preemption:

    memckpt simulate-preemption --timeout 6 --restarts 2 --grace 5 \\
        --cmd 'python examples/preemptible_train.py --base-dir /dev/shm/ckpt --steps 150'

The base directory and job also come from ``MEMCKPT_BASE_DIR`` and ``MEMCKPT_JOB``.
"""

from __future__ import annotations

import argparse
import logging
import os
import time

import torch
import torch.nn as nn

import memckpt
from memckpt.schedule import IterManager

log = logging.getLogger("preemptible_train")


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 1))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    x = torch.randn(32, 16, generator=g)
    return x, x.sum(dim=1, keepdim=True).sin()


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--base-dir",
        default=os.environ.get("MEMCKPT_BASE_DIR"),
        help="checkpoint base directory (default: $MEMCKPT_BASE_DIR)",
    )
    p.add_argument("--job", default=os.environ.get("MEMCKPT_JOB", "preemptible"))
    p.add_argument("--steps", type=int, default=200, help="total training steps")
    p.add_argument("--every", type=int, default=10, help="save every this many steps")
    p.add_argument("--step-time", type=float, default=0.05, help="extra seconds per step")
    p.add_argument(
        "--margin",
        type=float,
        default=2.0,
        help="IterManager redundant_time: save this long before the deadline",
    )
    p.add_argument(
        "--signal-grace",
        type=float,
        default=0.0,
        help="seconds between SIGTERM and the kill, as IterManager should assume",
    )
    args = p.parse_args()
    if not args.base_dir:
        p.error("pass --base-dir or set MEMCKPT_BASE_DIR")
    return args


def train(args: argparse.Namespace) -> str:
    """Train until ``args.steps`` or a deadline save; return "finished" or "preempted"."""
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    mgr = memckpt.CheckpointManager(args.base_dir, args.job, keep_last=2, timeout_s=60)
    state = {"model": model.state_dict(), "optim": opt.state_dict(), "step": 0}
    if mgr.load(state_dict=state) is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
        log.info("resumed from step %d", state["step"])
    start = int(state["step"])
    im = IterManager(
        total_iters=args.steps - start,
        redundant_time=args.margin,
        save_interval=args.every,
        signal_grace_s=args.signal_grace,
    )
    saved = start
    loss = torch.tensor(float("nan"))
    try:
        for step in range(start + 1, args.steps + 1):  # a checkpoint of step s holds s steps
            im.iter(step)
            x, y = batch(step)
            loss = nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            time.sleep(args.step_time)
            if im.should_save_ckpt():
                sd = {"model": model.state_dict(), "optim": opt.state_dict(), "step": step}
                im.record_save(mgr.save(step, sd))
                saved = step
                if im.exit_requested:
                    im.finalize(step)  # waits for the save; restores signal handlers
                    log.info("saved step %d to leave (%s); exiting", step, im.explain())
                    return "preempted"
        if saved != args.steps:
            sd = {"model": model.state_dict(), "optim": opt.state_dict(), "step": args.steps}
            mgr.save(args.steps, sd, blocking=True)
        log.info("finished %d steps, loss %.4f", args.steps, loss.item())
        return "finished"
    finally:
        im.close()
        mgr.close()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    train(parse_args())


if __name__ == "__main__":
    main()
