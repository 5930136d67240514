"""`pitome-export tune`: the search space, the split separation, the budget, resume after Ctrl-C,
the final export's checks, and every bad input (one line, exit 2, nothing written). Workers
sharing a study: tests/test_tune_workers.py."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ops.schedule import keep_curve, merges_from_ratio
from pipelines.jobs.tune.space import Candidate, ScheduleLayout, SearchSpace
from tests.cli_helpers import ROOT, cli, one_line_error

FAST = ("--runs", "2", "--batch", "2", "--tune-samples", "16", "--threads", "2")  # trials cheap to measure


# The search space


@pytest.mark.parametrize("ratio", [0.975, 0.9, 0.7, 0.5])
@pytest.mark.parametrize(("tokens", "depth", "layers"), [(49, 12, tuple(range(12))), (63, 6, (0, 1, 2))])
def test_equal_knots_give_the_uniform_schedule(ratio, tokens, depth, layers):
    layout = ScheduleLayout(tokens, depth, layers)
    assert layout.merges([ratio] * layout.knots) == tuple(merges_from_ratio(tokens, depth, ratio, layers))


@pytest.mark.parametrize("algo", ["tofu", "dct", "mctf", "crossget", "diffrate"])
@pytest.mark.parametrize(("tokens", "depth", "layers"), [(49, 12, tuple(range(12))), (63, 6, (0, 1, 2))])
def test_a_baselines_equal_knots_are_its_own_ratio(algo, tokens, depth, layers):
    """Each algorithm counts a ratio its own way (ToFu and MCTF with the class token, DCT kept
    tokens): a uniform trial labelled "tofu 0.9" is `--algo tofu --ratio 0.9`, not PiToMe's counts."""
    from ops.schedule import build_schedule

    layout = ScheduleLayout(tokens, depth, layers)
    for ratio in (0.95, 0.9, 0.7):
        want = build_schedule(tokens, depth, algo=algo, ratio=ratio, merge_layers=layers).merges
        assert layout.merges([ratio] * layout.knots, algo) == want


def test_a_trials_block_flops_count_where_its_algorithm_reduces():
    """DCT reduces after the MLP: the same schedule saves less than a merge before it."""
    from types import SimpleNamespace

    from ops.flops import flop_speedup as schedule_speedup
    from ops.schedule import build_schedule
    from pipelines.jobs.tune.trials import flop_speedup

    layout = ScheduleLayout(49, 12, tuple(range(12)))
    bench = SimpleNamespace(layout=layout, num_prefix=1, width=(96, 4.0))
    merges = layout.merges([0.9] * 3, "dct")
    schedule = build_schedule(49, 12, algo="dct", merges=list(merges))
    dct, tofu = (flop_speedup(bench, Candidate(algo, False, merges)) for algo in ("dct", "tofu"))
    assert dct == schedule_speedup(schedule, 96, 4.0, "mlp") < tofu == schedule_speedup(schedule, 96, 4.0)


def test_keep_curve_is_linear_between_knots():
    assert keep_curve([1.0, 0.5], [0, 1, 2]) == {0: 1.0, 1: 0.75, 2: 0.5}
    assert keep_curve([1.0, 0.8, 0.6], range(5)) == pytest.approx({0: 1.0, 1: 0.9, 2: 0.8, 3: 0.7, 4: 0.6})
    assert keep_curve([0.9, 0.6, 0.8], [0, 1, 2]) == {0: 0.9, 1: 0.6, 2: 0.8}  # one knot per layer


def test_shallow_models_get_one_fraction_per_merging_layer():
    assert ScheduleLayout(63, 6, (0, 1, 2)).knots == 3 and ScheduleLayout(49, 12, tuple(range(12))).knots == 3
    layout = ScheduleLayout(63, 6, (0, 1, 2))
    assert layout.merges([1.0, 0.5, 1.0]) == (0, 31, 0, 0, 0, 0)


