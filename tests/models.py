"""Small random-init models of every supported family, seeded, built without any hub access."""

from __future__ import annotations

import torch


def small_vit(kind: str = "deit", seed: int = 0, depth: int = 4, img_size: int = 64) -> torch.nn.Module:
    """A DeiT-shaped ViT with 64 patches; `kind`: deit, distilled, layerscale, mae."""
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    common = dict(img_size=img_size, patch_size=8, embed_dim=64, depth=depth, num_heads=2, num_classes=10)
    if kind == "distilled":
        return VisionTransformerDistilled(**common).eval()
    if kind == "layerscale":
        return VisionTransformer(init_values=0.1, **common).eval()
    if kind == "mae":
        return VisionTransformer(global_pool="avg", fc_norm=True, **common).eval()
    return VisionTransformer(**common).eval()


def small_text(kind: str = "bert", seed: int = 0, layers: int = 4) -> torch.nn.Module:
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        DistilBertConfig,
        DistilBertForSequenceClassification,
    )

    torch.manual_seed(seed)
    if kind == "bert":
        config = BertConfig(
            vocab_size=3000, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
            intermediate_size=128, max_position_embeddings=64, num_labels=3,
        )  # fmt: skip
        return BertForSequenceClassification(config).eval()
    config = DistilBertConfig(
        vocab_size=3000, dim=64, n_layers=layers, n_heads=4, hidden_dim=128, max_position_embeddings=64, num_labels=3
    )
    return DistilBertForSequenceClassification(config).eval()


def text_batch(
    seq_len: int = 32, batch: int = 3, seed: int = 0, pad_from: int = 20
) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and an attention mask whose last row is padded from `pad_from` on."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 3000, (batch, seq_len), generator=gen)
    ids[:, 0] = 101
    mask = torch.ones(batch, seq_len, dtype=torch.int64)
    mask[-1, pad_from:] = 0
    return ids, mask
