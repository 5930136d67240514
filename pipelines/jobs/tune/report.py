"""What the tune job tells: the live progress line, tune.json, pareto.png, the report section and
the closing summary (test-split figures of the chosen export beside the best uniform schedules)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from exporter.atomic import atomic_write, atomic_write_text
from pipelines.jobs.tune.study import best_feasible, completed, trial_record
from pipelines.jobs.tune.trials import REFERENCE


def progress_line(study, deadline: float) -> str:
    """The progress display's text: best feasible trial so far and the time left."""
    best = best_feasible(study)
    left = max(0.0, deadline - time.monotonic())  # the trial running at the deadline still finishes
    clock = f" · {int(left // 60)}:{int(left % 60):02d} left" if left < float("inf") else ""
    if best is None:
        return f"search · nothing within budget yet{clock}"
    return f"search · best {best.value:.2f} ({best.user_attrs['key']}){clock}"


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats in both speed-up and accuracy, fastest first."""
    order = sorted(range(len(points)), key=lambda i: (-points[i][0], -points[i][1]))
    front, best_accuracy = [], float("-inf")
    for i in order:
        if points[i][1] > best_accuracy:
            front.append(i)
            best_accuracy = points[i][1]
    return front


def _row(name: str, timing_name: str, summary: dict, choice) -> dict:
    """Test-split top-1 and drop of one scored graph (`name` in the accuracy stage), and its
    speed-up in the final timing run (`timing_name` there)."""
    top1 = summary["accuracy"]["top1"]
    reference_ms = choice.timing[REFERENCE].median_ms
    return {
        "test_top1": top1[name],
        "test_drop_points": 100.0 * (top1["unmerged"] - top1[name]),
        "speedup": reference_ms / choice.timing[timing_name].median_ms,
    }


def tune_outcome(setup, choice, job, summary: dict, export_failed: str | None = None) -> dict:
    """The figures the summary quotes: the chosen export and each uniform baseline on the test
    split beside their tuning-split figures (the estimate gap), and the preferred candidates
    whose export failed a check. `export_failed`: the check the written export failed."""
    bench, chosen = setup.bench, choice.candidate
    trial = choice.trial
    tuning_top1 = trial.user_attrs.get("top1", trial.user_attrs.get("eager_top1")) if trial else bench.reference_top1
    chosen_row = {
        "candidate": chosen.to_dict(), "label": chosen.key, "trial": trial.number if trial else None,
        "tuning_top1": tuning_top1, "tuning_drop_points": 100.0 * (bench.reference_top1 - tuning_top1),
        "flop_speedup": trial.user_attrs["flop_speedup"] if trial else 1.0,
        **_row("merged", chosen.key, summary, choice),
    }  # fmt: skip
    baselines = {}
    for name, candidate in choice.baselines.items():
        source = [t for t in completed(setup.study) if t.user_attrs["key"] == candidate.key][0]
        baselines[name] = {
            "candidate": candidate.to_dict(), "tuning_top1": source.user_attrs["top1"],
            "tuning_drop_points": 100.0 * (bench.reference_top1 - source.user_attrs["top1"]),
            "flop_speedup": source.user_attrs["flop_speedup"], **_row(name, name, summary, choice),
        }  # fmt: skip
    test_drop = chosen_row["test_drop_points"]
    return {
        "max_drop": job.max_drop,
        "confidence": job.confidence,
        "within_budget": choice.within_budget,
        "test_within_budget": test_drop <= job.max_drop,
        "merging_pays": choice.merging_pays,
        "objective": job.objective,
        "export_failed": export_failed,
        "rejected": choice.rejected,
        "unmerged": {"tuning_top1": bench.reference_top1, "test_top1": summary["accuracy"]["top1"]["unmerged"]},
        "chosen": chosen_row,
        "uniform_baselines": baselines,
        "tuning_data": setup.splits.tuning.description,
        "test_data": setup.splits.test.description,
        "test_separation": setup.splits.separation,
    }


def write_tune_files(setup, choice, job, summary: dict, outcome: dict, out: Path) -> None:
    """tune.json (every trial), pareto.png, and the tuning section of report.md."""
    trials = [trial_record(t) for t in setup.study.get_trials(deepcopy=False)]
    record = {
        "context": summary["context"],
        "study": {"name": setup.study.study_name, "storage": job.storage_url(), "settings": setup.study.user_attrs},
        "outcome": outcome,
        "final_timing": {name: stats.to_dict() for name, stats in choice.timing.items()},
        "trials": trials,
    }
    atomic_write_text(out / "tune.json", json.dumps(record, indent=2, default=str))
    draw_pareto(setup, choice, job, out / "pareto.png")
    report = out / "report.md"
    atomic_write_text(report, report.read_text() + "\n" + tune_markdown(setup, outcome))


def _measured(setup) -> list:
    """Completed trials that measured a graph (accuracy and speed-up), each graph once: a trial
    that reused an identical earlier one's measurement is the same point."""
    return [t for t in completed(setup.study) if "top1" in t.user_attrs and "reused_from" not in t.user_attrs]


