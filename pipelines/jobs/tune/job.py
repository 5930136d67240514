"""`pitome-export tune`: the fastest export within an accuracy budget.

The job loads the model once, measures the unmerged FP32 graph on a tuning split, searches
schedules, algorithms and precisions with Optuna (each trial an exported graph scored on the
tuning split and timed against the unmerged graph), re-times the best candidates together,
and exports the fastest one within the budget with the export job's stages, scoring it and the
best uniform schedules on the held-out test split: the figures the summary quotes.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from exporter.errors import ParityError
from ops.errors import PitomeError
from pipelines.jobs import options
from pipelines.jobs.export_job import ExportJob
from pipelines.jobs.options import option

if TYPE_CHECKING:
    from pipelines.models.registry import ModelSpec

DEFAULT_TUNE_SAMPLES = 5000
FINALISTS = 4  # best distinct candidates re-timed together before the choice
CALIBRATION_SAMPLES = 256
TUNE = ("tune",)  # the command that declares the options below


class BudgetMissedError(ParityError):
    """No trial kept the accuracy budget (exit 3, the most accurate trial's report written)."""


@dataclass
class TuneJob(ExportJob):
    """What `pitome-export tune` was asked for; the export fields apply to the chosen graph."""

    max_drop: float = option(
        "--max-drop", default=0.5, group="search", type=options.points, metavar="POINTS", commands=TUNE,
        help="top-1 points the export may lose against the unmerged FP32 model (default 0.5)",
    )  # fmt: skip
    confidence: float = option(
        "--confidence", default=0.9, group="search", type=options.confidence, metavar="LEVEL", commands=TUNE,
        help="a trial keeps the budget when its drop's upper confidence bound on the tuning split does "
        "(default 0.9; 0.5 trusts the point estimate)",
    )  # fmt: skip
    tune_data: str | None = option(
        "--tune-data", group="search", commands=TUNE,
        help="labelled tuning split, a source other than --data (default: a seeded, class-stratified half of --data "
        "or of the packaged data set's test split, the other half being the test split)",
    )  # fmt: skip
    tune_samples: int = option(
        "--tune-samples", default=DEFAULT_TUNE_SAMPLES, group="search", commands=TUNE, type=options.positive_int,
        help="tuning samples, a seeded class-stratified sample of the tuning split (default 5000)",
    )  # fmt: skip
    algos: list[str] = option("--algos", factory=lambda: list(options.DEFAULT_ALGOS), group="search", commands=TUNE,
                              type=options.algo_list, help=f"algorithms searched, of {','.join(options.ALGOS)} (default pitome,tome)")  # fmt: skip
    precisions: list[str] = option(
        "--precision", factory=lambda: ["fp32"], group="search", type=options.precision_list, commands=TUNE,
        help="precisions searched, e.g. fp32,int8 (int8 searches dynamic and static; default fp32)",
    )  # fmt: skip
    trials: int = option("--trials", default=40, group="search", type=options.positive_int, commands=TUNE,
                         help="completed trials the study should hold (default 40)")  # fmt: skip
    time_budget: float | None = option(
        "--time-budget", group="search", type=options.minutes, metavar="MIN", commands=TUNE,
        help="minutes for the whole command; the search stops in time for the final export",
    )  # fmt: skip
    objective: str = option(
        "--objective", default="latency", group="search", choices=("latency", "flops"), commands=TUNE,
        help="maximised within the budget: measured speed-up (default) or block-FLOP saving",
    )  # fmt: skip
    storage: str | None = option(
        "--storage", group="search", metavar="URL", commands=TUNE,
        help="Optuna storage URL shared by workers (default: a SQLite file beside the output folder; running the "
        "same command again resumes)",
    )  # fmt: skip
    search_only: bool = option("--search-only", default=False, group="search", action="store_true", commands=TUNE,
                               help="a worker: add trials to the study, write no folder")  # fmt: skip

    def default_out(self) -> Path:
        return Path("artifacts") / f"{self.model}-tune"

    def final_path(self) -> Path:
        return Path(self.out) if self.out else self.default_out()

    def storage_url(self) -> str:
        if self.storage:
            return self.storage
        final = self.final_path()
        return f"sqlite:///{final.parent.resolve() / (final.name + '.optuna.db')}"


@dataclass
class Splits:
    """The tuning split (trials) and the test split (the figures the summary quotes)."""

    tuning: object  # LabelledData
    test: object
    test_source: str | None  # what `--data` the final export job opens itself; None: `test` is passed in
    separation: str = "the held-out half, which no trial saw"  # how the report says the test split was kept apart


def check_tune_job(job: TuneJob) -> None:
    """Reject combinations that cannot run, before any work (one line, exit 2; a missing backend
    exit 4). Each value on its own is checked by its flag's type (pipelines.jobs.options)."""
    from pipelines.jobs.export_job import check_target

    if "fp16" in job.precisions and job.target == "onnx":
        raise PitomeError("fp16 graphs run slower than FP32 on ONNX Runtime CPU: search fp16 with --target trt")
    check_target(job.target)
    if job.target == "trt":  # not reached without TensorRT and a GPU: check_target exits 4 first
        raise PitomeError("tune measures trials on ONNX Runtime; --target trt tuning is not built yet")


def open_splits(job: TuneJob, spec: ModelSpec, model, seq_len: int | None, signature) -> Splits:
    """The tuning and test splits: `--tune-data` and `--data` (refused when they are one source),
    else seeded, class-stratified halves of `--data` or of a packaged data set's test split. Its
    training split is no tuning split: the shipped models were fitted on it, so drops measured
    there are in-sample and come out smaller than on new data. The tuning split is capped at
    `--tune-samples` by a seeded, class-stratified sample."""
    from pipelines.data.labelled import DataError, named_data_installed, split_held_out
    from pipelines.jobs.stages import open_data

    source = job.data or (spec.data if spec.data and named_data_installed(spec.data) else None)
    if source is None:
        raise DataError("tune needs labelled data to keep the budget on: pass --data (images or text with labels)")
    full = copy.copy(job)
    full.data = source
    data = open_data(full, spec, model, seq_len, signature)
    if job.tune_data is None:
        tuning, test = split_held_out(data, job.seed)
        return Splits(_capped(tuning, job.tune_samples, job.seed), test, None)
    full.data, full.limit = job.tune_data, None
    tuning = open_data(full, spec, model, seq_len, signature)
    if _same_source(job.tune_data, source) or _same_samples(tuning, data):
        raise DataError(
            f"--tune-data {job.tune_data} is the test split ({source}): the figures quoted as held out would be the "
            "ones the trials were chosen on; pass another split, or leave --tune-data out to tune on a seeded half "
            "of the test data"
        )
    separation = "a different source from the tuning data (--tune-data)"
    return Splits(_capped(tuning, job.tune_samples, job.seed), data, source, separation)


def _capped(data, samples: int, seed: int):
    """`data`, or a seeded class-stratified sample of `samples` of it (a class-sorted folder's
    first samples would be its first classes only)."""
    from pipelines.data.labelled import stratified_sample, subset

    if samples >= len(data):
        return data
    chosen = stratified_sample(data.labels, samples, seed)
    return subset(data, chosen, f"{data.description}, {samples} samples stratified by class (seed {seed})")


def _source_identity(source: str) -> tuple[str, str]:
    """(where, split) a `--data` value reads: a packaged data set's split or a resolved path (an
    IDX folder given by path is read for its test split, as "fashion-mnist" is)."""
    from pipelines.data.labelled import FASHION_MNIST_DIR, named_data

    named = named_data(source)
    if named is None:
        return str(Path(source).resolve()), "test"
    where = str(Path(FASHION_MNIST_DIR).resolve()) if named[0] == "fashion-mnist" else named[0]
    return where, named[1]


def _same_source(first: str, second: str) -> bool:
    return _source_identity(first) == _source_identity(second)


def _same_samples(first, second, probe: int = 8) -> bool:
    """Whether two labelled sets hold the same samples: same labels, and the same inputs for the
    first `probe` samples (a copy of the test folder elsewhere, or a text folder and its file)."""
    import numpy as np

    if len(first) != len(second) or not np.array_equal(first.labels, second.labels):
        return False
    indices = list(range(min(probe, len(first))))
    mine, theirs = first.loader(indices), second.loader(indices)
    return mine.keys() == theirs.keys() and all(np.array_equal(mine[name], theirs[name]) for name in mine)


def tune_settings(job: TuneJob, spec: ModelSpec, splits: Splits, space, weights: str) -> dict:
    """Everything that decides a trial's result: the study's identity. `weights` is the loaded
    model's digest (`weights_digest`): a checkpoint changed in place is another model; the
    versions of the packages an export depends on change the graphs and their timings."""
    from exporter.onnx_export import package_versions

    return {
        "model": spec.name, "weights": weights, "seq_len": job.seq_len, "versions": package_versions(),
        "tuning_data": splits.tuning.description, "tuning_samples": len(splits.tuning), "max_drop": job.max_drop,
        "confidence": job.confidence,
        "objective": job.objective, "space": space.describe(), "batch": job.bench_batch, "threads": job.threads,
        "opset": job.opset, "seed": job.seed, "version": 3,
    }  # fmt: skip


def weights_digest(model) -> str:
    """SHA-256 of the model's parameters and buffers (names, dtypes, shapes and bytes)."""
    import hashlib

    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name} {flat.dtype} {tuple(tensor.shape)};".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def run_tune(job: TuneJob, console) -> Path | None:
    """Search, choose, export; return the published folder (None for a search-only worker)."""
    from pipelines.jobs.export_job import build_output_folder, claim_output
    from pipelines.jobs.stages import torch_settings
    from pipelines.jobs.tune.report import print_outcome
    from pipelines.jobs.tune.search import prepare, run_search, select
    from pipelines.models.registry import resolve

    check_tune_job(job)
    began = time.monotonic()
    spec = resolve(job.model)
    if spec.kind not in ("vision", "text"):
        raise PitomeError(f"tune searches timm vision and Hugging Face text classifiers; {spec.name} is {spec.kind}")
    from pipelines.jobs.export_job import check_algo_fits

    for algo in job.algos:
        check_algo_fits(algo, spec)
    if job.random_init:
        console.print("[yellow]RANDOM-INIT WEIGHTS: accuracy is meaningless; the search still runs as it would.[/]")
    if not job.search_only:
        claim_output(job)  # refuses an existing folder before loading anything, not after the search
    with torch_settings(job.threads, job.seed):
        setup = prepare(job, spec, console)  # loads, opens the data and the study: bad input fails here
        run_search(setup, job, began, console)
        if job.search_only:
            console.print(f"search-only worker done: study {setup.study.study_name} in {job.storage_url()}")
            return None
        choice = select(setup, job, console)
        folder, outcome = build_output_folder(job, lambda out: _export(setup, choice, job, spec, out, console))
    print_outcome(outcome, folder, console)
    if outcome["export_failed"] is not None:
        raise ParityError(f"{outcome['export_failed']} (artifacts kept in {folder} for inspection)")
    if not outcome["within_budget"]:
        raise BudgetMissedError(
            f"no trial kept the budget of {job.max_drop} points; the most accurate one is written to {folder}"
        )
    return folder


