"""CrossGET, as the PiToMe authors re-implemented it for single-modality models: a complete-graph
matching without cross tokens, kept with its two quirks (docs/algorithm.md).

On the unit head-averaged keys of the non-prefix tokens, `D = m m^T - I`; tokens are ranked by
their row maxima of the symmetrised `(D + D^T) / 2` (mutual nearest neighbours tie exactly, and
every runtime sees the same ties), then each ranked token by its best similarity to a LATER one
(`Q`, ranks by descending score). As written, `Q`'s entries (ranks) are used as token positions
and every source merges into the one token at position `Q_r`: sources `Q_0..Q_{r-1}`, output
`[prefix, mean(Q_r and the sources), Q_{r+1}, ..., Q_{T-1}]`, a plain mean (no size carried).

Text (BERT, DistilBERT): the same step after the attention sublayer's LayerNorm of the merging
layers, on the keys summed over heads (BERT) or averaged (DistilBERT) as the family patch gives
them. The attention mask is max-merged (a group holding a real token is attended) and the size
channels (the real-token count) are summed per group, which is what mean pooling weighs: the
merged token is the plain mean of its group, so weighing it by the group's real tokens keeps the
pooled mean of an unpadded sequence what it was over the group's tokens. Padded input, where the
reference is undefined: the decisions are the reference's (padding takes part; ranks used as
positions mostly pick the leading, real tokens), and with the padding-safe patch (`valid` given)
the mean runs over a group's real tokens only, as PiToMe's padding-safe merge does (on Rotten
Tomatoes, MiniLM at 0.7: 59.5% top-1 against 53.3% with padding in the means).
"""

from __future__ import annotations

import torch

from ops.merge import MergePlan, PlanAssign, _unit_rows, best_match, descending_order, size_weighted_merge, slot_sums
from ops.reduction import Reduction
from ops.schedule import TokenSchedule

_LOWER_MASK = 1e9  # what the authors subtract below and on the diagonal: no later token there


def crossget_plan(metric: torch.Tensor, r: int, num_prefix: int) -> MergePlan:
    """The plan for `metric [B, N, d]` (prefix tokens first, never merged)."""
    m = _unit_rows(metric[:, num_prefix:])
    batch, tokens, _ = m.shape
    eye = torch.eye(tokens, dtype=m.dtype, device=m.device)
    gap = m @ m.transpose(1, 2) - eye
    row_best, _ = best_match((gap + gap.transpose(1, 2)) * 0.5)
    ranked = descending_order(row_best)  # P
    by_rank = gap.gather(1, ranked[:, :, None].expand(-1, -1, tokens)).gather(
        2, ranked[:, None, :].expand(-1, tokens, -1)
    )
    later = torch.triu(torch.ones(tokens, tokens, dtype=torch.bool, device=m.device), diagonal=1)
    later_best, _ = best_match(by_rank - _LOWER_MASK * (~later).to(m.dtype))
    order = descending_order(later_best)  # Q: ranks, used as positions (the authors' code)
    prefix = torch.arange(num_prefix, device=m.device).expand(batch, -1)
    kept = torch.cat([prefix, order[:, r:] + num_prefix], dim=1)
    into = torch.zeros(batch, r, dtype=torch.int64, device=m.device)  # every source into Q_r
    return MergePlan(kept, order[:, :r] + num_prefix, into, num_prefix)


class CrossGETAssign(PlanAssign):
    def __init__(self, r: int, num_prefix: int) -> None:
        super().__init__()
        self.r, self.num_prefix = r, num_prefix

    def forward(self, metric: torch.Tensor, valid: torch.Tensor | None) -> MergePlan:
        return crossget_plan(metric, self.r, self.num_prefix)


class PlainMean(torch.nn.Module):
    """Each slot the plain mean of its tokens (size reset to one for every token), over the real
    ones when `valid [B, N]` is given (padding weighs nothing; a padding-only slot keeps its own
    token); the size channels `[B, N, K]` -> ones, or with `sum_sizes` their sum over each slot."""

    def __init__(self, sum_sizes: bool = False) -> None:
        super().__init__()
        self.sum_sizes = sum_sizes

    def forward(
        self, x: torch.Tensor, size: torch.Tensor, plan: MergePlan, valid: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        weights = x.new_ones(x.shape[0], x.shape[1], 1) if valid is None else valid[..., None].to(x.dtype)
        out, _ = size_weighted_merge(x, weights, plan)
        if self.sum_sizes:
            return out, slot_sums(size, plan)
        return out, size.new_ones(out.shape[0], out.shape[1], size.shape[-1])


class CrossGET(Reduction):
    """One CrossGET layer of `r` tokens; size not carried (ones), or with `sum_sizes` (text)
    summed per group."""

    def __init__(self, r: int, num_prefix: int, sum_sizes: bool = False) -> None:
        super().__init__(r, num_prefix)
        self.assign = CrossGETAssign(r, num_prefix)
        self.combine = PlainMean(sum_sizes)

    def reduce(self, x, size, metric, valid, attention):
        return self.combine(x, size, self.assign(metric, valid), valid)


def vision_reductions(schedule: TokenSchedule, flavor: str, lowering: str) -> list[CrossGET]:
    return [CrossGET(r, schedule.num_prefix) for r in schedule.merges]


def text_reductions(schedule: TokenSchedule, lowering: str) -> list[CrossGET]:
    """The merging layers of a BERT/DistilBERT; the size channels are summed per group."""
    return [CrossGET(r, schedule.num_prefix, sum_sizes=True) for r in schedule.merges]
