"""Run inside a private mount namespace on a tiny tmpfs: a save that does not fit is skipped.

    full_disk_worker.py BASE            one save that does not fit next to step 1
    full_disk_worker.py BASE MIB STEPS  a training loop saving a MIB-MiB state every step

Prints one JSON report on its last line.
"""

from __future__ import annotations

import json
import sys

import torch

import memckpt


def one_oversize_save(base: str) -> dict:
    report: dict = {}
    with memckpt.CheckpointManager(base, "job", keep_last=1) as m:
        m.save(1, {"t": torch.ones(1 << 20)}).wait()  # 4 MiB
        r = m.save(2, {"t": torch.ones(5 << 20)}).wait()  # 20 MiB: does not fit next to step 1
        report["error"] = r.skipped
        report["committed"] = r.committed
        report["latest"] = m.latest()
        report["previous_intact"] = torch.equal(m.load()["t"], torch.ones(1 << 20))
        m.save(3, {"t": torch.full((1 << 20,), 3.0)}).wait()  # training goes on
        report["after"] = m.latest()
    return report


def training_loop(base: str, mib: int, steps: int) -> dict:
    """Train ``steps`` steps, saving a ``mib``-MiB state after each; never crash."""
    results = []
    w = torch.zeros(mib << 18)  # float32: 4 bytes each
    with memckpt.CheckpointManager(base, "job", keep_last=2) as m:
        for step in range(1, steps + 1):
            w.add_(1.0)  # "training"
            r = m.save(step, {"w": w}).wait()
            results.append({"step": step, "committed": r.committed, "skipped": r.skipped})
        latest = m.latest()
        loaded = m.load() if latest is not None else None
        intact = loaded is not None and torch.equal(loaded["w"], torch.full_like(w, latest))
    return {"results": results, "latest": latest, "intact": intact, "trained": steps}


def main() -> None:
    if len(sys.argv) == 2:
        report = one_oversize_save(sys.argv[1])
    else:
        report = training_loop(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
