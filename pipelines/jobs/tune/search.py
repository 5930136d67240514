"""The tune job's steps: prepare the trial bench and the study, search, and choose the export."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

from ops.errors import PitomeError
from pipelines.jobs.export_job import ExportJob
from pipelines.jobs.stages import ACCURACY_BATCH  # trials score in the batches the final export is scored in
from pipelines.jobs.tune.claims import GraphClaims
from pipelines.jobs.tune.job import (
    CALIBRATION_SAMPLES,
    FINALISTS,
    Splits,
    TuneJob,
    open_splits,
    tune_settings,
    weights_digest,
)
from pipelines.jobs.tune.space import Candidate, ScheduleLayout, SearchSpace, uniform_ratio
from pipelines.jobs.tune.study import Objective, candidate_of, completed, enqueue_seeds, open_study, search, study_name
from pipelines.jobs.tune.trials import REFERENCE, TrialBench, graph_correct, time_against
from pipelines.models.registry import ModelSpec

FINAL_RUNS_FACTOR = 3  # the finalists are re-timed with this many times a trial's runs
SEED_RATIOS = {"deep": (0.975, 0.95, 0.925, 0.9), "shallow": (0.9, 0.8, 0.7, 0.6)}


@dataclass
class TuneSetup:
    """What the search and the choice share: the spec, the splits, the trial bench, the study."""

    spec: ModelSpec
    splits: Splits
    bench: TrialBench
    space: SearchSpace
    study: object  # optuna.Study
    claims: GraphClaims
    origin: str
    reserve_seconds: float  # what the final export is expected to take


@dataclass
class Choice:
    """The candidate to export, how it was chosen, and the uniform schedules to score beside it."""

    ranked: list[tuple[Candidate, object | None]]  # best first, with its FrozenTrial (None: the unmerged graph)
    within_budget: bool
    timing: dict  # finalist name -> latency stats of the final interleaved run
    finalists: dict[str, Candidate]
    baselines: dict[str, Candidate]  # "uniform pitome 0.95" -> its candidate
    baseline_graphs: dict[str, Path]
    rejected: list[dict] = dataclasses.field(default_factory=list)  # preferred candidates whose export failed a check

    @property
    def candidate(self) -> Candidate:
        return self.ranked[0][0]

    @property
    def trial(self):
        return self.ranked[0][1]

    @property
    def merging_pays(self) -> bool:
        """Whether the candidate merges and beat the unmerged FP32 graph in the final timing."""
        timing = self.timing
        return self.candidate.merged and timing[self.candidate.key].median_ms < timing[REFERENCE].median_ms

    def fall_back(self, reason: str) -> Choice | None:
        """The choice of the next candidate in order, this one rejected for `reason`; None when none is left."""
        if len(self.ranked) == 1:
            return None
        trial = self.trial.number if self.trial is not None else None
        rejected = [*self.rejected, {"label": self.candidate.key, "trial": trial, "reason": reason}]
        return dataclasses.replace(self, ranked=self.ranked[1:], rejected=rejected)

    def export_job(self, job: TuneJob, splits: Splits) -> ExportJob:
        """The export job for the chosen candidate: the test split scores it and the baselines."""
        fields = {f.name: getattr(job, f.name) for f in dataclasses.fields(ExportJob)}
        candidate = self.candidate
        fields.update(
            algo=candidate.algo, ratio=None, schedule=list(candidate.merges), prop_attn=candidate.prop_attn,
            precision=candidate.precision, int8_mode=candidate.int8_mode, data=splits.test_source, out=None, force=True,
        )  # fmt: skip
        # the folder's latency table is timed as long as the final timing that chose the candidate
        # (at --runs a trial's timing, its figures could contradict the summary's)
        fields["bench_runs"] = FINAL_RUNS_FACTOR * job.bench_runs
        if candidate.precision != "fp32":  # the reduced graph may lose no more than the whole budget
            fields["max_accuracy_drop"] = job.max_drop
        return ExportJob(**fields)


def schedule_layout(model, spec: ModelSpec, seq_len: int | None) -> tuple[ScheduleLayout, int]:
    """(layout, prefix tokens) of the model, read from a patch that merges nothing."""
    from exporter.variants import Variant, variant_model

    text_seq_len = seq_len if spec.kind == "text" else None
    schedule = variant_model(model, Variant("layout", "pitome", ratio=1.0), text_seq_len).token_schedule
    layers = schedule.merge_layers if schedule.merge_layers is not None else tuple(range(schedule.depth))
    return ScheduleLayout(schedule.tokens[0], schedule.depth, layers, schedule.num_prefix), schedule.num_prefix


def prepare(job: TuneJob, spec: ModelSpec, console) -> TuneSetup:
    """Load the model, open both splits, open the study, and measure the unmerged reference."""
    import tempfile

    from exporter.signatures import signature_of
    from pipelines.jobs.benchmark import model_width
    from pipelines.models.registry import load_model

    model, origin = load_model(spec, job.checkpoint, job.random_init)
    seq_len = job.seq_len or spec.seq_len
    signature = signature_of(model, seq_len)
    if signature.output_names != ("logits",):
        raise PitomeError(f"tune scores top-1 and {spec.name} has no logits output: give it a classifier head")
    splits = open_splits(job, spec, model, seq_len, signature)
    layout, num_prefix = schedule_layout(model, spec, seq_len)
    prop_attn = (False, True) if spec.kind == "vision" else (False,)
    space = SearchSpace(layout, tuple(job.algos), prop_attn, tuple(job.precisions))
    settings = tune_settings(job, spec, splits, space, weights_digest(model))
    study, created, claims = open_study(job.storage_url(), study_name(settings), settings, job.seed)
    seeds = space.seeds(SEED_RATIOS["shallow" if layout.knots == len(layout.merge_layers) else "deep"])
    enqueue_seeds(study, seeds, created)
    scratch = Path(tempfile.mkdtemp(prefix="pitome-tune-"))
    bench = TrialBench(
        model, spec.kind, seq_len, signature, layout, num_prefix, model_width(model),
        list(splits.tuning.batches(ACCURACY_BATCH)), [], "", scratch, job.threads, job.bench_batch, job.bench_runs,
        job.opset, job.seed, job.confidence,
    )  # fmt: skip
    if "int8" in job.precisions:
        bench.calibration = [feeds for feeds, _ in splits.tuning.batches(16)][: CALIBRATION_SAMPLES // 16]
        bench.calibration_source = (
            f"{min(CALIBRATION_SAMPLES, len(splits.tuning))} samples of {splits.tuning.description}"
        )
    return _measure_reference(TuneSetup(spec, splits, bench, space, study, claims, origin, 0.0), console)


def _measure_reference(setup: TuneSetup, console) -> TuneSetup:
    """Export and score the unmerged FP32 graph; estimate the final export's cost from it."""
    bench = setup.bench
    began = time.monotonic()
    reference = bench.reference
    exported = time.monotonic()
    bench.reference_correct = graph_correct(bench, reference)
    scored = time.monotonic()
    test_scoring = (scored - exported) * len(setup.splits.test) / max(1, bench.samples)
    setup.reserve_seconds = 5 * (exported - began) + 5 * test_scoring + 30
    console.print(
        f"unmerged FP32 on the tuning split: top-1 {100 * bench.reference_top1:.2f}% of {bench.samples} "
        f"({setup.splits.tuning.description}); test split: {setup.splits.test.description}"
    )
    return setup