def failed_check(summary: dict) -> str | None:
    """The first verdict of the export stages that failed (the ones the export job exits 3 on:
    parity.json's "passed", a reduced precision's acceptance), or None when all passed."""
    if not summary["parity"]["passed"]:
        return f"parity FAILED: {summary['parity_line']}"
    precision = summary["precision"]
    if precision["agreement"] is not None and not precision["agreement"]["passed"]:
        return f"{precision['precision']} parity FAILED: {precision['agreement_line']}"
    return None


def _export(setup, choice, job: TuneJob, spec: ModelSpec, out: Path, console) -> dict:
    """The first candidate in the choice's order whose export passes its own checks, through the
    export job's stages into `out`, then the tuning files. One that fails a check is reported
    and the next finalist is exported in its place; when none is left, the folder holds the last
    one tried and the outcome says why (exit 3)."""
    import shutil

    from pipelines.jobs.tune.report import tune_outcome, write_tune_files

    while True:
        summary = _run_export(setup, choice, job, spec, out, console)
        failed = failed_check(summary)
        fallback = None if failed is None else choice.fall_back(failed)
        if fallback is None:
            break
        console.print(f"[yellow]the export of {choice.candidate.key} failed a check ({failed}): exporting the next "
                      f"finalist, {fallback.candidate.key}[/]")  # fmt: skip
        for child in out.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
        choice = fallback
    outcome = tune_outcome(setup, choice, job, summary, failed)
    write_tune_files(setup, choice, job, summary, outcome, out)
    return outcome


def _run_export(setup, choice, job: TuneJob, spec: ModelSpec, out: Path, console) -> dict:
    """The choice's candidate through the export job's stages into `out`; its summary."""
    from pipelines.jobs.stages import run_stages

    export = choice.export_job(job, setup.splits)
    preset = {"extra_graphs": dict(choice.baseline_graphs), "baseline": setup.bench.reference}
    if choice.candidate.key in setup.bench.fp32_graphs:  # exported during the search: not again
        preset["fp32_graph"] = setup.bench.fp32_graphs[choice.candidate.key]
    if setup.splits.test_source is None:
        preset["data"] = setup.splits.test
    if setup.bench.calibration and choice.candidate.int8_mode == "static":
        preset.update(calibration=setup.bench.calibration, calibration_source=setup.bench.calibration_source)
    return run_stages(export, spec, out, console, **preset)
