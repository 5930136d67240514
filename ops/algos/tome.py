"""ToMe's per-layer settings: bipartite soft matching by position in every merging layer
(`ops.merge.tome_assignment`), the same step for vision and text."""

from __future__ import annotations

from ops.merge import MergeStep, TokenMerge
from ops.schedule import TokenSchedule


def reductions(schedule: TokenSchedule, lowering: str) -> list[TokenMerge]:
    return [TokenMerge(MergeStep("tome", r, 0.0, lowering), schedule.num_prefix) for r in schedule.merges]


def vision_reductions(schedule: TokenSchedule, flavor: str, lowering: str) -> list[TokenMerge]:
    return reductions(schedule, lowering)


def text_reductions(schedule: TokenSchedule, lowering: str) -> list[TokenMerge]:
    return reductions(schedule, lowering)
