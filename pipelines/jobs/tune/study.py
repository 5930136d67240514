"""The Optuna study behind `pitome-export tune`: storage, identity, the objective and the loop.

The study lives in an Optuna storage (by default a SQLite file beside the output folder), so a
run stopped by Ctrl-C, or run again, resumes without repeating a completed trial, and several
workers given one `--storage URL` share the trials (Optuna's own distributed mode). Its name is
a hash of everything that decides a trial's result, so changing the budget, the data or the
space starts a new study instead of mixing incomparable trials.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import socket
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

from ops.errors import PitomeError
from pipelines.jobs import interrupts
from pipelines.jobs.tune.claims import GraphClaims
from pipelines.jobs.tune.space import Candidate, SearchSpace
from pipelines.jobs.tune.trials import TrialBench, drop_points, eager_correct, evaluate, flop_speedup, patched

FLOP_SLACK = 0.9  # by latency, a trial saving under 90% of the best feasible one's FLOPs cannot be faster
MAX_TRIALS_FACTOR = 5  # pruned (never exported) trials end a search after this many times --trials
HEARTBEAT_SECONDS = 30  # a worker that dies leaves its trial failed after twice this, and it is retried
WAIT_SECONDS = 1.0  # polling interval while another worker measures the same graph
FAILURES_IN_A_ROW = 3  # a worker whose last trials all raised stops searching: something is broken, not one graph


class TrialFailedError(PitomeError):
    """A trial's graph could not be exported, converted or run: that trial fails, the search goes on."""


class StorageError(PitomeError):
    """The Optuna storage URL cannot be opened."""


