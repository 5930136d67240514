"""The merge algorithms against their spec, on plain tensors."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from ops.merge import (
    MergeStep,
    TokenMerge,
    descending_order,
    pitome_assignment,
    pitome_energy,
    plan_from_slots,
    plan_slots,
    size_weighted_merge,
    tome_assignment,
)


def _inputs(b, n, c, d, seed, sizes=False):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, c, generator=gen)
    size = torch.randint(1, 4, (b, n, 1), generator=gen).float() if sizes else torch.ones(b, n, 1)
    metric = torch.randn(b, n, d, generator=gen)
    return x, size, metric


def test_descending_order_ties_go_to_lower_index():
    order = descending_order(torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0]]))
    assert order.tolist() == [[1, 2, 4, 0, 3]]


def test_descending_order_all_equal_is_identity():
    assert descending_order(torch.zeros(2, 300)).tolist() == [list(range(300))] * 2


@settings(max_examples=30, deadline=None)
@given(
    kind=st.sampled_from(["pitome", "pitome_bsm", "tome"]),
    tokens=st.integers(4, 40),
    prefix=st.integers(0, 2),
    frac=st.floats(0.05, 0.5),
    seed=st.integers(0, 10_000),
)
def test_plan_is_a_partition_and_round_trips_through_slots(kind, tokens, prefix, frac, seed):
    """Every token is kept or merged exactly once, and `plan_from_slots` recovers the plan's slots."""
    r = max(1, int(tokens * frac))
    x, size, metric = _inputs(2, tokens + prefix, 8, 6, seed, sizes=True)
    plan = TokenMerge(MergeStep(kind, r, 0.5), prefix).assign(metric, None)
    members = torch.cat([plan.kept, plan.merged], dim=1).sort(dim=1).values
    assert torch.equal(members, torch.arange(tokens + prefix).expand(2, -1))
    dst = plan_slots(plan)
    assert torch.equal(plan_slots(plan_from_slots(dst, plan.n_out)), dst)
    out, out_size = size_weighted_merge(x, size, plan)
    forced, forced_size = size_weighted_merge(x, size, plan_from_slots(dst, plan.n_out))
    torch.testing.assert_close(forced, out, atol=1e-6, rtol=1e-6)
    assert torch.equal(forced_size, out_size)


