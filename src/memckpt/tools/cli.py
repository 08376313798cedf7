"""The memckpt command: look at, verify and clean up checkpoint trees; run and demo jobs."""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from memckpt import _warnings  # noqa: F401  (first memckpt import: filters before torch)
from memckpt.errors import ConfigError, CorruptCheckpointError, InvalidNameError, MemckptError
from memckpt.storage.durability import describe
from memckpt.storage.reader import ObjectReader
from memckpt.tools.catalog import (
    DAMAGED,
    MISSING,
    Condition,
    JobsFound,
    StepSummary,
    damage_detail,
    find_jobs,
    find_jobs_across,
    gc_job,
    non_tensor_entries,
    scan_job,
    steps_in,
)
from memckpt.tools.tables import (
    CHECKED_HEADERS,
    EXIT_DAMAGE,
    EXIT_OK,
    EXIT_USAGE,
    CommandError,
    emit_json,
    error_document,
    human_bytes,
    print_table,
)

__all__ = ["build_parser", "main"]

log = logging.getLogger(__name__)

EPILOG = """\
exit codes: 0 ok; 1 damage found (status: or nothing can be recovered; demo: it
failed); 2 usage error (a bad argument, path, job or step).
--json (every command): one JSON document on stdout; an error under --json is
{"error": "...", "kind": "usage|damaged|io|error", "exit": N} on stdout.
after a failure (ls, status, verify, inspect): docs/operations.md
every MEMCKPT_* environment variable: docs/environment.md
"""


