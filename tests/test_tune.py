"""`pitome-export tune`: the search space, the split separation, the budget, resume after Ctrl-C,
two workers on one study, and every bad input (one line, exit 2, nothing written)."""

from __future__ import annotations

import json
import os
import signal
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
    (first, created), (second, joined) = (study_module.open_study(url, "s", {}, 0) for _ in range(2))
    assert (created, joined) == (True, False)
    study_module.enqueue_seeds(first, seeds, created)
    study_module.enqueue_seeds(second, seeds, joined)
    assert sorted(_queued(second)) == sorted(json.dumps(p, sort_keys=True) for p in seeds)

    orphan, created = study_module.open_study(f"sqlite:///{tmp_path / 'orphan.db'}", "s", {}, 0)
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


def test_a_named_data_set_tunes_on_its_training_split():
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
        splits = open_splits(TuneJob(model="vit_fmnist", tune_samples=300), spec, model, None, signature_of(model))
    assert "train split" in splits.tuning.description and len(splits.tuning) == 300
    assert "test split" in splits.test.description and len(splits.test) == 10_000
    assert splits.test_source == "fashion-mnist"
    assert not _fingerprints(splits.tuning) & _fingerprints(splits.test)


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
    """Completed trials in the storage's study; 0 while the database or the study is not made yet."""
    import optuna
    from optuna.trial import TrialState

    if not Path(storage.removeprefix("sqlite:///")).exists() or not optuna.get_all_study_summaries(storage):
        return 0
    return sum(t.state == TrialState.COMPLETE for t in _study(storage).get_trials(deepcopy=False))


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
        "accuracy.json", "bench.json", "data_config.json", "model.onnx", "pareto.png", "parity.json", "report.md",
        "schedule.json", "tune.json",
    ]  # fmt: skip
    record = json.loads((out / "tune.json").read_text())
    assert {t["number"] for t in record["trials"]} == {t.number for t in trials}
    assert "## Tuning" in (out / "report.md").read_text()
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    latency = json.loads((out / "bench.json").read_text())["latency"]  # timed as long as the final timing
    assert latency["onnxruntime merged"]["runs"] == 3 * 2 == record["final_timing"]["unmerged fp32"]["runs"]


def test_two_workers_share_one_study(tmp_path, _trace_cache):
    from optuna.trial import TrialState

    data = _image_folder(tmp_path / "data", [0, 1] * 8)
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    args = _tune_args(data, tmp_path / "unused", storage, 3, "--search-only")
    workers = [_process(args, _trace_cache), _process(args, _trace_cache)]
    for worker in workers:
        _, stderr = worker.communicate(timeout=600)
        assert worker.returncode == 0, stderr[-2000:]
    assert not (tmp_path / "unused").exists()  # search-only workers write no folder
    trials = _study(storage).trials
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.WAITING) for t in trials)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) >= 3 and len({t.user_attrs["worker"] for t in trials if "worker" in t.user_attrs}) == 2
    measured = [t.user_attrs["key"] for t in complete if "reused_from" not in t.user_attrs]
    assert len(measured) == len(set(measured))  # no graph measured twice
    seeds = [json.dumps(t.params, sort_keys=True) for t in trials if t.user_attrs.get("seed") and t.params]
    assert len(seeds) == len(set(seeds))  # every queued uniform schedule taken by one worker


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
