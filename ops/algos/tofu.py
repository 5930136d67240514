"""ToFu (Token Fusion), as the PiToMe authors' code runs it on ViTs and BERT/DistilBERT.

The matching is ToMe's (bipartite by position on the head-averaged keys, class token never
merged), with ToFu's count rule (the class token counted, `ops.schedule`). The first
`floor(L/2) + 1` blocks prune: the matched sources are dropped. The others merge, norm-preserving:
receiver j with sources S_j becomes the plain mean of j and S_j rescaled to
`max(||x_j||, max_s ||x_s||) / ||x_j||`, the norm of j before merging as the authors' code divides
(ToFu's paper rescales by the mean's own norm, MLERP; the two differ by 2e-3..3e-2 in DeiT-Tiny
logits). No size is carried (the next layer sees ones), except that a pruning layer keeps each
kept token's own size channels and drops the pruned ones' (on vision they are ones).

Text (BERT, DistilBERT; the authors' patches): every merging layer prunes, on the keys mean.
The kept tokens keep their mask and their real-token count; a pruned token leaves with both (the
authors max-merge the mask into the pruned token's match instead: the same mask unless a real
token is pruned into padding, which the padding-safe matching never does; the reference is
defined for unpadded input only).
"""

from __future__ import annotations

import torch

from ops.merge import MergeAssign, MergePlan, MergeStep, _gather_rows, joins
from ops.reduction import Reduction
from ops.schedule import TokenSchedule


def pruning_layers(depth: int) -> int:
    """Blocks 0..floor(L/2) prune, the later ones merge (DeiT: 0..6 prune, 7..11 merge)."""
    return depth // 2 + 1


def norm_preserving_merge(x: torch.Tensor, plan: MergePlan) -> torch.Tensor:
    """`x [B, N, C]` merged by `plan` into `[B, n_out, C]`: each receiver the plain mean of itself
    and its sources, rescaled to the largest norm among them over its own; others unchanged."""
    first = plan.first_receiver
    (receivers, sources) = _gather_rows(x, plan.kept[:, first:], plan.merged)
    join = joins(plan, x.dtype)  # [B, receivers, r]
    count = 1.0 + join.sum(dim=-1, keepdim=True)
    mean = (receivers + join @ sources) / count
    own_norm = torch.linalg.vector_norm(receivers, dim=-1, keepdim=True)
    source_norm = torch.linalg.vector_norm(sources, dim=-1)  # [B, r]
    largest = torch.maximum(own_norm, (join * source_norm[:, None, :]).amax(dim=-1, keepdim=True))
    out = torch.where(count > 1.0, mean * largest / own_norm, receivers)
    if not first:
        return out
    (head,) = _gather_rows(x, plan.kept[:, :first])
    return torch.cat([head, out], dim=1)


class ToFuCombine(torch.nn.Module):
    """Prune (gather the kept tokens and their sizes) or norm-preserving merge (sizes reset to ones)."""

    def __init__(self, prune: bool) -> None:
        super().__init__()
        self.prune = prune

    def forward(self, x: torch.Tensor, size: torch.Tensor, plan: MergePlan) -> tuple[torch.Tensor, torch.Tensor]:
        if self.prune:
            return _gather_rows(x, plan.kept)[0], _gather_rows(size, plan.kept)[0]
        out = norm_preserving_merge(x, plan)
        return out, size.new_ones(out.shape[0], out.shape[1], size.shape[-1])


class ToFu(Reduction):
    """One ToFu layer: prune or norm-preserving merge of `r` tokens; size not carried (a prune
    keeps the kept tokens' own)."""

    def __init__(self, r: int, num_prefix: int, prune: bool) -> None:
        super().__init__(r, num_prefix)
        self.assign = MergeAssign(MergeStep("tome", r), num_prefix)
        self.combine = ToFuCombine(prune)

    def reduce(self, x, size, metric, valid, attention):
        return self.combine(x, size, self.assign(metric, valid))


def vision_reductions(schedule: TokenSchedule, flavor: str, lowering: str) -> list[ToFu]:
    prune = pruning_layers(schedule.depth)
    return [ToFu(r, schedule.num_prefix, layer < prune) for layer, r in enumerate(schedule.merges)]


def text_reductions(schedule: TokenSchedule, lowering: str) -> list[ToFu]:
    """Every merging layer of a BERT/DistilBERT prunes (the authors' text patches)."""
    return [ToFu(r, schedule.num_prefix, prune=True) for r in schedule.merges]
