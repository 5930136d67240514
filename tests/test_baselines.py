"""The paper's baselines (ToFu, DCT, MCTF, CrossGET, DiffRate) on ViTs: what each computes against
the note's definition written a second time (tests/baselines_reference.py), their count rules at
the shipped models' token counts, hand-checked small cases, ONNX export and parity, and refusals."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
import torch

from ops import patch_model
from ops.errors import UnsupportedModelError
from ops.schedule import build_schedule
from tests import baselines_reference as reference
from tests.models import small_hf_vision, small_text, small_vit

BASELINES = ("tofu", "dct", "mctf", "crossget", "diffrate")
FIDELITY_ATOL = {"dct": 2e-4}  # DCT rounds through float16: values at a rounding boundary may land either side


@pytest.mark.parametrize("ratio", [0.9, 0.75])
@pytest.mark.parametrize("algo", BASELINES)
def test_each_baseline_computes_what_the_note_defines(algo, ratio):
    """The batched, exportable implementation against the plain per-image one, on a six-block
    DeiT (ToFu prunes in blocks 0..3 and merges in 4..5)."""
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    want = reference.forward(small_vit(depth=6), images, algo, ratio)
    model = patch_model(small_vit(depth=6), algo=algo, ratio=ratio)
    with torch.no_grad():
        got = model(images)
    torch.testing.assert_close(got, want, atol=FIDELITY_ATOL.get(algo, 1e-4), rtol=0)


def tokens_out(algo: str, tokens: int, ratio: float) -> list[int]:
    schedule = build_schedule(tokens, 12, algo=algo, ratio=ratio)
    return [t - r + 1 for t, r in zip(schedule.tokens, schedule.merges)]  # class token included


def test_count_rules_at_deit_s_ratio_0_9_are_the_notes():
    assert build_schedule(196, 12, algo="tofu", ratio=0.9).merges == (19, 17, 16, 14, 13, 11, 10, 9, 8, 8, 7, 6)
    assert build_schedule(196, 12, algo="mctf", ratio=0.9).merges == (19, 17, 16, 14, 13, 11, 10, 9, 8, 8, 7, 6)
    assert build_schedule(196, 12, algo="crossget", ratio=0.9).merges == (19, 17, 16, 14, 13, 11, 10, 9, 8, 7, 7, 6)
    assert [t - 1 for t in tokens_out("dct", 196, 0.9)] == [177, 160, 144, 130, 117, 106, 96, 87, 79, 72, 65, 59]
    assert tokens_out("diffrate", 196, 0.9) == [177, 160, 144, 130, 117, 106, 96, 87, 79, 72, 65, 59]


@pytest.mark.parametrize("algo", BASELINES)
def test_count_rules_at_vit_fmnist_follow_the_reference_formulas(algo):
    """vit_fmnist: 49 patches; every rule recomputed from the note's formula."""
    merges = build_schedule(49, 12, algo=algo, ratio=0.9).merges
    t, expected = 49, []
    for layer in range(12):
        if algo in ("tofu", "mctf"):
            r = reference.removed_on_all_tokens(t + 1, 0.9)
        elif algo == "dct":
            r = t - reference.kept_by_dct(t, 0.9)
        elif algo == "diffrate":
            k = t if layer == 0 else t + 1
            r = math.floor(k - k * 0.9) + (layer == 0)
        else:
            r = reference.removed_on_patches(t, 0.9)
        expected.append(r)
        t -= r
    assert list(merges) == expected


@pytest.mark.parametrize("algo", BASELINES)
def test_a_layer_that_removes_nothing_is_the_identity(algo):
    model = patch_model(small_vit(depth=2), algo=algo, schedule=[0, 0])
    plain = small_vit(depth=2)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(images), plain(images), atol=1e-5, rtol=0)


def test_crossget_ranks_exact_ties_by_index():
    """Mutual nearest neighbours tie exactly in CrossGET's row maxima, and duplicated tokens tie
    everywhere: the stable order decides, so the plan is the reference's and deterministic."""
    from ops.algos.crossget import crossget_plan

    palette = torch.eye(4)
    metric = torch.cat([torch.ones(1, 1, 4), palette[torch.tensor([[0, 1, 0, 2, 1, 3, 0, 2]])]], dim=1)
    plan = crossget_plan(metric, 3, 1)
    again = crossget_plan(metric.clone(), 3, 1)
    assert torch.equal(plan.kept, again.kept) and torch.equal(plan.merged, again.merged)
    assert plan.kept[0, 0] == 0 and (plan.into == 0).all()  # the class token first; one destination
    keys = metric[0]
    x = torch.randn(9, 5, generator=torch.Generator().manual_seed(2))
    want = reference.crossget(x, keys, 1 - 3 / 8)
    from ops.algos.crossget import PlainMean

    out, _ = PlainMean()(x[None], torch.ones(1, 9, 1), plan)
    torch.testing.assert_close(out[0], want, atol=1e-6, rtol=0)


