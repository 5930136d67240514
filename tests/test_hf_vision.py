"""Hugging Face vision patches (ViT, CLIP vision, DINOv2): what they compute, against the spec."""

from __future__ import annotations

import pytest
import torch

from exporter.decisions import decision_hooks
from exporter.signatures import as_outputs, signature_of
from ops import patch_model, unpatch_model
from ops.errors import UnsupportedModelError
from ops.patch.vision import proportional_attention
from tests.models import HF_VISION_KINDS, small_hf_vision

PIXELS = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def _outputs(model: torch.nn.Module, pixels: torch.Tensor = PIXELS) -> dict[str, torch.Tensor]:
    """Every output of the export signature, by name, on `pixels`."""
    from exporter.signatures import ExportWrapper

    signature = signature_of(model)
    with torch.no_grad():
        return dict(zip(signature.output_names, as_outputs(ExportWrapper(model, signature)(pixels))))


@pytest.mark.parametrize("kind", HF_VISION_KINDS)
def test_ratio_one_equals_the_stock_model(kind):
    model = small_hf_vision(kind)
    stock = _outputs(model)
    patched = _outputs(patch_model(model, algo="pitome", ratio=1.0))
    assert stock.keys() == patched.keys()
    for name in stock:
        torch.testing.assert_close(patched[name], stock[name], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kind", HF_VISION_KINDS)
def test_unpatch_restores_the_stock_model(kind):
    model = small_hf_vision(kind)
    before = {name: (type(m), set(vars(m))) for name, m in model.named_modules()}
    stock = _outputs(model)
    unpatch_model(patch_model(model, algo="tome", ratio=0.8))
    assert {name: (type(m), set(vars(m))) for name, m in model.named_modules()} == before
    for name, value in _outputs(model).items():
        torch.testing.assert_close(value, stock[name], atol=0, rtol=0)


@pytest.mark.parametrize(("kind", "prefix"), [("vit", 1), ("clip", 1), ("dinov2_registers", 5)])
@pytest.mark.parametrize("algo", ["pitome", "tome", "tofu", "mctf", "crossget", "diffrate"])
def test_class_and_register_tokens_never_merge(kind, prefix, algo):
    """Prefix tokens keep their own slots, alone, in every merging layer; the rest shrinks by r
    (a pruned token leaves with no slot)."""
    from ops.merge import DROPPED

    model = patch_model(small_hf_vision(kind), algo=algo, ratio=0.8)
    assert model.token_schedule.num_prefix == prefix
    with torch.no_grad(), decision_hooks(model) as capture:
        model(PIXELS)
    assert len(capture.slots) == 4
    for layer, r in zip(capture.slots, model.token_schedule.merges):
        torch.testing.assert_close(layer[:, :prefix], torch.arange(prefix).expand(2, -1))
        assert ((layer[:, prefix:] >= prefix) | (layer[:, prefix:] == DROPPED)).all()
        assert int(layer.max()) + 1 == layer.shape[1] - r


def test_feature_outputs_carry_the_merged_token_count_and_sizes():
    model = patch_model(small_hf_vision("dinov2_model"), algo="pitome", ratio=0.9)
    assert model.token_schedule.merges == (6, 5, 5, 4)
    with torch.no_grad():
        out = model(PIXELS)
    assert out.last_hidden_state.shape == (2, 1 + 64 - 20, 64)
    assert torch.equal(out.pooler_output, out.last_hidden_state[:, 0])
    assert (out.token_sizes[:, 0] == 1).all() and (out.token_sizes.sum(dim=(1, 2)) == 65).all()
    assert signature_of(model).output_names == ("last_hidden_state", "pooler_output")


def test_dinov2_classifier_weights_the_patch_mean_by_token_size():
    """The head reads [CLS, mean of patches]; after merging that mean is size-weighted."""
    model = patch_model(small_hf_vision("dinov2"), algo="pitome", ratio=0.8)
    with torch.no_grad():
        out = model.dinov2(PIXELS)
        tokens, sizes = out.last_hidden_state, out.token_sizes
        weighted = (tokens[:, 1:] * sizes[:, 1:]).sum(1) / sizes[:, 1:].sum(1)
        plain = tokens[:, 1:].mean(1)
        logits = model(PIXELS).logits
    expected = model.classifier(torch.cat([tokens[:, 0], weighted], 1))
    torch.testing.assert_close(logits, expected)
    assert not torch.allclose(logits, model.classifier(torch.cat([tokens[:, 0], plain], 1)))


def test_proportional_attention_counts_a_merged_token_as_its_copies():
    """A key/value of size 2 attends as two identical tokens of size 1 would."""
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 3, 8, generator=gen) for _ in range(3))
    merged = proportional_attention(q, k, v, torch.tensor([[[2.0], [1.0], [1.0]]]), 0.5)
    copies = torch.cat([k[:, :, :1], k], dim=2), torch.cat([v[:, :, :1], v], dim=2)
    torch.testing.assert_close(merged, proportional_attention(q, *copies, None, 0.5))


