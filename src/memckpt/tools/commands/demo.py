"""``memckpt demo``: train gpt_tiny on 2 simulated nodes, lose one, recover it from its peer."""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

__all__ = ["handler", "register"]

DESCRIPTION = (
    "Train gpt_tiny on 2 simulated nodes, kill node 1 and delete its memory, resume it "
    "from its peer's memory, and check the final weights equal an uninterrupted run's. "
    "The memory tiers live under /dev/shm and are deleted at the end unless --keep. "
    "Exit code: 0 the demo recovered bit-identical, 1 it did not, 2 a usage error."
)


def register(sub: Any) -> None:
    sp = sub.add_parser("demo", help="the main job: node loss and recovery from peer memory",
                        description=DESCRIPTION)  # fmt: skip
    sp.add_argument(
        "--out", default="memckpt-demo", help="output directory (default: memckpt-demo)"
    )
    sp.add_argument(
        "--steps",
        type=int,
        default=200,
        help="training steps (default 200; at least 3 intervals, e.g. "
        "--steps 6 --interval 2 for a quick check)",
    )
    sp.add_argument(
        "--kill-step",
        type=int,
        help="node 1 dies right before this step (default: about 3/5 of the steps, mid-interval)",
    )
    sp.add_argument(
        "--interval", type=int, default=10, help="memory save every N steps (default 10)"
    )
    sp.add_argument(
        "--device",
        choices=("cpu", "cuda", "auto"),
        default="cpu",
        help="train on the CPU (gloo; the default), on a GPU per simulated node "
        "(cuda: NCCL, 2 GPUs), or auto: cuda when 2 GPUs are visible, else cpu",
    )
    sp.add_argument(
        "--keep",
        action="store_true",
        help="keep the job's memory tree (the restarted run's steps on both nodes) and print "
        "its path and the memckpt status command that shows it",
    )
    sp.add_argument(
        "--persist",
        metavar="URL",
        help="also drain the job's memory saves to this durable tier (s3://bucket/prefix, "
        "gs://..., a path; credentials and AWS_ENDPOINT_URL from the environment), wipe "
        "both nodes' memory before the restart and restore from it",
    )
    sp.add_argument("--json", action="store_true", help="print the report as JSON")
    sp.set_defaults(fn=handler)


def handler(args: argparse.Namespace) -> int:
    from memckpt.tools.demo import print_report, run_demo

    logging.getLogger("memckpt").setLevel(logging.INFO)
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(message)s")
    logging.getLogger("memckpt.tools.demo").setLevel(logging.INFO)
    report = run_demo(args.out, steps=args.steps, kill_step=args.kill_step,
                      memory_interval=args.interval, device=args.device,
                      keep=args.keep, persist=args.persist)  # fmt: skip
    if args.json:
        print(json.dumps(report.as_dict(), indent=2, default=str))
    else:
        print_report(report)
    return 0 if report.ok else 1
