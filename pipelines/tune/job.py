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
from dataclasses import dataclass, field
from pathlib import Path

from exporter.errors import ParityError
from ops.errors import PitomeError
from pipelines.export_job import ExportJob
from pipelines.models import ModelSpec

DEFAULT_TUNE_SAMPLES = 5000
FINALISTS = 4  # best distinct candidates re-timed together before the choice
CALIBRATION_SAMPLES = 256
ACCURACY_BATCH = 32


class BudgetMissedError(ParityError):
    """No trial kept the accuracy budget (exit 3, the most accurate trial's report written)."""


@dataclass
class TuneJob(ExportJob):
    """What `pitome-export tune` was asked for; the export fields apply to the chosen graph."""

    max_drop: float = 0.5  # points of top-1 against the unmerged FP32 model
    algos: list[str] = field(default_factory=lambda: ["pitome", "tome"])
    precisions: list[str] = field(default_factory=lambda: ["fp32"])
    trials: int = 40
    time_budget: float | None = None  # minutes, the whole command
    objective: str = "latency"  # latency (measured) or flops (block FLOPs)
    storage: str | None = None  # Optuna storage URL; default a SQLite file beside the output folder
    tune_data: str | None = None  # labelled tuning split; default: the data's training split or half of it
    tune_samples: int = DEFAULT_TUNE_SAMPLES
    search_only: bool = False  # a worker: add trials to the shared study, write no folder

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


def check_tune_job(job: TuneJob) -> None:
    """Reject what cannot run, before any work (one line, exit 2; a missing backend exit 4)."""
    from pipelines.export_job import check_target
    from pipelines.tune.space import PRECISIONS

    if job.trials < 1:
        raise PitomeError("--trials must be at least 1")
    if not job.max_drop >= 0:
        raise PitomeError(f"--max-drop must be a number of points >= 0, got {job.max_drop}")
    if job.time_budget is not None and not job.time_budget > 0:
        raise PitomeError(f"--time-budget must be a positive number of minutes, got {job.time_budget}")
    for precision in job.precisions:
        if precision not in PRECISIONS:
            raise PitomeError(f"unknown precision {precision!r} in --precision; choose from {', '.join(PRECISIONS)}")
    if "fp16" in job.precisions and job.target == "onnx":
        raise PitomeError("fp16 graphs run slower than FP32 on ONNX Runtime CPU: search fp16 with --target trt")
    check_target(job.target)
    if job.target == "trt":  # not reached without TensorRT and a GPU: check_target exits 4 first
        raise PitomeError("tune measures trials on ONNX Runtime; --target trt tuning is not built yet")


def open_splits(job: TuneJob, spec: ModelSpec, model, seq_len: int | None, signature) -> Splits:
    """The tuning and test splits: `--tune-data`, else a named data set's training split, else a
    seeded half of `--data` (then the other half is the test split)."""
    from pipelines.data import DataError, named_data, named_data_installed, split_held_out
    from pipelines.stages import open_data

    source = job.data or (spec.data if spec.data and named_data_installed(spec.data) else None)
    if source is None:
        raise DataError("tune needs labelled data to keep the budget on: pass --data (images or text with labels)")
    named = named_data(source)
    tuning_source = job.tune_data or (f"{named[0]}:train" if named and named[1] == "test" else None)
    full = copy.copy(job)
    if tuning_source is not None:
        full.data = source
        test = open_data(full, spec, model, seq_len, signature)
        full.data, full.limit = tuning_source, job.tune_samples
        return Splits(open_data(full, spec, model, seq_len, signature), test, source)
    full.data = source
    tuning, test = split_held_out(open_data(full, spec, model, seq_len, signature), job.seed)
    if job.tune_samples < len(tuning):
        from pipelines.data import subset

        tuning = subset(tuning, list(range(job.tune_samples)), f"{tuning.description}, first {job.tune_samples}")
    return Splits(tuning, test, None)


def tune_settings(job: TuneJob, spec: ModelSpec, splits: Splits, space) -> dict:
    """Everything that decides a trial's result: the study's identity."""
    return {
        "model": spec.name, "checkpoint": job.checkpoint, "random_init": job.random_init, "seq_len": job.seq_len,
        "tuning_data": splits.tuning.description, "tuning_samples": len(splits.tuning), "max_drop": job.max_drop,
        "objective": job.objective, "space": space.describe(), "batch": job.bench_batch, "threads": job.threads,
        "opset": job.opset, "seed": job.seed, "version": 1,
    }  # fmt: skip


def run_tune(job: TuneJob, console) -> Path | None:
    """Search, choose, export; return the published folder (None for a search-only worker)."""
    from pipelines.export_job import build_output_folder, claim_output
    from pipelines.models import resolve
    from pipelines.stages import torch_settings
    from pipelines.tune.report import print_outcome
    from pipelines.tune.search import prepare, run_search, select

    check_tune_job(job)
    began = time.monotonic()
    spec = resolve(job.model)
    if job.random_init:
        console.print("[yellow]RANDOM-INIT WEIGHTS: accuracy is meaningless; the search still runs as it would.[/]")
    with torch_settings(job.threads, job.seed):
        setup = prepare(job, spec, console)  # loads, opens the data and the study: bad input fails here
        if not job.search_only:
            claim_output(job)  # refuses an existing folder now, not after the search
        run_search(setup, job, began, console)
        if job.search_only:
            console.print(f"search-only worker done: study {setup.study.study_name} in {job.storage_url()}")
            return None
        choice = select(setup, job, console)
        folder, outcome = build_output_folder(job, lambda out: _export(setup, choice, job, spec, out, console))
    print_outcome(outcome, folder, console)
    if not outcome["within_budget"]:
        raise BudgetMissedError(
            f"no trial kept the budget of {job.max_drop} points; the most accurate one is written to {folder}"
        )
    return folder


def _export(setup, choice, job: TuneJob, spec: ModelSpec, out: Path, console) -> dict:
    """The chosen candidate through the export job's stages into `out`, then the tuning files."""
    from pipelines.stages import run_stages
    from pipelines.tune.report import tune_outcome, write_tune_files

    export = choice.export_job(job, setup.splits)
    preset = {"extra_graphs": dict(choice.baseline_graphs), "baseline": setup.bench.reference}
    if setup.splits.test_source is None:
        preset["data"] = setup.splits.test
    if setup.bench.calibration and choice.candidate.int8_mode == "static":
        preset.update(calibration=setup.bench.calibration, calibration_source=setup.bench.calibration_source)
    summary = run_stages(export, spec, out, console, **preset)
    outcome = tune_outcome(setup, choice, job, summary)
    write_tune_files(setup, choice, job, summary, outcome, out)
    return outcome
