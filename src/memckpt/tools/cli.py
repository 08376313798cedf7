"""The ``memckpt`` command: look at, verify and clean up checkpoint trees."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from memckpt.errors import MemckptError
from memckpt.storage.reader import ObjectReader
from memckpt.tools.catalog import find_jobs, gc_job, scan_job, verify_job
from memckpt.tools.tables import emit_json, human_bytes, print_table

__all__ = ["main"]


def _jobs_across(paths: Sequence[str]) -> dict[str, list[Path]]:
    """Job name -> its directories under each given path (one path per node)."""
    jobs: dict[str, list[Path]] = {}
    for p in paths:
        for job in find_jobs(p):
            jobs.setdefault(job.name, []).append(job)
    return jobs


def cmd_ls(args: argparse.Namespace) -> int:
    docs = []
    for name, dirs in sorted(_jobs_across(args.path).items()):
        steps = scan_job(*dirs)
        docs.append(
            {
                "job": name if len(dirs) > 1 else str(dirs[0]),
                "dirs": [str(d) for d in dirs],
                "steps": [
                    {
                        "step": s.step,
                        "complete": s.complete,
                        "committed": s.committed,
                        "ranks": s.present_ranks,
                        "missing": s.missing_ranks,
                        "damaged": sorted({o.rank for o in s.objects if o.error is not None}),
                        "writing": list(s.writing_ranks),
                        "world_size": s.world_size,
                        "bytes": s.size,
                        **({"manifest_error": s.manifest_error} if s.manifest_error else {}),
                    }
                    for s in steps
                ],
            }
        )
    if args.json:
        emit_json(docs)
        return 0
    for d in docs:
        rows = [
            (
                s["step"],
                "yes" if s["complete"] else "no",
                "yes" if s["committed"] else ("DAMAGED" if "manifest_error" in s else "no"),
                f"{len(s['ranks'])}/{s['world_size'] or '?'}",
                ",".join(map(str, s["missing"])) or "-",
                ",".join(map(str, s["damaged"])) or "-",
                ",".join(map(str, s["writing"])) or "-",
                human_bytes(s["bytes"]),
            )
            for s in d["steps"]
        ]
        print_table(
            d["job"],
            ["step", "complete", "committed", "ranks", "not here", "damaged", "writing", "size"],
            rows,
        )
        if any(s["committed"] and s["missing"] for s in d["steps"]):
            print(
                "committed steps whose ranks are 'not here' are complete only if other nodes "
                "hold those ranks: list every node's directory (memckpt ls NODE0 NODE1 ...) "
                "or run memckpt status"
            )
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    job = _single_job(args.path)
    steps = {s.step: s for s in scan_job(job)}
    step = args.step if args.step is not None else max(steps, default=None)
    if step not in steps:
        raise MemckptError(f"no step {step} in {job} (steps: {sorted(steps)})")
    doc: dict[str, Any] = {"job": str(job), "step": step, "objects": []}
    for o in steps[step].objects:
        entry: dict[str, Any] = {"rank": o.rank, "path": str(o.path), "size": o.size}
        if o.error:
            entry["error"] = o.error
        else:
            with ObjectReader(o.path) as r:
                entry["world_size"] = r.index.world_size
                entry["tensors"] = [
                    {"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "bytes": t.nbytes,
                     "device": t.device}
                    for t in r.index.tensors
                ]  # fmt: skip
        doc["objects"].append(entry)
    if args.json:
        emit_json(doc)
        return 0
    for o in doc["objects"]:
        if "error" in o:
            print_table(f"step {step} rank {o['rank']}: DAMAGED", ["error"], [(o["error"],)])
            continue
        rows = [
            (t["name"], t["dtype"], tuple(t["shape"]), human_bytes(t["bytes"]), t["device"])
            for t in o["tensors"]
        ]
        print_table(
            f"step {step} rank {o['rank']} ({human_bytes(o['size'])}, {o['path']})",
            ["tensor", "dtype", "shape", "size", "device"],
            rows,
        )
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    results: dict[str, Any] = {}
    for job in find_jobs(args.path):
        for path, dmg in verify_job(job, args.step).items():
            results[str(path)] = dmg if isinstance(dmg, str) else [str(d) for d in dmg]
    bad = {p: d for p, d in results.items() if d}
    if args.json:
        emit_json({"objects": len(results), "damaged": bad})
    else:
        rows = [(p, "OK" if not d else (d if isinstance(d, str) else "; ".join(d))) for p, d in
                results.items()]  # fmt: skip
        print_table("verify", ["object", "result"], rows)
    if not results:
        logging.getLogger("memckpt").error("nothing to verify under %s", args.path)
        return 2
    return 1 if bad else 0


def cmd_gc(args: argparse.Namespace) -> int:
    job = _single_job(args.path)
    deleted = gc_job(job, args.keep, dry_run=args.dry_run)
    if args.json:
        emit_json({"job": str(job), "deleted": deleted, "dry_run": args.dry_run})
    else:
        verb = "would delete" if args.dry_run else "deleted"
        print(f"{verb} steps: {deleted or 'none'}")
    return 0


def _single_job(path: str) -> Path:
    jobs = find_jobs(path)
    if len(jobs) != 1:
        raise MemckptError(
            f"{path} holds {len(jobs)} jobs ({', '.join(j.name for j in jobs)}); "
            "name one job directory"
        )
    return jobs[0]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="memckpt", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    def add(name: str, help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("path", help="a job directory (base_dir/job_id) or a base directory")
        sp.add_argument("--json", action="store_true", help="machine-readable output")
        return sp

    sp = sub.add_parser("ls", help="list checkpoints and their completeness")
    sp.add_argument("path", nargs="+", help="job or base directories, one per node")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.set_defaults(fn=cmd_ls)
    sp = add("inspect", "show the tensors of a step")
    sp.add_argument("--step", type=int, help="default: newest")
    sp.set_defaults(fn=cmd_inspect)
    sp = add("verify", "re-hash every tensor; exit 1 on damage")
    sp.add_argument("--step", type=int, help="default: every step")
    sp.set_defaults(fn=cmd_verify)
    sp = add("gc", "delete all but the newest N complete steps")
    sp.add_argument("--keep", type=int, required=True)
    sp.add_argument("--dry-run", action="store_true")
    sp.set_defaults(fn=cmd_gc)
    _register_command_modules(sub)
    return p


def _register_command_modules(sub: Any) -> None:
    """Add the subcommands defined in ``memckpt.tools.commands.*`` (each has ``register(sub)``).

    Modules import their heavy dependencies inside their handlers, so ``memckpt --help``
    stays fast and works with torch alone.
    """
    import importlib
    import pkgutil

    import memckpt.tools.commands as commands

    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"memckpt.tools.commands.{info.name}")
        module.register(sub)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.fn(args))
    except MemckptError as e:
        print(f"memckpt: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
