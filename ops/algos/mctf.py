"""MCTF (Multi-Criteria Token Fusion), as the PiToMe authors' BERT patch runs it, wired into ViT
blocks the same way (their DeiT block does not run as written; docs/algorithm.md).

Two matchings on one score matrix between A and B (ToMe's bipartite split by position, class
token never merged): `W = (cos + 1) / 2 * (u_a u_b)^(1/40)` with `u = (1/s) / max(1/s)` per image
(sizes `s` carried from layer to layer). Forward: each A token's best B; the `floor(r/2)` A tokens
with the best scores are sources, the others (U1) stay in position order. Backward on the same
W: each B token's best U1 token; the `r - floor(r/2)` B tokens with the best scores are sources
(merged with whatever joined them forward: chains A -> B -> A), the others (U2) stay in score
order. Each group becomes the mean of its tokens weighted by `a s / max(s)`, `a` the attention
each token receives (probabilities averaged over heads and queries); sizes add up. Output
`[prefix, U1, U2]`. MCTF's informativeness term is off, as in the authors' runs (`tau_info` never
reaches the matching there).
"""

from __future__ import annotations

import torch

from ops.merge import MergePlan, PlanAssign, _unit_rows, best_match, descending_order, size_weighted_merge, slot_sums
from ops.reduction import Reduction
from ops.schedule import TokenSchedule

TAU_SIZE = 40.0  # the authors' tau_size (tau_sim = 1)


def _by_position(tokens: torch.Tensor) -> torch.Tensor:
    """Distinct token indices in ascending order (sorted as float32: TensorRT's TopK takes floats only)."""
    return torch.sort(tokens.to(torch.float32), dim=-1, stable=True).values.to(torch.int64)


def mctf_plan(metric: torch.Tensor, size: torch.Tensor, r: int, num_prefix: int) -> MergePlan:
    """The plan for `metric [B, N, d]` and `size [B, N, 1]` (prefix tokens first, never merged)."""
    p, batch = num_prefix, metric.shape[0]
    unit = _unit_rows(metric[:, p:])
    inverse = 1.0 / size[..., 0]
    u = (inverse / inverse.amax(dim=1, keepdim=True))[:, p:]
    a_par = p % 2  # A holds the even positions of the whole sequence, the class token's parity
    tokens = torch.arange(unit.shape[1], device=metric.device).expand(batch, -1)
    a, b = tokens[:, a_par::2], tokens[:, 1 - a_par :: 2]
    cos = unit[:, a_par::2] @ unit[:, 1 - a_par :: 2].transpose(1, 2)
    w = (cos + 1.0) / 2.0 * (u[:, a_par::2, None] * u[:, None, 1 - a_par :: 2]) ** (1.0 / TAU_SIZE)
    r1, r2 = r // 2, r - r // 2
    a_best, a_into = best_match(w)  # forward: each A's best B
    a_order = descending_order(a_best)
    s1, u1 = a_order[:, :r1], _by_position(a_order[:, r1:])
    backward = w.transpose(1, 2).gather(2, u1[:, None, :].expand(-1, b.shape[1], -1))  # [B, nB, nU1]
    b_best, b_into = best_match(backward)  # backward: each B's best U1 (index into U1)
    b_order = descending_order(b_best)
    s2, u2 = b_order[:, :r2], b_order[:, r2:]
    n_u1 = u1.shape[1]
    b_slot = torch.zeros_like(b_into)  # the receiving slot every B token ends in
    b_slot = b_slot.scatter(1, u2, n_u1 + torch.arange(u2.shape[1], device=metric.device).expand(batch, -1))
    b_slot = b_slot.scatter(1, s2, b_into.gather(1, s2))
    prefix = torch.arange(p, device=metric.device).expand(batch, -1)
    kept = torch.cat([prefix, a.gather(1, u1) + p, b.gather(1, u2) + p], dim=1)
    merged = torch.cat([a.gather(1, s1), b.gather(1, s2)], dim=1) + p
    into = torch.cat([b_slot.gather(1, a_into.gather(1, s1)), b_into.gather(1, s2)], dim=1)
    return MergePlan(kept, merged, into, p)


class MCTFAssign(PlanAssign):
    def __init__(self, r: int, num_prefix: int) -> None:
        super().__init__()
        self.r, self.num_prefix = r, num_prefix

    def forward(self, metric: torch.Tensor, size: torch.Tensor) -> MergePlan:
        return mctf_plan(metric, size, self.r, self.num_prefix)


class AttentionWeightedMerge(torch.nn.Module):
    """Each group the mean of its tokens weighted by received attention times relative size
    (size channel 0); every size channel summed per group."""

    def forward(self, x, size, plan: MergePlan, attention: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        received = attention.mean(dim=(1, 2))[..., None]  # [B, N, 1]
        own = size[..., :1]
        weight = received * own / own.amax(dim=1, keepdim=True)
        out, _ = size_weighted_merge(x, weight, plan)
        return out, slot_sums(size, plan)


class MCTF(Reduction):
    """One MCTF layer of `r` tokens (`floor(r/2)` forward, the rest backward); sizes carried."""

    needs_attention = True
    text_families = ("bert",)  # the authors' DistilBERT MCTF does not run

    def __init__(self, r: int, num_prefix: int) -> None:
        super().__init__(r, num_prefix)
        self.assign = MCTFAssign(r, num_prefix)
        self.combine = AttentionWeightedMerge()

    def reduce(self, x, size, metric, valid, attention):
        return self.combine(x, size, self.assign(metric, size), attention)


def vision_reductions(schedule: TokenSchedule, flavor: str, lowering: str) -> list[MCTF]:
    return [MCTF(r, schedule.num_prefix) for r in schedule.merges]


def text_reductions(schedule: TokenSchedule, lowering: str) -> list[MCTF]:
    """The merging layers of a BERT (the step is the vision one; the patch gives no size to attention)."""
    return [MCTF(r, schedule.num_prefix) for r in schedule.merges]
