"""Block FLOPs from a token schedule: the speed-up that merging promises in theory."""

from __future__ import annotations

from ops.schedule import TokenSchedule


def block_flops(dim: int, mlp_ratio: float, tokens_attn: int, tokens_mlp: int) -> int:
    """FLOPs (2 x multiply-adds) of one pre-norm transformer block.

    Attention runs on `tokens_attn` tokens (qkv + proj: 4 N C^2, scores and weighted sum:
    2 N^2 C), the MLP (2 mlp_ratio N C^2) on `tokens_mlp`: fewer where the reduction sits between
    attention and MLP, as many where it acts after the MLP (DCT). The reduction itself (a T x T
    similarity) is not counted.
    """
    n, m = tokens_attn, tokens_mlp
    macs = 4 * n * dim * dim + 2 * n * n * dim + 2 * mlp_ratio * m * dim * dim
    return int(2 * macs)


def schedule_flops(
    schedule: TokenSchedule, dim: int, mlp_ratio: float, stage: str = "attention"
) -> tuple[list[int], list[int]]:
    """Per-layer block FLOPs (merged, unmerged) for a schedule whose reductions act at `stage`
    (`ops.reduction.STAGES`)."""
    p = schedule.num_prefix
    unmerged_n = schedule.tokens[0] + p
    after = 0 if stage == "mlp" else 1  # the MLP sees the tokens the reduction left, or all of them
    merged = [block_flops(dim, mlp_ratio, t + p, t - after * r + p) for t, r in zip(schedule.tokens, schedule.merges)]
    unmerged = [block_flops(dim, mlp_ratio, unmerged_n, unmerged_n) for _ in schedule.tokens]
    return merged, unmerged


def flop_speedup(schedule: TokenSchedule, dim: int, mlp_ratio: float, stage: str = "attention") -> float:
    """Unmerged over merged block FLOPs: the speed-up the schedule promises."""
    merged, unmerged = schedule_flops(schedule, dim, mlp_ratio, stage)
    return sum(unmerged) / sum(merged)


def matching_ratio(
    algo: str, target: float, like: TokenSchedule, dim: int, mlp_ratio: float, near: float = 1.0, step: float = 0.001
) -> tuple[float, float]:
    """(ratio, its block-FLOP speed-up): the ratio, on a grid of `step`, at which `algo` on a model
    laid out as `like` (tokens, depth, prefix, merging layers) promises the speed-up closest to
    `target`; of the ratios that promise it (equal promises are equal schedules), the one nearest
    `near` (the target's own ratio: the target's algorithm gets it back). Algorithms count a ratio
    differently (`ops.schedule.COUNT_RULES`) and DCT reduces after the MLP, so equal ratios are
    not equal costs: the paper compares at equal FLOPs."""
    from ops.algos import algorithm
    from ops.errors import ScheduleError
    from ops.schedule import build_schedule

    stage, best, best_rank = algorithm(algo).stage, (1.0, 1.0), None
    for k in range(1, round(1.0 / step)):
        ratio = round(k * step, 6)
        try:
            schedule = build_schedule(like.tokens[0], like.depth, algo=algo, ratio=ratio, num_prefix=like.num_prefix,
                                      merge_layers=like.merge_layers)  # fmt: skip
        except ScheduleError:  # below the algorithm's smallest ratio, or more than a layer can take
            continue
        speedup = flop_speedup(schedule, dim, mlp_ratio, stage)
        rank = (abs(speedup - target), abs(ratio - near))
        if best_rank is None or rank < best_rank:
            best, best_rank = (ratio, speedup), rank
    return best
