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

from ops.errors import PitomeError
from pipelines.jobs import interrupts
from pipelines.jobs.tune.space import Candidate, SearchSpace
from pipelines.jobs.tune.trials import TrialBench, drop_points, eager_correct, evaluate, flop_speedup, patched

FLOP_SLACK = 0.9  # by latency, a trial saving under 90% of the best feasible one's FLOPs cannot be faster
MAX_TRIALS_FACTOR = 5  # pruned (never exported) trials end a search after this many times --trials
HEARTBEAT_SECONDS = 30  # a worker that dies leaves its trial failed after twice this, and it is retried
WAIT_SECONDS = 1.0  # polling interval while another worker measures the same graph


class StorageError(PitomeError):
    """The Optuna storage URL cannot be opened."""


def study_name(settings: dict) -> str:
    """A stable name for the study of these settings (model, data, budget, space, objective)."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return f"pitome-tune-{settings['model']}-{digest}"


def open_storage(url: str, attempts: int = 3):
    """An Optuna RDB storage with heartbeats (a dead worker's trial is failed and retried), or
    StorageError with one line when the URL cannot be opened. Workers that create a new
    database at the same moment race on its schema: the loser retries and finds it made."""
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
            if type(exc).__name__ != "IntegrityError" or attempt == attempts - 1:
                raise StorageError(f"cannot open the study storage {url}: {_first_line(exc)}") from None
            time.sleep(0.5 * (attempt + 1))


@contextlib.contextmanager
def _quiet_experimental() -> Iterator[None]:
    """Optuna marks heartbeats experimental; the warning says nothing a user of this command can act on."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def open_study(url: str, name: str, settings: dict, seed: int) -> tuple[object, bool]:
    """Create or load the study (seeded constrained TPE, maximising the objective); also whether
    this call created it: of several workers started together, exactly one did."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # a Ctrl-C'd trial is not worth a traceback
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=5)  # constraints: Trial.set_constraint
    storage = open_storage(url)
    try:
        study = optuna.create_study(storage=storage, study_name=name, direction="maximize", sampler=sampler)
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        study, created = optuna.load_study(storage=storage, study_name=name, sampler=sampler), False
    study.set_user_attr("settings", settings)
    return study, created


@dataclass
class Objective:
    """The trial function: propose, reuse an identical earlier trial, pre-filter by FLOPs, measure."""

    space: SearchSpace
    bench: TrialBench
    max_drop: float
    objective: str  # latency or flops

    def __call__(self, trial) -> float:
        interrupts.check()  # a Ctrl-C swallowed since the last trial (see pipelines.interrupts)
        candidate = self.space.suggest(trial)
        flops = flop_speedup(self.bench, candidate)
        trial.set_user_attr("candidate", candidate.to_dict())
        trial.set_user_attr("key", candidate.key)
        trial.set_user_attr("flop_speedup", flops)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        result = self._earlier(trial, candidate.key) or self._measure(trial, candidate, flops)
        for name, value in result.items():
            trial.set_user_attr(name, value)
        self._over_budget(trial, result["drop_bound_points"])
        return result["speedup"] if self.objective == "latency" else flops

    def _measure(self, trial, candidate: Candidate, flops: float) -> dict:
        """Pre-filter, then export and measure. Pruned (never exported): a schedule that cannot beat
        the best feasible trial on FLOPs (`_may_win`; the queued uniform schedules are always
        measured, they are the baselines), or one whose PyTorch FP32 top-1 already misses the
        budget (its export would too: they agree to ~1e-6). The budget is kept on the drop's
        upper confidence bound (`trials.drop_points`)."""
        import optuna

        best = self._best_feasible_flops(trial.study)
        if not trial.user_attrs.get("seed") and best is not None and not self._may_win(flops, best):
            trial.set_user_attr("pruned", f"block-FLOP speed-up {flops:.2f}x, below the best feasible {best:.2f}x")
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

    def _may_win(self, flops: float, best: float) -> bool:
        """Whether a schedule of this FLOP speed-up can still beat the best feasible trial: by
        FLOPs, only a larger saving; by latency, anything within FLOP_SLACK of it."""
        return flops > best if self.objective == "flops" else flops >= FLOP_SLACK * best

    def _over_budget(self, trial, bound_points: float) -> None:
        """Record the points the drop's upper bound lies beyond the budget: the study's constraint
        (feasible when <= 0)."""
        trial.set_user_attr("over_budget", bound_points - self.max_drop)
        trial.set_constraint("accuracy_drop", bound_points - self.max_drop)

    @staticmethod
    def _earlier(trial, key: str) -> dict | None:
        """The measurements of a completed trial with the same graph (no graph is measured twice).

        While another worker measures that graph this trial waits for it. A trial claims the
        measurement by marking itself `measuring`, then looks again: of two claims made at once
        the higher-numbered one withdraws, so exactly one measures. A dead worker's trial turns
        FAILED by heartbeat, and a waiting trial then claims the graph itself."""
        from optuna.trial import TrialState

        names = ("top1", "drop_points", "drop_bound_points", "speedup", "latency_ms", "latency_cv", "seconds")

        def others() -> list:
            states = (TrialState.COMPLETE, TrialState.RUNNING)
            return [t for t in trial.study.get_trials(deepcopy=False, states=states)
                    if t.user_attrs.get("key") == key and t.number != trial.number]  # fmt: skip

        def claimed(trials: list, below: int | None = None) -> bool:
            return any(t.state == TrialState.RUNNING and t.user_attrs.get("measuring")
                       and (below is None or t.number < below) for t in trials)  # fmt: skip

        while True:
            same = others()
            for done in same:
                if done.state == TrialState.COMPLETE:
                    return {**{name: done.user_attrs[name] for name in names}, "reused_from": done.number}
            if not claimed(same):
                trial.set_user_attr("measuring", True)
                if not claimed(others(), below=trial.number):
                    return None
                trial.set_user_attr("measuring", False)
            interrupts.check()
            time.sleep(WAIT_SECONDS)

    @staticmethod
    def _best_feasible_flops(study) -> float | None:
        flops = [t.user_attrs["flop_speedup"] for t in completed(study) if t.user_attrs["over_budget"] <= 0]
        return max(flops, default=None)


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
    whose every trial failed (Ctrl-C); it queues them all if the creator died before marking."""
    if created:
        for params in seeds:
            study.enqueue_trial(params, user_attrs={"seed": True})
        study.set_user_attr(SEEDED, True)
        return
    deadline = time.monotonic() + SEEDS_WAIT_SECONDS
    while SEEDED not in study.user_attrs and time.monotonic() < deadline:
        time.sleep(0.2)
    _requeue_failed_seeds(study, seeds)


def _requeue_failed_seeds(study, seeds: list[dict]) -> None:
    from optuna.trial import TrialState

    live = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)

    def params(trial) -> dict:  # a queued trial keeps its parameters aside until it runs
        return trial.params or trial.system_attrs.get("fixed_params", {})

    tried = [params(t) for t in study.get_trials(deepcopy=False)]
    alive = [params(t) for t in study.get_trials(deepcopy=False, states=live)]
    for params in seeds:
        failed_only = params in tried and params not in alive
        study.enqueue_trial(params, user_attrs={"seed": True}, skip_if_exists=not failed_only)
    study.set_user_attr(SEEDED, True)


