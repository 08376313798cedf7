"""Run inside a private mount namespace on a 24 MiB tmpfs: a cold save that fills it must fail.

argv: <mount point> <blocking|async>. Prints one JSON report line.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

import torch

import memckpt
from memckpt.storage.pool import BufferPool, free_bytes


def main() -> None:
    base, blocking = Path(sys.argv[1]), sys.argv[2] == "blocking"
    cold = functools.partialmethod(BufferPool.acquire, cold_ok=True)
    BufferPool.acquire = cold  # type: ignore[method-assign]
    ballast = base / "ballast"

    def acquire_then_fill(self: BufferPool, nbytes: int, **kw: object) -> object:
        # another job fills the tmpfs after the save's space check, leaving 4 MiB
        buf = cold.__get__(self)(nbytes, **kw)
        fd = os.open(ballast, os.O_CREAT | os.O_WRONLY, 0o600)
        os.posix_fallocate(fd, 0, free_bytes(base) - (4 << 20))
        os.close(fd)
        return buf

    report: dict = {}
    with memckpt.CheckpointManager(base, "job", keep_last=1, prefault=False) as m:
        m.save(1, {"t": torch.ones(1 << 20)}, blocking=blocking).wait()  # 4 MiB, cold
        BufferPool.acquire = acquire_then_fill  # type: ignore[method-assign, assignment]
        # 12 MiB: the tmpfs fills while it is written; the save is skipped (a result)
        r = m.save(2, {"t": torch.full((3 << 20,), 2.0)}, blocking=blocking).wait()
        report["error"] = r.skipped
        BufferPool.acquire = cold  # type: ignore[method-assign]
        ballast.unlink()
        report["pool_files"] = sorted(os.listdir(m.store.pool.dir))
        report["free_mib"] = free_bytes(base) >> 20
        report["latest"] = m.latest()
        report["previous_intact"] = torch.equal(m.load()["t"], torch.ones(1 << 20))
        m.save(3, {"t": torch.full((1 << 20,), 3.0)}, blocking=blocking).wait()  # training goes on
        report["after"] = m.latest()
        report["after_intact"] = torch.equal(m.load()["t"], torch.full((1 << 20,), 3.0))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
