"""Token merging in pure PyTorch: schedules, merge algorithms (PiToMe, ToMe) and model patches.

`patch_model`, `unpatch_model` and `repatch` load on first use, so that importing `ops` (for its
errors or schedules) does not import timm and transformers.
"""

from ops.errors import PitomeError, ScheduleError, UnsupportedModelError
from ops.schedule import TokenSchedule, build_schedule, merges_from_ratio

_PATCH_API = ("patch_model", "repatch", "unpatch_model")


def __getattr__(name: str):
    if name in _PATCH_API:
        from ops import patch

        return getattr(patch, name)
    raise AttributeError(f"module 'ops' has no attribute {name!r}")


__all__ = [
    "PitomeError",
    "ScheduleError",
    "TokenSchedule",
    "UnsupportedModelError",
    "build_schedule",
    "merges_from_ratio",
    "patch_model",
    "repatch",
    "unpatch_model",
]
