"""Every ``MEMCKPT_*`` environment variable memckpt reads or sets, defined once.

Modules take the names from here and read them through the helpers below, so
``grep MEMCKPT_ src/memckpt/settings.py`` lists every knob the project has.

======================== ===================================================================
variable                 meaning
======================== ===================================================================
MEMCKPT_SECRET           job secret for peer authentication (>= 16 bytes; hex or text)
MEMCKPT_NODE_ID          this process's failure domain (default: hostname + torchrun node)
MEMCKPT_TRANSFER_HOST    address the transfer server binds and advertises
MEMCKPT_TRANSFER_PORT    first port of the transfer servers on a node (+ LOCAL_RANK)
MEMCKPT_BASE_DIR         the recipes' memory tier directory (set per node by the launcher)
MEMCKPT_EVENTS_FILE      append JSON-lines progress events to this file
MEMCKPT_DEADLINE         unix or ISO-8601 time at which the allocation ends
MEMCKPT_FAULT_POINT      test hook: SIGKILL this process at the named save point
MEMCKPT_FAULT_STEP       ... only for this step
MEMCKPT_KILL_AT_STEP     recipes' fault hook: kill at this training step (first run only)
MEMCKPT_KILL_NODE        ... only on this node
MEMCKPT_RESTART_COUNT    restart count seen by the recipes (else TORCHELASTIC_RESTART_COUNT)
MEMCKPT_RESULT_DIR       the recipes' entry point writes rank<r>.json results here
MEMCKPT_PROFILE_DIR      the profiler plugin writes traces here
MEMCKPT_PROFILE_STEPS    ... for steps START:COUNT
======================== ===================================================================
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Final

__all__ = [
    "BASE_DIR_ENV",
    "DEADLINE_ENV",
    "EVENTS_FILE_ENV",
    "FAULT_POINT_ENV",
    "FAULT_STEP_ENV",
    "KILL_AT_STEP_ENV",
    "KILL_NODE_ENV",
    "NODE_ID_ENV",
    "PROFILE_DIR_ENV",
    "PROFILE_STEPS_ENV",
    "RESTART_COUNT_ENV",
    "RESULT_DIR_ENV",
    "SECRET_ENV",
    "TRANSFER_HOST_ENV",
    "TRANSFER_PORT_ENV",
    "get",
]

SECRET_ENV: Final = "MEMCKPT_SECRET"
NODE_ID_ENV: Final = "MEMCKPT_NODE_ID"
TRANSFER_HOST_ENV: Final = "MEMCKPT_TRANSFER_HOST"
TRANSFER_PORT_ENV: Final = "MEMCKPT_TRANSFER_PORT"
BASE_DIR_ENV: Final = "MEMCKPT_BASE_DIR"
EVENTS_FILE_ENV: Final = "MEMCKPT_EVENTS_FILE"
DEADLINE_ENV: Final = "MEMCKPT_DEADLINE"
FAULT_POINT_ENV: Final = "MEMCKPT_FAULT_POINT"
FAULT_STEP_ENV: Final = "MEMCKPT_FAULT_STEP"
KILL_AT_STEP_ENV: Final = "MEMCKPT_KILL_AT_STEP"
KILL_NODE_ENV: Final = "MEMCKPT_KILL_NODE"
RESTART_COUNT_ENV: Final = "MEMCKPT_RESTART_COUNT"
RESULT_DIR_ENV: Final = "MEMCKPT_RESULT_DIR"
PROFILE_DIR_ENV: Final = "MEMCKPT_PROFILE_DIR"
PROFILE_STEPS_ENV: Final = "MEMCKPT_PROFILE_STEPS"


def get(name: str, environ: Mapping[str, str] | None = None) -> str | None:
    """The variable's value, or None when it is unset or empty."""
    value = (os.environ if environ is None else environ).get(name)
    return value or None
