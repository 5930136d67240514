"""Test accuracy against training time: each kept epoch of a `pitome-export finetune --keep-epochs`
run scored on the test split after training.

    python -m benchmarks.finetune_curve artifacts/ft/vit-pitome-0.9-e16

The run picks its epoch on the validation slice carved from the training split and never sees the
test split; this harness reads the test split only once training is over, to draw what a longer
(or shorter) run would have bought: top-1 and agreement with the unmerged original of the merged
student before training and after each epoch, against the epoch's wall time, beside the
validation figure the run chose by. The student is the run's own schedule patched onto the model
in PyTorch (the export's graph equals it to ~1e-6); the unmerged original is scored alike.
Writes curve.json, curve.md and curve.png into `--out/RUN` (default benchmarks/results/finetune).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from benchmarks.finetune_table import RESULTS
from benchmarks.records import write_record
from ops.errors import PitomeError
from pipelines.jobs.finetune.outputs import published_epoch, published_text
from pipelines.learning.loop import epoch_of_file

if TYPE_CHECKING:
    import torch

    from pipelines.jobs.finetune.distill import Distillation
    from pipelines.jobs.finetune.job import FinetuneJob


class RunError(Exception):
    """A run folder this harness cannot score (one line, exit 2)."""


def read_record(folder: Path) -> dict:
    """finetune.json of `folder`, checked to be a classifier's record with every kept epoch present."""
    try:
        record = json.loads((folder / "finetune.json").read_text())
    except FileNotFoundError:
        raise RunError(f"{folder} lacks finetune.json: not a `pitome-export finetune` folder") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RunError(f"{folder}/finetune.json cannot be read: {error}") from None
    if not isinstance(record, dict) or not {"command_line", "history", "schedule"} <= record.keys():
        raise RunError(f"{folder}/finetune.json is not a `pitome-export finetune` record")
    kept = record.get("epoch_weights") or []
    missing = [name for name in kept if not (folder / name).is_file()]
    if not kept or missing:
        raise RunError(f"{folder} lacks {', '.join(missing) or 'kept epochs (run finetune with --keep-epochs)'}")
    trained = {entry.get("epoch") for entry in record["history"]}
    strays = [name for name in kept if epoch_of_file(name) not in trained]
    if strays:
        raise RunError(f"{folder}/finetune.json lists weights of no recorded epoch: {', '.join(strays)}")
    if "val_accuracy" not in record.get("validation_teacher", {}):
        raise RunError(f"{folder} is a feature model's run: this curve scores classifiers (top-1)")
    return record


def job_of(record: dict) -> FinetuneJob:
    """The run's FinetuneJob, parsed again from its recorded command line: the same model, weights
    (a checkpoint, random init), schedule and data."""
    import contextlib
    import io
    import shlex

    from pipelines.cli.commands import build_parser
    from pipelines.jobs.finetune.job import FinetuneJob, with_tuned_schedule
    from pipelines.jobs.options import job_fields

    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            args = build_parser().parse_args(shlex.split(record["command_line"])[1:])
    except SystemExit:
        reason = (errors.getvalue().strip().splitlines() or ["?"])[-1]
        raise RunError(f"its recorded command line no longer parses ({reason})") from None
    job, _ = with_tuned_schedule(FinetuneJob(**job_fields(args, FinetuneJob, "finetune")))
    return job


@dataclass
class Scorer:
    """The run's merged student and the unmerged original as the run loaded them, and the test split."""

    job: FinetuneJob
    student: torch.nn.Module
    teacher: torch.nn.Module
    task: Distillation  # scores a model on the test split (its "validation" data here)
    samples: int

    def score(self, model: torch.nn.Module) -> dict:
        """Test top-1 of `model`, its agreement with the original, and the paired 95% interval of its
        change against the original in points (both scored on the same samples)."""
        from pipelines.jobs.accuracy import paired_comparison

        output, labels = self.task.outputs(model)
        predicted, labels = output.argmax(-1).cpu().numpy(), labels.cpu().numpy()
        original = self.task.teacher_outputs().argmax(-1).cpu().numpy()
        return {
            "test_accuracy": float((predicted == labels).mean()),
            "test_agreement": float((predicted == original).mean()),
            "delta_points_ci95": paired_comparison(predicted, original, labels)["delta_points_ci95"],
        }


def scorer(record: dict, threads: int) -> Scorer:
    """Rebuild the run's student, teacher and test split (the run's data, its test split)."""
    import dataclasses

    from rich.console import Console

    from pipelines.jobs.finetune.distill import Distillation, LossWeights
    from pipelines.jobs.finetune.job import prepare
    from pipelines.jobs.stages import open_data, torch_settings
    from pipelines.models.registry import resolve

    job = dataclasses.replace(job_of(record), threads=threads, device="cpu")
    try:
        spec = resolve(job.model)
        with torch_settings(job.threads, job.seed):  # as the run: a random-init teacher is drawn alike
            setup = prepare(job, spec, record["schedule"]["source"], Console(quiet=True))
        if setup.schedule["merges"] != record["schedule"]["merges"]:
            raise RunError(f"{record['command_line']!r} now patches another schedule than the run's")
        if setup.sources.test is None:
            raise RunError(f"the run's data ({job.data}) has no test split to score")
        test = open_data(dataclasses.replace(job, data=setup.sources.test), spec, setup.student, setup.seq_len,
                         setup.signature)  # fmt: skip
    except PitomeError as error:
        raise RunError(str(error)) from None
    task = Distillation(setup.student, setup.teacher, setup.signature, LossWeights(1.0, 0.0, 0.0), test, "cpu")
    return Scorer(job, setup.student, setup.teacher, task, len(test))


