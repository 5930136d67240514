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
from pathlib import Path

from benchmarks.records import write_record

RESULTS = Path(__file__).resolve().parent / "results" / "finetune"


def run_folder(text: str) -> Path:
    """A `pitome-export finetune --keep-epochs` output folder, checked for its kept epochs."""
    path = Path(text)
    if not (path / "finetune.json").is_file():
        raise argparse.ArgumentTypeError(f"{path} lacks finetune.json: not a `pitome-export finetune` folder")
    kept = json.loads((path / "finetune.json").read_text()).get("epoch_weights") or []
    missing = [name for name in kept if not (path / name).is_file()]
    if not kept or missing:
        what = ", ".join(missing) if missing else "kept epochs (run finetune with --keep-epochs)"
        raise argparse.ArgumentTypeError(f"{path} lacks {what}")
    return path


def job_of(record: dict):
    """The run's FinetuneJob, parsed again from its recorded command line: the same model, weights
    (a checkpoint, random init), schedule and data."""
    import shlex

    from pipelines.cli.commands import build_parser
    from pipelines.jobs.finetune.job import FinetuneJob, with_tuned_schedule
    from pipelines.jobs.options import job_fields

    args = build_parser().parse_args(shlex.split(record["command_line"])[1:])
    job, _ = with_tuned_schedule(FinetuneJob(**job_fields(args, FinetuneJob, "finetune")))
    return job


def scorer(record: dict, threads: int):
    """(student, teacher, score, samples): the run's merged student and the unmerged original as the
    run loaded them, and a function giving a model's test top-1 and agreement with the original."""
    import dataclasses

    from rich.console import Console

    from pipelines.jobs.finetune.distill import Distillation, LossWeights
    from pipelines.jobs.finetune.job import prepare
    from pipelines.jobs.stages import open_data, torch_settings
    from pipelines.models.registry import resolve

    job = dataclasses.replace(job_of(record), threads=threads, device="cpu")
    spec = resolve(job.model)
    with torch_settings(job.threads, job.seed):  # as the run: a random-init teacher is drawn alike
        setup = prepare(job, spec, record["schedule"]["source"], Console(quiet=True))
    if setup.schedule["merges"] != record["schedule"]["merges"]:
        sys.exit(f"{record['command_line']!r} now patches another schedule than the run's")
    test = open_data(dataclasses.replace(job, data=setup.sources.test), spec, setup.student, setup.seq_len,
                     setup.signature)  # fmt: skip
    task = Distillation(setup.student, setup.teacher, setup.signature, LossWeights(1.0, 0.0, 0.0), test, "cpu")

    def score(model) -> dict[str, float]:
        figures = task.evaluate(model)
        return {"test_accuracy": figures["val_accuracy"], "test_agreement": figures["val_agreement"]}

    return setup.student, setup.teacher, score, len(test)


def curve(folder: Path, threads: int) -> dict:
    """Test figures of the student before training and after each kept epoch, and of the original."""
    from safetensors.torch import load_file

    record = json.loads((folder / "finetune.json").read_text())
    student, teacher, score, samples = scorer(record, threads)
    points = [{"epoch": 0, "minutes": 0.0, "val_accuracy": record["validation_before"]["val_accuracy"],
               **score(student)}]  # fmt: skip
    for name, epoch in zip(record["epoch_weights"], record["history"]):
        student.load_state_dict(load_file(str(folder / name)))
        points.append({"epoch": epoch["epoch"], "minutes": epoch["wall_seconds"] / 60,
                       "val_accuracy": epoch["val_accuracy"], **score(student)})  # fmt: skip
    return {
        "run": folder.name, "model": job_of(record).model, "schedule": record["schedule"], "command": record["command_line"],
        "recipe": record["recipe"], "best_epoch": record["best_epoch"], "test_samples": samples,
        "unmerged_test_accuracy": score(teacher)["test_accuracy"], "points": points,
        "cpu": record["cpu"], "samples_per_second": record["samples_per_second"],
    }  # fmt: skip


def markdown(result: dict, setup: dict) -> str:
    original = result["unmerged_test_accuracy"]
    schedule = result["schedule"]
    lines = [
        f"# {result['model']} {schedule['algo']} {','.join(map(str, schedule['merges']))}: test accuracy per epoch",
        "",
        f"Run: `{result['command']}` on {result['cpu']} ({result['samples_per_second']:.0f} samples/s); the run "
        f"kept epoch {result['best_epoch']}, picked on its validation slice. Unmerged original: {original:.2%} on "
        f"the {result['test_samples']} test samples.",
        "",
        "| epoch | training minutes | validation top-1 | test top-1 | vs original | agreement with original |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for p in result["points"]:
        chosen = " (kept)" if p["epoch"] == result["best_epoch"] else ""
        lines.append(
            f"| {p['epoch'] or 'before'}{chosen} | {p['minutes']:.1f} | {p['val_accuracy']:.2%} | "
            f"{p['test_accuracy']:.2%} | {100 * (p['test_accuracy'] - original):+.2f} | {p['test_agreement']:.2%} |"
        )
    lines += ["", f"Scored {setup['date']} in PyTorch on the CPU (`{setup['command']}`, {setup['seconds']:.0f} s)."]
    return "\n".join(lines)


def draw(result: dict, path: Path) -> None:
    """Test and validation top-1 against training minutes, the original and 0.5 points under it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from exporter.atomic import atomic_write

    points, original = result["points"], 100 * result["unmerged_test_accuracy"]
    minutes = [p["minutes"] for p in points]
    fig, axis = plt.subplots(figsize=(7, 4.5))
    axis.plot(minutes, [100 * p["test_accuracy"] for p in points], "o-", label="test top-1 (merged, fine-tuned)")
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
    parser.add_argument("run", type=run_folder, metavar="FOLDER")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    began = time.monotonic()
    folder = args.run
    result = curve(folder, args.threads)
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
