"""Token merging for timm's VisionTransformer family (ViT, DeiT, distilled DeiT, MAE-style pooling).

The patch swaps the classes of the model, its blocks and their attention modules for subclasses
whose forward passes carry `size [B, N, 1]` explicitly from block to block, and merges between
attention and MLP. Per-layer settings are frozen on each block at patch time (plain values, no
shared mutable state), so an export traces the same static shapes as eager runs.
"""

from __future__ import annotations

import torch
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer

from ops.errors import UnsupportedModelError
from ops.patch.surgery import add_attributes, swap_class
from ops.patch.vision import merging_block, proportional_attention, size_weighted_mean
from ops.reduction import Reduction

SUPPORTED_POOLS = ("token", "avg")


class MergingAttention(Attention):
    """timm Attention that can add log(size) to the logits and also returns head-averaged keys
    (and, with `probs`, the attention probabilities)."""

    def forward(
        self, x: torch.Tensor, size: torch.Tensor | None = None, probs: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        b, n, _ = x.shape
        gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        out, weights = proportional_attention(q, k, v, size, self.scale, probs)
        out = self.norm(out.transpose(1, 2).reshape(b, n, self.attn_dim))
        if gate is not None:
            out = out * gate
        return self.proj_drop(self.proj(out)), k.mean(dim=1), weights


class MergingBlock(Block):
    """timm Block that reduces tokens with its frozen `token_merge` (any `ops.reduction.Reduction`)."""

    token_merge: Reduction
    prop_attn: bool

    def forward(self, x: torch.Tensor, size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return merging_block(x, size, self._attention_branch, self._mlp_branch, self.token_merge)

    def _attention_branch(self, x: torch.Tensor, size: torch.Tensor, probs: bool):
        attn_out, keys, weights = self.attn(self.norm1(x), size if self.prop_attn else None, probs)
        return self.drop_path1(self.ls1(attn_out)), keys, weights

    def _mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class MergingVisionTransformer(VisionTransformer):
    """VisionTransformer whose forward runs merging blocks and pools with token sizes."""

    scheduled_tokens: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm_pre(self.patch_drop(self._pos_embed(self.patch_embed(x))))
        if x.shape[1] != self.scheduled_tokens:
            raise ValueError(
                f"the schedule was frozen for {self.scheduled_tokens} tokens but this input gives {x.shape[1]}: "
                f"use images of {tuple(self.patch_embed.img_size)}"
            )
        size = x.new_ones(x.shape[0], x.shape[1], 1)
        for block in self.blocks:
            x, size = block(x, size)
        x = self.norm(x)
        if self.global_pool != "avg":
            return self.forward_head(x)
        p = self.num_prefix_tokens
        pooled = size_weighted_mean(x[:, p:], size[:, p:])
        return self.head(self.head_drop(self.fc_norm(pooled)))


def check_supported(model: torch.nn.Module) -> None:
    """Refuse models whose structure this patch would silently compute wrong."""
    if not isinstance(model, VisionTransformer):
        raise UnsupportedModelError(f"{type(model).__name__} is not a timm VisionTransformer")
    if model.global_pool not in SUPPORTED_POOLS or getattr(model, "attn_pool", None) is not None:
        raise UnsupportedModelError(f"global_pool={model.global_pool!r} is not supported (token or avg)")
    for i, block in enumerate(model.blocks):
        if type(block) is not Block:
            raise UnsupportedModelError(f"block {i} is a {type(block).__name__}; only timm Block is supported")
        if not isinstance(block.attn, Attention):
            raise UnsupportedModelError(f"block {i} attention is a {type(block.attn).__name__}; only timm Attention")


def token_layout(model: torch.nn.Module) -> tuple[int, int]:
    """(non-prefix tokens, prefix tokens) of a timm ViT at its configured image size."""
    return model.patch_embed.num_patches, model.num_prefix_tokens


def infer_flavor(model: torch.nn.Module) -> str:
    """Reference per-model settings: MAE-style when pooling by average, else DeiT-style."""
    return "mae" if model.global_pool == "avg" else "deit"


def patch(model: torch.nn.Module, reductions: list[Reduction], prop_attn: bool) -> None:
    """Swap in the merging classes and freeze each block's reduction."""
    swap_class(model, MergingVisionTransformer)
    add_attributes(model, scheduled_tokens=model.patch_embed.num_patches + model.num_prefix_tokens)
    for block, reduction in zip(model.blocks, reductions):
        swap_class(block, MergingBlock)
        swap_class(block.attn, MergingAttention)
        add_attributes(block, token_merge=reduction, prop_attn=prop_attn)