def test_reference_settings_per_family():
    vit = patch_model(small_hf_vision("vit"), algo="pitome", ratio=0.9)
    assert vit.merge_config["steps"] == ["pitome_bsm"] * 2 + ["pitome"] * 2 and not vit.merge_config["prop_attn"]
    clip = patch_model(small_hf_vision("clip"), algo="pitome", ratio=0.9)
    assert clip.merge_config["steps"] == ["pitome"] * 4
    assert [m.step.margin for m in clip.token_merges] == [0.9 - 0.9 * i / 4 for i in range(4)]
    assert patch_model(small_hf_vision("dinov2"), algo="tome", ratio=0.9).merge_config["prop_attn"] is True


def test_dinov2_is_frozen_at_the_asked_image_size():
    model = patch_model(small_hf_vision("dinov2"), ratio=0.9, image_size=48)
    assert model.token_schedule.tokens[0] == 36
    assert signature_of(model).input_shapes["pixel_values"] == (3, 48, 48)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 48, 48)).logits.shape == (1, 10)
    with pytest.raises(ValueError, match="frozen for 37 tokens"), torch.no_grad():
        model(PIXELS)
    with pytest.raises(UnsupportedModelError, match="multiple of the patch size"):
        patch_model(small_hf_vision("dinov2"), ratio=0.9, image_size=50)


def test_clip_model_exports_its_image_tower():
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    vision = small_hf_vision("clip").config.to_dict()
    config = CLIPConfig(
        text_config={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64},
        vision_config=vision, projection_dim=16,
    )  # fmt: skip
    model = CLIPModel(config).eval()
    with torch.no_grad():
        stock = model.get_image_features(pixel_values=PIXELS).pooler_output
    patch_model(model, ratio=1.0)
    signature = signature_of(model)
    assert signature.output_names == ("image_embeds", "last_hidden_state")
    torch.testing.assert_close(_outputs(model)["image_embeds"], stock, atol=1e-6, rtol=1e-6)
    patch_model(model, ratio=0.9)
    assert _outputs(model)["last_hidden_state"].shape == (2, 45, 64)


def _swin():
    from transformers import SwinConfig, SwinModel

    return SwinModel(SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1], num_heads=[2]))


def _beit():
    from transformers import BeitConfig, BeitModel

    return BeitModel(BeitConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                num_attention_heads=2, intermediate_size=64))  # fmt: skip


def _siglip():
    from transformers import SiglipVisionConfig, SiglipVisionModel

    return SiglipVisionModel(SiglipVisionConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                                num_attention_heads=2, intermediate_size=64))  # fmt: skip


@pytest.mark.parametrize(
    ("make", "reason"),
    [(_swin, "windowed"), (_beit, "relative position biases"), (_siglip, "attention-pooling")],
    ids=["swin", "beit", "siglip"],
)
def test_models_merging_would_compute_wrong_are_refused_with_the_reason(make, reason):
    with pytest.raises(UnsupportedModelError, match=reason):
        patch_model(make(), ratio=0.9)
