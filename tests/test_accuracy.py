"""The paired comparison of two graphs' predictions, and how the report states it."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.jobs.accuracy import paired_comparison


def _predictions(labels: np.ndarray, wrong: np.ndarray) -> np.ndarray:
    """`labels`, with the samples marked in `wrong` given another class."""
    return np.where(wrong, (labels + 1) % 10, labels)


def test_paired_comparison_counts_the_samples_only_one_graph_gets_right():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 2000)
    first_wrong, second_wrong = rng.random(2000) < 0.10, rng.random(2000) < 0.12
    paired = paired_comparison(_predictions(labels, first_wrong), _predictions(labels, second_wrong), labels)
    assert paired["only_first_right"] == int((~first_wrong & second_wrong).sum())
    assert paired["only_second_right"] == int((first_wrong & ~second_wrong).sum())
    # Agresti and Min: the plain interval of the mean per-sample difference (+1, 0, -1) once half a
    # sample is added to each of the four cells (right/wrong x right/wrong), computed another way
    per_sample = np.concatenate([second_wrong.astype(float) - first_wrong.astype(float), [1, -1, 0, 0]])
    weights = np.concatenate([np.ones(2000), np.full(4, 0.5)])
    mean = np.average(per_sample, weights=weights)
    half = 1.96 * np.sqrt(np.average((per_sample - mean) ** 2, weights=weights) / weights.sum())
    assert paired["delta_points_ci95"] == pytest.approx([100 * (mean - half), 100 * (mean + half)])


def test_paired_interval_keeps_a_width_when_the_graphs_never_disagree():
    labels = np.arange(500) % 10
    low, high = paired_comparison(labels, labels.copy(), labels)["delta_points_ci95"]
    assert low < 0 < high and high - low > 0.5  # not "exactly equal" from 500 samples


def test_paired_comparison_refuses_unpaired_predictions():
    labels = np.arange(10)
    for first, second in ((labels[:9], labels), (labels[:1], labels), (labels[:0], labels[:0])):
        with pytest.raises(ValueError, match="paired predictions of one shape"):
            paired_comparison(first, second, labels[: len(second)])


def test_paired_interval_is_narrow_where_the_graphs_mostly_agree():
    """Two graphs wrong on nearly the same samples: the difference is known far better than either
    accuracy (binomial SE of 0.9 accuracy on 10,000 samples: 0.3 points)."""
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 10, 10_000)
    wrong = rng.random(10_000) < 0.10
    flipped = wrong.copy()
    flipped[np.flatnonzero(~wrong)[:20]] = True  # the second graph also misses 20 more
    low, high = paired_comparison(_predictions(labels, wrong), _predictions(labels, flipped), labels)[
        "delta_points_ci95"
    ]
    assert 0 < low < 0.2 < high < 0.35 and high - low < 0.3


@pytest.mark.parametrize(
    ("only_first", "only_second", "p"),
    [(0, 6, 2 / 2**6), (6, 0, 2 / 2**6), (3, 3, 1.0), (0, 0, 1.0), (1, 9, 2 * (1 + 10) / 2**10)],
)
def test_mcnemar_exact_p_is_the_two_sided_binomial_tail(only_first, only_second, p):
    labels = np.zeros(40, dtype=int)
    first_wrong = np.zeros(40, dtype=bool)
    second_wrong = np.zeros(40, dtype=bool)
    second_wrong[:only_first] = True  # only the first graph right on these
    first_wrong[only_first : only_first + only_second] = True  # only the second right on these
    paired = paired_comparison(_predictions(labels, first_wrong), _predictions(labels, second_wrong), labels)
    assert (paired["only_first_right"], paired["only_second_right"]) == (only_first, only_second)
    assert paired["mcnemar_p"] == pytest.approx(p)


def test_mcnemar_tail_in_log_space_matches_exact_integers_and_scales():
    from math import comb

    from pipelines.jobs.accuracy import binomial_tail_half

    exact = sum(comb(2000, k) for k in range(901)) / 2**2000  # 900 of 2,000 discordant one way
    assert binomial_tail_half(900, 2000) == pytest.approx(exact, rel=1e-9)
    assert 0 < binomial_tail_half(19_000, 40_000) < 1e-20  # z about 10: tiny, not underflowed to 0
    assert binomial_tail_half(20_000, 40_000) == pytest.approx(0.5, abs=0.01)


def test_report_states_the_paired_interval():
    from rich.console import Console

    from pipelines.jobs.report import _accuracy_markdown, print_accuracy

    accuracy = {
        "data": "test split", "samples": 10_000, "top1_merged": 0.9037, "top1_unmerged": 0.906, "delta_points": -0.23,
        "agreement": 0.9644, "top1": {"merged": 0.9037, "unmerged": 0.906},
        "paired": {"only_first_right": 160, "only_second_right": 183, "delta_points_ci95": [-0.59, 0.13], "mcnemar_p": 0.24},
    }  # fmt: skip
    markdown = "\n".join(_accuracy_markdown(accuracy))
    assert "merged graph alone is right on 160, the unmerged alone on 183" in markdown
    assert "-0.59 to +0.13 points (McNemar's exact p = 0.24" in markdown
    console = Console(record=True, width=400)
    print_accuracy(accuracy, console)
    assert "(-0.23 points, 95% CI -0.59 to +0.13)" in console.export_text()
    del accuracy["paired"]  # a record written before the paired figures: the report still reads it
    assert "Paired" not in "\n".join(_accuracy_markdown(accuracy))
