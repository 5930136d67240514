"""`pitome-export sweep`: a grid of algorithms x ratios, timed together, drawn as a trade-off curve.

Every point is exported, checked for parity, and timed in ONE interleaved measurement with the
unmerged baseline, so the throughput axis compares like with like. With `--data` the y axis is
top-1 accuracy; without, it is top-1 agreement with the unmerged model on seeded inputs.
`--match-flops ALGO@RATIO` puts every algorithm at the ratio whose block FLOPs match that point's
(algorithms count a ratio differently, so equal ratios are not equal costs), and
`--reduction-share` times each point beside a twin whose reductions only keep the first tokens
(same shapes, no reduction work): the share of its latency that the reduction itself costs.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ops.errors import PitomeError
from pipelines.jobs import options
from pipelines.jobs.export_job import ExportJob
from pipelines.jobs.options import option

MATCH_TOLERANCE = 0.02  # --match-flops: how far a matched point's block FLOPs may be from the target's
TWIN = " (reduction skipped)"  # the name suffix of a point's twin in the timing run


@dataclass
class SweepJob(ExportJob):
    """A grid of `algos` x `ratios`, each point exported like an export job's merged graph."""

    ratios: list[float] = option("--ratios", factory=lambda: [0.975, 0.95, 0.925, 0.9], group="merging",
                                 type=options.ratio_list, commands=("sweep",), help="e.g. 0.95,0.9")  # fmt: skip
    algos: list[str] = option("--algos", factory=lambda: list(options.DEFAULT_ALGOS), group="merging",
                              type=options.algo_list, commands=("sweep",), help=f"of {','.join(options.ALGOS)} (default pitome,tome)")  # fmt: skip

    match_flops: tuple[str, float] | None = option(
        "--match-flops", group="merging", type=options.algo_at_ratio, metavar="ALGO@RATIO", commands=("sweep",),
        help=f"instead of --ratios: each algorithm at the ratio whose block FLOPs match ALGO@RATIO's within "
        f"{MATCH_TOLERANCE:.0%} (the paper's comparison at equal cost)",
    )  # fmt: skip
    reduction_share: bool = option(
        "--reduction-share", default=False, group="benchmark", action="store_true", commands=("sweep",),
        help="also time each point with its reductions replaced by keeping the first tokens: the share of its "
        "latency the reduction costs",
    )  # fmt: skip

    def default_out(self) -> Path:
        return Path("artifacts") / f"{self.model}-sweep"


def run_sweep(job: SweepJob, console) -> Path:
    """Run the sweep into its output folder (published whole) and return it; ParityError (exit 3)
    when a point's graph failed parity."""
    from exporter.errors import ParityError
    from pipelines.jobs.export_job import build_output_folder
    from pipelines.jobs.stages import torch_settings
    from pipelines.models.registry import resolve

    spec = resolve(job.model)
    with torch_settings(job.threads, job.seed):  # seeded: --random-init weights are the export job's
        final, result = build_output_folder(job, lambda tmp: _sweep(job, spec, tmp, console))
    console.print(f"[bold]Report:[/] {final / 'report.md'}  [bold]Plot:[/] {final / 'tradeoff.png'}")
    failed = [p for p in result["points"] if not p["parity_passed"]]
    if failed:
        names = ", ".join(f"{p['algo']}@{p['ratio']}" for p in failed)
        raise ParityError(f"parity FAILED for {names} (see {final / 'sweep.json'})")
    return final


def _sweep(job: SweepJob, spec, out: Path, console) -> dict:
    """Export and check every point, time them with the unmerged graph, score them, write the folder."""
    from rich.progress import Progress

    from exporter.atomic import atomic_write_text
    from exporter.runners import device_name, torch_device
    from exporter.signatures import signature_of
    from exporter.variants import Variant, export_variant
    from pipelines.jobs import report
    from pipelines.jobs.stages import open_data
    from pipelines.models.registry import load_model

    seq_len = job.seq_len or spec.seq_len
    device = torch_device(job.device)
    with Progress(console=console) as progress, tempfile.TemporaryDirectory(prefix="pitome-sweep-") as tmp:
        scratch = Path(tmp)
        task = progress.add_task("load and export the unmerged baseline", total=1)
        model, origin = load_model(spec, job.checkpoint, job.random_init)
        signature = signature_of(model, seq_len)
        data = open_data(job, spec, model, seq_len, signature) if job.data else None
        baseline, _ = export_variant(model, Variant("unmerged"), scratch, seq_len=seq_len, opset=job.opset)
        progress.update(task, completed=1)
        points = _export_points(job, model, signature, seq_len, device, scratch, progress)
        unmerged_latency = _time_points(job, signature, baseline, points, progress)
        check = data if data is not None else _synthetic(signature, job.seed)
        _score_points(job, baseline, points, check, labelled=data is not None, progress=progress)
    result = {
        "context": report.run_context(job, spec, origin, device_name(device), str(device)),
        "y_axis": "top-1 accuracy" if data is not None else "top-1 agreement with the unmerged model",
        "data": data.description if data is not None else "seeded synthetic inputs",
        "samples": len(check),
        "unmerged": {"latency": unmerged_latency, "top1": points[0]["top1_unmerged"]},
        "points": points,
    }
    atomic_write_text(out / "sweep.json", json.dumps(result, indent=2))
    draw_tradeoff(result, out / "tradeoff.png")
    atomic_write_text(out / "report.md", sweep_markdown(result))
    _print_table(result, console)
    return result


