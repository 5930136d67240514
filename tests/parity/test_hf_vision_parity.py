"""Parity of Hugging Face vision exports: every family x algo x lowering on ONNX Runtime.

CI runs each family on a two-layer random-init model (both layers merge, so the DeiT-style
families exercise both PiToMe splits); every output is compared, so a feature model's hidden
states (merged token count) and its pooled or projected output each pass on their own.
`make test-heavy` adds the full-size configurations (ViT-B/16, CLIP ViT-B/16 vision, DINOv2-S).
"""

from __future__ import annotations

import itertools

import pytest

from ops import patch_model
from tests.models import small_hf_vision
from tests.parity.test_parity import ALGOS, LOWERINGS, run_parity

# family -> (small model kind, the outputs its export declares)
FAMILIES = {
    "vit": ("vit", ("logits",)),
    "clip": ("clip_projection", ("image_embeds", "last_hidden_state")),
    "dinov2": ("dinov2", ("logits",)),
}


@pytest.mark.parametrize(("family", "algo", "lowering"), list(itertools.product(FAMILIES, ALGOS, LOWERINGS)))
def test_hf_vision_onnx_matches_pytorch(tmp_path, family, algo, lowering):
    kind, outputs = FAMILIES[family]
    model = patch_model(small_hf_vision(kind, layers=2), algo=algo, ratio=0.85, lowering=lowering)
    report = run_parity(model, tmp_path / "model.onnx")
    assert tuple(o.name for o in report.outputs) == outputs
    assert report.passed, report.verdict()


def full_size(family: str):
    """A random-init model of the published architecture, built from its config (no hub)."""
    import transformers as tf

    if family == "vit":  # google/vit-base-patch16-224
        return tf.ViTForImageClassification(tf.ViTConfig(num_labels=1000)).eval()
    if family == "clip":  # openai/clip-vit-base-patch16, image tower
        return tf.CLIPVisionModelWithProjection(tf.CLIPVisionConfig(patch_size=16, projection_dim=512)).eval()
    # facebook/dinov2-small, at the 224 crop of its image processor
    return tf.Dinov2Model(tf.Dinov2Config(hidden_size=384, num_attention_heads=6, image_size=518)).eval()


@pytest.mark.heavy
@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("family", FAMILIES)
def test_full_size_hf_vision(tmp_path, family, algo):
    kind_kwargs = {"image_size": 224} if family == "dinov2" else {}
    model = patch_model(full_size(family), algo=algo, ratio=0.9, **kind_kwargs)
    report = run_parity(model, tmp_path / "model.onnx")
    assert report.passed, report.verdict()
