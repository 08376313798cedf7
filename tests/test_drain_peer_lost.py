"""A rank closing after a failure never waits for a dead peer's drain part.

The coordinator's drain of a step waits (up to ``DrainPolicy.part_wait_s``, 600 s) for
every rank's part before it writes the step's manifest. When a peer dies before its part
is uploaded, that wait cannot succeed; the drain thread is joined at interpreter exit, so
the surviving rank used to hang there for minutes after the failure (found when the
durable demo's node-loss run stalled 60 s, until the launcher killed it).
"""

from __future__ import annotations

import pytest

from drain_workers import peer_dies_before_uploading_its_part
from memckpt.engine import drain
from multiproc import run_ranks


@pytest.mark.slow
@pytest.mark.parametrize("how", ["with", "finally"])
def test_closing_after_a_failure_stops_waiting_for_a_dead_peers_part(shm_dir, how):
    out = run_ranks(
        peer_dies_before_uploading_its_part, 2, str(shm_dir / "mem"), str(shm_dir / "disk"), how,
        env_per_rank={r: {"MEMCKPT_NODE_ID": f"node{r}"} for r in range(2)},
        expect_dead=(1,), timeout=120,
    )  # fmt: skip
    assert out[0]["err"] == "the peer is gone"
    assert out[0]["drain_s"] < 10, out[0]  # was part_wait_s (600 s): a hang at exit
    assert out[0]["memory_kept"]  # a failing close keeps memory for the restart
    assert not (shm_dir / "disk" / "job" / "step-1" / "manifest.json").exists()


def test_a_drain_scheduled_after_the_give_up_waits_as_usual(shm_dir):
    late = shm_dir / "late-part"
    drain.stop_waiting_for_parts("an earlier job failed")

    def wait() -> None:
        drain.wait_for_parts([late], timeout=30)

    fut = drain._executor.submit(wait)
    late.touch()
    fut.result(timeout=30)  # found the part: the earlier give-up did not stop this wait


def test_a_wait_begun_before_the_give_up_ends_at_once(shm_dir):
    import threading
    import time

    started = threading.Event()
    result: list[BaseException | None] = []

    def wait() -> None:
        started.set()
        try:
            drain.wait_for_parts([shm_dir / "never"], timeout=600)
            result.append(None)
        except BaseException as e:
            result.append(e)

    t = threading.Thread(target=wait)
    t.start()
    started.wait(5)
    time.sleep(0.2)
    t0 = time.monotonic()
    drain.stop_waiting_for_parts("rank 0 is closing after an error")
    t.join(10)
    assert time.monotonic() - t0 < 2
    assert (
        result
        and "stopped waiting" in str(result[0])
        and "closing after an error" in str(result[0])
    )
