"""Named points in the save path where tests can kill the process (crash-safety tests).

Set ``MEMCKPT_FAULT_POINT=<name>`` (and optionally ``MEMCKPT_FAULT_STEP=<step>``)
before the process starts; when a save of that step reaches that point the
process sends itself SIGKILL, as a node failure would. Unset, each point costs
one environment lookup.
"""

from __future__ import annotations

import os
import signal
from typing import Final

from memckpt.settings import FAULT_POINT_ENV, FAULT_STEP_ENV

__all__ = ["FAULT_POINTS", "REPLICATION_FAULT_POINTS", "fault_point"]

FAULT_POINTS: Final = (
    "after_begin",
    "mid_stage",
    "after_stage",
    "before_header",
    "before_local_commit",
    "after_local_commit",
    "after_vote",
    "after_manifest",
    "mid_retention",
)

# reached only with replication on
REPLICATION_FAULT_POINTS: Final = ("mid_replica_send", "mid_replica_recv", "after_replicate")


def fault_point(name: str, step: int) -> None:
    if os.environ.get(FAULT_POINT_ENV) != name:
        return
    want = os.environ.get(FAULT_STEP_ENV)
    if want is None or want == str(step):
        os.kill(os.getpid(), signal.SIGKILL)
