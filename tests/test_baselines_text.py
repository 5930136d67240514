"""The baselines on BERT and DistilBERT (the note's "Text" lines): each against the note's
definition written a second time (tests/baselines_reference.py), where each acts and what follows
its tokens (mask, sizes) on padded input, hand-checked small cases, ONNX export with parity, and
the schedule CLI."""

from __future__ import annotations

import math

import onnx
import pytest
import torch

from ops import patch_model
from tests import baselines_reference as reference
from tests.models import small_text, text_batch

TEXT_BASELINES = ("tofu", "dct", "mctf", "crossget")
CASES = [
    (kind, algo) for kind in ("bert", "distilbert") for algo in TEXT_BASELINES if (kind, algo) != ("distilbert", "mctf")
]


def unpadded_ids(batch: int = 3, seq_len: int = 32, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(5, 3000, (batch, seq_len), generator=torch.Generator().manual_seed(seed))
    ids[:, 0] = 101
    return ids


def float16_ulp(value: float) -> float:
    """The spacing of float16 numbers at `value` (normal range)."""
    return 2.0 ** (math.floor(math.log2(abs(value))) - 10)


@pytest.mark.parametrize("ratio", [0.9, 0.7])
@pytest.mark.parametrize(("kind", "algo"), CASES)
def test_each_text_baseline_computes_what_the_note_defines(kind, algo, ratio):
    """The batched, exportable implementation against the plain per-sequence one: the last hidden
    state of a four-layer encoder whose first three layers reduce, unpadded, within 1e-4.

    DCT rounds through float16 after float32 arithmetic, which differs from the reference's float64
    FFT by float32 noise: a value that close to a rounding midpoint lands on either side, one
    float16 ulp apart (2e-3 at the LayerNorm outputs' size, which the next layers carry to the
    last hidden state). Without the rounding the two agree to 2e-6. So for DCT what heads read
    (class token, mean over tokens) is held to 2e-4 and each value to one float16 ulp.
    """
    ids = unpadded_ids()
    want = reference.text_forward(small_text(kind).base_model, ids, algo, ratio)
    model = patch_model(small_text(kind), algo=algo, ratio=ratio, seq_len=32)
    with torch.no_grad():
        got = model.base_model(input_ids=ids).last_hidden_state
    if algo != "dct":
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
        return
    torch.testing.assert_close(got[:, 0], want[:, 0], atol=2e-4, rtol=0)
    torch.testing.assert_close(got.mean(dim=1), want.mean(dim=1), atol=2e-4, rtol=0)
    torch.testing.assert_close(got, want, atol=float16_ulp(want.abs().max().item()), rtol=0)


def test_text_counts_follow_each_algorithms_rule_in_the_first_three_layers():
    """64 tokens at 0.7 (minilm_sentiment): ToFu and MCTF count the class token, CrossGET does
    not, DCT keeps ceil(T ratio); the other layers keep everything."""
    merges = {algo: patch_model(small_text("bert", layers=6), algo=algo, ratio=0.7, seq_len=64).token_schedule.merges
              for algo in TEXT_BASELINES}  # fmt: skip
    assert merges == {
        "tofu": (19, 13, 9, 0, 0, 0),
        "mctf": (19, 13, 9, 0, 0, 0),
        "crossget": (18, 13, 9, 0, 0, 0),
        "dct": (18, 13, 9, 0, 0, 0),
    }
    t = 63
    for r in merges["dct"][:3]:
        assert t - r == reference.kept_by_dct(t, 0.7)
        t -= r


# What follows the tokens on padded input


@pytest.mark.parametrize(("kind", "algo"), CASES)
def test_token_sizes_count_the_real_tokens_each_output_token_holds(kind, algo):
    """Merges keep every real token somewhere (sizes add up to the real count), DCT's spans too;
    ToFu's pruned tokens leave with their size. The mask is "holds a real token" (max-merged),
    except after DCT, whose tokens blend everything: all ones."""
    ids, mask = text_batch(seq_len=32)
    model = patch_model(small_text(kind), algo=algo, ratio=0.7, seq_len=32)
    with torch.no_grad():
        out = model.base_model(input_ids=ids, attention_mask=mask)
    sizes, valid = out.token_sizes, out.attention_mask
    if algo == "tofu":
        assert torch.equal(sizes, valid) and (sizes.sum(1) <= mask.sum(1)).all()  # each kept token: itself
    else:
        torch.testing.assert_close(sizes.sum(1), mask.sum(1).float(), atol=1e-4, rtol=0)
    if algo == "dct":  # the padded row's last spans sampled padding only
        assert torch.equal(valid, torch.ones_like(valid)) and (sizes[2, -3:] == 0).all()
        return
    assert torch.equal(valid, (sizes > 0).float())
    assert (valid[:2] == 1).all() and valid[2].sum() < valid.shape[1]  # only the padded row holds padding


def test_tofu_prunes_padding_first_and_a_pruned_token_takes_its_sizes_along():
    """Padding-safe matching: the padding A token's best match is padding (score above any
    cosine), so it is pruned first; the kept tokens keep their own size channels."""
    from ops.algos.tofu import ToFu

    layer = ToFu(r=2, num_prefix=1, prune=True).eval()
    x = torch.randn(1, 7, 3, generator=torch.Generator().manual_seed(0))
    keys = torch.randn(1, 7, 4, generator=torch.Generator().manual_seed(1))
    valid = torch.tensor([[1.0, 1, 1, 1, 1, 0, 0]])  # positions 5 (B) and 6 (A) are padding
    sizes = torch.stack([torch.ones(1, 7), valid * torch.tensor([[1.0, 2, 3, 4, 5, 0, 0]])], dim=-1)
    out, out_sizes = layer(x, sizes, keys, valid)
    kept = [next(i for i in range(7) if torch.equal(row, x[0, i])) for row in out[0]]  # [kept A, B]
    assert kept[0] == 0 and 6 not in kept and {1, 3, 5} <= set(kept) and len(set(kept)) == 5  # only A prunes
    assert torch.equal(out_sizes, sizes[:, kept])


def test_dct_spans_weigh_what_each_output_token_samples():
    """Output token i of T' samples input span [i T/T', (i+1) T/T'): rows add up to T/T', every
    input token is shared out once, and a padded tail weighs nothing."""
    from ops.algos.dct import span_overlaps

    spans = span_overlaps(10, 4)  # width 2.5
    torch.testing.assert_close(spans.sum(0), torch.ones(10))
    torch.testing.assert_close(spans.sum(1), torch.full((4,), 2.5))
    assert spans[0].tolist() == [1.0, 1.0, 0.5, 0, 0, 0, 0, 0, 0, 0]
    real = torch.tensor([1.0] * 5 + [0.0] * 5)[:, None]  # five real tokens, then padding
    assert (spans @ real)[:, 0].tolist() == [2.5, 2.5, 0.0, 0.0]


@pytest.mark.parametrize(("kind", "masked"), [("bert", False), ("distilbert", True)])
def test_dct_mask_rule_bert_drops_it_after_the_first_layer_distilbert_after_a_reducing_one(kind, masked):
    """DCT reducing in layer 1 only, of two; the class token leaves DCT untouched, so it shows
    what layer 1 attended to. BERT's reference drops the mask after the first layer: the padded
    row's class token saw the padding. DistilBERT's sets it to ones after a reducing layer only:
    layer 1 still masked it, as the unpatched model does."""
    ids, mask = text_batch(seq_len=32)
    model = patch_model(small_text(kind, layers=2), algo="dct", schedule=[0, 3], seq_len=32)
    plain = small_text(kind, layers=2)
    with torch.no_grad():
        got = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0]
        want = plain.base_model(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0]
    torch.testing.assert_close(got[:2], want[:2], atol=1e-5, rtol=0)  # unpadded rows: the mask never mattered
    assert torch.allclose(got[2], want[2], atol=1e-5) == masked


