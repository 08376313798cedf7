"""Rank functions for tests/test_drain_peer_lost.py (module level: spawned ranks import them)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import torch


def peer_dies_before_uploading_its_part(
    rank: int, world: int, base: str, persist: str, how: str
) -> dict:
    """Both ranks commit step 1 with ``persist_every=1``. Rank 1's drain is held back and
    the rank dies: its part never reaches ``persist``. Rank 0 (the coordinator, whose
    drain waits for every part) then fails and closes while the exception propagates:
    ``how`` is "with" (a with block) or "finally" (a training loop's finally clause)."""
    import memckpt
    from memckpt.engine import drain

    if rank == 1:
        drain._executor.submit(threading.Event().wait, 300)  # its drain never runs
    m = memckpt.CheckpointManager(Path(base) / f"node{rank}", "job", persist_every=1,
                                  persist_dir=persist)  # fmt: skip
    err = ""
    try:
        if how == "with":
            with m:
                m.save(1, {"w": torch.ones(100)}).wait()
                if rank == 1:
                    os._exit(0)  # dies: the part is never uploaded
                time.sleep(0.5)  # rank 0's drain is waiting for rank 1's part by now
                raise RuntimeError("the peer is gone")
        else:
            try:
                m.save(1, {"w": torch.ones(100)}).wait()
                if rank == 1:
                    os._exit(0)
                time.sleep(0.5)
                raise RuntimeError("the peer is gone")
            finally:
                m.close()
    except RuntimeError as e:
        err = str(e)
    t0 = time.monotonic()
    drain.wait_for_drains(timeout=60)  # what the interpreter's exit would wait for
    return {"err": err, "drain_s": time.monotonic() - t0,
            "memory_kept": (Path(base) / "node0" / "job" / "step-1").is_dir()}  # fmt: skip