def grid(job: SweepJob, model, seq_len: int | None) -> list[tuple[str, float]]:
    """(algo, ratio) of every point: `--algos` x `--ratios`, or each algorithm at the ratio that
    matches `--match-flops`' block FLOPs (PitomeError, exit 2, when one cannot within
    MATCH_TOLERANCE)."""
    from exporter.variants import Variant, variant_model
    from ops.algos import algorithm
    from ops.flops import flop_speedup, matching_ratio
    from pipelines.jobs.benchmark import model_width

    if job.match_flops is None:
        return [(algo, ratio) for algo in job.algos for ratio in job.ratios]
    target_algo, target_ratio = job.match_flops
    like = variant_model(model, Variant("target", target_algo, target_ratio), seq_len).token_schedule
    dim, mlp_ratio = model_width(model)
    target = flop_speedup(like, dim, mlp_ratio, algorithm(target_algo).stage)
    points = []
    for algo in job.algos:
        ratio, speedup = matching_ratio(algo, target, like, dim, mlp_ratio, near=target_ratio)
        if abs(speedup / target - 1.0) > MATCH_TOLERANCE:
            raise PitomeError(f"{algo} cannot match {target_algo}@{target_ratio:g}'s {target:.2f}x fewer block FLOPs "
                              f"within {MATCH_TOLERANCE:.0%} (closest: {speedup:.2f}x at ratio {ratio:g})")  # fmt: skip
        points.append((algo, ratio))
    return points


def _export_points(job: SweepJob, model, signature, seq_len, device, scratch: Path, progress) -> list[dict]:
    """Export and check parity of every point; each keeps its graph's `path` (and its twin's,
    `twin_path`, with `--reduction-share`)."""
    from exporter.parity import TOLERANCES, parity_feeds, verify_export
    from exporter.variants import Variant, export_module, export_variant
    from ops.reduction import without_reduction
    from pipelines.jobs.benchmark import flops_summary

    points = []
    pairs = grid(job, model, seq_len)
    task = progress.add_task("export + parity per point", total=len(pairs))
    for algo, ratio in pairs:
        variant = Variant(f"{algo}@{ratio}", algo, ratio, prop_attn=job.prop_attn, lowering=job.lowering)
        path, merged = export_variant(model, variant, scratch, seq_len=seq_len, opset=job.opset)
        feeds = parity_feeds(signature, (2,), 1, job.seed)
        parity = verify_export(merged, signature, path, feeds, TOLERANCES["fp32"], device, job.threads, scratch)
        point = {
            "algo": algo, "ratio": ratio, "schedule": list(merged.token_schedule.merges),
            "prop_attn": merged.merge_config["prop_attn"], "parity_passed": parity.passed, "parity": parity.verdict(),
            "path": path, **flops_summary(merged),
        }  # fmt: skip
        if job.reduction_share:
            twin = path.with_name(f"{path.stem}.twin.onnx")
            point["twin_path"] = export_module(without_reduction(merged), variant, twin, seq_len=seq_len,
                                               opset=job.opset)  # fmt: skip
        points.append(point)
        progress.advance(task)
    return points


def _point_name(point: dict) -> str:
    return f"{point['algo']}@{point['ratio']}"


def _time_points(job: SweepJob, signature, baseline: Path, points: list[dict], progress) -> dict:
    """All points and the unmerged graph in one interleaved run; sets each point's latency and
    speed-up, returns the unmerged graph's latency."""
    from exporter.variants import time_graphs

    feeds = signature.example_inputs(job.bench_batch, seed=job.seed)
    numpy_feeds = {name: feeds[name].numpy() for name in signature.input_names}
    graphs = {"unmerged": baseline, **{_point_name(p): p["path"] for p in points}}
    graphs.update({_point_name(p) + TWIN: p.pop("twin_path") for p in points if "twin_path" in p})
    task = progress.add_task(f"latency: {len(graphs)} graphs interleaved x {job.bench_runs}", total=1)
    stats = time_graphs(graphs, numpy_feeds, job.bench_batch, job.bench_runs, job.threads)
    progress.update(task, completed=1)
    for point in points:
        point["latency"] = stats[_point_name(point)].to_dict()
        point["speedup"] = stats["unmerged"].median_ms / point["latency"]["median_ms"]
        twin = stats.get(_point_name(point) + TWIN)
        point["reduction_share"] = None if twin is None else 1.0 - twin.median_ms / point["latency"]["median_ms"]
    return stats["unmerged"].to_dict()