def test_crossget_text_means_leave_padding_out_and_sum_the_sizes():
    """Padding-safe: a group's mean runs over its real tokens; a padding-only slot keeps its own
    token; sizes are summed per slot."""
    from ops.algos.crossget import PlainMean
    from ops.merge import MergePlan

    x = torch.tensor([[[0.0, 0.0], [2.0, 0.0], [4.0, 0.0], [9.0, 9.0], [7.0, 7.0]]])
    valid = torch.tensor([[1.0, 1, 1, 0, 0]])
    sizes = torch.stack([torch.ones(1, 5), valid], dim=-1)
    # slot 1 = token 1 with sources 2 (real) and 3 (padding); slot 2 = token 4 (padding) alone
    plan = MergePlan(torch.tensor([[0, 1, 4]]), torch.tensor([[2, 3]]), torch.tensor([[0, 0]]), 1)
    out, out_sizes = PlainMean(sum_sizes=True)(x, sizes, plan, valid)
    assert out[0].tolist() == [[0.0, 0.0], [3.0, 0.0], [7.0, 7.0]]
    assert out_sizes[0].tolist() == [[1.0, 1.0], [3.0, 2.0], [1.0, 0.0]]
    reference_mean, _ = PlainMean()(x, sizes, plan)  # without `valid`: padding in the mean
    assert reference_mean[0, 1].tolist() == [5.0, 3.0]


