"""What every vision patch shares (timm ViT/DeiT and Hugging Face ViT, CLIP, DINOv2).

All of them are pre-norm blocks, `x + attn(norm1(x))` then `x + mlp(norm2(x))`, and reduce tokens
where their layer's `ops.reduction.Reduction` acts (between the two, or after the MLP); they differ
only in where each piece lives, which each family file says.
Shapes: `x [B, N, C]`, `size [B, N, 1]` (patches a token stands for), `q, k, v [B, H, N, d]`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ops.reduction import Reduction


def proportional_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, size: torch.Tensor | None, scale: float, probs: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention over `[B, H, N, d]`, with `log(size)` added to every key's logit when `size` is
    given; returns the output and, with `probs`, the probabilities `[B, H, N, N]`.

    A token standing for s patches then weighs as s copies of one (ToMe's proportional
    attention); as an additive mask it keeps PyTorch's fused attention kernels usable. A
    reduction that reads the probabilities (MCTF, DiffRate) gets the same attention computed
    without the fused kernel, which never materialises them.
    """
    bias = None if size is None else size.log()[:, None, None, :, 0]
    if not probs:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale), None
    logits = (q @ k.transpose(-2, -1)) * scale
    weights = (logits if bias is None else logits + bias).softmax(dim=-1)
    return weights @ v, weights


def size_weighted_mean(x: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """Mean of `x [B, N, C]` over tokens weighted by `size [B, N, 1]` -> `[B, C]`: the plain mean
    over the patches the merged tokens stand for."""
    return (x * size).sum(dim=1) / size.sum(dim=1)


AttentionBranch = Callable[[torch.Tensor, torch.Tensor, bool], tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]


def merging_block(
    x: torch.Tensor,
    size: torch.Tensor,
    attention_branch: AttentionBranch,
    mlp_branch: Callable[[torch.Tensor], torch.Tensor],
    reduction: Reduction,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One pre-norm block that reduces tokens where its `reduction` acts: `[B, N, C]` -> `[B, N - r, C]`.

    `attention_branch(x, size, probs)` returns the residual branch (norm, attention, layer
    scale), the head-averaged keys `[B, N, d]` that rank the tokens, and the attention
    probabilities when `probs`; `mlp_branch` is the other residual branch. Most reductions act
    between the two branches; DCT's after the MLP.
    """
    attn_out, keys, probs = attention_branch(x, size, reduction.needs_attention)
    x = x + attn_out
    if reduction.stage == "mlp":
        return reduction(x + mlp_branch(x), size, keys, attention=probs)
    x, size = reduction(x, size, keys, attention=probs)
    return x + mlp_branch(x), size
