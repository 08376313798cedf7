"""``memckpt status NODE_DIR...``: per step, where each rank's data is, what is at risk, and
what a restart would load.

Give one directory per node (its memory base directory, or the job directory in it). A
missing or empty directory is a node that holds nothing (a lost or replaced node). Exit
code: 0 when a step can be recovered and nothing is damaged, 1 when nothing can be
recovered or something is damaged, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

__all__ = ["handle", "register"]


def register(sub: Any) -> None:
    sp = sub.add_parser(
        "status",
        help="per step: where each rank's data is, what is at risk, what a restart would load",
        description=(__doc__ or "").replace("``", ""),
    )
    sp.add_argument(
        "paths",
        nargs="+",
        metavar="NODE_DIR",
        help="one directory per node (base dir or job dir); a missing one holds nothing",
    )
    sp.add_argument("--job", help="job id, when the directories hold several")
    sp.add_argument(
        "--verify",
        action="store_true",
        help="re-hash every object's data too (reads it all; default: headers only)",
    )
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.set_defaults(fn=handle)


def _where(st: Any, rank: Any) -> str:
    return "; ".join(f"{st.label(c.node)} {c.condition}" for c in rank.copies) or "-"


def _copies(rank: Any) -> str:
    return f"{rank.good} of {rank.expected}" if rank.expected else str(rank.good)


def _how(st: Any, plan: Any) -> str:
    fetch = [
        f"rank {r} from {st.label(node)}"
        for r in sorted(plan.sources)
        for node, local in [st.source(r, plan)]
        if not local
    ]
    return "fetch " + ", ".join(fetch) if fetch else "every rank reads its own node"


def _ranks(pairs: list[tuple[int, int]]) -> str:
    by_step: dict[int, list[int]] = {}
    for s, r in pairs:
        by_step.setdefault(s, []).append(r)
    return "; ".join(
        f"step {s} rank {', '.join(map(str, rs))}"
        for s, rs in sorted(by_step.items(), reverse=True)
    )


def _finite(manifest: Any) -> str:
    """``yes``, ``no: <which tensors held NaN/Inf>``, or ``-`` without a manifest."""
    if manifest is None:
        return "-"
    return "yes" if manifest.finite else f"no: {manifest.non_finite_summary()}"


def _durability(v: Any) -> str:
    """``local``, ``replicated (2 copies)``, ``persisted`` or ``-`` (see docs/durable.md)."""
    from memckpt.storage.durability import describe

    d = v.durability
    return describe(d["tier"], d["copies"])


def _last_save(doc: dict[str, Any]) -> str:
    """One line: step, outcome (with the reason), when, and the replication rate."""
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(doc["unix"]))
    text = f"step {doc['step']} {doc['outcome']} at {when}"
    if doc["reason"]:
        text += f": {doc['reason']}"
    if doc["outcome"] == "committed":
        text += f" ({doc['nbytes'] / 1e6:.1f} MB, blocking {doc['blocking_s']:.3f}s)"
    rate = doc["replication_bytes_per_s"]
    if rate is not None:
        text += (f"; replicated {doc['replication_bytes'] / 1e6:.1f} MB at "
                 f"{rate / 1e6:.1f} MB/s")  # fmt: skip
    return text


def render(st: Any) -> None:
    """Print a JobStatus for an operator."""
    from memckpt.tools.status import last_saves, node_room
    from memckpt.tools.tables import CHECKED_HEADERS, print_table

    repl = f"replication {st.strategy}" if st.strategy else "no replication recorded"
    print_table(
        f"job {st.job_id}: world size {st.world_size}, {repl}",
        ["node", "directory", "state", "ranks"],
        [
            (n.label, n.job_dir or n.path or "-", n.state, ", ".join(map(str, n.ranks)) or "-")
            for n in st.nodes
        ],
        whole=["directory"],
    )
    rows = [
        (v.step, r.rank, st.label(st.rank_node.get(r.rank)), _copies(r), _where(st, r), r.state)
        for v in reversed(st.steps)
        if v.summary.committed
        for r in v.ranks
    ]
    print_table("copies of each rank's object", ["step", "rank", "node", "good copies",
                "on", "state"], rows)  # fmt: skip
    steps = [
        (v.step, "yes" if v.summary.committed else "no", _durability(v),
         _finite(v.summary.manifest), "yes" if v.recoverable else "no",
         _how(st, v.plan) if v.recoverable else v.why_not)
        for v in reversed(st.steps)
    ]  # fmt: skip
    print_table("steps", ["step", "committed", "durability", "finite", "recoverable",
                          "how / why not"], steps)  # fmt: skip
    for v in reversed(st.steps):
        if v.summary.persisted is not None:
            print(f"step {v.step}: persisted to {v.summary.persisted.where} (as its drain "
                  "recorded on the node)")  # fmt: skip
    plan = st.plan
    if plan.step is None:
        print("recovery: nothing can be recovered from these nodes; restart from the "
              "persistent tier (or pass the directories of nodes left out)")  # fmt: skip
    else:
        prow = []
        for r in sorted(plan.sources):
            node, local = st.source(r, plan)
            src = f"local ({st.label(node)})" if local else f"fetch from {st.label(node)}"
            prow.append((r, st.label(st.rank_node.get(r)), src))
        print_table(f"recovery plan: load step {plan.step}", ["rank", "node", "source"], prow)
    if st.at("lost"):
        print(f"lost (no good copy on these nodes): {_ranks(st.at('lost'))}")
    if st.at("at risk"):
        print(f"at risk (one good copy left): {_ranks(st.at('at risk'))}")
    for s, path, c in st.damage:
        print(f"step {s}: {path}: {c}")
    for n in st.nodes:
        if n.job_dir:
            for rank, doc in sorted(last_saves(n.job_dir).items()):
                print(f"last save of rank {rank} on {n.label}: {_last_save(doc)}")
    for n in st.nodes:
        if n.job_dir:
            room = node_room(n.job_dir)
            if room["next_save_bytes"]:
                verdict = "fits" if room["fits"] else f"would be skipped: it {room['why_not']}"
                print(f"room on {n.label}: a save like the newest step {verdict}")
    if st.checked == "headers":
        print(CHECKED_HEADERS.format(how="--verify (or memckpt verify)"))


def handle(args: argparse.Namespace) -> int:
    from memckpt.tools.status import job_status
    from memckpt.tools.tables import emit_json

    st = job_status(args.paths, args.job, verify=args.verify)
    if args.json:
        emit_json(st.as_dict())
    else:
        render(st)
    return st.exit_code
