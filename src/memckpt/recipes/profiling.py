"""torch.profiler around a window of training steps, switched on by the profiler plugin.

``MEMCKPT_PROFILE_DIR=<dir>`` and ``MEMCKPT_PROFILE_STEPS=<start>:<count>`` (set by
``memckpt run --plugin profiler:start=5,steps=3``) make every rank record steps
``start .. start+count-1`` (saves included) and write a Chrome trace to
``<dir>/rank<r>.json``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from memckpt.errors import ConfigError
from memckpt.settings import PROFILE_DIR_ENV, PROFILE_STEPS_ENV

__all__ = ["StepProfiler"]

log = logging.getLogger(__name__)


class StepProfiler:
    """Starts the profiler before step ``start`` and exports after ``start + count - 1``."""

    def __init__(self, rank: int, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.rank = rank
        self.dir = env.get(PROFILE_DIR_ENV) or None
        self._prof: Any = None
        self.start = self.end = 0
        self.trace: str | None = None
        if self.dir:
            raw = env.get(PROFILE_STEPS_ENV, "5:3")
            try:
                start, count = (int(x) for x in raw.split(":"))
            except ValueError:
                raise ConfigError(f"{PROFILE_STEPS_ENV} must be START:COUNT, got {raw!r}") from None
            if start < 1 or count < 1:
                raise ConfigError(f"{PROFILE_STEPS_ENV} needs START, COUNT >= 1, got {raw!r}")
            self.start, self.end = start, start + count - 1

    def before(self, step: int) -> None:
        if self.dir and step == self.start and self._prof is None:
            import torch.profiler

            self._prof = torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True
            )
            self._prof.__enter__()

    def after(self, step: int) -> None:
        if self._prof is not None and step >= self.end:
            self.stop()

    def stop(self) -> None:
        if self._prof is None:
            return
        prof, self._prof = self._prof, None
        prof.__exit__(None, None, None)
        assert self.dir is not None
        path = Path(self.dir) / f"rank{self.rank}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(path))
        self.trace = str(path)
        log.info("rank %d: profile of steps %d..%d written to %s", self.rank, self.start,
                 self.end, path)  # fmt: skip