@pytest.mark.parametrize("kind", ["bert", "distilbert"])
def test_attention_with_probabilities_is_the_models_own_eager_attention(kind):
    """MCTF's layers compute attention by hand to keep the probabilities: the same output and
    probabilities as the model's eager attention, padding columns at zero."""
    from ops.patch.hf_text import BERT, DISTILBERT, additive_mask, attention_with_probabilities

    model = small_text(kind)
    model.set_attn_implementation("eager")
    ids, mask = text_batch(seq_len=32)
    fam = BERT if kind == "bert" else DISTILBERT
    base = model.base_model
    layer = fam.layers(base)[0]
    with torch.no_grad():
        hidden = fam.embed(base, ids, None, None)
        bias = additive_mask(mask.float(), hidden.dtype)
        got, probs = attention_with_probabilities(fam, layer, hidden, bias)
        want = fam.attention(layer, hidden, bias)
        _, want_probs = fam.self_attention(layer)(hidden, attention_mask=bias)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    torch.testing.assert_close(probs, want_probs, atol=1e-7, rtol=0)
    assert (probs[2, :, :, 20:] == 0).all()


# Export and CLI


@pytest.mark.parametrize(("kind", "algo"), [*(("bert", algo) for algo in TEXT_BASELINES), ("distilbert", "dct")])
def test_text_onnx_export_matches_pytorch_and_parses_for_tensorrt(tmp_path, kind, algo):
    """Every text baseline on BERT (and DistilBERT's own DCT mask rule): parity on the feeds'
    padded rows too, batch 1 and 8."""
    from exporter.graph_check import trt_compatibility
    from exporter.onnx_export import export_onnx
    from exporter.parity import TOLERANCES, parity_feeds, verify_export
    from exporter.signatures import signature_of

    model = patch_model(small_text(kind), algo=algo, ratio=0.7, seq_len=32)
    path = export_onnx(model, None, tmp_path / "model.onnx")
    findings = trt_compatibility(onnx.load(path))
    assert [f for f in findings if f.op_type != "input"] == []  # int64 token ids: a warning of every text graph
    signature = signature_of(model)
    feeds = parity_feeds(signature, batch_sizes=(1, 8), batches_per_size=1)
    report = verify_export(model, signature, path, feeds, TOLERANCES["fp32"], torch.device("cpu"), threads=2)
    assert report.passed and report.decisions is None, report.verdict()
    assert report.batch_sizes == [1, 8]


@pytest.mark.parametrize("algo", TEXT_BASELINES)
def test_schedule_cli_takes_each_text_baseline(algo):
    from tests.cli_helpers import cli

    result = cli("schedule", "minilm_sentiment", "--algo", algo, "--ratio", "0.7")
    assert result.returncode == 0, result.stderr[-2000:]
    expected = {"tofu": "19,13,9,0,0,0", "mctf": "19,13,9,0,0,0", "crossget": "18,13,9,0,0,0", "dct": "18,13,9,0,0,0"}
    assert f"schedule: {expected[algo]}" in result.stdout
    assert f"{algo} reduces" in " ".join(result.stdout.split())