def test_tofu_prunes_the_sources_and_keeps_the_rest_in_place():
    from ops.algos.tofu import ToFu

    layer = ToFu(r=2, num_prefix=1, prune=True).eval()
    x = torch.randn(1, 7, 3, generator=torch.Generator().manual_seed(0))
    keys = torch.randn(1, 7, 4, generator=torch.Generator().manual_seed(1))
    out, size = layer(x, torch.ones(1, 7, 1), keys)
    want = reference.tofu(x[0], keys[0], 0.7, prune=True)  # floor(7 - 4.9) = 2 with the class token
    torch.testing.assert_close(out[0], want, atol=0, rtol=0)  # gathers only: bit-exact
    assert out.shape == (1, 5, 3) and torch.equal(size, torch.ones(1, 5, 1))


def test_tofu_merge_keeps_the_largest_norm():
    from ops.algos.tofu import norm_preserving_merge
    from ops.merge import MergePlan

    x = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [3.0, 0.0], [0.0, 5.0]]])
    plan = MergePlan(torch.tensor([[0, 1, 3]]), torch.tensor([[2]]), torch.tensor([[0]]), 1)  # 2 joins 1
    out = norm_preserving_merge(x, plan)
    mean = torch.tensor([1.5, 1.0])
    torch.testing.assert_close(out[0, 1], mean * 3.0 / 2.0)  # max(||x1|| = 2, ||x2|| = 3) / ||x1||
    assert torch.equal(out[0, 2], x[0, 3]) and torch.equal(out[0, 0], x[0, 0])  # untouched: bit-exact


def test_dct_truncation_is_orthonormal_and_equals_the_fft_dct():
    from ops.algos.dct import dct_matrix, truncation

    x = torch.randn(12, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(dct_matrix(12) @ x, reference.dct_ortho(x))
    torch.testing.assert_close(truncation(12, 12).double(), torch.eye(12, dtype=torch.float64), atol=1e-6, rtol=0)
    smooth = torch.ones(12, 1)  # a constant sequence lives in frequency 0 only
    torch.testing.assert_close(truncation(12, 5) @ smooth, torch.full((5, 1), math.sqrt(12 / 5)))


def test_diffrate_sizes_never_go_non_positive():
    """A source opposite to its destination (cosine -1) would take the size to 0 and the next
    log(size) to -inf; the size is clamped to the smallest normal float instead (docs/algorithm.md)."""
    from ops.algos.diffrate import DiffRateCombine
    from ops.merge import MergePlan

    x = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0]]])
    size = torch.ones(1, 3, 1)
    plan = MergePlan(torch.tensor([[0, 1]]), torch.tensor([[2]]), torch.tensor([[0]]), 1)
    out, merged_size = DiffRateCombine()(x, size, plan)
    assert merged_size[0, 1, 0] == torch.finfo(torch.float32).tiny and torch.isfinite(merged_size.log()).all()
    torch.testing.assert_close(out[0, 1], torch.zeros(2))  # the plain mean of the two


def test_the_reductions_act_where_their_papers_put_them():
    from ops.algos import ALGORITHMS

    stages = {name: a.stage for name, a in ALGORITHMS.items()}
    assert stages == {**dict.fromkeys(ALGORITHMS, "attention"), "dct": "mlp"}
    assert {name for name, a in ALGORITHMS.items() if a.reduction.needs_attention} == {"mctf", "diffrate"}
    assert {name for name, a in ALGORITHMS.items() if a.prop_attn} == {"tome", "mctf", "diffrate"}
    assert {name for name, a in ALGORITHMS.items() if a.reduction.mixes_tokens} == {"dct"}
    assert {name for name, a in ALGORITHMS.items() if a.text is None} == {"diffrate"}
    assert {name for name, a in ALGORITHMS.items() if "distilbert" not in a.reduction.text_families} == {"mctf"}


# Export


