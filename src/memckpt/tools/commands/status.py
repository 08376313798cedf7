"""``memckpt status NODE_DIR...``: which node holds which rank's data, and the recovery plan."""

from __future__ import annotations

import argparse
import json
from typing import Any

__all__ = ["register"]


def register(sub: Any) -> None:
    sp = sub.add_parser(
        "status",
        help="which node holds which rank's data per step, and what a restart would load",
        description=(__doc__ or "").replace("``", ""),
    )
    sp.add_argument("paths", nargs="+", help="one directory per node (base dir or job dir)")
    sp.add_argument("--job", help="job id, when a directory holds several")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.set_defaults(fn=handle)


def handle(args: argparse.Namespace) -> int:
    from memckpt.tools.status import job_status
    from memckpt.tools.tables import print_table

    st = job_status(args.paths, args.job)
    if args.json:
        print(json.dumps(st.as_dict(), indent=2))
        return 0
    header = f"job {st.job_id}: {len(st.nodes)} node(s), world size {st.world_size}, " + (
        f"replication {st.strategy}" if st.strategy else "no replication record"
    )
    rows = []
    for step, by_rank in sorted(st.held.items(), reverse=True):
        for r in range(st.world_size or 0):
            on = by_rank.get(r, [])
            want = st.expected.get(r, [])
            if not on:
                state = "LOST"
            elif want and not set(want) <= set(on):
                state = "under-replicated"
            else:
                state = "ok"
            rows.append((step, r, st.nodes[st.rank_node[r]] if r in st.rank_node else "?",
                         ", ".join(st.nodes[n] for n in on) or "-",
                         ", ".join(st.nodes[n] for n in want) or "-", state))  # fmt: skip
    print_table(header, ["step", "rank", "node", "held on", "should be on", "state"], rows)
    plan = st.plan
    if plan.step is None:
        why = "; ".join(f"step {s}: {w}" for s, w in sorted(plan.skipped.items(), reverse=True))
        print_table("recovery plan", ["result"], [(f"nothing to recover ({why or 'no steps'})",)])
        return 1
    prow = [
        (r, "local" if s == r else f"fetch from rank {s} ({st.nodes[st.rank_node[s]]})")
        for r, s in sorted(plan.sources.items())
    ]
    print_table(f"recovery plan: load step {plan.step}", ["rank", "source"], prow)
    return 0