class ArgumentsError(CommandError):
    """A command line argparse refused; ``parser`` printed the usage of the command."""

    def __init__(self, message: str, parser: argparse.ArgumentParser) -> None:
        super().__init__(message)
        self.parser = parser


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors reach ``main`` (which prints them as text or JSON)."""

    def error(self, message: str) -> NoReturn:
        raise ArgumentsError(message, self)


# -- ls ------------------------------------------------------------------------------------------


def _damaged_cell(s: StepSummary) -> str:
    parts = [f"rank {r}" for r in s.damaged_ranks]
    parts += [f"rank {k.rank} (set aside)" for k in s.marks if k.rank is not None]
    parts += ["step (load mark)" for _ in s.step_marks[:1]]
    parts += ["manifest" for _ in [s.manifest_error] if s.manifest_error]
    return ", ".join(parts) or "-"


def _step_doc(s: StepSummary) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "step": s.step,
        "committed": s.committed,
        "complete": s.complete,
        "world_size": s.world_size,
        "ranks": s.present_ranks,
        "missing": s.missing_ranks,
        "damaged": sorted(set(s.damaged_ranks) | {k.rank for k in s.marks if k.rank is not None}),
        "writing": list(s.writing_ranks),
        "bytes": s.size,
        "data_bytes": s.data_bytes,
        "durability": s.durability_doc(),
        "objects": [
            {"rank": o.rank, "path": str(o.path), **s.object_condition(o).as_dict()}
            for o in s.objects
        ],
        "damage": [{"path": str(p), **c.as_dict()} for p, c in s.damage],
    }
    if s.manifest_error:
        doc["manifest_error"] = s.manifest_error
    if s.manifest is not None:
        doc["finite"] = s.manifest.finite  # False: some rank saved NaN/Inf (recovery skips it)
        if not s.manifest.finite:
            doc["non_finite"] = {str(r): {"count": nf.count, "tensors": list(nf.names)}
                                 for r, nf in sorted(s.manifest.non_finite.items())}  # fmt: skip
    return doc


def cmd_ls(args: argparse.Namespace) -> int:
    found = find_jobs_across(args.path)
    scans = {name: scan_job(*dirs) for name, dirs in sorted(found.jobs.items())}
    code = EXIT_DAMAGE if any(s.damage for steps in scans.values() for s in steps) else EXIT_OK
    if args.json:
        emit_json([
            {"job": name if len(found.jobs[name]) > 1 else str(found.jobs[name][0]),
             "dirs": [str(d) for d in found.jobs[name]], "checked": "headers",
             "empty": found.empty, "steps": [_step_doc(s) for s in steps], "exit": code}
            for name, steps in scans.items()
        ])  # fmt: skip
        return code
    for name, steps in scans.items():
        dirs = found.jobs[name]
        rows = [
            (s.step, "yes" if s.committed else ("damaged" if s.manifest_error else "no"),
             "yes" if s.complete else "no", f"{len(s.present_ranks)}/{s.world_size or '?'}",
             ", ".join(map(str, s.missing_ranks)) or "-", _damaged_cell(s),
             ", ".join(map(str, s.writing_ranks)) or "-", human_bytes(s.data_bytes),
             "-" if s.manifest is None else ("yes" if s.manifest.finite else "NaN/Inf"),
             describe(s.durability, s.copies))
            for s in steps
        ]  # fmt: skip
        print_table(name if len(dirs) > 1 else str(dirs[0]),
                    ["step", "committed", "complete", "ranks ok", "missing", "damaged",
                     "writing", "data", "finite", "durability"], rows)  # fmt: skip
        for s in steps:
            for path, c in s.damage:
                print(f"step {s.step}: {path}: {c}")
            if s.persisted is not None:
                print(f"step {s.step}: persisted to {s.persisted.where} (as its drain recorded "
                      "on the node)")  # fmt: skip
            if s.manifest is not None and not s.manifest.finite:
                print(f"step {s.step}: saved holding NaN/Inf ({s.manifest.non_finite_summary()});"
                      " recovery passes over it unless on_non_finite='load'")  # fmt: skip
        if any(s.committed and s.missing_ranks for s in steps):
            print("missing ranks of a committed step may be on other nodes: list every node's "
                  "directory (memckpt ls NODE0 NODE1 ...) or run memckpt status")  # fmt: skip
    _print_empty(found)
    print(CHECKED_HEADERS.format(how="memckpt verify"))
    return code


def _print_empty(found: JobsFound) -> None:
    for path, why in found.empty.items():
        print(f"{path}: {why} (a node with nothing on it)")


# -- verify --------------------------------------------------------------------------------------


def _check_step(step: int | None, known: Sequence[int], where: str) -> None:
    if step is not None and step not in known:
        raise CommandError(
            f"no step {step} in {where} (steps: {list(known)}); pass one of them, or no --step"
        )


def cmd_verify(args: argparse.Namespace) -> int:
    found = find_jobs_across(args.path)
    known = sorted({s for dirs in found.jobs.values() for s in steps_in(*dirs)})
    _check_step(args.step, known, ", ".join(args.path))
    if not known:
        raise CommandError(f"no step to verify under {', '.join(args.path)}")
    wanted = None if args.step is None else {args.step}
    results: list[dict[str, Any]] = []
    for name, dirs in sorted(found.jobs.items()):
        for s in scan_job(*dirs, verify=True, steps=wanted):
            rows: list[tuple[int | None, str, Condition]] = [
                (o.rank, str(o.path), s.object_condition(o)) for o in s.objects
            ]
            if s.committed:
                rows += [(r, "-", Condition(MISSING, "no copy in the given directories"))
                         for r in s.missing_ranks]  # fmt: skip
            taken = {p for _, p, _ in rows}
            rows += [(None, str(p), c) for p, c in s.damage if str(p) not in taken]
            results += [{"job": name, "step": s.step, "rank": r, "path": p, **c.as_dict()}
                        for r, p, c in rows]  # fmt: skip
    damaged = {r["path"]: r["detail"] for r in results if r["state"] == DAMAGED}
    missing = [{k: r[k] for k in ("job", "step", "rank")} for r in results
               if r["state"] == MISSING]  # fmt: skip
    code = EXIT_DAMAGE if damaged else EXIT_OK
    objects = sum(1 for r in results if r["state"] != MISSING)
    if args.json:
        emit_json({"checked": "data", "objects": objects, "damaged": damaged,
                   "missing": missing, "results": results, "exit": code})  # fmt: skip
        return code
    rows = [(r["step"], "-" if r["rank"] is None else r["rank"], r["path"],
             str(Condition(r["state"], r["detail"]))) for r in results]  # fmt: skip
    print_table("verify: every tensor chunk re-hashed", ["step", "rank", "object", "result"], rows,
                whole=["object"])  # fmt: skip
    _print_empty(found)
    print(f"{objects} checked: {len(damaged)} damaged, {len(missing)} missing")
    if damaged:
        print(
            "a damaged copy is never loaded; memckpt status NODE_DIR... --verify shows "
            "whether another node holds a good one and which step a restart would load"
        )
    return code


# -- inspect -------------------------------------------------------------------------------------

_ENTRIES_SHOWN = 50


def _inspect_object(s: StepSummary, o: Any, verify: bool) -> dict[str, Any]:
    entry: dict[str, Any] = {"rank": o.rank, "path": str(o.path), "size": o.size}
    cond = s.object_condition(o)
    try:
        with ObjectReader(o.path) as r:
            idx, h = r.index, r.header
            entry.update(
                world_size=idx.world_size,
                data_bytes=idx.data_bytes,
                non_tensor_bytes=h.objects_length,
                tensors=[
                    {"name": t.name, "dtype": t.dtype, "shape": list(t.shape),
                     "bytes": t.nbytes, "device": t.device}
                    for t in idx.tensors
                ],
            )  # fmt: skip
            if verify and cond.ok and (bad := r.verify()):
                cond = Condition(DAMAGED, "checksum mismatch in " + "; ".join(map(str, bad[:5])))
            try:
                entry["entries"] = [e.__dict__ for e in non_tensor_entries(r)]
            except MemckptError as e:  # a class a load must allow, or damage
                entry["entries_error"] = damage_detail(e, o.path)
                if isinstance(e, CorruptCheckpointError) and cond.ok:
                    cond = Condition(DAMAGED, damage_detail(e, o.path))
    except (CorruptCheckpointError, OSError) as e:
        if cond.ok:
            cond = Condition(DAMAGED, damage_detail(e, o.path))
    entry.update(cond.as_dict())
    if not cond.ok:
        entry["error"] = cond.detail
    return entry


def _print_object(step: int, o: dict[str, Any]) -> None:
    print(f"step {step} rank {o['rank']}: {Condition(o['state'], o['detail'])}")
    print(f"  {o['path']}")
    if "tensors" not in o:
        return
    print(f"  tensors {human_bytes(o['data_bytes'])}, non-tensor part "
          f"{human_bytes(o['non_tensor_bytes'])}; file {human_bytes(o['size'])} "
          "(a pool buffer, reused across steps)")  # fmt: skip
    rows = [(t["name"], t["dtype"], tuple(t["shape"]), human_bytes(t["bytes"]), t["device"])
            for t in o["tensors"]]  # fmt: skip
    print_table("tensors", ["name", "dtype", "shape", "size", "device"], rows)
    if "entries_error" in o:
        print(f"  non-tensor entries not shown: {o['entries_error']}")
    elif o.get("entries"):
        shown = o["entries"][:_ENTRIES_SHOWN]
        print_table("non-tensor entries", ["name", "type", "value"],
                    [(e["name"], e["type"], e["value"]) for e in shown])  # fmt: skip
        if len(o["entries"]) > len(shown):
            print(f"  ... and {len(o['entries']) - len(shown)} more (--json lists them)")


def cmd_inspect(args: argparse.Namespace) -> int:
    job = _single_job(args.path)
    known = steps_in(job)
    step = args.step if args.step is not None else max(known, default=None)
    if step is None:
        raise CommandError(f"{job} holds no step to inspect")
    _check_step(step, known, str(job))
    (s,) = scan_job(job, steps={step})
    objects = [_inspect_object(s, o, args.verify) for o in s.objects]
    marks = [{"path": str(p), **c.as_dict()} for p, c in s.damage
             if str(p) not in {o["path"] for o in objects}]  # fmt: skip
    missing = s.missing_ranks if s.committed else []
    damaged = any(o["state"] == DAMAGED for o in objects) or bool(marks)
    code = EXIT_DAMAGE if damaged else EXIT_OK
    checked = "data" if args.verify else "headers"
    if args.json:
        emit_json(
            {"job": str(job), "step": step, "committed": s.committed, "checked": checked,
             "objects": objects, "missing": missing, "damage": marks, "exit": code}
        )  # fmt: skip
        return code
    for o in objects:
        _print_object(step, o)
    for r in missing:
        print(f"step {step} rank {r}: {Condition(MISSING, 'not in this tree')}")
    for m in marks:
        print(f"step {step}: {m['path']}: {Condition(m['state'], m['detail'])}")
    if not s.committed:
        print(f"step {step} is not committed (no valid manifest here)")
    if not args.verify:
        print(CHECKED_HEADERS.format(how="--verify"))
    return code


# -- gc ------------------------------------------------------------------------------------------


def cmd_gc(args: argparse.Namespace) -> int:
    if args.keep is None and args.persist_dir is None:
        raise CommandError("gc needs --keep N (the memory tree) or --persist-dir URL (the "
                           "durable tier), or both")  # fmt: skip
    if args.persist_dir is None and (args.persist_keep_last is not None or args.persist_option):
        raise CommandError("--persist-keep-last and --persist-option need --persist-dir URL")
    job = _single_job(args.path) if args.keep is not None else None
    deleted = gc_job(job, args.keep, dry_run=args.dry_run) if job is not None else []
    store = _gc_store(args, job) if args.persist_dir is not None else None
    verb = "would delete" if args.dry_run else "deleted"
    if args.json:
        doc: dict[str, Any] = {"job": None if job is None else str(job), "deleted": deleted,
                               "dry_run": args.dry_run, "exit": EXIT_OK}  # fmt: skip
        if store is not None:
            doc["persist"] = store
        emit_json(doc)
        return EXIT_OK
    if job is not None:
        print(f"{verb} steps: {', '.join(map(str, deleted)) or 'none'} ({job})")
    if store is not None:
        half = ", ".join(map(str, store["half_uploaded"])) or "none"
        expired = ", ".join(map(str, store["expired"])) or "none"
        print(f"{verb} from {store['url']}/{store['job']}: half-uploaded steps {half}; "
              f"persisted steps {expired}")  # fmt: skip
    return EXIT_OK


def _storage_options(pairs: Sequence[str]) -> dict[str, Any]:
    """``key=value`` pairs as fsspec storage options; a value that reads as JSON (true, 3,
    {...}) is that value, any other is the string."""
    import json

    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise CommandError(f"--persist-option {pair!r}: give key=value, e.g. "
                               "endpoint_url=http://minio:9000")  # fmt: skip
        try:
            out[key.strip()] = json.loads(raw)
        except ValueError:
            out[key.strip()] = raw
    return out


def _gc_store(args: argparse.Namespace, job: Path | None) -> dict[str, Any]:
    """``memckpt gc --persist-dir``: clean the job's durable tier (``RemoteTier.gc``)."""
    from memckpt.storage.remote import RemoteTier, resolve_location

    if job is None:
        jobs = find_jobs(args.path) if os.path.lexists(args.path) else []
        if len(jobs) > 1:
            raise CommandError(f"{args.path} holds {len(jobs)} jobs: give one job directory")
        # the memory tier may be gone (released once persisted): the path names the job
        job = jobs[0] if jobs else Path(args.path)
    if isinstance(resolve_location(args.persist_dir), Path):
        raise CommandError(f"--persist-dir {args.persist_dir!r} is a local path; gc of a "
                           "drained directory: memckpt gc <dir>/<job> --keep N")  # fmt: skip
    if args.persist_grace < 0:
        raise CommandError(f"--persist-grace must be >= 0 seconds, got {args.persist_grace}")
    tier = RemoteTier(args.persist_dir, job.name, _storage_options(args.persist_option))
    plan = tier.gc(args.persist_keep_last, args.persist_grace, dry_run=args.dry_run)
    return {"url": tier.url, "job": tier.job_id, "half_uploaded": list(plan.half_uploaded),
            "expired": list(plan.expired)}  # fmt: skip