def test_seeds_are_the_uniform_schedules_and_the_unmerged_graph_in_every_reduced_precision():
    import optuna

    layout = ScheduleLayout(49, 12, tuple(range(12)))
    space = SearchSpace(layout, ("pitome", "tome"), (False, True), ("fp32", "int8"))
    seeds = [space.suggest(optuna.trial.FixedTrial(params)) for params in space.seeds((0.95, 0.9))]
    merged = [c for c in seeds if c.merged]
    assert [(c.algo, c.prop_attn, c.merges) for c in merged] == [
        (algo, algo == "tome", tuple(merges_from_ratio(49, 12, ratio)))
        for ratio in (0.95, 0.9) for algo in ("pitome", "tome")
    ]  # fmt: skip
    assert {c.precision_label for c in seeds if not c.merged} == {"int8 dynamic", "int8 static"}
    assert len({c.key for c in seeds}) == len(seeds)


def test_candidate_key_names_the_graph():
    merged = Candidate("tome", True, (2, 1, 0), "int8", "static")
    assert merged.key == "tome prop 2,1,0 int8 static"
    assert Candidate.from_dict(merged.to_dict()) == merged
    assert Candidate("pitome", True, (0, 0, 0)).key == Candidate("tome", False, (0, 0, 0)).key == "unmerged fp32"


def _bench_with_reference(reference: np.ndarray, confidence: float):
    from pipelines.jobs.tune.trials import TrialBench

    unused = ("model", "kind", "seq_len", "signature", "layout", "num_prefix", "width", "batches", "calibration",
              "calibration_source", "scratch", "threads", "bench_batch", "runs", "opset")  # fmt: skip
    return TrialBench(**dict.fromkeys(unused), confidence=confidence, reference_correct=reference)


def test_the_budget_is_kept_on_the_paired_upper_bound_of_the_drop():
    """1,000 samples, the candidate loses 30 the reference got right and gains 10: 2.00 points
    lost; the paired standard error is sqrt((40/1000 - 0.02**2) / 1000) = 0.629 points."""
    from pipelines.jobs.tune.trials import drop_points

    reference = np.zeros(1000, dtype=bool)
    reference[:600] = True
    candidate = reference.copy()
    candidate[:30] = False  # lost
    candidate[600:610] = True  # gained
    drop, bound = drop_points(_bench_with_reference(reference, 0.9), candidate)
    assert drop == pytest.approx(2.0) and bound == pytest.approx(2.0 + 1.2816 * 0.6293, abs=1e-3)
    assert drop_points(_bench_with_reference(reference, 0.5), candidate) == pytest.approx((2.0, 2.0))
    assert drop_points(_bench_with_reference(reference, 0.9), reference) == (0.0, 0.0)  # same predictions: no doubt


def test_pareto_front_keeps_the_points_nothing_beats():
    from pipelines.jobs.tune.report import pareto_front

    points = [(1.0, 0.90), (1.5, 0.89), (1.4, 0.85), (2.0, 0.80), (1.2, 0.90)]
    assert pareto_front(points) == [3, 1, 4]


def test_study_name_changes_with_what_decides_a_trial():
    from pipelines.jobs.tune.study import study_name

    settings = {"model": "vit_fmnist", "max_drop": 0.5, "tuning_data": "x"}
    assert study_name(settings) == study_name(dict(settings))
    assert study_name({**settings, "max_drop": 1.0}) != study_name(settings)


def test_off_grid_knots_give_the_schedule_they_are_reported_as():
    """Optuna proposes 0.5 + 14 * 0.025 = 0.8500000000000001; with 60 tokens that merges 8 in the
    first layer where ratio 0.85 merges 9, while the trial is reported as "uniform 0.85"."""
    import optuna

    from pipelines.jobs.tune.space import uniform_ratio

    layout = ScheduleLayout(60, 12, tuple(range(12)))
    space = SearchSpace(layout, ("pitome",), (False,), ("fp32",))
    off_grid = {
        "algo": "pitome",
        "prop_attn": False,
        "precision": "fp32",
        **{f"keep{i}": 0.5 + 14 * 0.025 for i in range(3)},
    }
    assert off_grid["keep0"] != 0.85
    candidate = space.suggest(optuna.trial.FixedTrial(off_grid))
    assert candidate.merges == tuple(merges_from_ratio(60, 12, 0.85))
    assert f"{uniform_ratio(off_grid, layout.knots):g}" == "0.85"


