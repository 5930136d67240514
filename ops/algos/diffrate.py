"""DiffRate, training-free (kept counts from the ratio), as the PiToMe authors' code evaluates it.

After the attention residual of every block, tokens are ordered by the attention the class
token pays them (head mean of the probabilities' class row; the prefix first); the first block
also prunes the least attended token (the kept count starts at the patch count, class token
inside it). The least attended of the rest merge, each into its most similar kept token (cosine
of `x` itself, class token excluded): the kept token becomes the plain mean of itself and its
sources, its size `s_j + sum_u s_u cos(u, j)`. Proportional attention reads the sizes.

Where the reference is undefined: a size that the sum of cosines drives to zero or below would
make the next `log(size)` NaN (the authors' training path clamps at 1, evaluation does not);
here it is clamped to the smallest normal float, so the token weighs nothing in attention.
"""

from __future__ import annotations

import torch

from ops.merge import (
    MergePlan,
    PlanAssign,
    _gather_rows,
    _unit_rows,
    best_match,
    descending_order,
    joins,
    size_weighted_merge,
)
from ops.reduction import Reduction
from ops.schedule import TokenSchedule


def diffrate_plan(x: torch.Tensor, attention: torch.Tensor, r: int, pruned: int, num_prefix: int) -> MergePlan:
    """The plan for `x [B, N, C]` with attention probabilities `[B, H, N, N]`: `pruned` tokens
    dropped, `r - pruned` merged."""
    p = num_prefix
    tokens = x.shape[1] - p
    class_attention = attention[:, :, 0, p:].mean(dim=1)  # [B, T]
    order = descending_order(class_attention) + p
    important, merged, dropped = (
        order[:, : tokens - r],
        order[:, tokens - r : tokens - pruned],
        order[:, tokens - pruned :],
    )
    unit = _unit_rows(x)
    unit_merged, unit_important = _gather_rows(unit, merged, important)
    _, into = best_match(unit_merged @ unit_important.transpose(1, 2))
    prefix = torch.arange(p, device=x.device).expand(x.shape[0], -1)
    return MergePlan(torch.cat([prefix, important], dim=1), merged, into, p, dropped if pruned else None)


class DiffRateAssign(PlanAssign):
    def __init__(self, r: int, pruned: int, num_prefix: int) -> None:
        super().__init__()
        self.r, self.pruned, self.num_prefix = r, pruned, num_prefix

    def forward(self, x: torch.Tensor, attention: torch.Tensor) -> MergePlan:
        return diffrate_plan(x, attention, self.r, self.pruned, self.num_prefix)


class DiffRateCombine(torch.nn.Module):
    """Plain mean of each kept token and its sources; sizes add the sources' sizes times cosine."""

    def forward(self, x, size, plan: MergePlan) -> tuple[torch.Tensor, torch.Tensor]:
        out, _ = size_weighted_merge(x, torch.ones_like(size), plan)
        first = plan.first_receiver
        unit_merged, unit_kept = _gather_rows(_unit_rows(x), plan.merged, plan.kept[:, first:])
        cosine = (unit_merged * unit_kept.gather(1, plan.into[..., None].expand_as(unit_merged))).sum(-1)
        (kept_size, merged_size) = _gather_rows(size, plan.kept, plan.merged)
        added = joins(plan, size.dtype) @ (merged_size * cosine[..., None])
        tail = (kept_size[:, first:] + added).clamp_min(torch.finfo(size.dtype).tiny)
        return out, torch.cat([kept_size[:, :first], tail], dim=1)


class DiffRate(Reduction):
    """One DiffRate layer: `r` tokens leave, the first `pruned` of them by pruning."""

    needs_attention = True

    def __init__(self, r: int, num_prefix: int, pruned: int) -> None:
        super().__init__(r, num_prefix)
        self.assign = DiffRateAssign(r, pruned, num_prefix)
        self.combine = DiffRateCombine()

    def reduce(self, x, size, metric, valid, attention):
        return self.combine(x, size, self.assign(x, attention))


def vision_reductions(schedule: TokenSchedule, flavor: str, lowering: str) -> list[DiffRate]:
    """The first layer's count includes one pruned token (`ops.schedule`'s DiffRate rule)."""
    return [DiffRate(r, schedule.num_prefix, int(layer == 0 and r > 0)) for layer, r in enumerate(schedule.merges)]