def _single_job(path: str) -> Path:
    jobs = find_jobs(path)
    if not jobs:
        raise CommandError(
            f"no memckpt job under {path}: give a job directory (base_dir/job_id), which "
            "holds step-N/ directories"
        )
    if len(jobs) > 1:
        names = ", ".join(j.name for j in jobs)
        raise CommandError(f"{path} holds {len(jobs)} jobs ({names}): give one job directory")
    return jobs[0]


# -- the parser ----------------------------------------------------------------------------------


def _version() -> str:
    import torch

    import memckpt

    return (
        f"memckpt {memckpt.__version__} (torch {torch.__version__}, "
        f"python {platform.python_version()})"
    )


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="memckpt", description=__doc__, epilog=EPILOG,
                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--version", action="version", version=_version())
    sub = p.add_subparsers(dest="command", required=True)

    def add(name: str, help_: str, many: bool) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_)
        if many:
            sp.add_argument("path", nargs="+", metavar="PATH",
                            help="job or base directories, one per node (a missing one holds "
                            "nothing)")  # fmt: skip
        else:
            sp.add_argument("path", help="a job directory (base_dir/job_id) or a base directory")
        sp.add_argument("--json", action="store_true", help="machine-readable output")
        return sp

    sp = add("ls", "list the steps of each job: committed, complete, ranks ok, missing and "
             "damaged (headers only: fast); exit 1 on damage", many=True)  # fmt: skip
    sp.set_defaults(fn=cmd_ls)
    sp = add("inspect", "show a step's objects: tensors, non-tensor entries, sizes, damage; "
             "exit 1 on damage", many=False)  # fmt: skip
    sp.add_argument("--step", type=int, help="the step (default: the newest)")
    sp.add_argument("--verify", action="store_true", help="re-hash the step's tensor data too")
    sp.set_defaults(fn=cmd_inspect)
    sp = add("verify", "re-hash every tensor chunk of every object; exit 1 on damage",
             many=True)  # fmt: skip
    sp.add_argument("--step", type=int, help="only this step (default: every step)")
    sp.set_defaults(fn=cmd_verify)
    sp = add("gc", "delete all but the newest N complete steps of one node's tree, and "
             "half-uploaded (or, with --persist-keep-last, old) steps of the job's durable "
             "tier", many=False)  # fmt: skip
    sp.add_argument("--keep", type=int, metavar="N",
                    help="complete steps to keep, newest first (N >= 1; steps newer than the "
                    "newest complete one are never touched); needed unless --persist-dir "
                    "is given")  # fmt: skip
    sp.add_argument("--dry-run", action="store_true",
                    help="print the steps that would be deleted; delete nothing")  # fmt: skip
    sp.add_argument("--persist-dir", metavar="URL",
                    help="the job's durable tier (s3://bucket/prefix ...): delete its "
                    "half-uploaded steps (objects, no manifest); the job is PATH's (a PATH "
                    "that holds no job names it: base_dir/job_id)")  # fmt: skip
    sp.add_argument("--persist-option", action="append", default=[], metavar="KEY=VALUE",
                    help="an fsspec storage option for --persist-dir (repeatable), e.g. "
                    "endpoint_url=http://minio:9000; credentials and AWS_ENDPOINT_URL come "
                    "from the environment as for training")  # fmt: skip
    sp.add_argument("--persist-keep-last", type=int, metavar="N",
                    help="also delete persisted steps beyond the newest N (manifest "
                    "first)")  # fmt: skip
    sp.add_argument("--persist-grace", type=float, default=3600.0, metavar="SECONDS",
                    help="a half-uploaded step newer than the newest persisted one may be an "
                    "upload in flight: delete it only once it is this old (default 3600; 0 "
                    "when no job drains there)")  # fmt: skip
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


