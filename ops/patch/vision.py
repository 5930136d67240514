"""What every vision patch shares (timm ViT/DeiT and Hugging Face ViT, CLIP, DINOv2).

All of them are pre-norm blocks, `x + attn(norm1(x))` then `x + mlp(norm2(x))`, and merge between
the two with `TokenMerge`; they differ only in where each piece lives, which each family file says.
Shapes: `x [B, N, C]`, `size [B, N, 1]` (patches a token stands for), `q, k, v [B, H, N, d]`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ops.errors import UnsupportedModelError
from ops.merge import MergeStep, TokenMerge
from ops.schedule import TokenSchedule

# Reference settings per kind of model: DeiT (supervised) runs the energy-ordered bipartite split
# in the first half of the blocks and the energy-protected one after, MAE the opposite, CLIP-style
# encoders the energy-protected split everywhere with a higher margin.
FLAVORS = ("deit", "mae", "clip")


def layer_steps(schedule: TokenSchedule, algo: str, flavor: str, lowering: str) -> list[MergeStep]:
    """Per-layer merge steps as the reference runs them.

    PiToMe margin `0.75 - 0.75 i/L` (DeiT, MAE) or `0.9 - 0.9 i/L` (CLIP). DeiT: energy-ordered
    bipartite (bsm) in the first ceil(L/2) blocks, energy-protected after; MAE: the opposite;
    CLIP: energy-protected in every block.
    """
    if flavor not in FLAVORS:
        raise UnsupportedModelError(f"unknown vision flavor {flavor!r}; choose one of {', '.join(FLAVORS)}")
    depth = schedule.depth
    half = math.ceil(depth / 2)
    top = 0.9 if flavor == "clip" else 0.75
    steps = []
    for i, r in enumerate(schedule.merges):
        if algo == "tome":
            steps.append(MergeStep("tome", r, 0.0, lowering))
            continue
        early = i < half
        bsm = flavor != "clip" and (early if flavor == "deit" else not early)
        steps.append(MergeStep("pitome_bsm" if bsm else "pitome", r, top - top * i / depth, lowering))
    return steps


def proportional_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, size: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """SDPA over `[B, H, N, d]`, with `log(size)` added to every key's logit when `size` is given.

    A token standing for s patches then weighs as s copies of one (ToMe's proportional
    attention); as an additive mask it keeps PyTorch's fused attention kernels usable.
    """
    bias = None if size is None else size.log()[:, None, None, :, 0]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)


def size_weighted_mean(x: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """Mean of `x [B, N, C]` over tokens weighted by `size [B, N, 1]` -> `[B, C]`: the plain mean
    over the patches the merged tokens stand for."""
    return (x * size).sum(dim=1) / size.sum(dim=1)


def merging_block(
    x: torch.Tensor,
    size: torch.Tensor,
    attention_branch: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    mlp_branch: Callable[[torch.Tensor], torch.Tensor],
    token_merge: TokenMerge,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One pre-norm block that merges between attention and MLP: `[B, N, C]` -> `[B, N - r, C]`.

    `attention_branch(x, size)` returns the residual branch (norm, attention, layer scale) and the
    head-averaged keys `[B, N, d]` that rank the tokens; `mlp_branch` is the other residual branch.
    """
    attn_out, keys = attention_branch(x, size)
    x, size = token_merge(x + attn_out, size, keys)
    return x + mlp_branch(x), size