@pytest.mark.parametrize("algo", BASELINES)
def test_onnx_export_matches_pytorch_and_parses_for_tensorrt(tmp_path, algo):
    from exporter.graph_check import trt_compatibility
    from exporter.onnx_export import export_onnx
    from exporter.parity import TOLERANCES, parity_feeds, verify_export
    from exporter.signatures import signature_of

    model = patch_model(small_vit(depth=4), algo=algo, ratio=0.7)
    path = export_onnx(model, None, tmp_path / "model.onnx")
    assert trt_compatibility(onnx.load(path)) == []
    signature = signature_of(model)
    feeds = parity_feeds(signature, batch_sizes=(1, 8), batches_per_size=1)
    report = verify_export(model, signature, path, feeds, TOLERANCES["fp32"], torch.device("cpu"), threads=2)
    assert report.passed and report.decisions is None, report.verdict()
    assert report.batch_sizes == [1, 8]


@pytest.mark.parametrize("algo", ["tofu", "mctf", "crossget", "diffrate"])
def test_the_near_tie_rescue_forces_a_baselines_own_decisions(tmp_path, algo):
    """Every baseline decides through the same ranking primitives, so parity can force a graph's
    decisions into it: with exact tolerances the direct check fails on float noise, and the
    rerun finds the same decisions in every layer."""
    from exporter.onnx_export import export_onnx
    from exporter.parity import Tolerances, parity_feeds, verify_export
    from exporter.signatures import signature_of

    model = patch_model(small_vit(depth=2), algo=algo, ratio=0.8)
    path = export_onnx(model, None, tmp_path / "model.onnx")
    signature = signature_of(model)
    feeds = parity_feeds(signature, batch_sizes=(2,), batches_per_size=1)
    exact = Tolerances(atol=0.0, rtol=0.0)
    report = verify_export(model, signature, path, feeds, exact, torch.device("cpu"), threads=2, scratch=tmp_path)
    decisions = report.decisions
    assert decisions is not None and decisions.mismatch is None, report.verdict()
    assert set(decisions.layers) == {"slots_0", "slots_1"} and decisions.samples_with_flips == 0
    assert all(f.slots_follow_choices and f.tie_gap == 0.0 for f in decisions.layers.values())


@pytest.mark.parametrize("algo", BASELINES)
def test_reduced_precision_keeps_each_reduction_in_fp32(tmp_path, algo):
    """INT8 and FP16 graphs leave every reduction node in FP32 (DCT's constant matrices too);
    DCT's own float16 round trip is the algorithm's, present in the FP32 graph as well."""
    from exporter.merge_precision import reduced_merge_nodes
    from exporter.onnx_export import export_onnx
    from exporter.quantize import convert_precision

    model = patch_model(small_vit(depth=2), algo=algo, ratio=0.9)
    fp32 = export_onnx(model, None, tmp_path / "fp32.onnx")
    for precision in ("int8", "fp16"):
        reduced = convert_precision(fp32, tmp_path / f"{precision}.onnx", precision)
        assert reduced_merge_nodes(onnx.load(reduced), onnx.load(fp32)) == [], precision
    if algo == "dct":  # without the FP32 graph to compare with, the round trip is reported
        assert reduced_merge_nodes(onnx.load(tmp_path / "fp16.onnx"))


def test_hf_vision_families_take_the_baselines(tmp_path):
    """The HF vision block's three ways of running a reduction: after the MLP (DCT), with the
    attention probabilities (MCTF, DiffRate); ToFu and CrossGET take PiToMe's path (keys only,
    between attention and MLP), covered by its HF vision tests and by their timm tests above."""
    from exporter.onnx_export import export_onnx
    from exporter.runners import ort_session

    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    for algo in ("dct", "mctf", "diffrate"):
        model = patch_model(small_hf_vision("clip_projection", layers=2), algo=algo, ratio=0.8)
        with torch.no_grad():
            eager = model(pixels).image_embeds
        path = export_onnx(model, {"pixel_values": pixels}, tmp_path / f"{algo}.onnx")
        graph = ort_session(path).run(["image_embeds"], {"pixel_values": pixels.numpy()})[0]
        np.testing.assert_allclose(graph, eager.numpy(), atol=1e-4)


# Refusals


@pytest.mark.parametrize(
    ("kind", "algo", "message"),
    [
        ("bert", "diffrate", "diffrate has no text variant"),
        ("distilbert", "diffrate", "diffrate has no text variant"),
        ("distilbert", "mctf", "mctf has no DistilBERT variant"),
    ],
)
def test_text_models_refuse_what_has_no_text_variant_here(kind, algo, message):
    model = small_text(kind)
    with pytest.raises(UnsupportedModelError, match=message):
        patch_model(model, algo=algo, ratio=0.7, seq_len=32)
    assert not hasattr(model.base_model, "token_merges")  # refused before any surgery