def curve(folder: Path, threads: int) -> dict:
    """Test figures of the student before training and after each kept epoch, and of the original."""
    from safetensors.torch import load_file

    record = read_record(folder)
    run = scorer(record, threads)
    by_epoch = {entry["epoch"]: entry for entry in record["history"]}
    points = [{"epoch": 0, "minutes": 0.0, "val_accuracy": record["validation_before"]["val_accuracy"],
               **run.score(run.student)}]  # fmt: skip
    for name in sorted(record["epoch_weights"], key=epoch_of_file):
        epoch = by_epoch[epoch_of_file(name)]
        run.student.load_state_dict(load_file(str(folder / name)))
        points.append({"epoch": epoch["epoch"], "minutes": epoch["wall_seconds"] / 60,
                       "val_accuracy": epoch["val_accuracy"], **run.score(run.student)})  # fmt: skip
    return {
        "run": folder.name, "model": run.job.model, "schedule": record["schedule"], "command": record["command_line"],
        "recipe": record["recipe"], "published_epoch": published_epoch(record),
        "published": published_text(record), "test_samples": run.samples,
        "unmerged_test_accuracy": run.score(run.teacher)["test_accuracy"], "points": points,
        "cpu": record["cpu"], "samples_per_second": record["samples_per_second"],
    }  # fmt: skip


def change_with_interval(point: dict, original: float) -> str:
    """`-0.23 (-0.41 to -0.05)`: the change against the original in points, with its paired interval."""
    low, high = point["delta_points_ci95"]
    return f"{100 * (point['test_accuracy'] - original):+.2f} ({low:+.2f} to {high:+.2f})"


def markdown(result: dict, setup: dict) -> str:
    """curve.md: one row per point, the published epoch marked, the gap to the original in points."""
    original = result["unmerged_test_accuracy"]
    schedule = result["schedule"]
    lines = [
        f"# {result['model']} {schedule['algo']} {','.join(map(str, schedule['merges']))}: test accuracy per epoch",
        "",
        f"Run: `{result['command']}` on {result['cpu']} ({result['samples_per_second']:.0f} samples/s); "
        f"{result['published']}. Unmerged original: {original:.2%} on "
        f"the {result['test_samples']} test samples.",
        "",
        "| epoch | training minutes | validation top-1 | test top-1 | vs original (paired 95% CI) | "
        "agreement with original |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for p in result["points"]:
        chosen = " (published)" if p["epoch"] == result["published_epoch"] else ""
        lines.append(
            f"| {p['epoch'] or 'before'}{chosen} | {p['minutes']:.1f} | {p['val_accuracy']:.2%} | "
            f"{p['test_accuracy']:.2%} | {change_with_interval(p, original)} | {p['test_agreement']:.2%} |"
        )
    lines += ["", f"Scored {setup['date']} in PyTorch on the CPU (`{setup['command']}`, {setup['seconds']:.0f} s)."]
    return "\n".join(lines)


def draw(result: dict, path: Path) -> None:
    """Test top-1 (with its paired interval against the original) and validation top-1 against
    training minutes, the original and 0.5 points under it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from exporter.atomic import atomic_write

    points, original = result["points"], 100 * result["unmerged_test_accuracy"]
    minutes = [p["minutes"] for p in points]
    fig, axis = plt.subplots(figsize=(7, 4.5))
    test = [100 * p["test_accuracy"] for p in points]
    change = [value - original for value in test]  # the paired interval is of this change, in points
    below = [d - p["delta_points_ci95"][0] for d, p in zip(change, points)]
    above = [p["delta_points_ci95"][1] - d for d, p in zip(change, points)]
    axis.errorbar(minutes, test, yerr=[below, above], fmt="o-", capsize=3,
                  label="test top-1 (merged, fine-tuned; paired 95% CI vs original)")  # fmt: skip
    axis.plot(minutes, [100 * p["val_accuracy"] for p in points], "s:", alpha=0.6, label="validation top-1")
    axis.axhline(original, c="C2", ls="--", label="unmerged original (test)")
    axis.axhline(original - 0.5, c="C3", ls=":", label="original - 0.5 points")
    axis.set_xlabel("training minutes")
    axis.set_ylabel("top-1 (%)")
    axis.set_title(f"{result['model']} {result['schedule']['algo']} {','.join(map(str, result['schedule']['merges']))}")
    axis.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, metavar="FOLDER", help="a `pitome-export finetune --keep-epochs` output")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    began = time.monotonic()
    folder = args.run
    try:
        result = curve(folder, args.threads)
    except RunError as error:
        parser.error(f"{folder}: {error}" if str(folder) not in str(error) else str(error))
    setup = {
        "date": time.strftime("%Y-%m-%d"), "seconds": time.monotonic() - began, "threads": args.threads,
        "command": "python -m benchmarks.finetune_curve " + " ".join(argv if argv is not None else sys.argv[1:]),
    }  # fmt: skip
    out = args.out / folder.name
    write_record(out, "curve", {"setup": setup, **result}, markdown(result, setup))
    draw(result, out / "curve.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
