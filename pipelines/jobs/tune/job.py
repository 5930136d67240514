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
        help="labelled tuning split (default: the training split of a packaged data set, else a seeded half of "
        "--data, the other half being the test split)",
    )  # fmt: skip
    tune_samples: int = option("--tune-samples", default=DEFAULT_TUNE_SAMPLES, group="search", commands=TUNE,
                               type=options.positive_int, help="tuning samples (default 5000)")  # fmt: skip
    algos: list[str] = option("--algos", factory=lambda: list(options.ALGOS), group="search", commands=TUNE,
                              type=options.algo_list, help="algorithms searched (default pitome,tome)")  # fmt: skip
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
    """The tuning and test splits: `--tune-data`, else a named data set's training split, else a
    seeded half of `--data` (then the other half is the test split)."""
    from pipelines.data.labelled import DataError, named_data, named_data_installed, split_held_out
    from pipelines.jobs.stages import open_data

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
        from pipelines.data.labelled import subset

        tuning = subset(tuning, list(range(job.tune_samples)), f"{tuning.description}, first {job.tune_samples}")
    return Splits(tuning, test, None)


def tune_settings(job: TuneJob, spec: ModelSpec, splits: Splits, space) -> dict:
    """Everything that decides a trial's result: the study's identity."""
    return {
        "model": spec.name, "checkpoint": job.checkpoint, "random_init": job.random_init, "seq_len": job.seq_len,
        "tuning_data": splits.tuning.description, "tuning_samples": len(splits.tuning), "max_drop": job.max_drop,
        "confidence": job.confidence,
        "objective": job.objective, "space": space.describe(), "batch": job.bench_batch, "threads": job.threads,
        "opset": job.opset, "seed": job.seed, "version": 2,
    }  # fmt: skip


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
    if not outcome["within_budget"]:
        raise BudgetMissedError(
            f"no trial kept the budget of {job.max_drop} points; the most accurate one is written to {folder}"
        )
    return folder


def _export(setup, choice, job: TuneJob, spec: ModelSpec, out: Path, console) -> dict:
    """The chosen candidate through the export job's stages into `out`, then the tuning files."""
    from pipelines.jobs.stages import run_stages
    from pipelines.jobs.tune.report import tune_outcome, write_tune_files

    export = choice.export_job(job, setup.splits)
    preset = {"extra_graphs": dict(choice.baseline_graphs), "baseline": setup.bench.reference}
    if choice.candidate.key in setup.bench.fp32_graphs:  # exported during the search: not again
        preset["fp32_graph"] = setup.bench.fp32_graphs[choice.candidate.key]
    if setup.splits.test_source is None:
        preset["data"] = setup.splits.test
    if setup.bench.calibration and choice.candidate.int8_mode == "static":
        preset.update(calibration=setup.bench.calibration, calibration_source=setup.bench.calibration_source)
    summary = run_stages(export, spec, out, console, **preset)
    outcome = tune_outcome(setup, choice, job, summary)
    write_tune_files(setup, choice, job, summary, outcome, out)
    return outcome