def run_search(setup: TuneSetup, job: TuneJob, began: float, console) -> None:
    """Run the study until `--trials` completed trials or the time budget (less the final export)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from pipelines.jobs.tune.report import progress_line

    budget = job.time_budget * 60 if job.time_budget is not None else float("inf")
    deadline = began + budget - (0 if job.search_only else setup.reserve_seconds)
    objective = Objective(setup.space, setup.bench, job.max_drop, job.objective, setup.claims)
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TimeElapsedColumn())  # fmt: skip
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("search", total=job.trials, completed=len(completed(setup.study)))

        def on_trial(trial) -> None:
            if trial is not None and "error" in trial.user_attrs:
                console.print(
                    f"[yellow]trial {trial.number} failed, the search goes on: {trial.user_attrs['error']}[/]"
                )
            progress.update(task, completed=len(completed(setup.study)),
                            description=progress_line(setup.study, deadline))  # fmt: skip

        on_trial(None)
        search(setup.study, objective, job.trials, deadline, on_trial)


def _finalists(setup: TuneSetup) -> tuple[dict[str, Candidate], dict[str, Candidate], dict[str, object]]:
    """(finalists, uniform baselines, trial of each name): the best distinct feasible trials,
    the best feasible uniform schedule per algorithm in the first precision, and the reference."""
    feasible = [t for t in completed(setup.study) if t.user_attrs["over_budget"] <= 0]
    feasible.sort(key=lambda t: t.value, reverse=True)
    finalists: dict[str, Candidate] = {}
    trials: dict[str, object] = {}
    for trial in feasible:
        key = trial.user_attrs["key"]
        if len(finalists) < FINALISTS and key not in finalists:
            finalists[key], trials[key] = candidate_of(trial), trial
    baselines: dict[str, Candidate] = {}
    first = setup.space.precisions[0]
    for algo in setup.space.algos:
        uniform = [t for t in feasible if _uniform_of(setup, t, algo, first) is not None]
        if uniform:
            best = max(uniform, key=lambda t: t.user_attrs["flop_speedup"])
            name = f"uniform {algo} {_uniform_of(setup, best, algo, first):g}"
            baselines[name], trials[name] = candidate_of(best), best
    return finalists, baselines, trials


def _uniform_of(setup: TuneSetup, trial, algo: str, precision: str) -> float | None:
    """The trial's uniform ratio if it is a merged uniform schedule of `algo` at `precision`."""
    candidate = candidate_of(trial)
    if candidate.algo != algo or candidate.precision != precision or not candidate.merged:
        return None
    if candidate.prop_attn != (algo == "tome" and True in setup.space.prop_attn):
        return None
    return uniform_ratio(trial.params, setup.space.layout.knots)