def test_study_name_changes_with_versions_and_weights(monkeypatch):
    """A study resumed after upgrading torch, or with a checkpoint retrained in place, would mix
    trials of other graphs (and other timings) with its own."""
    import timm
    import torch

    from exporter import onnx_export
    from pipelines.data.labelled import LabelledData
    from pipelines.jobs.tune.job import Splits, TuneJob, tune_settings, weights_digest
    from pipelines.jobs.tune.study import study_name
    from pipelines.models.registry import resolve

    torch.manual_seed(0)
    model = timm.create_model("test_vit")
    same, retrained = timm.create_model("test_vit"), timm.create_model("test_vit")
    same.load_state_dict(model.state_dict())
    retrained.load_state_dict(model.state_dict())
    with torch.no_grad():
        retrained.head.bias[0] += 1e-3
    assert weights_digest(same) == weights_digest(model) != weights_digest(retrained)

    data = LabelledData("x", np.zeros(4, dtype=np.int64), None)
    space = SearchSpace(ScheduleLayout(49, 12, tuple(range(12))), ("pitome",), (False,), ("fp32",))

    def name(weights: str) -> str:
        return study_name(tune_settings(TuneJob(model="test_vit"), resolve("test_vit"), Splits(data, data, None), space,
                                        weights))  # fmt: skip

    before = name(weights_digest(model))
    assert name(weights_digest(retrained)) != before
    versions = onnx_export.package_versions()
    monkeypatch.setattr(onnx_export, "package_versions", lambda: {**versions, "torch": "0.0.1"})
    assert name(weights_digest(model)) != before


def _completed_trial(flops: float, precision: str = "fp32", int8_mode: str | None = None, over_budget: float = -0.1):
    import optuna

    candidate = Candidate("pitome", False, (1,) * 12, precision, int8_mode)
    attrs = {"flop_speedup": flops, "over_budget": over_budget, "candidate": candidate.to_dict(), "key": candidate.key}
    return optuna.trial.create_trial(value=1.0, user_attrs=attrs)


@pytest.mark.parametrize(
    ("objective", "precision", "int8_mode", "pruned"),
    [("latency", "int8", "dynamic", False), ("latency", "int8", "static", False), ("latency", "fp32", None, True),
     ("flops", "int8", "dynamic", True)],
)  # fmt: skip
def test_latency_pre_filter_compares_flops_within_a_precision(objective, precision, int8_mode, pruned):
    """The best feasible trial is FP32 at 1.5x block FLOPs; an INT8 trial at 1.3x (below 90% of
    1.5x) still runs about 1.3x faster than its FP32 twin, so by latency it may win: only FP32
    trials at 1.3x are pruned. By FLOPs precision changes nothing: 1.3x < 1.5x is pruned."""
    import optuna

    from pipelines.jobs.tune.study import Objective

    study = optuna.create_study(direction="maximize")
    study.add_trial(_completed_trial(1.5))
    study.add_trial(_completed_trial(1.2, "int8", "dynamic"))  # a worse trial of the candidate's precision
    study.add_trial(_completed_trial(2.0, "int8", "static", over_budget=0.3))  # misses the budget: no rival
    candidate = Candidate("pitome", False, (1,) * 12, precision, int8_mode)
    reason = Objective(None, None, 0.5, objective, None)._cannot_win(study, candidate, 1.3)
    assert (reason is not None) == pruned
    if pruned:
        assert "below the best feasible" in reason and "1.50x" in reason


def _open(tmp_path, name: str = "study.db"):
    from pipelines.jobs.tune.study import open_study

    return open_study(f"sqlite:///{tmp_path / name}", "s", {}, 0)


def test_workers_joining_a_study_propose_their_own_schedules(tmp_path):
    """With one sampler seed, workers started together proposed the same schedules (3 of 8)."""
    proposals = []
    for opened in (_open(tmp_path), _open(tmp_path)):
        trial = opened.study.ask()
        proposals.append([trial.suggest_float(f"keep{i}", 0.5, 1.0, step=0.025) for i in range(4)])
    assert proposals[0] != proposals[1]


def _measured(trial, candidate, flops) -> dict:
    return {"top1": 0.5, "drop_points": 0.0, "drop_bound_points": 0.0, "speedup": 1.0, "latency_ms": 1.0,
            "latency_cv": 0.0, "seconds": 0.0}  # fmt: skip


