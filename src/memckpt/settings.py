"""Every ``MEMCKPT_*`` environment variable memckpt reads or sets, defined once.

Modules take the names from here and read them through :func:`get`. Each name is
declared with its meaning and what happens when it is unset; :data:`VARIABLES` holds
the declarations in order, and :func:`markdown` renders them as the page
``docs/environment.md``::

    python -c "import memckpt.settings as s; print(s.markdown(), end='')" > docs/environment.md

A test checks that the page and this module agree, and that every ``MEMCKPT_*`` name
in the sources is declared here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

__all__ = [
    "BASE_DIR_ENV",
    "DEADLINE_ENV",
    "EVENTS_FILE_ENV",
    "FAULT_POINT_ENV",
    "FAULT_STEP_ENV",
    "KILL_AT_STEP_ENV",
    "KILL_NODE_ENV",
    "LOG_DIR_ENV",
    "METRICS_PORT_ENV",
    "METRICS_TEXTFILE_ENV",
    "NODE_ID_ENV",
    "ON_NON_FINITE_ENV",
    "PROFILE_DIR_ENV",
    "PROFILE_STEPS_ENV",
    "REPLICATION_BANDWIDTH_ENV",
    "RESTART_COUNT_ENV",
    "RESULT_DIR_ENV",
    "SECRET_ENV",
    "TRANSFER_HOST_ENV",
    "TRANSFER_PORT_ENV",
    "VARIABLES",
    "Variable",
    "get",
    "markdown",
]


@dataclass(frozen=True)
class Variable:
    """One environment variable: its name, what it does, and what happens when it is unset.

    ``set_by``: who normally sets it (``you``, ``memckpt run``, ``tests``, ...).
    """

    name: str
    meaning: str
    default: str
    set_by: str = "you"


_declared: list[Variable] = []


def _declare(name: str, meaning: str, default: str, set_by: str = "you") -> str:
    _declared.append(Variable(name, meaning, default, set_by))
    return name


SECRET_ENV: Final = _declare(
    "MEMCKPT_SECRET",
    "job secret that authenticates peers' transfer servers (at least 16 bytes; hex or text); "
    "every rank of a job must see the same value",
    "rank 0 generates one and shares it through the process group",
)
NODE_ID_ENV: Final = _declare(
    "MEMCKPT_NODE_ID",
    "this process's failure domain: replicas go to ranks with another node id. Set it per "
    "node, the same value for every rank of a node; ranks that share a checkpoint directory "
    "must share a node id",
    "the host name, plus torchrun's node rank (`GROUP_RANK`) when set",
    "you; `memckpt run` (`node<i>`); the sbatch script (`<host>/<SLURM_NODEID>`)",
)
ON_NON_FINITE_ENV: Final = _declare(
    "MEMCKPT_ON_NON_FINITE",
    "what a load does with a step saved holding NaN/Inf, for every API that does not pass "
    "`on_non_finite=`: `skip` (resume from the newest finite step), `load`, or `raise`",
    "`skip`",
)
TRANSFER_HOST_ENV: Final = _declare(
    "MEMCKPT_TRANSFER_HOST",
    "address the transfer server binds and advertises to peers",
    "the local address that routes to `MASTER_ADDR`, else 127.0.0.1",
    "you; `memckpt run` (127.0.0.1)",
)
TRANSFER_PORT_ENV: Final = _declare(
    "MEMCKPT_TRANSFER_PORT",
    "first port of the transfer servers on a node; local rank r listens on this + r",
    "a free port per rank",
)
REPLICATION_BANDWIDTH_ENV: Final = _declare(
    "MEMCKPT_REPLICATION_BANDWIDTH",
    "cap on the bytes per second that replication and re-replication send and fetch, per "
    "node (the node's ranks share it): a number of bytes or a value with a unit, such as "
    "`100MB`, `1GiB` or `800 MB/s`; the `replication_bandwidth=` argument takes precedence",
    "no cap: replication runs at full speed",
)
BASE_DIR_ENV: Final = _declare(
    "MEMCKPT_BASE_DIR",
    "memory-tier directory of the recipes and of `memckpt.State` (overrides "
    "`checkpoint.memory.base_dir`)",
    "`checkpoint.memory.base_dir` (recipes); /dev/shm/memckpt (`State`)",
    "you; `memckpt run` (`<base_dir>/node<i>`)",
)
EVENTS_FILE_ENV: Final = _declare(
    "MEMCKPT_EVENTS_FILE",
    "append JSON-lines progress events (saves, steps) to this file",
    "no events are written",
    "you; `memckpt simulate-preemption`",
)
METRICS_PORT_ENV: Final = _declare(
    "MEMCKPT_METRICS_PORT",
    "serve Prometheus metrics over HTTP on this port (`PORT` or `HOST:PORT`), one exporter "
    "per node and job: the node's first rank to open the job serves every local rank's "
    "samples (docs/operations.md, Metrics); needs `pip install 'memckpt[metrics]'`; the "
    "`metrics_port=` argument takes precedence",
    "no HTTP exporter",
)
METRICS_TEXTFILE_ENV: Final = _declare(
    "MEMCKPT_METRICS_TEXTFILE",
    "also write the node's Prometheus metrics to this file (atomically, after each batch of "
    "events) for node_exporter's textfile collector; `{job}` in it is the job id",
    "no metrics file",
)
DEADLINE_ENV: Final = _declare(
    "MEMCKPT_DEADLINE",
    "when the allocation ends (unix time or ISO-8601), so IterManager saves ahead of it",
    "no deadline (signals still trigger a save)",
    "you; `memckpt simulate-preemption`",
)
FAULT_POINT_ENV: Final = _declare(
    "MEMCKPT_FAULT_POINT",
    "test hook: SIGKILL this process at the named point of a save",
    "off",
    "tests",
)
FAULT_STEP_ENV: Final = _declare(
    "MEMCKPT_FAULT_STEP",
    "test hook: with `MEMCKPT_FAULT_POINT`, only at this step",
    "every step",
    "tests",
)
KILL_AT_STEP_ENV: Final = _declare(
    "MEMCKPT_KILL_AT_STEP",
    "recipes' fault hook: SIGKILL every rank (of `MEMCKPT_KILL_NODE`) before this training "
    "step, in the first run only",
    "off",
    "`memckpt run --plugin fault`",
)
KILL_NODE_ENV: Final = _declare(
    "MEMCKPT_KILL_NODE",
    "recipes' fault hook: only on the node with this id",
    "every node",
    "`memckpt run --plugin fault`",
)
RESTART_COUNT_ENV: Final = _declare(
    "MEMCKPT_RESTART_COUNT",
    "restart count the recipes' fault hook sees (a restarted run is never killed again)",
    "`TORCHELASTIC_RESTART_COUNT`, else 0",
    "`memckpt demo`",
)
RESULT_DIR_ENV: Final = _declare(
    "MEMCKPT_RESULT_DIR",
    "the recipes' entry point writes each rank's result to `rank<r>.json` here",
    "no results are written",
    "`memckpt run`",
)
LOG_DIR_ENV: Final = _declare(
    "MEMCKPT_LOG_DIR",
    "the recipes' entry point appends each rank's log to `rank<r>.log` here; `memckpt run` "
    "reads the first error of a failed run from it",
    "logs go to the terminal only",
    "`memckpt run` (`<run-dir>/logs`)",
)
PROFILE_DIR_ENV: Final = _declare(
    "MEMCKPT_PROFILE_DIR",
    "the recipes' profiler writes Chrome traces (`rank<r>.json`) here",
    "no profiling",
    "`memckpt run --plugin profiler`",
)
PROFILE_STEPS_ENV: Final = _declare(
    "MEMCKPT_PROFILE_STEPS",
    "with `MEMCKPT_PROFILE_DIR`: the steps to profile, as `START:COUNT`",
    "5:3",
    "`memckpt run --plugin profiler`",
)

VARIABLES: Final[tuple[Variable, ...]] = tuple(_declared)
"""Every variable, in the order declared above."""


def get(name: str, environ: Mapping[str, str] | None = None) -> str | None:
    """The variable's value, or None when it is unset or empty."""
    value = (os.environ if environ is None else environ).get(name)
    return value or None


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown() -> str:
    """The page ``docs/environment.md``: every variable, its meaning, default and setter."""
    lines = [
        "# Environment variables",
        "",
        "<!-- generated from src/memckpt/settings.py by memckpt.settings.markdown(); edit the",
        "     declarations there, not this page (a test compares the two) -->",
        "",
        "Every `MEMCKPT_*` variable memckpt reads or sets, as `memckpt.settings` declares it.",
        "An empty value counts as unset. Arguments passed in code (`node_id=`, `secret=`,",
        "`base_dir=`, ...) take precedence over the variables.",
        "",
        "| variable | meaning | when unset | set by |",
        "|---|---|---|---|",
    ]
    for v in VARIABLES:
        cells = (f"`{v.name}`", _cell(v.meaning), _cell(v.default), _cell(v.set_by))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