def draw_pareto(setup, choice, job, path: Path) -> None:
    """Tuning-split top-1 against measured speed-up: every trial, the front, the uniform lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trials = _measured(setup)
    points = [(t.user_attrs["speedup"], 100 * t.user_attrs["top1"]) for t in trials]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter([p[0] for p in points], [p[1] for p in points], s=14, c="0.6", label="trials")
    front = sorted(points[i] for i in pareto_front(points))  # slowest first: accuracy falls as speed rises
    ax.step([p[0] for p in front], [p[1] for p in front], where="pre", c="C0", label="Pareto front")
    for algo, colour in (("pitome", "C1"), ("tome", "C2")):
        line = sorted((points[i] for i, t in enumerate(trials) if _is_uniform(setup, t, algo)), key=lambda p: p[0])
        if line:
            ax.plot([p[0] for p in line], [p[1] for p in line], "o--", c=colour, ms=4, label=f"uniform {algo}")
    chosen = choice.trial
    if chosen is not None and "speedup" in chosen.user_attrs:
        ax.plot(chosen.user_attrs["speedup"], 100 * chosen.user_attrs["top1"], "*", c="C3", ms=14, label="chosen")
    ax.axhline(100 * setup.bench.reference_top1 - job.max_drop, c="C3", lw=0.8, ls=":", label="budget")
    ax.set_xlabel("measured speed-up over unmerged FP32 (per trial)")
    ax.set_ylabel("top-1 on the tuning split (%)")
    ax.set_title(f"{setup.spec.name}: {len(trials)} graphs measured, {len(setup.study.trials)} trials")
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def _is_uniform(setup, trial, algo: str) -> bool:
    from pipelines.jobs.tune.search import _uniform_of

    return _uniform_of(setup, trial, algo, setup.space.precisions[0]) is not None


def _schedule_text(candidate: dict) -> str:
    if not any(candidate["merges"]):
        return "unmerged"
    attn = ", prop-attn" if candidate["prop_attn"] else ""
    return f"{candidate['algo']}{attn} {','.join(map(str, candidate['merges']))}"


def _precision_text(candidate: dict) -> str:
    mode = candidate.get("int8_mode")
    return f"{candidate['precision']} {mode}" if mode else candidate["precision"]


def tune_markdown(setup, outcome: dict) -> str:
    """The report section: the choice beside the uniform schedules, and the Pareto table."""
    lines = [
        "## Tuning", "",
        f"Budget: at most {outcome['max_drop']} points of top-1 below the unmerged FP32 model, kept on the "
        f"{outcome['confidence']:.0%} upper confidence bound of each trial's drop; objective {outcome['objective']}. "
        f"Trials are scored on {outcome['tuning_data']}; the figures below are on {outcome['test_data']}, "
        f"{outcome['test_separation']}.", "",
        *_rejected_lines(outcome),
        "| export | precision | test top-1 | drop (points) | drop on the tuning split | speed-up | block-FLOP speed-up |",
        "|---|---|---:|---:|---:|---:|---:|",
        f"| unmerged | fp32 | {100 * outcome['unmerged']['test_top1']:.2f}% | 0.00 | 0.00 | 1.00x | 1.00x |",
    ]  # fmt: skip
    rows = {"**chosen**": outcome["chosen"], **outcome["uniform_baselines"]}
    for name, row in rows.items():
        candidate = row["candidate"]
        lines.append(
            f"| {name}: {_schedule_text(candidate)} | {_precision_text(candidate)} | {100 * row['test_top1']:.2f}% "
            f"| {row['test_drop_points']:.2f} | {row['tuning_drop_points']:.2f} | {row['speedup']:.2f}x "
            f"| {row['flop_speedup']:.2f}x |"
        )
    trials = _measured(setup)
    points = [(t.user_attrs["speedup"], t.user_attrs["top1"]) for t in trials]
    lines += [
        "", "Speed-ups: ONNX Runtime CPU, one interleaved run of these graphs. Pareto front of the trials "
        "(tuning split, each trial timed against the unmerged graph):", "",
        "| trial | schedule | precision | tuning top-1 | drop (bound) | speed-up | block-FLOP speed-up |",
        "|---:|---|---|---:|---:|---:|---:|",
    ]  # fmt: skip
    for i in pareto_front(points):
        t = trials[i]
        a = t.user_attrs
        lines.append(
            f"| {t.number} | {_schedule_text(a['candidate'])} | {_precision_text(a['candidate'])} | "
            f"{100 * a['top1']:.2f}% | {a['drop_points']:.2f} ({a['drop_bound_points']:.2f}) | {a['speedup']:.2f}x | "
            f"{a['flop_speedup']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def _rejected_lines(outcome: dict) -> list[str]:
    """Markdown lines naming the preferred candidates whose export failed a check, and the check."""
    lines = [
        f"- {row['label']} was preferred, but its export failed a check: {row['reason']}" for row in outcome["rejected"]
    ]
    if outcome["export_failed"] is not None:
        lines.append(f"- **The written export failed a check**: {outcome['export_failed']}")
    return [*lines, ""] if lines else []


def print_outcome(outcome: dict, folder: Path, console) -> None:
    """The closing lines: the chosen export beside the uniform baselines, on the test split."""
    chosen = outcome["chosen"]
    for row in outcome["rejected"]:
        console.print(f"[yellow]{row['label']} was preferred, but its export failed a check: {row['reason']}[/]")
    if outcome["export_failed"] is not None:
        console.print(f"[red]the written export failed a check and no finalist is left: {outcome['export_failed']}[/]")
    elif not outcome["within_budget"]:
        console.print(f"[red]no trial kept the budget of {outcome['max_drop']} points: wrote the most accurate one[/]")
    elif not outcome["merging_pays"]:
        console.print(
            f"[yellow]merging does not pay here: the unmerged {_precision_text(chosen['candidate'])} graph is the "
            "fastest within the budget[/]"
        )
    console.print(
        f"[bold]chosen:[/] {_schedule_text(chosen['candidate'])} {_precision_text(chosen['candidate'])}: test top-1 "
        f"{100 * chosen['test_top1']:.2f}% ({-chosen['test_drop_points']:+.2f} points), {chosen['speedup']:.2f}x "
        f"measured, {chosen['flop_speedup']:.2f}x block FLOPs"
    )
    for name, row in outcome["uniform_baselines"].items():
        console.print(
            f"  {name}: test top-1 {100 * row['test_top1']:.2f}% ({-row['test_drop_points']:+.2f}), "
            f"{row['speedup']:.2f}x measured, {row['flop_speedup']:.2f}x block FLOPs"
        )
    if outcome["within_budget"] and not outcome["test_within_budget"]:
        console.print(
            f"[yellow]on the test split the chosen export lost {chosen['test_drop_points']:.2f} points, more than "
            f"the budget of {outcome['max_drop']}: the tuning split's estimate was optimistic (a higher --confidence "
            "or more --tune-samples guards against it)[/]"
        )
    console.print(f"[bold]Report:[/] {folder / 'report.md'}  [bold]Plot:[/] {folder / 'pareto.png'}")