def study_name(settings: dict) -> str:
    """A stable name for the study of these settings (model, data, budget, space, objective)."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return f"pitome-tune-{settings['model']}-{digest}"


def open_storage(url: str, attempts: int = 3):
    """An Optuna RDB storage with heartbeats (a dead worker's trial is failed and retried), or
    StorageError with one line when the URL cannot be opened. Workers that create a new
    database at the same moment race on its schema (`_schema_race`): the loser retries and finds
    it made."""
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    for attempt in range(attempts):
        try:
            with _quiet_experimental():
                return RDBStorage(
                    url, heartbeat_interval=HEARTBEAT_SECONDS, grace_period=2 * HEARTBEAT_SECONDS,
                    heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1),
                )  # fmt: skip
        except (ImportError, ValueError, optuna.exceptions.StorageInternalError) as exc:
            raise StorageError(f"cannot open the study storage {url}: {_first_line(exc)}") from None
        except Exception as exc:  # noqa: BLE001 - SQLAlchemy's errors for bad URLs, drivers and hosts
            if not type(exc).__module__.startswith("sqlalchemy"):
                raise
            if not _schema_race(exc) or attempt == attempts - 1:
                raise StorageError(f"cannot open the study storage {url}: {_first_line(exc)}") from None
            time.sleep(0.5 * (attempt + 1))


def _schema_race(exc: Exception) -> bool:
    """Whether `exc` is what a worker gets when another creates the same schema at that moment:
    a unique violation (PostgreSQL's catalogue), or "table ... already exists" (SQLite, whose
    `CREATE TABLE` raced past the existence check)."""
    return type(exc).__name__ == "IntegrityError" or "already exists" in str(exc)


@contextlib.contextmanager
def _quiet_experimental() -> Iterator[None]:
    """Optuna marks heartbeats experimental; the warning says nothing a user of this command can act on."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


class OpenedStudy(NamedTuple):
    """An opened study, whether this call created it, and its graph claims."""

    study: object  # optuna.Study
    created: bool  # of several workers started together, exactly one created it
    claims: GraphClaims


def open_study(url: str, name: str, settings: dict, seed: int) -> OpenedStudy:
    """Create or load the study (constrained TPE, maximising the objective).

    The worker that creates the study samples with `seed`, so one worker's search repeats; each
    worker that joins it draws a sampler seed of its own: with one seed, workers started together
    proposed the same schedules (Optuna's random start-up trials, then TPE on the same history)."""
    import random

    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # a Ctrl-C'd trial is not worth a traceback
    storage = open_storage(url)

    def sampler(worker_seed: int):  # constraints: Trial.set_constraint
        return optuna.samplers.TPESampler(seed=worker_seed, n_startup_trials=5)

    try:
        study = optuna.create_study(storage=storage, study_name=name, direction="maximize", sampler=sampler(seed))
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        joined = sampler(random.SystemRandom().randrange(2**31))
        study, created = optuna.load_study(storage=storage, study_name=name, sampler=joined), False
    study.set_user_attr("settings", settings)
    return OpenedStudy(study, created, GraphClaims(storage.engine, name))


@dataclass
class Objective:
    """The trial function: propose, reuse an identical earlier trial, pre-filter by FLOPs, measure."""

    space: SearchSpace
    bench: TrialBench
    max_drop: float
    objective: str  # latency or flops
    claims: GraphClaims

    def __call__(self, trial) -> float:
        import optuna

        interrupts.check()  # a Ctrl-C swallowed since the last trial (see pipelines.interrupts)
        candidate = self.space.suggest(trial)
        flops = flop_speedup(self.bench, candidate)
        trial.set_user_attr("candidate", candidate.to_dict())
        trial.set_user_attr("key", candidate.key)
        trial.set_user_attr("flop_speedup", flops)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        try:
            result = self._earlier(trial, candidate.key) or self._measure(trial, candidate, flops)
        except optuna.TrialPruned:
            raise
        except Exception as exc:  # noqa: BLE001 - a graph that fails to export or run ends its own trial only
            trial.set_user_attr("error", f"{type(exc).__name__}: {_first_line(exc)}")
            raise TrialFailedError(f"trial {trial.number} ({candidate.key}) failed: {_first_line(exc)}") from exc
        for name, value in result.items():
            trial.set_user_attr(name, value)
        self._over_budget(trial, result["drop_bound_points"])
        return result["speedup"] if self.objective == "latency" else flops

    def _measure(self, trial, candidate: Candidate, flops: float) -> dict:
        """Pre-filter, then export and measure. Pruned (never exported): a schedule that cannot beat
        the best feasible trial on FLOPs (`_cannot_win`; the queued uniform schedules are always
        measured, they are the baselines), or one whose PyTorch FP32 top-1 already misses the
        budget (its export would too: they agree to ~1e-6). The budget is kept on the drop's
        upper confidence bound (`trials.drop_points`)."""
        import optuna

        beaten = None if trial.user_attrs.get("seed") else self._cannot_win(trial.study, candidate, flops)
        if beaten is not None:
            trial.set_user_attr("pruned", beaten)
            raise optuna.TrialPruned()
        model = patched(self.bench, candidate)
        if candidate.merged:
            correct = eager_correct(self.bench, model)
            drop, bound = drop_points(self.bench, correct)
            trial.set_user_attr("eager_top1", float(correct.mean()))
            if bound > self.max_drop:
                self._over_budget(trial, bound)
                trial.set_user_attr("pruned", f"PyTorch FP32 top-1 {100 * correct.mean():.2f}% loses {drop:.2f} "
                                    f"points (up to {bound:.2f})")  # fmt: skip
                raise optuna.TrialPruned()
        return evaluate(self.bench, candidate, model)

    def _cannot_win(self, study, candidate: Candidate, flops: float) -> str | None:
        """Why a schedule of this FLOP speed-up cannot beat the best feasible trial, or None.

        By FLOPs, only a larger saving can. By latency, anything within FLOP_SLACK of the best
        feasible trial of the same precision can: a precision changes the speed-up a FLOP
        saving buys (dynamic INT8 runs the same FLOPs about 1.3x faster), so an INT8 trial
        measured against FP32 trials' FLOPs could be pruned although it is the fastest."""
        same_precision = self.objective == "latency"
        rivals = [
            t.user_attrs["flop_speedup"] for t in completed(study) if t.user_attrs["over_budget"] <= 0
            and (not same_precision or candidate_of(t).precision_label == candidate.precision_label)
        ]  # fmt: skip
        best = max(rivals, default=None)
        if best is None or (flops > best if self.objective == "flops" else flops >= FLOP_SLACK * best):
            return None
        among = f" {candidate.precision_label}" if same_precision else ""
        return f"block-FLOP speed-up {flops:.2f}x, below the best feasible{among} {best:.2f}x"

    def _over_budget(self, trial, bound_points: float) -> None:
        """Record the points the drop's upper bound lies beyond the budget: the study's constraint
        (feasible when <= 0)."""
        trial.set_user_attr("over_budget", bound_points - self.max_drop)
        trial.set_constraint("accuracy_drop", bound_points - self.max_drop)

    def _earlier(self, trial, key: str) -> dict | None:
        """The measurements of a completed trial with the same graph (no graph is measured twice).

        The trial that takes the graph's claim in the storage (`claims.GraphClaims`: one insert
        wins) measures it; another trial proposing that graph meanwhile waits for its result. A
        claim whose trial stopped without completing (pruned, failed, or its worker died: while
        waiting, heartbeats fail a dead worker's trial) is handed over to one waiting trial."""
        import optuna
        from optuna.trial import TrialState

        names = ("top1", "drop_points", "drop_bound_points", "speedup", "latency_ms", "latency_cv", "seconds")
        study = trial.study

        def holds(number: int) -> bool:  # running, or completed since this trial looked for a measurement
            states = (TrialState.RUNNING, TrialState.COMPLETE)
            return any(t.number == number for t in study.get_trials(deepcopy=False, states=states))

        while True:
            for done in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
                if done.user_attrs.get("key") == key:
                    return {**{name: done.user_attrs[name] for name in names}, "reused_from": done.number}
            if self.claims.take(key, trial.number, holds):
                return None
            with _quiet_experimental():
                optuna.storages.fail_stale_trials(study)
            interrupts.check()
            time.sleep(WAIT_SECONDS)


def completed(study) -> list:
    """The study's completed trials, in number order."""
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


SEEDED = "seeds_queued"  # study attribute: the uniform schedules are in the queue
SEEDS_WAIT_SECONDS = 10.0


def enqueue_seeds(study, seeds: list[dict], created: bool) -> None:
    """Queue the uniform schedules first, each once whatever the number of workers.

    The worker that created the study queues them and marks the study (a check-then-queue by
    every worker would race: two workers started together both found a seed missing and both
    queued it). A worker joining a study waits for the mark, then queues again only the seeds
    whose every trial was stopped (Ctrl-C, a dead worker), not one that raised: it would fail
    again on every resume. It queues them all if the creator died before marking."""
    if created:
        for params in seeds:
            study.enqueue_trial(params, user_attrs={"seed": True})
        study.set_user_attr(SEEDED, True)
        return
    deadline = time.monotonic() + SEEDS_WAIT_SECONDS
    while SEEDED not in study.user_attrs and time.monotonic() < deadline:
        time.sleep(0.2)
    _requeue_stopped_seeds(study, seeds)


def _requeue_stopped_seeds(study, seeds: list[dict]) -> None:
    from optuna.trial import TrialState

    live = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)

    def params(trial) -> dict:  # a queued trial keeps its parameters aside until it runs
        return trial.params or trial.system_attrs.get("fixed_params", {})

    trials = study.get_trials(deepcopy=False)
    tried = [params(t) for t in trials]
    alive = [params(t) for t in trials if t.state in live]
    raised = [params(t) for t in trials if t.state == TrialState.FAIL and "error" in t.user_attrs]
    for params in seeds:
        stopped_only = params in tried and params not in alive and params not in raised
        study.enqueue_trial(params, user_attrs={"seed": True}, skip_if_exists=not stopped_only)
    study.set_user_attr(SEEDED, True)


