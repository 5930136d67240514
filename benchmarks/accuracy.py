"""The accuracy experiment: PiToMe vs ToMe, with and without proportional attention, on the full
test sets of the project's two real models, through ONNX Runtime, against block FLOPs.

    python -m benchmarks.accuracy                               # make accuracy: both models
    python -m benchmarks.accuracy --models minilm_sentiment     # one model
    python -m benchmarks.accuracy --limit 500 --out /tmp/acc    # a quick look

Each (model, proportional-attention setting) is one `pitome-export sweep`: every point exported,
checked for parity, timed in one interleaved run with the unmerged graph, and scored on the test
set in one pass over the data. PiToMe and ToMe share the schedule at each ratio, so each ratio
compares them at equal FLOPs. Results: `benchmarks/results/accuracy/<model>.{md,json,png}`.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from exporter.atomic import atomic_write, atomic_write_text
from pipelines.jobs.options import positive_int

RESULTS = Path(__file__).resolve().parent / "results" / "accuracy"


@dataclass(frozen=True)
class Experiment:
    data: str
    ratios: tuple[float, ...]
    prop_attn: tuple[bool, ...]
    int8_ratio: float  # the PiToMe point also measured in INT8 (each of INT8_VARIANTS)
    note: str = ""


EXPERIMENTS = {
    "vit_fmnist": Experiment("fashion-mnist", (0.975, 0.95, 0.925, 0.9, 0.875, 0.85), (False, True), 0.9),
    "minilm_sentiment": Experiment(
        "rotten-tomatoes",
        (0.9, 0.8, 0.7, 0.6, 0.55),
        (False,),
        0.7,
        note="Proportional attention is not implemented for text models, so text has one setting (off).",
    ),  # fmt: skip
}
# (mode, FFN down-projection precision): each mode's default, and static with the FFN in INT8 too,
# which shows what keeping it FP32 buys.
INT8_VARIANTS = (("static", "fp32"), ("static", "int8"), ("dynamic", "int8"))
CALIBRATION_SAMPLES = 256  # static INT8: this many samples of the model's own training data


def run_model(model: str, exp: Experiment, scratch: Path, runs: int, limit: int | None, console) -> dict:
    """One sweep per proportional-attention setting; their points and the unmerged baseline; the INT8 points."""
    from pipelines.jobs.sweep import SweepJob, run_sweep

    points, unmerged = [], None
    for prop in exp.prop_attn:
        out = scratch / f"{model}-prop-{'on' if prop else 'off'}"
        job = SweepJob(
            model=model, ratios=list(exp.ratios), algos=["pitome", "tome"], prop_attn=prop, data=exp.data,
            limit=limit, out=str(out), force=True, bench_runs=runs,
        )  # fmt: skip
        run_sweep(job, console)
        result = json.loads((out / "sweep.json").read_text())
        points += result["points"]
        unmerged = unmerged or {**result["unmerged"], "samples": result["samples"], "data": result["data"]}
        context = result["context"]
    int8 = int8_points(model, exp, scratch, limit, console)
    return {"model": model, "unmerged": unmerged, "points": points, "int8": int8, "context": context, "note": exp.note}


def int8_points(model: str, exp: Experiment, scratch: Path, limit: int | None, console) -> list[dict]:
    return [int8_point(model, exp, mode, ffn, scratch, limit, console) for mode, ffn in INT8_VARIANTS]


def int8_point(model: str, exp: Experiment, mode: str, ffn_out: str, scratch: Path, limit: int | None, console) -> dict:
    """PiToMe at `exp.int8_ratio` in INT8 (`mode`, FFN down-projections in `ffn_out`), with its FP32
    twin and the INT8 unmerged graph, scored on the same test samples."""
    from pipelines.jobs.export_job import run_job

    job = int8_point_job(model, exp, mode, ffn_out, scratch / f"{model}-int8-{mode}-ffn-{ffn_out}", limit)
    run_job(job, console)
    return read_int8_point(Path(job.out), exp.int8_ratio)


def int8_point_job(model: str, exp: Experiment, mode: str, ffn_out: str, out: Path, limit: int | None):
    """The export job of one INT8 point: static calibration on the model's own training data; the
    agreement bars are off (the point is to measure, not to gate)."""
    from pipelines.jobs.export_job import ExportJob

    return ExportJob(
        model=model, ratio=exp.int8_ratio, precision="int8", int8_mode=mode, int8_ffn_out=ffn_out,
        calibration=str(CALIBRATION_SAMPLES) if mode == "static" else None, data=exp.data, limit=limit,
        out=str(out), force=True, bench=False, max_accuracy_drop=100.0, min_cosine=(0.0, 0.0),
    )  # fmt: skip


def read_int8_point(out: Path, ratio: float) -> dict:
    """The INT8 point's figures, read back from its export job's folder (mode and FFN precision
    from the shipped graph's metadata)."""
    import onnx

    from exporter.onnx_export import read_metadata

    meta = read_metadata(onnx.load(str(out / "model.onnx"), load_external_data=False))
    accuracy = json.loads((out / "accuracy.json").read_text())
    agreement = json.loads((out / "parity.json").read_text())["precision"]["agreement"]
    top1 = accuracy["top1"]
    return {
        "mode": meta["int8_mode"], "ffn_out": meta["int8_ffn_out"], "ratio": ratio, "samples": accuracy["samples"],
        "top1_merged_int8": top1["merged"], "top1_merged_fp32": top1["merged fp32"],
        "top1_unmerged_int8": top1["unmerged int8"], "top1_unmerged_fp32": top1["unmerged"],
        "top1_agreement_with_fp32_merged": agreement["top1_agreement"],
        "decision_agreement_per_layer": agreement["layer_agreement"],
    }  # fmt: skip


def comparison(points: list[dict]) -> list[dict]:
    """PiToMe minus ToMe top-1 (points) at each ratio and setting: equal schedules, equal FLOPs."""
    rows = []
    for prop in sorted({p["prop_attn"] for p in points}):
        for ratio in sorted({p["ratio"] for p in points}, reverse=True):
            pair = {p["algo"]: p for p in points if p["ratio"] == ratio and p["prop_attn"] == prop}
            if {"pitome", "tome"} <= pair.keys():
                delta = 100 * (pair["pitome"]["top1"] - pair["tome"]["top1"])
                rows.append({"prop_attn": prop, "ratio": ratio, "pitome_minus_tome": delta})
    return rows


def markdown(result: dict, command: str, minutes: float | None) -> str:
    ctx, base = result["context"], result["unmerged"]
    lines = [
        f"# Accuracy vs FLOPs: {result['model']}",
        "",
        f"`{command}`"
        + (f" ({minutes:.0f} min)" if minutes is not None else "")
        + f". {base['samples']} test samples ({base['data']}), through ONNX Runtime CPU; "
        f"weights: {ctx['weights']}.",
        f"CPU {ctx['cpu']}, {ctx['threads']} threads; versions: "
        + ", ".join(f"{k} {v}" for k, v in ctx["versions"].items()),
        "",
        "Block FLOPs per item from the schedule; measured speed-up = unmerged median / point median, all graphs of "
        "one setting timed in one interleaved run (batch 8). Agreement = share of predictions equal to the unmerged "
        "graph's.",
        "",
        "| algo | prop. attn | ratio | block GFLOPs | FLOP speed-up | measured speed-up | top-1 | change (points) | "
        "agreement |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        f"| unmerged | - | 1 | {result['points'][0]['block_gflops_unmerged']:.3f} | 1.00x | 1.00x | "
        f"{base['top1']:.2%} | - | 100% |",
    ]
    for p in sorted(result["points"], key=lambda p: (p["algo"], p["prop_attn"], -p["ratio"])):
        lines.append(
            f"| {p['algo']} | {'on' if p['prop_attn'] else 'off'} | {p['ratio']} | {p['block_gflops_merged']:.3f} | "
            f"{p['block_flop_speedup']:.2f}x | {p['speedup']:.2f}x | {p['top1']:.2%} | "
            f"{100 * (p['top1'] - base['top1']):+.2f} | {p['agreement']:.2%} |"
        )
    rows = comparison(result["points"])
    wins = sum(r["pitome_minus_tome"] > 0 for r in rows)
    ties = sum(r["pitome_minus_tome"] == 0 for r in rows)
    lines += [
        "",
        "PiToMe minus ToMe at equal FLOPs (points): "
        + ", ".join(f"{r['ratio']} {'on' if r['prop_attn'] else 'off'} {r['pitome_minus_tome']:+.2f}" for r in rows),
        "",
        f"PiToMe is ahead at {wins} of {len(rows)} equal-FLOP points, tied at {ties}, behind at "
        f"{len(rows) - wins - ties}.",
    ]
    lines += int8_markdown(result.get("int8", []), result.get("int8_rerun"))
    if result["note"]:
        lines += ["", result["note"]]
    lines += ["", f"![accuracy vs block FLOPs]({result['model']}.png)", ""]
    return "\n".join(lines)


def int8_markdown(int8: list[dict], rerun: dict | None = None) -> list[str]:
    """The INT8 points beside their FP32 twins: the loss is quantization's where unmerged INT8 loses alike."""
    if not int8:
        return []
    lines = [
        "",
        f"INT8 (PiToMe {int8[0]['ratio']}, the merge kept FP32; static = QDQ calibrated on "
        f"{CALIBRATION_SAMPLES} training samples, "
        "dynamic = activation scales at run time; FFN down-proj. = the MatMuls after GELU), same test samples"
        + (f", re-measured by `{rerun['command']}` ({rerun['minutes']:.0f} min)" if rerun else "")
        + ":",
        "",
        "| INT8 mode | FFN down-proj. | merged INT8 | merged FP32 | INT8 - FP32 (points) | unmerged INT8 | "
        "unmerged FP32 | top-1 agreement with FP32 merged (parity inputs) | merge-decision agreement per layer |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for q in int8:
        layers = ", ".join(f"{v:.1%}" for v in q["decision_agreement_per_layer"].values())
        lines.append(
            f"| {q['mode']} | {q.get('ffn_out', 'int8')} | {q['top1_merged_int8']:.2%} | {q['top1_merged_fp32']:.2%} | "
            f"{100 * (q['top1_merged_int8'] - q['top1_merged_fp32']):+.2f} | {q['top1_unmerged_int8']:.2%} | "
            f"{q['top1_unmerged_fp32']:.2%} | {q['top1_agreement_with_fp32_merged']:.1%} | {layers} |"
        )
    return lines


def draw(result: dict, path: Path) -> None:
    """Top-1 vs block GFLOPs per item: one line per algorithm and setting, the unmerged model as a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    styles = {"pitome": "tab:blue", "tome": "tab:orange"}
    for algo in ("pitome", "tome"):
        for prop in sorted({p["prop_attn"] for p in result["points"]}):
            pts = sorted((p for p in result["points"] if p["algo"] == algo and p["prop_attn"] == prop),
                         key=lambda p: p["block_gflops_merged"])  # fmt: skip
            if pts:
                ax.plot([p["block_gflops_merged"] for p in pts], [100 * p["top1"] for p in pts], marker="o",
                        color=styles[algo], linestyle="-" if not prop else "--",
                        label=f"{algo}, prop. attn {'on' if prop else 'off'}")  # fmt: skip
    base = result["unmerged"]
    unmerged_gflops = result["points"][0]["block_gflops_unmerged"]
    ax.plot([unmerged_gflops], [100 * base["top1"]], marker="*", markersize=13,
            color="black", linestyle="none", label="unmerged")  # fmt: skip
    for q, marker in zip(result.get("int8", []), ("x", "+", "1"), strict=False):
        merged_gflops = next(p["block_gflops_merged"] for p in result["points"]
                             if p["algo"] == "pitome" and p["ratio"] == q["ratio"])  # fmt: skip
        ax.plot([merged_gflops, unmerged_gflops], [100 * q["top1_merged_int8"], 100 * q["top1_unmerged_int8"]],
                marker=marker, markersize=10, color="tab:red", linestyle="none",
                label=f"INT8 {q['mode']}, FFN {q.get('ffn_out', 'int8')} (pitome {q['ratio']}, unmerged)")  # fmt: skip
    ax.set_xlabel("block GFLOPs per item")
    ax.set_ylabel(f"top-1 accuracy (%), {base['samples']} test samples")
    ax.set_title(f"{result['model']}: accuracy vs FLOPs (ONNX Runtime)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.accuracy", description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(EXPERIMENTS), help="comma-separated: " + ", ".join(EXPERIMENTS))
    parser.add_argument("--limit", type=positive_int, default=None, help="first N test samples (seeded); default: all")
    parser.add_argument("--runs", type=positive_int, default=20, help="timed runs per graph (default 20)")
    parser.add_argument("--out", default=str(RESULTS), help=f"results folder (default {RESULTS})")
    parser.add_argument("--scratch", default="artifacts/accuracy", help="folder for the per-sweep artifacts")
    parser.add_argument("--int8-only", action="store_true",
                        help="re-measure the INT8 points only; the FP32 sweep is read from the recorded results")  # fmt: skip
    args = parser.parse_args(argv)
    from rich.console import Console

    from ops.errors import PitomeError

    console = Console()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python -m benchmarks.accuracy " + shlex.join(sys.argv[1:] if argv is None else argv)
    for model in args.models.split(","):
        if model not in EXPERIMENTS:
            print(
                f"benchmarks.accuracy: error: unknown model {model!r}; choose from {', '.join(EXPERIMENTS)}",
                file=sys.stderr,
            )
            return 2
        recorded_path = out / f"{model}.json"
        recorded = json.loads(recorded_path.read_text()) if args.int8_only and recorded_path.is_file() else None
        if args.int8_only and recorded is None:
            print(
                f"benchmarks.accuracy: error: --int8-only needs a recorded sweep, {recorded_path} is missing",
                file=sys.stderr,
            )
            return 2
        if recorded is not None and args.limit is not None and args.limit != recorded["unmerged"]["samples"]:
            samples = recorded["unmerged"]["samples"]
            print(f"benchmarks.accuracy: error: the recorded sweep used {samples} test samples; --int8-only "
                  f"measures on the same ones: drop --limit {args.limit}", file=sys.stderr)  # fmt: skip
            return 2
        began = time.perf_counter()
        try:
            if recorded is not None:
                result = recorded
                result["int8"] = int8_points(model, EXPERIMENTS[model], Path(args.scratch), args.limit, console)
            else:
                result = run_model(model, EXPERIMENTS[model], Path(args.scratch), args.runs, args.limit, console)
        except PitomeError as exc:
            print(f"benchmarks.accuracy: error: {exc}", file=sys.stderr)
            return 2
        minutes = (time.perf_counter() - began) / 60
        if args.int8_only:
            result["int8_rerun"] = {"command": command, "minutes": minutes}
        else:
            result.update(command=command, minutes=minutes)
            result.pop("int8_rerun", None)
        atomic_write_text(recorded_path, json.dumps(result, indent=2))
        draw(result, out / f"{model}.png")
        atomic_write_text(out / f"{model}.md", markdown(result, result["command"], result.get("minutes")))
        console.print(f"[bold]{model}:[/] {out / (model + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