def _failing_objective(opened, fails):
    """An Objective over the real study whose measurement raises where `fails(trial)` says."""
    from pipelines.jobs.tune.study import Objective
    from pipelines.jobs.tune.trials import TrialBench

    layout = ScheduleLayout(49, 12, tuple(range(12)))
    unused = ("model", "kind", "seq_len", "signature", "batches", "calibration", "calibration_source", "scratch",
              "threads", "bench_batch", "runs", "opset")  # fmt: skip
    bench = TrialBench(**dict.fromkeys(unused), layout=layout, num_prefix=1, width=(96, 4.0))
    objective = Objective(SearchSpace(layout, ("pitome", "tome"), (False,), ("fp32",)), bench, 0.5, "flops",
                          opened.claims)  # fmt: skip

    def measure(trial, candidate, flops):
        if fails(trial):
            raise RuntimeError(f"export of {candidate.key} failed")
        return _measured(trial, candidate, flops)

    objective._measure = measure
    return objective


def test_a_failing_trial_fails_alone_and_failing_workers_stop(tmp_path):
    """One graph that does not export ends its trial (the error kept in it), not the search; a
    worker whose trials all fail stops after FAILURES_IN_A_ROW instead of proposing forever."""
    from optuna.trial import TrialState

    from pipelines.jobs.tune.study import FAILURES_IN_A_ROW, search

    opened = _open(tmp_path)
    search(opened.study, _failing_objective(opened, lambda t: t.number == 0), 3, float("inf"), lambda t: None)
    states = [t.state for t in opened.study.trials]
    assert states[0] == TrialState.FAIL and states.count(TrialState.COMPLETE) == 3
    assert opened.study.trials[0].user_attrs["error"].startswith("RuntimeError: export of ")

    broken = _open(tmp_path, "broken.db")
    search(broken.study, _failing_objective(broken, lambda t: True), 3, float("inf"), lambda t: None)
    assert [t.state for t in broken.study.trials] == [TrialState.FAIL] * FAILURES_IN_A_ROW


def test_a_seed_that_raised_is_not_queued_again_on_resume(tmp_path):
    """A seed stopped by Ctrl-C is queued again when the study resumes; one whose graph raised
    would raise again, on every resume."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution
    from optuna.trial import TrialState

    from pipelines.jobs.tune.study import SEEDED, enqueue_seeds

    study = _open(tmp_path).study
    seeds = [{"algo": "pitome", "keep0": 0.9}, {"algo": "tome", "keep0": 0.9}]
    distributions = {
        "algo": CategoricalDistribution(["pitome", "tome"]),
        "keep0": FloatDistribution(0.5, 1.0, step=0.025),
    }
    for params, attrs in zip(seeds, ({"seed": True, "error": "RuntimeError: no"}, {"seed": True})):
        study.add_trial(optuna.trial.create_trial(state=TrialState.FAIL, params=params, distributions=distributions,
                                                  user_attrs=attrs, system_attrs={"fixed_params": params}))  # fmt: skip
    study.set_user_attr(SEEDED, True)
    enqueue_seeds(study, seeds, created=False)
    assert _queued(study) == [json.dumps(seeds[1], sort_keys=True)]


def _queued(study) -> list[str]:
    from optuna.trial import TrialState

    return [
        json.dumps(t.system_attrs["fixed_params"], sort_keys=True)
        for t in study.get_trials(states=(TrialState.WAITING,))
    ]


def test_workers_opening_one_study_queue_each_seed_once(tmp_path, monkeypatch):
    """Only the worker that created the study queues the seeds; another joining it waits for them
    and adds none (before, both checked for a seed, found none and queued it: run twice). When
    the creator died before queueing them, a joining worker queues them itself."""
    from pipelines.jobs.tune import study as study_module

    seeds = [{"algo": "pitome", "keep_0": 0.9}, {"algo": "tome", "keep_0": 0.9}]
    url = f"sqlite:///{tmp_path / 'study.db'}"
    (first, created, _), (second, joined, _) = (study_module.open_study(url, "s", {}, 0) for _ in range(2))
    assert (created, joined) == (True, False)
    study_module.enqueue_seeds(first, seeds, created)
    study_module.enqueue_seeds(second, seeds, joined)
    assert sorted(_queued(second)) == sorted(json.dumps(p, sort_keys=True) for p in seeds)

    orphan, created, _ = study_module.open_study(f"sqlite:///{tmp_path / 'orphan.db'}", "s", {}, 0)
    monkeypatch.setattr(study_module, "SEEDS_WAIT_SECONDS", 0.0)
    study_module.enqueue_seeds(orphan, seeds, False)  # its creator never queued them
    assert len(_queued(orphan)) == len(seeds)


# The splits


def _image_folder(root: Path, labels: list[int], seed: int = 0, size: int = 40) -> Path:
    """Distinct random images, one file each, in numeric class folders (label = folder name)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i, label in enumerate(labels):
        (root / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / str(label) / f"{i}.png")
    return root


