"""Fine-tuning results: the table of benchmarks/results/finetune, built from the runs' folders,
each run's graphs timed in one interleaved run beside the same schedule untrained.

    python -m benchmarks.finetune_table \\
        --run "vit_fmnist=artifacts/ft/vit-pitome-0.9,artifacts/ft/vit-pitome-0.9-shelf" \\
        --run "minilm_sentiment=artifacts/ft/minilm-0.62,artifacts/ft/minilm-0.62-shelf,artifacts/ft/minilm-1.0"

Each `--run MODEL=FINETUNED,OFF_THE_SHELF[,UNMERGED_FINETUNED]` names three output folders: a
`pitome-export finetune` run, the plain export of the same schedule untrained (`pitome-export
MODEL --ratio R --data D`: its accuracy is the off-the-shelf figure), and optionally `finetune
--ratio 1` with the same recipe and data (the honest reference where training on the task gains
more than merging loses). The two merged graphs and the unmerged stock graph are timed together
(ONNX Runtime CPU, threads fixed, interleaved, median of `--runs`): the fine-tuned graph should
keep the untrained one's speed-up, as it is the same graph with other weights. Each run's
small files (finetune.json, accuracy.json, report.md, training.png) are copied beside the table.

Run folders hold the graphs and weights and do not outlive the machine they were trained on, so
`--keep-rows` adds runs to the table already in `--out` rather than rebuilding it: the earlier rows
stay with the timing they were measured in (a run named again is re-timed and replaces its row),
and the footer says which rows share which interleaved run. A row's two speed-ups always come
from one run; rows of different runs can differ by the CPU's drift between them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.records import write_record
from pipelines.jobs.finetune.outputs import published_epoch
from pipelines.jobs.options import positive_int

RESULTS = Path(__file__).resolve().parent / "results" / "finetune"
KEPT_FILES = ("finetune.json", "accuracy.json", "bench.json", "report.md", "training.png", "schedule.json")


@dataclass(frozen=True)
class Run:
    model: str
    finetuned: Path
    shelf: Path
    schedule: dict  # the schedule.json both merged graphs share
    unmerged_finetuned: Path | None = None
    paired_vs_alike: dict | None = None  # `paired_predictions` of the fine-tuned and the unmerged fine-tuned

    @property
    def name(self) -> str:
        return self.finetuned.name


def parse_run(text: str) -> Run:
    """`MODEL=FINETUNED,OFF_THE_SHELF[,UNMERGED_FINETUNED]`, each folder checked for what the table
    reads of it, and the two merged graphs for the same schedule: refused before any timing."""
    model, _, folders = text.partition("=")
    paths = [Path(p) for p in folders.split(",") if p]
    if not model or len(paths) not in (2, 3):
        raise argparse.ArgumentTypeError(f"{text!r}: expected MODEL=FINETUNED,OFF_THE_SHELF[,UNMERGED_FINETUNED]")
    wanted = [
        ("finetune.json", "accuracy.json", "model.onnx", "schedule.json", "bench.json"),
        ("accuracy.json", "model.onnx", "schedule.json"),
        ("finetune.json", "accuracy.json"),
    ]
    for path, files in zip(paths, wanted):
        missing = [f for f in files if not (path / f).is_file()]
        if missing:
            raise argparse.ArgumentTypeError(f"{path} lacks {', '.join(missing)}")
    finetuned, shelf, *unmerged = paths
    schedule = same_schedule(finetuned, shelf)
    if not unmerged:
        return Run(model, finetuned, shelf, schedule)
    return Run(model, finetuned, shelf, schedule, unmerged[0], paired_predictions(finetuned, unmerged[0]))


def paired_predictions(finetuned: Path, unmerged_finetuned: Path) -> dict | None:
    """The fine-tuned merged graph against the unmerged model fine-tuned alike, sample by sample, where
    both exports kept their predictions (`predictions.npz`, written since the paired comparison was
    added); refused if they were scored on other samples."""
    from pipelines.jobs.accuracy import PREDICTIONS, load_predictions, paired_comparison

    files = [folder / PREDICTIONS for folder in (finetuned, unmerged_finetuned)]
    if not all(f.is_file() for f in files):
        return None
    try:
        (data, labels, tuned), (other_data, other_labels, alike) = (load_predictions(f) for f in files)
        same_samples = data == other_data and np.array_equal(labels, other_labels)
        if same_samples:
            return paired_comparison(tuned["merged"], alike["merged"], labels)
    except (OSError, zipfile.BadZipFile, KeyError, ValueError) as error:
        raise argparse.ArgumentTypeError(f"{' or '.join(map(str, files))}: not a predictions file ({error})") from None
    raise argparse.ArgumentTypeError(f"{finetuned} and {unmerged_finetuned} were scored on other samples")


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def same_schedule(finetuned: Path, shelf_folder: Path) -> dict:
    """The schedule both merged graphs were exported with; refused if they differ."""
    try:
        tuned, shelf = (read_json(folder / "schedule.json") for folder in (finetuned, shelf_folder))
        differ = any(tuned.get(key) != shelf.get(key) for key in ("algo", "merges", "prop_attn"))
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as error:
        raise argparse.ArgumentTypeError(f"{finetuned.name}: a schedule.json is not a schedule ({error})") from None
    if differ:
        raise argparse.ArgumentTypeError(f"{shelf_folder} was exported with another schedule than {finetuned}")
    return tuned


def stock_graph(model_name: str, batch: int, scratch: Path) -> tuple[Path, dict]:
    """The unmerged stock graph of a model (exported into `scratch`) and feeds of `batch` samples."""
    from exporter.signatures import signature_of
    from exporter.variants import Variant, export_variant
    from pipelines.models.registry import load_model, resolve

    spec = resolve(model_name)
    model, _ = load_model(spec, None, False)
    seq_len = spec.seq_len if spec.kind == "text" else None
    feeds = {k: v.numpy() for k, v in signature_of(model, seq_len).example_inputs(batch).items()}
    scratch.mkdir(parents=True, exist_ok=True)
    graph, _ = export_variant(model, Variant("unmerged"), scratch, seq_len=seq_len)
    return graph, feeds


def time_run(run: Run, unmerged: Path, feeds: dict, batch: int, runs: int, threads: int) -> dict[str, float]:
    """Median ms of the fine-tuned graph, the untrained one and the unmerged stock graph, timed together."""
    from exporter.variants import time_graphs

    graphs = {"fine-tuned": run.finetuned / "model.onnx", "untrained": run.shelf / "model.onnx", "unmerged": unmerged}
    stats = time_graphs(graphs, feeds, batch, runs, threads)
    return {name: s.median_ms for name, s in stats.items()}


def row(run: Run, timings: dict[str, float]) -> dict:
    """Everything the table shows of one run."""
    tuned, shelf = (read_json(folder / "accuracy.json") for folder in (run.finetuned, run.shelf))
    record = read_json(run.finetuned / "finetune.json")
    schedule = run.schedule
    out = {
        "run": run.name, "model": run.model, "algo": schedule.get("algo"), "merges": schedule.get("merges"),
        "command": record["command_line"], "block_flop_speedup": read_json(run.finetuned / "bench.json")["block_flop_speedup"],
        "speedup_untrained": timings["unmerged"] / timings["untrained"],
        "speedup_finetuned": timings["unmerged"] / timings["fine-tuned"],
        "off_the_shelf": shelf["top1_merged"], "finetuned": tuned["top1_merged"], "original": tuned["top1_unmerged"],
        "epochs": len(record["history"]), "published_epoch": published_epoch(record), "train_minutes": record["wall_seconds"] / 60,
        "samples_per_second": record["samples_per_second"], "test_samples": tuned["samples"],
        "unmerged_finetuned": None,
    }  # fmt: skip
    out["paired_vs_original"], out["paired_shelf_vs_original"] = tuned.get("paired"), shelf.get("paired")
    if run.unmerged_finetuned is not None:
        out["unmerged_finetuned"] = read_json(run.unmerged_finetuned / "accuracy.json")["top1_merged"]
        out["paired_vs_unmerged_finetuned"] = run.paired_vs_alike
        out["unmerged_finetuned_minutes"] = read_json(run.unmerged_finetuned / "finetune.json")["wall_seconds"] / 60
    return out


def points(a: float, b: float, paired: dict | None = None) -> str:
    """`-0.23`, or `-0.23 ± 0.19` with the half-width of the paired 95% interval where it was measured."""
    text = f"{100 * (a - b):+.2f}"
    if paired:
        low, high = paired["delta_points_ci95"]
        text += f" ± {(high - low) / 2:.2f}"
    return text


def row_ranges(numbers: list[int]) -> str:
    """1-based row numbers as `1-13, 15`."""
    spans: list[list[int]] = []
    for n in numbers:
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in spans)


def timing_note(rows: list[dict], timings: list[dict]) -> str:
    """Which interleaved run timed which rows, with its setup and command."""

    def setup_text(t: dict) -> str:
        return (
            f"batch {t['batch']}, {t['threads']} threads, median of {t['runs']} on {t['cpu']}, measured {t['date']} "
            f"by `{t['command']}` ({t['seconds']:.0f} s)"
        )

    graphs = "ONNX Runtime CPU, the fine-tuned graph, the same schedule untrained and the unmerged stock graph"
    if len(timings) == 1:
        return f"Speed-ups: {graphs} timed in one interleaved run, {setup_text(timings[0])}."
    ranges = [row_ranges([n for n, r in enumerate(rows, 1) if r["timing"] == index]) for index in range(len(timings))]
    groups = [f"{'row' if text.isdigit() else 'rows'} {text}: {setup_text(t)}" for text, t in zip(ranges, timings)]
    return (
        f"Speed-ups: {graphs} timed in one interleaved run per row, the rows grouped by the run that timed them; "
        "a row's two speed-ups share one run, rows of different runs can differ by the CPU's drift between them. "
        + "; ".join(groups)
        + "."
    )


PAIRED_NOTE = (
    " `± x`: the half-width of a change's 95% interval, the two models paired sample by sample on the test "
    "split (rows exported since the accuracy stage pairs them)."
)


def has_paired(row: dict) -> bool:
    return any(
        row.get(key) for key in ("paired_vs_original", "paired_shelf_vs_original", "paired_vs_unmerged_finetuned")
    )


def markdown(rows: list[dict], timings: list[dict]) -> str:
    lines = [
        "| model | schedule | block FLOPs | speed-up untrained / fine-tuned | off the shelf | fine-tuned | "
        "original (unmerged) | unmerged fine-tuned alike | training |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        alike = "-"
        if r["unmerged_finetuned"] is not None:
            vs_alike = points(r["finetuned"], r["unmerged_finetuned"], r.get("paired_vs_unmerged_finetuned"))
            alike = f"{r['unmerged_finetuned']:.2%} ({vs_alike} vs it)"
        lines.append(
            f"| {r['model']} | {r['algo']} {','.join(map(str, r['merges']))} | {r['block_flop_speedup']:.2f}x | "
            f"{r['speedup_untrained']:.2f}x / {r['speedup_finetuned']:.2f}x | {r['off_the_shelf']:.2%} "
            f"({points(r['off_the_shelf'], r['original'], r.get('paired_shelf_vs_original'))}) | **{r['finetuned']:.2%}** "
            f"({points(r['finetuned'], r['original'], r.get('paired_vs_original'))}) | {r['original']:.2%} | {alike} | "
            f"{r['epochs']} epochs, {r['train_minutes']:.0f} min ({r['samples_per_second']:.0f} samples/s), published epoch {r['published_epoch']} |"
        )
    lines += [
        "",
        f"Accuracy: top-1 on the full test split ({', '.join(sorted({str(r['test_samples']) for r in rows}))} "
        f"samples), never seen in training.{PAIRED_NOTE if any(map(has_paired, rows)) else ''} "
        f"{timing_note(rows, timings)} Commands of each run: its finetune.json.",
    ]
    return "\n".join(lines)


ROW_FIELDS = ("run", "model", "algo", "merges", "block_flop_speedup", "speedup_untrained", "speedup_finetuned",
              "off_the_shelf", "finetuned", "original", "epochs", "published_epoch", "train_minutes",
              "samples_per_second", "test_samples", "unmerged_finetuned", "timing")  # fmt: skip
TIMING_FIELDS = ("date", "cpu", "batch", "threads", "runs", "seconds", "command")


def earlier_table(out: Path) -> dict:
    """The table already in `out` (`--keep-rows`), every row and timing checked for what the table
    prints of it; ValueError, before any timing, if there is none to keep or it is not one."""
    try:
        record = read_json(out / "table.json")
    except (OSError, ValueError) as error:
        raise ValueError(f"no table to keep in {out} ({error})") from None
    if not isinstance(record, dict) or "setup" in record:
        raise ValueError(
            f"{out / 'table.json'} predates per-row timings or is no table: rebuild it without --keep-rows"
        )
    rows, timings = record.get("rows"), record.get("timings")
    if not isinstance(rows, list) or not isinstance(timings, list):
        raise ValueError(f"{out / 'table.json'} has no rows and timings")
    for index, timing in enumerate(timings):
        if not isinstance(timing, dict) or any(key not in timing for key in TIMING_FIELDS):
            raise ValueError(f"{out / 'table.json'}: timing {index} lacks one of {', '.join(TIMING_FIELDS)}")
    for row in rows:
        if not isinstance(row, dict) or any(key not in row for key in ROW_FIELDS):
            raise ValueError(f"{out / 'table.json'}: a row lacks one of {', '.join(ROW_FIELDS)}")
        if not isinstance(row["timing"], int) or not 0 <= row["timing"] < len(timings):
            raise ValueError(f"{out / 'table.json'}: row {row['run']!r} names no recorded timing")
    return record


def merged_rows(earlier: list[dict], new: list[dict]) -> list[dict]:
    """The earlier rows with the new ones in place of a row of the same run, else after the last row of
    the same model and schedule, else after the last row of their model, else at the end."""
    rows = list(earlier)
    for new_row in new:
        names = [r["run"] for r in rows]
        if new_row["run"] in names:
            rows[names.index(new_row["run"])] = new_row
            continue
        schedule = (new_row["model"], new_row["algo"], new_row["merges"])
        same_schedule = [i for i, r in enumerate(rows) if (r["model"], r["algo"], r["merges"]) == schedule]
        same_model = [i for i, r in enumerate(rows) if r["model"] == new_row["model"]]
        after = (same_schedule or same_model or [len(rows) - 1])[-1]
        rows.insert(after + 1, new_row)
    return rows


def keep_timings_in_use(rows: list[dict], timings: list[dict]) -> tuple[list[dict], list[dict]]:
    """Drop the timings no row refers to any more (all their rows re-timed), renumbering the rest in order."""
    used = sorted({r["timing"] for r in rows})
    index = {old: new for new, old in enumerate(used)}
    return [dict(r, timing=index[r["timing"]]) for r in rows], [timings[i] for i in used]


def time_runs(runs: list[Run], batch: int, repeats: int, threads: int) -> list[dict]:
    """The table rows of `runs`, their graphs timed beside each model's unmerged stock graph."""
    with tempfile.TemporaryDirectory(prefix="pitome-finetune-table-") as scratch:
        stocks = {model: stock_graph(model, batch, Path(scratch) / model) for model in {r.model for r in runs}}
        return [row(run, time_run(run, *stocks[run.model], batch, repeats, threads)) for run in runs]


