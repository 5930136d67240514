"""Errors a user can cause; the CLI turns them into one line and an exit code."""


class PitomeError(ValueError):
    """Base class of user-facing errors raised by pitome-export."""


class ScheduleError(PitomeError):
    """A ratio or explicit token schedule that cannot be applied to the model."""


class UnsupportedModelError(PitomeError):
    """A model (or model option) that no patch in `ops.patch` knows how to merge."""
