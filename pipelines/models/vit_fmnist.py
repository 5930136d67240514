"""`vit_fmnist`: a small timm ViT trained by this project on Fashion-MNIST (not a published checkpoint).

49 patches of 4x4 plus a class token through 12 blocks: the per-layer token schedule has the
shape of DeiT's, at a size that trains on a CPU. The weights ship in `pipelines/models/assets`; the
training script is `pipelines.training.train_vit_fmnist`, the model card sits beside the weights.
"""

from __future__ import annotations

from pathlib import Path

import torch

ARCH = dict(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=96, depth=12, num_heads=3)
MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST training-set pixel statistics
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
ASSETS = Path(__file__).resolve().parent / "assets" / "vit_fmnist"
WEIGHTS = ASSETS / "model.safetensors"


def architecture(drop_path: float = 0.0) -> torch.nn.Module:
    """The untrained model, with its preprocessing declared the way timm models declare theirs."""
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(**ARCH, drop_path_rate=drop_path)
    model.pretrained_cfg = {
        "input_size": (ARCH["in_chans"], ARCH["img_size"], ARCH["img_size"]),
        "mean": (MEAN,),
        "std": (STD,),
        "interpolation": "bilinear",
        "crop_pct": 1.0,
        "crop_mode": "center",
        "num_classes": ARCH["num_classes"],
        "label_names": CLASSES,
    }
    return model


def build(checkpoint: str | None = None, random_init: bool = False) -> torch.nn.Module:
    """The shipped weights, or `checkpoint` (safetensors or a training checkpoint), or random init."""
    from pipelines.models.registry import ModelLoadError, load_weights

    model = architecture()
    if random_init:
        return model.eval()
    path = Path(checkpoint) if checkpoint else WEIGHTS
    if not path.is_file():
        raise ModelLoadError(
            f"vit_fmnist weights not found at {path}: train them with python -m pipelines.training.train_vit_fmnist"
        )
    load_weights(model, str(path), "vit_fmnist")
    return model.eval()