def search(study, objective: Objective, trials: int, deadline: float, on_trial: Callable[[object], None]) -> None:
    """Run trials until the study holds `trials` completed ones or `deadline` (time.monotonic) passes."""
    from optuna.trial import TrialState

    def stop_when_done(study, trial) -> None:
        interrupts.check()
        on_trial(trial)
        finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
        done = sum(t.state == TrialState.COMPLETE for t in finished)
        if done >= trials or len(finished) >= MAX_TRIALS_FACTOR * trials:
            study.stop()

    if len(completed(study)) >= trials:
        return
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        return
    study.optimize(objective, timeout=remaining, callbacks=[stop_when_done], gc_after_trial=True)


def best_feasible(study) -> object | None:
    """The completed trial with the highest objective within the budget, or None."""
    feasible = [t for t in completed(study) if t.user_attrs["over_budget"] <= 0]
    return max(feasible, key=lambda t: t.value, default=None)


def trial_record(trial) -> dict:
    """One trial as tune.json lists it."""
    attrs = trial.user_attrs
    record = {"number": trial.number, "state": trial.state.name, "params": trial.params}
    record.update({key: value for key, value in attrs.items() if key not in ("over_budget", "measuring")})
    record["within_budget"] = "over_budget" in attrs and attrs["over_budget"] <= 0
    if trial.value is not None and not math.isnan(trial.value):
        record["objective"] = trial.value
    return record


def candidate_of(trial) -> Candidate:
    return Candidate.from_dict(trial.user_attrs["candidate"])