def _fingerprints(data) -> set[bytes]:
    return {row.tobytes() for feeds, _ in data.batches(8) for row in feeds["pixel_values"]}


def _splits(tmp_path, **job_fields):
    import timm

    from exporter.signatures import signature_of
    from pipelines.jobs.tune.job import TuneJob, open_splits
    from pipelines.models.registry import resolve

    model = timm.create_model("test_vit").eval()
    job = TuneJob(model="test_vit", **job_fields)
    return open_splits(job, resolve("test_vit"), model, None, signature_of(model))


def test_held_out_halves_share_no_sample(tmp_path):
    folder = _image_folder(tmp_path / "data", [i % 3 for i in range(21)])
    splits = _splits(tmp_path, data=str(folder))
    tuning, test = _fingerprints(splits.tuning), _fingerprints(splits.test)
    assert len(tuning) == 10 and len(test) == 11
    assert not tuning & test
    assert splits.test_source is None  # the export job gets the held-out half, not the whole folder


def test_tune_data_is_the_tuning_split_and_data_the_test_split(tmp_path):
    test_folder = _image_folder(tmp_path / "test", [0, 1] * 5, seed=1)
    tune_folder = _image_folder(tmp_path / "tune", [0, 1] * 4, seed=2)
    splits = _splits(tmp_path, data=str(test_folder), tune_data=str(tune_folder), tune_samples=6)
    assert len(splits.tuning) == 6 and len(splits.test) == 10 and splits.test_source == str(test_folder)
    assert not _fingerprints(splits.tuning) & _fingerprints(splits.test)


def test_a_named_data_set_tunes_on_a_held_out_half_of_its_test_split():
    """The shipped vit_fmnist was fitted on Fashion-MNIST's training split: drops measured there are
    in-sample (91.60% top-1 there against 90.60% on test). Tuning takes a seeded, class-stratified
    half of the test split; the other half is the test split the figures are quoted on."""
    from pipelines.data.labelled import named_data_installed

    if not named_data_installed("fashion-mnist"):
        pytest.skip("Fashion-MNIST is not installed (make install apt-gets dataset-fashion-mnist)")
    import torch

    from exporter.signatures import signature_of
    from pipelines.jobs.tune.job import TuneJob, open_splits
    from pipelines.models.registry import load_model, resolve

    spec = resolve("vit_fmnist")
    model, _ = load_model(spec, None, random_init=True)
    with torch.no_grad():
        splits = open_splits(TuneJob(model="vit_fmnist"), spec, model, None, signature_of(model))
    assert "test split" in splits.tuning.description and "tuning half" in splits.tuning.description
    assert "held-out test half" in splits.test.description
    assert len(splits.tuning) == len(splits.test) == 5_000 and splits.test_source is None
    assert np.bincount(splits.tuning.labels).tolist() == [500] * 10  # stratified: each class halved
    tuning = {row.tobytes() for feeds, _ in splits.tuning.batches(500) for row in feeds["pixel_values"]}
    test = {row.tobytes() for feeds, _ in splits.test.batches(500) for row in feeds["pixel_values"]}
    assert not tuning & test


def test_tune_samples_are_a_stratified_sample_of_a_class_sorted_folder(tmp_path):
    """An ImageNet-style folder lists its samples class by class: the first N of it (or of its
    tuning half) held the first classes only (1000 classes x 50, 5,000 samples: classes 0-202)."""
    labels = [label for label in range(10) for _ in range(6)]
    folder = _image_folder(tmp_path / "data", labels, size=8)
    halves = _splits(tmp_path, data=str(folder), tune_samples=10)
    assert np.bincount(halves.tuning.labels).tolist() == [1] * 10
    assert np.bincount(halves.test.labels).tolist() == [3] * 10  # each class split in half
    other = _image_folder(tmp_path / "tune", labels, seed=3, size=8)
    given = _splits(tmp_path, data=str(folder), tune_data=str(other), tune_samples=20)
    assert np.bincount(given.tuning.labels).tolist() == [2] * 10
    assert "stratified by class" in given.tuning.description


