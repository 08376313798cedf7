"""Fake time and a manager factory for the schedule tests; no test here sleeps."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

# The schedule tests run from a source checkout whether or not memckpt is installed.
if importlib.util.find_spec("memckpt") is None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from memckpt.schedule import IterManager

START_UNIX = 1_767_225_600.0  # 2026-01-01T00:00:00Z


class FakeTime:
    """A monotonic and a wall clock that move only when told to."""

    def __init__(self, unix: float = START_UNIX) -> None:
        self.unix = unix
        self.mono = 100.0

    def monotonic(self) -> float:
        return self.mono

    def time(self) -> float:
        return self.unix

    def sleep(self, seconds: float) -> None:
        self.mono += seconds
        self.unix += seconds


@pytest.fixture
def fake_time() -> FakeTime:
    return FakeTime()


@pytest.fixture
def make_manager(fake_time: FakeTime) -> Callable[..., IterManager]:
    """IterManager on fake time, without signal handlers or process environment."""

    def make(**kwargs: Any) -> IterManager:
        kwargs.setdefault("signals", ())
        kwargs.setdefault("environ", {})
        return IterManager(clock=fake_time.monotonic, wall_clock=fake_time.time, **kwargs)

    return make


@pytest.fixture
def train(fake_time: FakeTime) -> Callable[..., list[int]]:
    """Run ``steps`` iterations of ``step_s`` each; return the steps at which a save was due."""

    def run(im: IterManager, steps: int, step_s: float | Callable[[int], float]) -> list[int]:
        saved = []
        for _ in range(steps):
            im.iter()
            fake_time.sleep(step_s(im.iter_count) if callable(step_s) else step_s)
            if im.should_save_ckpt():
                saved.append(im.iter_count)
        return saved

    return run
