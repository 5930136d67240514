"""`--from-tune DIR`: the schedule a tune result chose, or the N-th point of its Pareto front."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ops.errors import PitomeError


@dataclass(frozen=True)
class TunedSchedule:
    """A tune result's merge settings, and which of its points they are (for the report)."""

    algo: str
    prop_attn: bool
    merges: list[int]
    label: str


def read_tune_result(folder: str) -> dict:
    """tune.json of a tune output folder; one PitomeError line when it is not one."""
    path = Path(folder) / "tune.json"
    try:
        record = json.loads(path.read_text())
        record["outcome"]["chosen"]["candidate"]
    except (OSError, ValueError, KeyError, TypeError):
        raise PitomeError(f"--from-tune {folder}: no readable tune.json of a `pitome-export tune` run there") from None
    return record


def tuned_schedule(folder: str, pick: int | None) -> TunedSchedule:
    """The chosen schedule of the tune result in `folder`, or (`pick`) the pick-th point of its
    Pareto front, fastest first (as report.md lists it): a looser point to win back by training."""
    from pipelines.jobs.tune.report import pareto_front

    record = read_tune_result(folder)
    if pick is None:
        candidate, label = record["outcome"]["chosen"]["candidate"], "its chosen export"
    else:
        measured = [t for t in record["trials"]
                    if t.get("state") == "COMPLETE" and "top1" in t and "speedup" in t and "reused_from" not in t]  # fmt: skip
        front = pareto_front([(t["speedup"], t["top1"]) for t in measured])
        if pick > len(front):
            raise PitomeError(f"--pick {pick}: the Pareto front of {folder} has {len(front)} points")
        trial = measured[front[pick - 1]]
        candidate, label = trial["candidate"], f"Pareto point {pick} (trial {trial['number']})"
    if not any(candidate["merges"]):
        raise PitomeError(f"--from-tune {folder}: {label} is the unmerged graph, nothing to fine-tune; pass --pick N")
    return TunedSchedule(candidate["algo"], bool(candidate["prop_attn"]), list(candidate["merges"]),
                         f"{label} of the tune result {folder}")  # fmt: skip
