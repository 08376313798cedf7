"""What rank 0 of a training run shows and records: a progress bar or log lines, metrics.

Metrics go to ``logger.metrics_file`` as JSON lines: one per logged step
(``{"step", "loss", "time", "lr", "save_blocking_s"}``) and events
(``{"event": "resume" | "exit" | "end", ..., "time"}``). Other ranks record nothing.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["TrainingReporter"]

log = logging.getLogger(__name__)


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