# -- main ----------------------------------------------------------------------------------------


def _classify(e: BaseException) -> tuple[str, int, str]:
    """(kind, exit code, one-line message) of an error a command ended with."""
    if isinstance(e, CorruptCheckpointError):
        return "damaged", EXIT_DAMAGE, str(e)
    if isinstance(e, (CommandError, ConfigError, InvalidNameError)):
        return "usage", EXIT_USAGE, str(e)
    if isinstance(e, MemckptError):
        return "error", EXIT_USAGE, str(e)
    assert isinstance(e, OSError)
    where = f"{e.filename}: " if e.filename else ""
    return "io", EXIT_USAGE, f"{where}{e.strerror or e}; check the path and its permissions"


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; return its exit code (an argument error in text raises SystemExit(2)).

    Under ``--json`` every error is a JSON document on stdout (``error_document``).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    as_json = "--json" in argv[: argv.index("--")] if "--" in argv else "--json" in argv
    try:
        args = build_parser().parse_args(argv)
        logging.basicConfig(
            level=logging.DEBUG if args.verbose else logging.WARNING,
            format="%(levelname)s %(name)s: %(message)s",
        )
        return int(args.fn(args))
    except (MemckptError, OSError) as e:
        kind, code, message = _classify(e)
        message = " ".join(message.split())  # one line, whatever the message held
        if as_json:
            emit_json(error_document(message, kind, code))
        elif isinstance(e, ArgumentsError):  # as argparse ends: usage, error, SystemExit(2)
            e.parser.print_usage(sys.stderr)
            e.parser.exit(code, f"{e.parser.prog}: error: {message}\n")
        else:
            print(f"memckpt: error: {message}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