@pytest.mark.parametrize("how", ["same path", "another spelling of the path", "a copy"])
def test_tune_data_that_is_the_test_split_is_refused(tmp_path, monkeypatch, how):
    """Trials chosen on the test split would have their own figures quoted as held out."""
    import shutil

    from pipelines.data.labelled import DataError

    folder = _image_folder(tmp_path / "data", [0, 1] * 4, size=8)
    tune_data = {"same path": folder, "another spelling of the path": Path("data") / ".." / "data",
                 "a copy": shutil.copytree(folder, tmp_path / "copy")}[how]  # fmt: skip
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="is the test split"):
        _splits(tmp_path, data=str(folder), tune_data=str(tune_data))


def test_tune_data_naming_the_packaged_test_split_by_its_folder_is_refused(tmp_path):
    from pipelines.data.labelled import FASHION_MNIST_DIR, named_data_installed

    if not named_data_installed("fashion-mnist"):
        pytest.skip("Fashion-MNIST is not installed (make install apt-gets dataset-fashion-mnist)")
    result = cli("tune", "vit_fmnist", "--random-init", "--data", "fashion-mnist", "--tune-data", FASHION_MNIST_DIR,
                 "-o", str(tmp_path / "o"))  # fmt: skip
    one_line_error(result, 2, f"--tune-data {FASHION_MNIST_DIR} is the test split (fashion-mnist)")
    assert list(tmp_path.iterdir()) == []


# Bad input: one line, exit 2, nothing written


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--max-drop", "-1"], "expected a number of points >= 0"),
        (["--max-drop", "abc"], "expected a number of points >= 0"),
        (["--trials", "0"], "expected a positive integer"),
        (["--confidence", "1"], "expected a confidence level in [0.5, 1)"),
        (["--confidence", "0.3"], "expected a confidence level in [0.5, 1)"),
        (["--time-budget", "0"], "positive number of minutes"),
        (["--precision", "fp32,int4"], "unknown precision 'int4'"),
        (["--precision", "fp32,fp16"], "fp16 graphs run slower"),
    ],
)
def test_bad_budget_and_search_flags(tmp_path, args, fragment):
    folder = _image_folder(tmp_path / "data", [0, 1])
    one_line_error(cli("tune", "test_vit", "--random-init", "--data", str(folder), "-o", str(tmp_path / "o"), *args),
                   2, fragment)  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_tune_refuses_what_it_cannot_score(tmp_path):
    one_line_error(cli("tune", "dinov2_small", "--random-init", "-o", str(tmp_path / "o")), 2,
                   "tune searches timm vision and Hugging Face text classifiers")  # fmt: skip
    assert list(tmp_path.iterdir()) == []


def test_tune_without_labelled_data_is_exit_2(tmp_path):
    one_line_error(cli("tune", "test_vit", "--random-init", "-o", str(tmp_path / "o")), 2, "tune needs labelled data")
    assert list(tmp_path.iterdir()) == []


def test_an_existing_output_folder_is_refused_before_loading(tmp_path, monkeypatch):
    """The folder check costs nothing; it must not wait for the model, the data and the reference."""
    from pipelines.jobs.tune import search

    def must_not_load(*args, **kwargs):
        raise AssertionError("loaded before refusing the output folder")

    monkeypatch.setattr(search, "prepare", must_not_load)
    folder = _image_folder(tmp_path / "data", [0, 1])
    (tmp_path / "o").mkdir()
    result = cli("tune", "test_vit", "--random-init", "--data", str(folder), "-o", str(tmp_path / "o"))
    one_line_error(result, 2, "exists; pass --force")
    assert list((tmp_path / "o").iterdir()) == []


