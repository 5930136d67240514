"""Preprocessing of Hugging Face vision models: the image processor config that ships beside
model.onnx (`preprocessor_config.json`, what `AutoImageProcessor` and optimum's pipelines read),
the image size the export is frozen at, and the same preprocessing for the accuracy stage.

The config is the model's own when its folder (or the hub) has one; random-init models get their
family's published defaults, so an output folder is always complete.
"""

from __future__ import annotations

import json
from pathlib import Path

FILE = "preprocessor_config.json"
IMAGENET = {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}
CLIP_STATS = {"image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}
RESAMPLE = {2: "bilinear", 3: "bicubic"}  # PIL's codes, as the configs store them


def default_config(model_type: str, image_size: int) -> dict:
    """The image processor a family publishes with its checkpoints (ViT: resize to the model's
    size, mean/std 0.5; CLIP: shortest edge, center crop, OpenAI stats; DINOv2: 8/7 of the size, then
    a center crop to it, as 256 -> 224 for the published checkpoints)."""
    common = {"do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True}
    if model_type.startswith("clip"):
        crop = {"height": image_size, "width": image_size}
        return {"image_processor_type": "CLIPImageProcessor", **common, "size": {"shortest_edge": image_size},
                "do_center_crop": True, "crop_size": crop, "resample": 3, "do_convert_rgb": True, **CLIP_STATS}  # fmt: skip
    if model_type.startswith("dinov2"):
        crop = {"height": image_size, "width": image_size}
        return {"image_processor_type": "BitImageProcessor", **common, "size": {"shortest_edge": image_size * 8 // 7},
                "do_center_crop": True, "crop_size": crop, "resample": 3, "do_convert_rgb": True, **IMAGENET}  # fmt: skip
    return {"image_processor_type": "ViTImageProcessor", **common, "size": {"height": image_size, "width": image_size},
            "resample": 2, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}  # fmt: skip


def processor_config(model, source: str | None, pretrained: bool) -> dict:
    """The model's image processor config: `source`'s file (a folder, or the hub when the weights
    came from it), else the family default."""
    found = None
    if source and Path(source).is_dir():
        found = Path(source) / FILE if (Path(source) / FILE).is_file() else None
    elif source and pretrained:
        found = _from_hub(source)
    if found is not None:
        return json.loads(found.read_text())
    config = model.config
    size = config.image_size[0] if isinstance(config.image_size, (list, tuple)) else config.image_size
    return default_config(config.model_type, size)


def job_processor(model, spec, checkpoint: str | None, random_init: bool) -> dict:
    """`processor_config` for a job's model: from `--checkpoint`, the model folder, or the hub id."""
    return processor_config(model, checkpoint or spec.source, pretrained=not (random_init or checkpoint))


def _from_hub(source: str) -> Path | None:
    from huggingface_hub import hf_hub_download

    from pipelines.models.registry import offline_if_hub_unreachable

    try:
        with offline_if_hub_unreachable():
            return Path(hf_hub_download(source, FILE))
    except Exception:  # noqa: BLE001 - no processor file on the hub or in the cache: the default serves
        return None


def crop_size(processor: dict) -> int:
    """The side of the square the processor hands the model (its crop, else its resize)."""
    if processor.get("do_center_crop") and processor.get("crop_size"):
        crop = processor["crop_size"]
        return crop["height"] if isinstance(crop, dict) else int(crop)
    size = processor["size"]
    return size.get("height") or size["shortest_edge"] if isinstance(size, dict) else int(size)


def frozen_image_size(model, processor: dict) -> int | None:
    """The image size to freeze the export at: DINOv2 runs at its processor's crop (224 for the
    published checkpoints, not the 518 its config names); other families at their config's size."""
    return crop_size(processor) if model.config.model_type.startswith("dinov2") else None


def timm_data_config(processor: dict, image_size: int) -> dict:
    """The processor as the timm data config the accuracy stage's image loader takes: resize
    (shortest edge, or the square) then center crop to `image_size`, the processor's mean and std."""
    size = processor.get("size") or {}
    resize = size.get("shortest_edge") or size.get("height") or image_size if isinstance(size, dict) else size
    return {
        "input_size": (3, image_size, image_size),
        "interpolation": RESAMPLE.get(processor.get("resample"), "bilinear"),
        "mean": tuple(processor.get("image_mean", IMAGENET["image_mean"])),
        "std": tuple(processor.get("image_std", IMAGENET["image_std"])),
        "crop_pct": image_size / resize if processor.get("do_center_crop") else 1.0,
        "crop_mode": "center",
    }
