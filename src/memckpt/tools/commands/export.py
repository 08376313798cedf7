"""``memckpt export BASE/JOB [--step N] --to DIR``: a memory checkpoint as a plain DCP directory.

The result loads with ``torch.distributed.checkpoint.FileSystemReader`` in a process that
never imports memckpt. The step must have been saved through the DCP adapter
(``memckpt.adapters.dcp.MemoryStorageWriter``). On a multi-node job, name the other
nodes' base directories with ``--from`` so every rank's object is found. Exit code: 0
exported, 1 the step's data is damaged, 2 a usage error (path, step, destination).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

__all__ = ["handle", "register"]


def register(sub: Any) -> None:
    sp = sub.add_parser(
        "export",
        help="write a memory checkpoint as a plain DCP directory",
        description=(__doc__ or "").replace("``", ""),
    )
    sp.add_argument("path", help="the job directory (base_dir/job_id)")
    sp.add_argument("--step", type=int, help="default: the newest committed step")
    sp.add_argument("--to", required=True, metavar="DIR",
                    help="destination: a new or empty directory, or an earlier export")  # fmt: skip
    sp.add_argument("--from", dest="sources", action="append", default=[], metavar="NODE_DIR",
                    help="another node's base directory holding ranks' objects")  # fmt: skip
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.set_defaults(fn=handle)


def _check_destination(to: Path) -> None:
    from memckpt.tools.tables import CommandError

    if not os.path.lexists(to):
        return
    if not to.is_dir() or to.is_symlink():
        raise CommandError(
            f"--to {to} exists and is not a directory: give the path of a new directory"
        )
    if any(to.iterdir()) and not (to / ".metadata").is_file():
        raise CommandError(
            f"--to {to} is a directory holding other files: give a new or empty directory "
            "(an earlier export, with its .metadata, is overwritten)"
        )


def handle(args: argparse.Namespace) -> int:
    from memckpt.adapters.dcp import checkpoint_id, export
    from memckpt.tools.catalog import find_jobs, scan_job
    from memckpt.tools.tables import CommandError, emit_json

    jobs = find_jobs(args.path)
    if len(jobs) != 1:
        names = ", ".join(j.name for j in jobs) or "none"
        raise CommandError(f"{args.path} holds {len(jobs)} jobs ({names}): give one job directory")
    job = jobs[0]
    for src in args.sources:
        if not Path(src).is_dir():
            raise CommandError(f"--from {src}: no such directory: give another node's base dir")
    _check_destination(Path(args.to))
    trees = [job, *(Path(src) / job.name for src in args.sources)]
    committed = [s.step for s in scan_job(*trees) if s.committed]
    step = args.step
    if step is None:
        if not committed:
            raise CommandError(f"{job} holds no committed step to export")
        step = committed[-1]
    elif step not in committed:
        raise CommandError(f"no committed step {step} in {job} (committed: {committed})")
    out = export(checkpoint_id(job.parent, job.name, step), args.to, sources=args.sources)
    if args.json:
        emit_json({"job": str(job), "step": step, "to": str(out), "exit": 0})
    else:
        print(f"exported step {step} of {job} to {out}")
    return 0
