"""``memckpt export BASE/JOB [--step N] --to DIR``: a memory checkpoint as a plain DCP directory.

The result loads with ``torch.distributed.checkpoint.FileSystemReader`` in a process that
never imports memckpt. The step must have been saved through the DCP adapter
(``memckpt.adapters.dcp.MemoryStorageWriter``). On a multi-node job, name the other
nodes' base directories with ``--from`` so every rank's object is found.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

__all__ = ["register"]


def register(sub: Any) -> None:
    sp = sub.add_parser(
        "export",
        help="write a memory checkpoint as a plain DCP directory",
        description=(__doc__ or "").replace("``", ""),
    )
    sp.add_argument("path", help="the job directory (base_dir/job_id)")
    sp.add_argument("--step", type=int, help="default: the newest committed step")
    sp.add_argument("--to", required=True, help="destination directory")
    sp.add_argument("--from", dest="sources", action="append", default=[],
                    help="another node's base directory holding ranks' objects")  # fmt: skip
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.set_defaults(fn=handle)


def handle(args: argparse.Namespace) -> int:
    from memckpt.adapters.dcp import checkpoint_id, export
    from memckpt.errors import MemckptError
    from memckpt.tools.catalog import scan_job

    job = Path(args.path)
    step = args.step
    if step is None:
        committed = [s.step for s in scan_job(job) if s.committed]
        if not committed:
            raise MemckptError(f"{job} holds no committed step to export")
        step = committed[-1]
    out = export(checkpoint_id(job.parent, job.name, step), args.to, sources=args.sources)
    if args.json:
        print(json.dumps({"step": step, "to": str(out)}))
    else:
        print(f"exported step {step} of {job} to {out}")
    return 0