def copy_small_files(runs: list[Run], out: Path) -> None:
    """Each run's small files (not its graphs or weights) beside the table, one folder a run."""
    for folder in (f for run in runs for f in (run.finetuned, run.unmerged_finetuned) if f is not None):
        kept = out / folder.name
        kept.mkdir(parents=True, exist_ok=True)
        for name in KEPT_FILES:
            if (folder / name).is_file():
                shutil.copy2(folder / name, kept / name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=parse_run, action="append", required=True, metavar="MODEL=FT,SHELF[,UNMERGED_FT]")
    parser.add_argument("--batch", type=positive_int, default=8)
    parser.add_argument("--runs", type=positive_int, default=50)
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--keep-rows", action="store_true",
        help="add the runs to the table already in --out, keeping its other rows and the timing they were measured in",
    )  # fmt: skip
    args = parser.parse_args(argv)
    names = [run.name for run in args.run]
    if len(set(names)) < len(names):
        parser.error(f"two --run folders share a name ({', '.join(sorted({n for n in names if names.count(n) > 1}))}): "
                     "a row and its copied files are named by the fine-tuned folder")  # fmt: skip
    from exporter.runners import cpu_name

    try:
        earlier = earlier_table(args.out) if args.keep_rows else {"rows": [], "timings": []}
    except ValueError as error:
        parser.error(f"--keep-rows: {error}")
    began = time.monotonic()
    timing = len(earlier["timings"])
    new_rows = [dict(r, timing=timing) for r in time_runs(args.run, args.batch, args.runs, args.threads)]
    setup = {
        "date": time.strftime("%Y-%m-%d"), "cpu": cpu_name(), "batch": args.batch, "threads": args.threads,
        "runs": args.runs, "seconds": time.monotonic() - began,
        "command": "python -m benchmarks.finetune_table " + " ".join(argv if argv is not None else sys.argv[1:]),
    }  # fmt: skip
    rows, timings = keep_timings_in_use(merged_rows(earlier["rows"], new_rows), [*earlier["timings"], setup])
    table = markdown(rows, timings)  # before anything is written: a row it cannot print fails here
    copy_small_files(args.run, args.out)
    write_record(args.out, "table", {"timings": timings, "rows": rows}, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
