import pytest

from ops.errors import ScheduleError
from ops.flops import schedule_flops
from ops.schedule import build_schedule, merges_from_ratio, parse_schedule


def test_schedule_deit_small_r09():
    schedule = build_schedule(196, 12, algo="pitome", ratio=0.9)
    assert list(schedule.merges) == [19, 17, 16, 14, 13, 11, 10, 9, 8, 7, 7, 6]
    assert schedule.final_tokens == 59
    assert schedule.to_dict()["tokens_out"][-1] == 60


def test_ratio_uses_python_float_expression():
    # 100 - 100 * 0.55 is 44.99999999999999 in floats: the reference floors it to 44, not 45.
    assert merges_from_ratio(100, 1, 0.55) == [44]


def test_small_token_counts_reach_zero_merges():
    merges = merges_from_ratio(49, 12, 0.975)
    assert merges == [1] * 10 + [0, 0]


def test_ratio_one_merges_nothing():
    assert build_schedule(196, 12, algo="tome", ratio=1.0).merges == (0,) * 12


def test_text_merges_only_in_given_layers():
    schedule = build_schedule(127, 12, algo="pitome", ratio=0.7, merge_layers=(0, 1, 2))
    assert schedule.merges[3:] == (0,) * 9 and all(r > 0 for r in schedule.merges[:3])


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5])
def test_ratio_out_of_range(ratio):
    with pytest.raises(ScheduleError, match="ratio must be in"):
        build_schedule(196, 12, algo="tome", ratio=ratio)


def test_pitome_ratio_floor():
    with pytest.raises(ScheduleError, match="PiToMe needs ratio >= 0.5"):
        build_schedule(196, 12, algo="pitome", ratio=0.45)
    with pytest.raises(ScheduleError, match="at most half"):  # ToMe too cannot merge more than half
        build_schedule(196, 12, algo="tome", ratio=0.45)


@pytest.mark.parametrize(
    ("merges", "message"),
    [
        ([19] * 11, "12 layers"),
        ([19] * 13, "12 layers"),
        ([-1] + [0] * 11, "non-negative"),
        ([99] + [0] * 11, "at most half"),
        ([50] * 12, "at most half"),
    ],
)
def test_explicit_schedule_rejected(merges, message):
    with pytest.raises(ScheduleError, match=message):
        build_schedule(196, 12, algo="pitome", merges=merges)


def test_schedule_in_non_merging_layer_rejected():
    with pytest.raises(ScheduleError, match="does not merge"):
        build_schedule(127, 6, algo="pitome", merges=[1, 1, 1, 1, 0, 0], merge_layers=(0, 1, 2))


def test_a_schedule_per_merging_layer_is_accepted_where_only_some_layers_merge():
    """`tune` reports a text model's schedule for its merging layers (e.g. MiniLM: 22,2,5); the
    same list exports as is, the other layers merging none."""
    short = build_schedule(63, 6, algo="pitome", merges=[22, 2, 5], merge_layers=(0, 1, 2))
    assert short == build_schedule(63, 6, algo="pitome", merges=[22, 2, 5, 0, 0, 0], merge_layers=(0, 1, 2))
    with pytest.raises(ScheduleError, match=r"4 entries but the model has 6 layers or its 3 merging layers \(0,1,2\)"):
        build_schedule(63, 6, algo="pitome", merges=[1, 1, 1, 1], merge_layers=(0, 1, 2))


def test_parse_schedule():
    assert parse_schedule("19,17, 16") == [19, 17, 16]
    with pytest.raises(ScheduleError):
        parse_schedule("19,x")


def test_block_flops_fall_with_merging():
    schedule = build_schedule(196, 12, algo="pitome", ratio=0.9)
    merged, unmerged = schedule_flops(schedule, 384, 4.0)
    assert all(m < u for m, u in zip(merged, unmerged))
    assert merged == sorted(merged, reverse=True)
    # attention at N_l tokens, MLP at N_l - r_l: DeiT-S at 0.9 does 1.79x fewer block FLOPs
    assert sum(unmerged) / sum(merged) == pytest.approx(1.790, abs=1e-3)
