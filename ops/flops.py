"""Block FLOPs from a token schedule: the speed-up that merging promises in theory."""

from __future__ import annotations

from ops.schedule import TokenSchedule


def block_flops(dim: int, mlp_ratio: float, tokens_attn: int, tokens_mlp: int) -> int:
    """FLOPs (2 x multiply-adds) of one pre-norm transformer block.

    Attention runs on `tokens_attn` tokens (qkv + proj: 4 N C^2, scores and weighted sum:
    2 N^2 C); the merge sits between attention and MLP, so the MLP (2 mlp_ratio N C^2) runs on
    `tokens_mlp`. The merge itself (a T x T similarity) is not counted.
    """
    n, m = tokens_attn, tokens_mlp
    macs = 4 * n * dim * dim + 2 * n * n * dim + 2 * mlp_ratio * m * dim * dim
    return int(2 * macs)


def schedule_flops(schedule: TokenSchedule, dim: int, mlp_ratio: float) -> tuple[list[int], list[int]]:
    """Per-layer block FLOPs (merged, unmerged) for a schedule."""
    p = schedule.num_prefix
    unmerged_n = schedule.tokens[0] + p
    merged = [block_flops(dim, mlp_ratio, t + p, t - r + p) for t, r in zip(schedule.tokens, schedule.merges)]
    unmerged = [block_flops(dim, mlp_ratio, unmerged_n, unmerged_n) for _ in schedule.tokens]
    return merged, unmerged