def _score_points(job: SweepJob, baseline: Path, points: list[dict], check, labelled: bool, progress) -> None:
    """Top-1 (with labels) and agreement with the unmerged graph of every point, in one pass."""
    from pipelines.jobs.accuracy import measure_accuracy

    task = progress.add_task("accuracy" if labelled else "agreement with unmerged", total=-(-len(check) // 32))
    graphs = {_point_name(p): p.pop("path") for p in points}
    first = next(iter(graphs))
    acc = measure_accuracy(
        graphs.pop(first), baseline, check, 32, job.threads, lambda: progress.advance(task), extra=graphs
    )
    for point in points:
        graph = "merged" if _point_name(point) == first else _point_name(point)
        point["top1_unmerged"] = acc["top1_unmerged"] if labelled else None
        point["top1"] = acc["top1"][graph] if labelled else None
        point["agreement"] = acc["agreement_with_unmerged"][graph]


def _synthetic(signature, seed: int):
    """Seeded inputs (labels unused) for agreement when no labelled data is given."""
    import numpy as np

    from pipelines.data.labelled import LabelledData

    tensors = signature.example_inputs(64, seed=seed + 7)
    arrays = {name: tensors[name].numpy() for name in signature.input_names}
    return LabelledData(
        "seeded synthetic inputs", np.zeros(64, dtype=np.int64), lambda idx: {k: v[idx] for k, v in arrays.items()}
    )


def draw_tradeoff(result: dict, path: Path) -> None:
    """Accuracy (or agreement) vs throughput: one line per algorithm, the unmerged model as a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = "top1" if result["points"][0]["top1"] is not None else "agreement"
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for algo in dict.fromkeys(p["algo"] for p in result["points"]):
        pts = [p for p in result["points"] if p["algo"] == algo]
        ax.plot([p["latency"]["throughput"] for p in pts], [100 * p[key] for p in pts], marker="o", label=algo)
        for p in pts:
            ax.annotate(f"{p['ratio']:g}", (p["latency"]["throughput"], 100 * p[key]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")  # fmt: skip
    base = result["unmerged"]
    base_y = 100 * base["top1"] if base["top1"] is not None else 100.0
    ax.plot([base["latency"]["throughput"]], [base_y], marker="*", markersize=12, linestyle="none", label="unmerged")
    ax.set_xlabel(f"throughput (items/s, batch {base['latency']['batch']})")
    ax.set_ylabel(result["y_axis"] + " (%)")
    ax.set_title(f"{result['context']['model']} ({result['context']['weights']})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    from exporter.atomic import atomic_write

    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def sweep_markdown(result: dict) -> str:
    """report.md of a sweep: the run's context and one table row per point."""
    from pipelines.jobs.report import random_init_banner

    ctx = result["context"]
    lines = random_init_banner(ctx, "agreement and latency")
    lines += [
        f"# pitome-export sweep: {ctx['model']}",
        "",
        f"- weights: {ctx['weights']}; command: `{ctx['command_line']}`; git {ctx['git_commit']}",
        f"- CPU {ctx['cpu']}; threads {ctx['threads']}; y axis: {result['y_axis']} on {result['samples']} samples "
        f"({result['data']})",
        "- all graphs timed in one interleaved run (ONNX Runtime CPU, spinning off)",
        "",
        "| algo | ratio | block-FLOP speed-up | measured speed-up | median ms | items/s | top-1 | agreement "
        "| reduction share | parity |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    base = result["unmerged"]
    top1 = f"{base['top1']:.2%}" if base["top1"] is not None else "-"
    lines.append(
        f"| unmerged | 1 | 1.00x | 1.00x | {base['latency']['median_ms']:.1f} | {base['latency']['throughput']:.1f} | "
        f"{top1} | 100% | - | - |"
    )
    for p in result["points"]:
        top1 = f"{p['top1']:.2%}" if p["top1"] is not None else "-"
        lines.append(
            f"| {p['algo']} | {p['ratio']} | {p['block_flop_speedup']:.2f}x | {p['speedup']:.2f}x | "
            f"{p['latency']['median_ms']:.1f} | {p['latency']['throughput']:.1f} | {top1} | {p['agreement']:.2%} | "
            f"{_share(p)} | {'PASSED' if p['parity_passed'] else 'FAILED'} |"
        )
    lines += ["", "![accuracy vs throughput](tradeoff.png)", ""]
    return "\n".join(lines)


def _print_table(result: dict, console) -> None:
    from rich.table import Table

    table = Table(title=f"sweep: {result['y_axis']}")
    for column in ("algo", "ratio", "FLOP x", "measured x", "items/s", "top-1", "agree", "reduction", "parity"):
        table.add_column(column, justify="right")
    for p in result["points"]:
        top1 = f"{p['top1']:.2%}" if p["top1"] is not None else "-"
        table.add_row(
            p["algo"], f"{p['ratio']}", f"{p['block_flop_speedup']:.2f}", f"{p['speedup']:.2f}",
            f"{p['latency']['throughput']:.1f}", top1, f"{p['agreement']:.2%}", _share(p),
            "ok" if p["parity_passed"] else "FAIL",
        )  # fmt: skip
    console.print(table)


def _share(point: dict) -> str:
    """The point's reduction share of latency, or "-" when its twin was not timed."""
    return "-" if point.get("reduction_share") is None else f"{point['reduction_share']:.0%}"
