"""Interleaved latency measurement in trtexec's shape: warm-up, then N timed rounds.

Candidates run round-robin within each round (the starting one rotates), so a machine that
drifts between a fast and a slow mode slows all of them alike and their ratio stays fair.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

NOISY_CV = 0.05


@dataclass
class LatencyStats:
    """Milliseconds per call of one candidate, and items/s at its batch size."""

    name: str
    batch: int
    runs: int
    min_ms: float
    mean_ms: float
    median_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    cv: float
    throughput: float

    @property
    def noisy(self) -> bool:
        return self.cv > NOISY_CV

    def to_dict(self) -> dict:
        return {**asdict(self), "noisy": self.noisy}


def _percentile(sorted_ms: list[float], q: float) -> float:
    index = min(len(sorted_ms) - 1, max(0, round(q * (len(sorted_ms) - 1))))
    return sorted_ms[index]


def summarize(name: str, batch: int, times_ms: list[float]) -> LatencyStats:
    ordered = sorted(times_ms)
    mean = statistics.fmean(ordered)
    cv = statistics.pstdev(ordered) / mean if mean else 0.0
    median = statistics.median(ordered)
    return LatencyStats(
        name=name,
        batch=batch,
        runs=len(ordered),
        min_ms=ordered[0],
        mean_ms=mean,
        median_ms=median,
        p90_ms=_percentile(ordered, 0.90),
        p95_ms=_percentile(ordered, 0.95),
        p99_ms=_percentile(ordered, 0.99),
        max_ms=ordered[-1],
        cv=cv,
        throughput=batch / (median / 1000.0),
    )


def time_interleaved(
    candidates: dict[str, Callable[[], object]], batch: int, runs: int = 20, warmup: int = 3
) -> dict[str, LatencyStats]:
    """Time every candidate `runs` times, interleaved, after `warmup` untimed rounds.

    Host wall time per call, except for a candidate that returns a float: that is its own
    measurement in milliseconds (GPU runs timed with CUDA events).
    """
    names = list(candidates)
    for _ in range(warmup):
        for name in names:
            candidates[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(runs):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            measured = candidates[name]()
            elapsed = (time.perf_counter() - start) * 1000.0
            times[name].append(measured if isinstance(measured, float) else elapsed)
    return {name: summarize(name, batch, times[name]) for name in names}
