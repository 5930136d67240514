"""Fine-tuning results: the table of benchmarks/results/finetune, built from the runs' folders,
with every speed-up re-timed in one interleaved run.

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
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.records import write_record
from pipelines.jobs.finetune.outputs import published_epoch

RESULTS = Path(__file__).resolve().parent / "results" / "finetune"
KEPT_FILES = ("finetune.json", "accuracy.json", "bench.json", "report.md", "training.png", "schedule.json")


@dataclass(frozen=True)
class Run:
    model: str
    finetuned: Path
    shelf: Path
    schedule: dict  # the schedule.json both merged graphs share
    unmerged_finetuned: Path | None = None

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
    return Run(model, finetuned, shelf, same_schedule(finetuned, shelf), *unmerged)


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
    if run.unmerged_finetuned is not None:
        out["unmerged_finetuned"] = read_json(run.unmerged_finetuned / "accuracy.json")["top1_merged"]
        out["unmerged_finetuned_minutes"] = read_json(run.unmerged_finetuned / "finetune.json")["wall_seconds"] / 60
    return out


def points(a: float, b: float) -> str:
    return f"{100 * (a - b):+.2f}"


def markdown(rows: list[dict], setup: dict) -> str:
    lines = [
        "| model | schedule | block FLOPs | speed-up untrained / fine-tuned | off the shelf | fine-tuned | "
        "original (unmerged) | unmerged fine-tuned alike | training |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        alike = "-"
        if r["unmerged_finetuned"] is not None:
            alike = f"{r['unmerged_finetuned']:.2%} ({points(r['finetuned'], r['unmerged_finetuned'])} vs it)"
        lines.append(
            f"| {r['model']} | {r['algo']} {','.join(map(str, r['merges']))} | {r['block_flop_speedup']:.2f}x | "
            f"{r['speedup_untrained']:.2f}x / {r['speedup_finetuned']:.2f}x | {r['off_the_shelf']:.2%} "
            f"({points(r['off_the_shelf'], r['original'])}) | **{r['finetuned']:.2%}** "
            f"({points(r['finetuned'], r['original'])}) | {r['original']:.2%} | {alike} | {r['epochs']} epochs, "
            f"{r['train_minutes']:.0f} min ({r['samples_per_second']:.0f} samples/s), published epoch {r['published_epoch']} |"
        )
    lines += [
        "",
        f"Accuracy: top-1 on the full test split ({', '.join(sorted({str(r['test_samples']) for r in rows}))} "
        "samples), never seen in training. Speed-ups: ONNX Runtime CPU, the fine-tuned graph, the same "
        f"schedule untrained and the unmerged stock graph timed in one interleaved run (batch {setup['batch']}, "
        f"{setup['threads']} threads, median of {setup['runs']}), on {setup['cpu']}; measured {setup['date']} "
        f"(`{setup['command']}`, {setup['seconds']:.0f} s). Commands of each run: its finetune.json.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=parse_run, action="append", required=True, metavar="MODEL=FT,SHELF[,UNMERGED_FT]")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    from exporter.runners import cpu_name

    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="pitome-finetune-table-") as scratch:
        stocks = {model: stock_graph(model, args.batch, Path(scratch) / model) for model in {r.model for r in args.run}}
        rows = [row(run, time_run(run, *stocks[run.model], args.batch, args.runs, args.threads)) for run in args.run]
    setup = {
        "date": time.strftime("%Y-%m-%d"), "cpu": cpu_name(), "batch": args.batch, "threads": args.threads,
        "runs": args.runs, "seconds": time.monotonic() - began,
        "command": "python -m benchmarks.finetune_table " + " ".join(argv if argv is not None else sys.argv[1:]),
    }  # fmt: skip
    for folder in (f for run in args.run for f in (run.finetuned, run.unmerged_finetuned) if f is not None):
        kept = args.out / folder.name
        kept.mkdir(parents=True, exist_ok=True)
        for name in KEPT_FILES:
            if (folder / name).is_file():
                shutil.copy2(folder / name, kept / name)
    write_record(args.out, "table", {"setup": setup, "rows": rows}, markdown(rows, setup))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
