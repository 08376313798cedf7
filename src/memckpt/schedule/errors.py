"""Errors raised by ``memckpt.schedule``; each subclasses ``memckpt.errors.MemckptError``."""

from __future__ import annotations

from memckpt.errors import MemckptError

__all__ = ["DeadlineFormatError", "ScheduleConfigError", "SignalInstallError"]


class ScheduleConfigError(MemckptError, ValueError):
    """An IterManager argument is out of range or two arguments contradict each other."""


class DeadlineFormatError(ScheduleConfigError):
    """A deadline (environment variable or argument) is not a unix time or ISO-8601 time."""


class SignalInstallError(MemckptError, RuntimeError):
    """Signal handlers could not be installed (not the main thread, or already installed)."""