@settings(max_examples=40, deadline=None)
@given(
    kind=st.sampled_from(["pitome", "pitome_bsm", "tome"]),
    batch=st.integers(1, 3),
    tokens=st.integers(4, 40),
    prefix=st.integers(0, 2),
    frac=st.floats(0.0, 0.5),
    seed=st.integers(0, 10_000),
    sizes=st.booleans(),
)
def test_lowerings_agree_and_size_is_conserved(kind, batch, tokens, prefix, frac, seed, sizes):
    r = int(tokens * frac)
    x, size, metric = _inputs(batch, tokens + prefix, 8, 6, seed, sizes)
    outs = {low: TokenMerge(MergeStep(kind, r, 0.5, low), prefix)(x, size, metric) for low in ("matmul", "scatter")}
    (xm, sm), (xs, ss) = outs["matmul"], outs["scatter"]
    assert xm.shape == (batch, tokens + prefix - r, 8)
    torch.testing.assert_close(xm, xs, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(sm, ss, atol=0, rtol=0)
    torch.testing.assert_close(sm.sum(1), size.sum(1), atol=1e-5, rtol=0)
    # prefix tokens stay first and untouched
    assert torch.equal(xm[:, :prefix], x[:, :prefix]) and torch.equal(sm[:, :prefix], size[:, :prefix])


@pytest.mark.parametrize("lowering", ["matmul", "scatter"])
def test_merged_token_is_size_weighted_mean_of_its_group(lowering):
    x, size, metric = _inputs(2, 30, 5, 4, seed=3, sizes=True)
    plan = pitome_assignment(metric, 7, 0.5, bsm=False)
    out, out_size = size_weighted_merge(x, size, plan, lowering)
    dst, n_out = plan_slots(plan), plan.n_out
    for b in range(2):
        for slot in range(n_out):
            members = (dst[b] == slot).nonzero().flatten()
            w = size[b, members]
            expected = (x[b, members] * w).sum(0) / w.sum()
            torch.testing.assert_close(out[b, slot], expected, atol=1e-6, rtol=1e-6)
            assert out_size[b, slot, 0] == w.sum()


@pytest.mark.parametrize("lowering", ["matmul", "scatter"])
def test_protected_tokens_unchanged(lowering):
    """Energy-protected PiToMe: the T - 2r lowest-energy tokens are copied bit-exactly."""
    x, size, metric = _inputs(2, 40, 16, 8, seed=1, sizes=True)
    r = 9
    plan = pitome_assignment(metric, r, 0.6, bsm=False)
    out, out_size = size_weighted_merge(x, size, plan, lowering)
    dst, n_out = plan_slots(plan), plan.n_out
    normed = F.normalize(metric, dim=-1)
    energy = pitome_energy(normed @ normed.transpose(1, 2), 0.6)
    for b in range(2):
        protected = energy[b].argsort(descending=True)[2 * r :]
        slots = dst[b, protected]
        assert len(set(slots.tolist())) == len(protected)  # each alone in its slot
        assert torch.equal(out[b, slots], x[b, protected])
        assert torch.equal(out_size[b, slots], size[b, protected])
        mergeable = energy[b].argsort(descending=True)[: 2 * r]
        assert out_size[b, n_out - r :].sum() == size[b, mergeable].sum()  # A and B all end in B slots


def test_pitome_merges_most_redundant_tokens():
    """Duplicated tokens have the highest energy: they are the ones merged away."""
    gen = torch.Generator().manual_seed(0)
    distinct = torch.randn(1, 10, 8, generator=gen)
    dup = torch.randn(1, 1, 8, generator=gen).expand(1, 6, 8)
    metric = torch.cat([distinct, dup], dim=1)
    plan = pitome_assignment(metric, 3, 0.5, bsm=False)
    dst, n_out = plan_slots(plan), plan.n_out
    counts = torch.bincount(dst[0], minlength=n_out)
    merged_slots = (counts > 1).nonzero().flatten()
    members = torch.cat([(dst[0] == s).nonzero().flatten() for s in merged_slots])
    assert set(members.tolist()) <= set(range(10, 16))


def test_tome_parity_of_positions():
    """ToMe: with one prefix token, metric token 0 sits at position 1 (B); A = odd metric indices."""
    metric = torch.randn(1, 9, 4)
    plan = tome_assignment(metric, 0, position_offset=1)
    # no merge: [A (positions 2,4,6,8 -> metric 1,3,5,7), B (metric 0,2,4,6,8)]
    assert plan_slots(plan)[0].tolist() == [4, 0, 5, 1, 6, 2, 7, 3, 8]
    assert plan.n_out == 9


def test_tome_merges_best_matches():
    base = torch.randn(1, 4, 6)
    # metric tokens 1 and 0 identical (A=1 -> B=0 is the best edge)
    metric = torch.stack([base[0, 0], base[0, 0], base[0, 1], base[0, 2], base[0, 3]])[None]
    dst = plan_slots(tome_assignment(metric, 1, position_offset=1))
    assert dst[0, 1] == dst[0, 0]


def test_text_padding_never_merges_into_real_tokens():
    x, _, metric = _inputs(1, 20, 8, 6, seed=5)
    valid = torch.ones(1, 20)
    valid[0, 14:] = 0
    for kind in ("pitome_text", "tome"):
        out, out_size = TokenMerge(MergeStep(kind, 5, 0.9), 1)(x, valid[..., None], metric, valid)
        # real tokens keep their total size; padding contributes nothing anywhere
        assert out_size.sum() == 14
        metric2 = metric.clone()
        metric2[0, 14:] = torch.randn(6, 6)
        x2 = x.clone()
        x2[0, 14:] = 100.0
        out2, out_size2 = TokenMerge(MergeStep(kind, 5, 0.9), 1)(x2, valid[..., None], metric2, valid)
        real = out_size[0, :, 0] > 0
        assert torch.equal(out[0, real], out2[0, real])
        assert torch.equal(out_size, out_size2)