@pytest.mark.parametrize(
    ("url", "fragment"),
    [("sqlite:////nonexistent/dir/study.db", "cannot open the study storage"),
     ("postgresql://tuner@127.0.0.1:1/study", "cannot open the study storage"),
     ("nosuchdb://x", "cannot open the study storage")],
)  # fmt: skip
def test_unreachable_storage_is_exit_2(tmp_path, url, fragment):
    folder = _image_folder(tmp_path / "data", [0, 1])
    result = cli(
        "tune", "test_vit", "--random-init", "--data", str(folder), "--storage", url, "-o", str(tmp_path / "o")
    )
    one_line_error(result, 2, fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


# The search as users run it


def _study(storage: str):
    import optuna

    (summary,) = optuna.get_all_study_summaries(storage)
    return optuna.load_study(study_name=summary.study_name, storage=storage)


def _completed(storage: str) -> int:
    """Completed trials in the storage's SQLite file, read without Optuna: 0 until the tune process
    has made its tables. (Opening the storage with Optuna while the process creates the schema
    races it to create the same tables, and the test's side of that race fails.)"""
    path = Path(storage.removeprefix("sqlite:///"))
    if not path.exists():
        return 0
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)) as db:
            return db.execute("SELECT COUNT(*) FROM trials WHERE state = 'COMPLETE'").fetchone()[0]
    except sqlite3.OperationalError:  # no trials table yet
        return 0


def _tune_args(data: Path, out: Path, storage: str, trials: int, *extra: str) -> list[str]:
    return ["tune", "test_vit", "--random-init", "--data", str(data), "--trials", str(trials), "--storage", storage,
            "-o", str(out), *FAST, *extra]  # fmt: skip


