"""Run inside a private mount namespace on a tiny tmpfs: a save that does not fit must fail."""

from __future__ import annotations

import json
import sys

import torch

import memckpt


def main() -> None:
    base = sys.argv[1]
    report: dict = {}
    with memckpt.CheckpointManager(base, "job", keep_last=1) as m:
        m.save(1, {"t": torch.ones(1 << 20)}).wait()  # 4 MiB
        try:
            m.save(2, {"t": torch.ones(5 << 20)}).wait()  # 20 MiB: does not fit next to step 1
            report["error"] = None
        except memckpt.InsufficientSpaceError as e:
            report["error"] = str(e)
        report["latest"] = m.latest()
        report["previous_intact"] = torch.equal(m.load()["t"], torch.ones(1 << 20))
        m.save(3, {"t": torch.full((1 << 20,), 3.0)}).wait()  # training goes on
        report["after"] = m.latest()
    print(json.dumps(report))


if __name__ == "__main__":
    main()