@pytest.mark.parametrize("kind", ["bert", "distilbert"])
def test_text_models_take_tofu_dct_crossget_and_mctf_on_bert(kind):
    ids = torch.randint(5, 3000, (2, 32), generator=torch.Generator().manual_seed(0))
    for algo in ("tofu", "dct", "crossget", "mctf")[: 4 if kind == "bert" else 3]:
        model = patch_model(small_text(kind), algo=algo, ratio=0.7, seq_len=32)
        assert model.merge_config["steps"] == [algo, algo, algo, "none"]
        with torch.no_grad():
            assert torch.isfinite(model(input_ids=ids).logits).all()


def test_baselines_refuse_the_scatter_lowering_and_the_fused_merge():
    with pytest.raises(UnsupportedModelError, match="matmul lowering only"):
        patch_model(small_vit(depth=2), algo="mctf", ratio=0.9, lowering="scatter")
    with pytest.raises(UnsupportedModelError, match="fused merge implements pitome and tome, not dct"):
        patch_model(small_vit(depth=2), algo="dct", ratio=0.9, merge_impl="fused")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["minilm_sentiment", "--algo", "diffrate"], "diffrate has no text variant"),
        (["schedule", "minilm_sentiment", "--algo", "diffrate"], "diffrate has no text variant"),
        (["schedule", "distilbert_base", "--algo", "mctf"], "mctf has no DistilBERT variant"),
        (["distilbert_base", "--random-init", "--algo", "mctf"], "mctf has no DistilBERT variant"),
        (["tune", "minilm_sentiment", "--algos", "pitome,diffrate"], "diffrate has no text variant"),
        (["test_vit", "--random-init", "--algo", "tofu", "--ratio", "0"], "ratio must be a number in"),
        (["test_vit", "--random-init", "--algo", "tofu", "--schedule", "99"], "schedule has 1 entries"),
    ],
)
def test_cli_refusals_are_one_line_exit_2(tmp_path, args, fragment):
    from tests.cli_helpers import cli, one_line_error

    one_line_error(cli(*args, "-o", tmp_path / "out") if args[0] != "schedule" else cli(*args), 2, fragment)
    assert not (tmp_path / "out").exists()


def test_cli_exports_a_baseline_end_to_end(tmp_path):
    import json

    from tests.cli_helpers import cli

    out = tmp_path / "out"
    result = cli("test_vit", "--random-init", "--algo", "crossget", "--ratio", "0.9", "--runs", "2", "-o", out)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((out / "parity.json").read_text())["passed"]
    assert json.loads((out / "schedule.json").read_text())["algo"] == "crossget"
    assert json.loads((out / "bench.json").read_text())["block_flop_speedup"] > 1.0


def test_matched_flops_give_each_algorithm_its_own_ratio_of_equal_cost():
    """The paper compares at equal FLOPs: each algorithm's ratio whose block FLOPs match PiToMe's
    within 2% (vit_fmnist at 0.9, minilm_sentiment's layout at 0.7), the target's own ratio given
    back to the algorithms that count like PiToMe."""
    from ops.flops import flop_speedup, matching_ratio

    for tokens, depth, layers, ratio, dim in ((49, 12, None, 0.9, 96), (63, 6, (0, 1, 2), 0.7, 384)):
        like = build_schedule(tokens, depth, algo="pitome", ratio=ratio, merge_layers=layers)
        target = flop_speedup(like, dim, 4.0)
        for algo in ("pitome", "tome", "crossget"):
            assert matching_ratio(algo, target, like, dim, 4.0, near=ratio) == (ratio, target)
        for algo in BASELINES:
            if layers is not None and algo == "diffrate":
                continue
            matched, speedup = matching_ratio(algo, target, like, dim, 4.0, near=ratio)
            assert abs(speedup / target - 1) <= 0.02, algo
            stage = "mlp" if algo == "dct" else "attention"
            again = build_schedule(tokens, depth, algo=algo, ratio=matched, merge_layers=layers)
            assert flop_speedup(again, dim, 4.0, stage) == speedup
    dct = build_schedule(63, 6, algo="pitome", ratio=0.7, merge_layers=(0, 1, 2))
    assert matching_ratio("dct", flop_speedup(dct, 384, 4.0), dct, 384, 4.0, near=0.7)[0] == 0.65