def _most_accurate(study):
    """The trial with the best tuning-split top-1 (measured, or PyTorch FP32 where it was pruned)."""
    scored = [t for t in study.get_trials(deepcopy=False) if "top1" in t.user_attrs or "eager_top1" in t.user_attrs]
    if not scored:
        raise PitomeError("the search ended before any trial was scored: give it more --trials or --time-budget")
    return max(scored, key=lambda t: (t.user_attrs.get("top1", t.user_attrs.get("eager_top1")),
                                      t.user_attrs["flop_speedup"]))  # fmt: skip


def select(setup: TuneSetup, job: TuneJob, console) -> Choice:
    """Re-time the finalists and the reference together and rank them: the fastest within the
    budget first (the largest FLOP saving with `--objective flops`), the others after it in the
    same order, in case its export fails a check. No trial within the budget: the most accurate
    one is timed and written."""
    bench = setup.bench
    finalists, baselines, trials = _finalists(setup)
    within_budget = bool(finalists)
    if not within_budget:
        best = _most_accurate(setup.study)
        finalists, trials = {best.user_attrs["key"]: candidate_of(best)}, {best.user_attrs["key"]: best}
    graphs = {REFERENCE: bench.reference}
    graphs.update({key: bench.graph(c) for key, c in {**finalists, **baselines}.items()})
    runs = FINAL_RUNS_FACTOR * bench.runs
    console.print(f"final timing: {len(graphs)} graphs interleaved x {runs} runs")
    timing = time_against(bench, graphs, runs=runs)
    baseline_graphs = {name: graphs[name] for name in baselines}
    if not within_budget or job.objective == "flops":
        order = sorted(
            finalists, key=lambda k: (trials[k].user_attrs["flop_speedup"], -timing[k].median_ms), reverse=True
        )
    else:  # the unmerged FP32 graph competes too: it keeps any budget
        order = sorted([*finalists, REFERENCE], key=lambda k: timing[k].median_ms)
    reference = Candidate("pitome", False, (0,) * bench.layout.depth)
    ranked = [(reference, None) if key == REFERENCE else (finalists[key], trials[key]) for key in order]
    return Choice(ranked, within_budget, timing, finalists, baselines, baseline_graphs)
