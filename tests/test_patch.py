"""Model patches: exactness at ratio 1, padding safety, schedule on the model, unpatch."""

import copy

import pytest
import torch

from ops import patch_model, repatch, unpatch_model
from ops.errors import ScheduleError, UnsupportedModelError
from tests.models import small_text, small_vit, text_batch

VISION_KINDS = ["deit", "distilled", "layerscale", "mae"]


@pytest.mark.parametrize("kind", VISION_KINDS)
@pytest.mark.parametrize("algo", ["pitome", "tome"])
def test_ratio_one_equals_unpatched_vision(kind, algo):
    model = small_vit(kind)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        reference = model(x)
        patch_model(model, algo=algo, ratio=1.0, prop_attn=False)
        torch.testing.assert_close(model(x), reference, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["bert", "distilbert"])
def test_ratio_one_equals_unpatched_text(kind):
    model = small_text(kind)
    ids, mask = text_batch()
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask).logits
        patch_model(model, ratio=1.0, seq_len=32)
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, reference, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", VISION_KINDS)
@pytest.mark.parametrize("algo", ["pitome", "tome"])
def test_merged_vision_runs_and_keeps_schedule(kind, algo):
    model = small_vit(kind)
    patch_model(model, algo=algo, ratio=0.9)
    assert model.token_schedule.merges == (6, 5, 5, 4)
    assert model.token_schedule.tokens == (64, 58, 53, 48)
    with torch.no_grad():
        out = model(torch.randn(3, 3, 64, 64))
    assert out.shape == (3, 10) and torch.isfinite(out).all()


def test_reference_layer_choices():
    deit = patch_model(small_vit("deit", depth=6), algo="pitome", ratio=0.9)
    assert deit.merge_config["steps"] == ["pitome_bsm"] * 3 + ["pitome"] * 3
    assert deit.merge_config["prop_attn"] is False
    mae = patch_model(small_vit("mae", depth=6), algo="pitome", ratio=0.9)
    assert mae.merge_config["steps"] == ["pitome"] * 3 + ["pitome_bsm"] * 3
    tome = patch_model(small_vit("deit"), algo="tome", ratio=0.9)
    assert tome.merge_config["prop_attn"] is True
    assert [b.token_merge.step.margin for b in deit.blocks] == [0.75 - 0.75 * i / 6 for i in range(6)]


def test_prop_attn_changes_the_output():
    model = small_vit("deit")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        off = patch_model(model, algo="pitome", ratio=0.8, prop_attn=False)(x)
        on = patch_model(model, algo="pitome", ratio=0.8, prop_attn=True)(x)
    assert not torch.allclose(off, on)


def test_repatch_and_unpatch_restore():
    model = small_vit("distilled")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        reference = model(x)
        patch_model(model, algo="pitome", ratio=0.9, lowering="matmul")
        merged = model(x)
        repatch(model, lowering="scatter")
        assert model.merge_config["lowering"] == "scatter"
        torch.testing.assert_close(model(x), merged, atol=1e-6, rtol=1e-6)
        patch_model(model, algo="tome", schedule=[3, 3, 3, 3])
        assert model.token_schedule.merges == (3, 3, 3, 3)
        unpatch_model(model)
        assert type(model).__name__ == "VisionTransformerDistilled"
        assert not hasattr(model, "token_schedule")
        assert not any(type(m).__name__ == "TokenMerge" for m in model.modules())
        assert torch.equal(model(x), reference)


def test_distillation_token_is_not_merged():
    model = patch_model(small_vit("distilled"), algo="tome", ratio=0.5, prop_attn=False)
    seen = {}
    model.blocks[-1].register_forward_hook(lambda m, i, o: seen.update(size=o[1]))
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64))
    assert (seen["size"][:, :2] == 1).all()
    assert seen["size"].sum(1).flatten().tolist() == [66.0, 66.0]


@pytest.mark.parametrize("kind", ["bert", "distilbert"])
@pytest.mark.parametrize("algo", ["pitome", "tome", "tofu"])  # padding-safe ToFu prunes padding first
def test_padding_content_never_changes_logits(kind, algo):
    model = patch_model(small_text(kind), algo=algo, ratio=0.7, seq_len=32)
    ids, mask = text_batch()
    other = ids.clone()
    other[-1, 20:] = torch.randint(5, 3000, (12,), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask).logits
        b = model(input_ids=other, attention_mask=mask).logits
    assert torch.equal(a, b)


@pytest.mark.parametrize("kind", ["bert", "distilbert"])
def test_padding_safe_equals_reference_mode_without_padding(kind):
    model = small_text(kind)
    ids, _ = text_batch()
    mask = torch.ones_like(ids)
    with torch.no_grad():
        safe = patch_model(model, ratio=0.7, seq_len=32)(input_ids=ids, attention_mask=mask).logits
        ref = patch_model(model, ratio=0.7, seq_len=32, padding_safe=False)(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(safe, ref)


def test_text_schedule_merges_first_three_layers_only():
    model = patch_model(small_text("bert", layers=6), ratio=0.7, seq_len=32)
    assert model.token_schedule.merges == (9, 6, 4, 0, 0, 0)
    assert [s for s in model.merge_config["steps"]] == ["pitome_text"] * 3 + ["none"] * 3


def test_text_wrong_length_is_a_clear_error():
    model = patch_model(small_text("bert"), ratio=0.7, seq_len=32)
    with pytest.raises(ValueError, match="sequence length 32"):
        model(input_ids=torch.ones(1, 16, dtype=torch.int64))


def test_unsupported_models_are_refused():
    with pytest.raises(UnsupportedModelError):
        patch_model(torch.nn.Linear(2, 2))
    model = small_vit("deit")
    model.global_pool = "max"
    with pytest.raises(UnsupportedModelError, match="global_pool"):
        patch_model(model)


def test_schedule_errors_surface_from_patch_model():
    with pytest.raises(ScheduleError, match="4 layers"):
        patch_model(small_vit("deit"), schedule=[1, 2, 3])


def test_patch_is_in_place_and_deepcopy_safe():
    model = small_vit("deit")
    assert patch_model(model, ratio=0.9) is model
    clone = unpatch_model(copy.deepcopy(model))
    assert type(clone).__name__ == "VisionTransformer" and hasattr(model, "token_schedule")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("algo", ["pitome", "tome"])
def test_half_precision_merged_text_is_nan_free_with_padding(dtype, algo):
    """A padding-only slot has size 0: its share of the slot must be 0, not 0/0, in any dtype."""
    model = patch_model(small_text("bert"), algo=algo, ratio=0.7, seq_len=32)
    ids, mask = text_batch(pad_from=8)
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask).logits
        reduced = model.to(dtype)(input_ids=ids, attention_mask=mask).logits
    assert torch.isfinite(reduced).all()
    torch.testing.assert_close(reduced.float(), reference, atol=3e-2, rtol=0)


@pytest.mark.parametrize("make", [lambda: small_vit("deit"), lambda: small_text("bert")], ids=["vision", "text"])
def test_unpatch_leaves_no_attribute_behind(make):
    """Every attribute a patch adds is removed again: the stock model's modules, as they were."""
    model = make()
    before = {name: set(vars(m)) for name, m in model.named_modules()}
    kwargs = {"seq_len": 32} if not hasattr(model, "blocks") else {}
    unpatch_model(patch_model(model, ratio=0.9, **kwargs))
    assert {name: set(vars(m)) for name, m in model.named_modules()} == before