def search(study, objective: Objective, trials: int, deadline: float, on_trial: Callable[[object], None]) -> None:
    """Run trials until the study holds `trials` completed ones or `deadline` (time.monotonic)
    passes. A trial that raises fails alone (`TrialFailedError`, its error in the trial);
    FAILURES_IN_A_ROW of this worker's trials failing in a row stop its search."""
    from optuna.trial import TrialState

    failures = []  # this worker's trials that raised, since its last one that did not

    def stop_when_done(study, trial) -> None:
        interrupts.check()
        on_trial(trial)
        failures[:] = [*failures, trial] if trial.state == TrialState.FAIL else []
        ended = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
        finished = study.get_trials(deepcopy=False, states=ended)
        done = sum(t.state == TrialState.COMPLETE for t in finished)
        if done >= trials or len(finished) >= MAX_TRIALS_FACTOR * trials or len(failures) >= FAILURES_IN_A_ROW:
            study.stop()

    if len(completed(study)) >= trials:
        return
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        return
    study.optimize(
        objective, timeout=remaining, callbacks=[stop_when_done], gc_after_trial=True, catch=(TrialFailedError,)
    )


def best_feasible(study) -> object | None:
    """The completed trial with the highest objective within the budget, or None."""
    feasible = [t for t in completed(study) if t.user_attrs["over_budget"] <= 0]
    return max(feasible, key=lambda t: t.value, default=None)


def trial_record(trial) -> dict:
    """One trial as tune.json lists it."""
    attrs = trial.user_attrs
    record = {"number": trial.number, "state": trial.state.name, "params": trial.params}
    record.update({key: value for key, value in attrs.items() if key != "over_budget"})
    record["within_budget"] = "over_budget" in attrs and attrs["over_budget"] <= 0
    if trial.value is not None and not math.isnan(trial.value):
        record["objective"] = trial.value
    return record


def candidate_of(trial) -> Candidate:
    return Candidate.from_dict(trial.user_attrs["candidate"])