def _process(args: list[str], traces) -> subprocess.Popen:
    """The CLI in a real process (what these tests are about), sharing the run's trace cache."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "160", "PITOME_TEST_TRACES": str(traces.folder)}
    return subprocess.Popen([sys.executable, "-m", "tests.cached_cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip


def test_tune_resumes_after_ctrl_c_without_repeating_a_trial(tmp_path, _trace_cache):
    from optuna.trial import TrialState

    data = _image_folder(tmp_path / "data", [0, 1] * 8)
    storage, out = f"sqlite:///{tmp_path / 'study.db'}", tmp_path / "out"
    proc = _process(_tune_args(data, out, storage, 2), _trace_cache)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not _completed(storage):
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert not out.exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())
    before = {t.number: t.datetime_complete for t in _study(storage).trials if t.state == TrialState.COMPLETE}
    assert len(before) == 1

    result = cli(*_tune_args(data, out, storage, 2))
    assert result.returncode == 0, result.stderr[-3000:]
    trials = _study(storage).trials
    complete = {t.number: t for t in trials if t.state == TrialState.COMPLETE}
    assert len(complete) == 2
    for number, finished in before.items():  # the trial done before Ctrl-C was not run again
        assert complete[number].datetime_complete == finished
    assert sorted(p.name for p in out.iterdir()) == [
        "accuracy.json", "bench.json", "data_config.json", "model.onnx", "pareto.png", "parity.json",
        "predictions.npz", "report.md", "schedule.json", "tune.json",
    ]  # fmt: skip
    record = json.loads((out / "tune.json").read_text())
    assert {t["number"] for t in record["trials"]} == {t.number for t in trials}
    assert "## Tuning" in (out / "report.md").read_text()
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    latency = json.loads((out / "bench.json").read_text())["latency"]  # timed as long as the final timing
    assert latency["onnxruntime merged"]["runs"] == 3 * 2 == record["final_timing"]["unmerged fp32"]["runs"]


def test_no_trial_within_budget_is_exit_3_with_the_most_accurate_report(tmp_path, monkeypatch):
    """Every merged schedule scored 1 point below the unmerged model (the measurement stood in
    for; the search, the budget check, the choice and the written folder are real)."""
    monkeypatch.setattr("pipelines.jobs.tune.study.drop_points", lambda bench, correct: (1.0, 1.0))
    from exporter import onnx_export

    exported, export = [], onnx_export.export_onnx
    monkeypatch.setattr(onnx_export, "export_onnx", lambda *a, **k: exported.append(a[2]) or export(*a, **k))
    data = _image_folder(tmp_path / "data", [0, 1] * 4)
    out = tmp_path / "out"
    result = cli(*_tune_args(data, out, f"sqlite:///{tmp_path / 'study.db'}", 2))
    one_line_error(result, 3, "no trial kept the budget of 0.5 points")
    record = json.loads((out / "tune.json").read_text())
    assert not record["outcome"]["within_budget"] and record["outcome"]["chosen"]["trial"] is not None
    assert all(t["state"] == "PRUNED" and "loses 1.00 points" in t["pruned"] for t in record["trials"])
    # the reference and the chosen trial are exported once each: the folder's graph is the trial's
    assert len(exported) == 2 and json.loads((out / "parity.json").read_text())["passed"]
    assert (out / "model.onnx").exists() and "## Tuning" in (out / "report.md").read_text()


def _wrong_merged_graphs_ranked_pitome_unmerged_tome(monkeypatch) -> None:
    """Every merged trial's graph is the unmerged model's: a wrong graph the search cannot tell
    (trials score and time it; every trial keeps the budget here), which the final export's
    parity, comparing the graph with the merged PyTorch model, fails. The final timing ranks the
    PiToMe finalist first, the unmerged graph second, the ToMe one last. (A failing parity traces
    a decision graph to explain itself: the two tests below patch alike, so the trace cache
    traces it once.)"""
    import dataclasses
    import shutil

    from pipelines.jobs.tune import search, trials
    from pipelines.jobs.tune.trials import REFERENCE

    real_export, real_time = trials.export_candidate, search.time_against

    def export(bench, candidate, model, stem):
        if not candidate.merged:
            return real_export(bench, candidate, model, stem)
        wrong = shutil.copy(bench.reference, stem.with_suffix(".fp32.onnx"))
        return wrong, wrong

    def timed(bench, graphs, runs=None):
        stats = real_time(bench, graphs, runs)
        rank = {name: 1.0 if name.startswith("pitome") else 2.0 if name == REFERENCE else 3.0 for name in stats}
        return {name: dataclasses.replace(s, median_ms=rank[name]) for name, s in stats.items()}

    monkeypatch.setattr(trials, "export_candidate", export)
    monkeypatch.setattr(search, "time_against", timed)
    for module in ("study", "trials"):  # 8 random-init samples decide nothing: every trial keeps the budget
        monkeypatch.setattr(f"pipelines.jobs.tune.{module}.drop_points", lambda bench, correct: (0.0, 0.0))


def test_a_chosen_export_that_fails_parity_falls_back_to_the_next_finalist(tmp_path, monkeypatch):
    """The chosen graph's parity.json said FAILED and tune still printed "chosen" and exited 0.
    Now a finalist whose export fails a check is named with the check, and the next one in the
    choice's order is exported instead: here the unmerged graph, timed after the PiToMe one."""
    _wrong_merged_graphs_ranked_pitome_unmerged_tome(monkeypatch)
    data = _image_folder(tmp_path / "data", [0, 1] * 4)
    out = tmp_path / "out"
    result = cli(*_tune_args(data, out, f"sqlite:///{tmp_path / 'study.db'}", 2))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    outcome = json.loads((out / "tune.json").read_text())["outcome"]
    assert outcome["chosen"]["label"] == "unmerged fp32" and outcome["export_failed"] is None
    (rejected,) = outcome["rejected"]
    assert rejected["label"].startswith("pitome plain") and rejected["reason"].startswith("parity FAILED")
    assert json.loads((out / "parity.json").read_text())["passed"]
    assert "was preferred, but its export failed a check: parity FAILED" in result.stdout
    assert f"{rejected['label']} was preferred, but its export failed a check" in (out / "report.md").read_text()


def test_a_chosen_export_that_fails_parity_with_no_finalist_left_is_exit_3(tmp_path, monkeypatch):
    """By FLOPs with one trial, the PiToMe graph is the only finalist: its failing folder is kept."""
    _wrong_merged_graphs_ranked_pitome_unmerged_tome(monkeypatch)
    data = _image_folder(tmp_path / "data", [0, 1] * 4)
    out = tmp_path / "out"
    result = cli(*_tune_args(data, out, f"sqlite:///{tmp_path / 'study.db'}", 1, "--objective", "flops"))
    one_line_error(result, 3, "parity FAILED")
    outcome = json.loads((out / "tune.json").read_text())["outcome"]
    assert outcome["export_failed"].startswith("parity FAILED") and outcome["rejected"] == []
    assert not json.loads((out / "parity.json").read_text())["passed"]
