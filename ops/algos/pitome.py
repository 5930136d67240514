"""PiToMe's per-layer settings, as the authors' code runs them: which variant and margin each
layer uses, for vision (by model flavor) and text. The merge itself is `ops.merge`'s
(energies, plans and the size-weighted mean, shared with ToMe and the fused kernels).
"""

from __future__ import annotations

import math

from ops.errors import UnsupportedModelError
from ops.merge import MergeStep, TokenMerge
from ops.schedule import TokenSchedule

# DeiT (supervised) runs the energy-ordered bipartite split in the first half of the blocks and
# the energy-protected one after, MAE the opposite, CLIP-style encoders the energy-protected
# split everywhere with a higher margin.
FLAVORS = ("deit", "mae", "clip")


def vision_steps(schedule: TokenSchedule, flavor: str, lowering: str) -> list[MergeStep]:
    """Margin `0.75 - 0.75 i/L` (DeiT, MAE) or `0.9 - 0.9 i/L` (CLIP). DeiT: energy-ordered
    bipartite (bsm) in the first ceil(L/2) blocks, energy-protected after; MAE: the opposite;
    CLIP: energy-protected in every block."""
    if flavor not in FLAVORS:
        raise UnsupportedModelError(f"unknown vision flavor {flavor!r}; choose one of {', '.join(FLAVORS)}")
    depth = schedule.depth
    half = math.ceil(depth / 2)
    top = 0.9 if flavor == "clip" else 0.75
    steps = []
    for i, r in enumerate(schedule.merges):
        early = i < half
        bsm = flavor != "clip" and (early if flavor == "deit" else not early)
        steps.append(MergeStep("pitome_bsm" if bsm else "pitome", r, top - top * i / depth, lowering))
    return steps


def text_steps(schedule: TokenSchedule, lowering: str) -> list[MergeStep]:
    """Gaussian-energy PiToMe with margin `0.9 - 0.25 i/L` (L = all layers, not the merging ones)."""
    n = schedule.depth
    return [MergeStep("pitome_text", r, 0.9 - 0.25 * i / n, lowering) for i, r in enumerate(schedule.merges)]


def vision_reductions(schedule: TokenSchedule, flavor: str, lowering: str) -> list[TokenMerge]:
    return [TokenMerge(step, schedule.num_prefix) for step in vision_steps(schedule, flavor, lowering)]


def text_reductions(schedule: TokenSchedule, lowering: str) -> list[TokenMerge]:
    return [TokenMerge(step, schedule.num_prefix) for step in text_steps(schedule, lowering)]
