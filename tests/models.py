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


HF_VISION_KINDS = ("vit", "vit_model", "clip", "clip_projection", "dinov2", "dinov2_model", "dinov2_registers")


def small_hf_vision(kind: str = "vit", seed: int = 0, layers: int = 4, image_size: int = 64) -> torch.nn.Module:
    """A small random-init Hugging Face vision model with 64 patches of 8x8 (`HF_VISION_KINDS`):
    the classifiers `vit`, `dinov2`, `dinov2_registers`; the feature models `vit_model`, `clip`
    (CLIPVisionModel), `clip_projection`, `dinov2_model`."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(hidden_size=64, num_hidden_layers=layers, num_attention_heads=2, image_size=image_size, patch_size=8)
    if kind.startswith("vit"):
        config = tf.ViTConfig(intermediate_size=128, num_labels=10, **common)
        return (tf.ViTModel if kind == "vit_model" else tf.ViTForImageClassification)(config).eval()
    if kind.startswith("clip"):
        config = tf.CLIPVisionConfig(intermediate_size=128, projection_dim=32, **common)
        return (tf.CLIPVisionModelWithProjection if kind == "clip_projection" else tf.CLIPVisionModel)(config).eval()
    if kind == "dinov2_registers":
        config = tf.Dinov2WithRegistersConfig(mlp_ratio=2, num_labels=10, num_register_tokens=4, **common)
        return tf.Dinov2WithRegistersForImageClassification(config).eval()
    config = tf.Dinov2Config(mlp_ratio=2, num_labels=10, **common)
    return (tf.Dinov2Model if kind == "dinov2_model" else tf.Dinov2ForImageClassification)(config).eval()
