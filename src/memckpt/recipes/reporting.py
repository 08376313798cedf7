"""What rank 0 of a training run shows and records: a progress bar or log lines, metrics.

Metrics go to ``logger.metrics_file`` as JSON lines: one per logged step
(``{"step", "loss", "time", "lr", "save_blocking_s"}``) and events
(``{"event": "resume" | "exit" | "end", ..., "time"}``). Other ranks record nothing.
The ``end`` event names the newest step per durability tier (``newest_step_per_tier``).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from memckpt.engine.handle import SaveHandle
from memckpt.storage.durability import LOCAL, PERSISTED, REPLICATED, TIERS, tier_rank

__all__ = ["TrainingReporter", "describe_newest", "newest_step_per_tier"]

log = logging.getLogger(__name__)


def newest_step_per_tier(
    handles: Iterable[SaveHandle], persistent_step: int | None = None
) -> dict[str, int | None]:
    """The newest step each tier holds, from this rank's memory saves (pure).

    ``local``: the newest committed memory step; ``replicated``: the newest one committed
    with copies on 2+ nodes; ``persisted``: the newest one its drain persisted, or the
    newest persistent (DCP) save ``persistent_step``, whichever is newer. None: none yet.
    """
    out: dict[str, int | None] = dict.fromkeys(TIERS)

    def note(tier: str, step: int) -> None:
        seen = out[tier]
        out[tier] = step if seen is None else max(seen, step)

    for h in handles:
        if tier_rank(h.durability) >= tier_rank(LOCAL):
            note(LOCAL, h.step)
        if h.copies >= 2:
            note(REPLICATED, h.step)
        if h.durability == PERSISTED:
            note(PERSISTED, h.step)
    if persistent_step is not None:
        note(PERSISTED, persistent_step)
    return out


def describe_newest(newest: dict[str, int | None]) -> str:
    """``local 40, replicated 40, persisted 30`` (``-`` for a tier with no step)."""
    return ", ".join(f"{t} {'-' if newest.get(t) is None else newest[t]}" for t in TIERS)


class TrainingReporter:
    """Rank 0's view of training: a rich progress bar on a terminal, else a log line per log step.

    The bar is used when ``progress`` is set and stderr is a tty; it updates every step
    with this rank's loss. ``logged`` takes the loss averaged over ranks.
    """

    def __init__(
        self,
        *,
        rank: int,
        total_steps: int,
        start_step: int,
        progress: bool,
        metrics_file: str | None,
    ) -> None:
        self.enabled = rank == 0
        self.total_steps = total_steps
        self.metrics_file = metrics_file if self.enabled else None
        self._bar: Any = None
        self._task: Any = None
        self._last_time = time.perf_counter()
        self._last_step = start_step
        if self.enabled and progress and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            self._bar = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                console=Console(stderr=True),
            )
            self._task = self._bar.add_task(
                "train", total=total_steps, completed=start_step, info=""
            )
            self._bar.start()
        if self.metrics_file:
            Path(self.metrics_file).parent.mkdir(parents=True, exist_ok=True)

    def event(self, event: str, **fields: Any) -> None:
        """Append ``{"event": event, **fields, "time"}`` to the metrics file."""
        if self.enabled:
            self._append({"event": event, **fields, "time": time.time()})

    def step(self, step: int, local_loss: float, save_blocking_s: float | None) -> None:
        """Every step: move the progress bar."""
        if self._bar is not None:
            save = "" if save_blocking_s is None else f"  save {save_blocking_s * 1e3:.1f} ms"
            self._bar.update(self._task, completed=step, info=f"loss {local_loss:.4f}{save}")

    def logged(self, step: int, loss: float, lr: float, save_blocking_s: float | None) -> None:
        """A log step: a log line (without a bar) and a metrics line."""
        if not self.enabled:
            return
        now = time.perf_counter()
        per_step = (now - self._last_time) / max(1, step - self._last_step)
        self._last_time, self._last_step = now, step
        if self._bar is None:
            log.info(
                "step %d/%d loss %.4f lr %.2e %.1f ms/step%s",
                step,
                self.total_steps,
                loss,
                lr,
                per_step * 1e3,
                "" if save_blocking_s is None else f" save {save_blocking_s * 1e3:.1f} ms",
            )
        self._append(
            {
                "step": step,
                "loss": loss,
                "time": time.time(),
                "lr": lr,
                "save_blocking_s": save_blocking_s,
            }
        )

    def _append(self, doc: dict[str, Any]) -> None:
        if not self.metrics_file:
            return
        try:
            with open(self.metrics_file, "a", encoding="utf-8") as f:
                f.write(json.dumps(doc, default=str) + "\n")
        except OSError as e:
            log.warning("cannot append metrics to %s: %s", self.metrics_file, e)

    def close(self) -> None:
        """Stop the progress bar; safe to call twice."""
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
