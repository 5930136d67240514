"""Latency harness: merged (PiToMe, ToMe) vs unmerged, ONNX Runtime CPU and PyTorch eager.

    python -m benchmarks.latency --quick      # make bench: deit_small and bert_base, a few minutes
    python -m benchmarks.latency              # the full grid recorded in benchmarks/results/

For each model and batch size, every candidate (the unmerged graph and each algo x ratio) is
timed in ONE interleaved run after warm-up, threads fixed, ORT spinning off; the table shows
median and p90, the measured speed-up over unmerged beside the block-FLOP ideal, and, for the
PiToMe graph at the last ratio, what its merge costs: end to end, against the same graph with
every merge step replaced by keeping the first N - r tokens (same shapes, no merge work), timed
in the same interleaved run; and by op type, from ONNX Runtime's profiler.
Weights are random (hubs are unreachable here): latency does not depend on them.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ops.reduction import without_reduction
from pipelines.jobs.options import positive_int

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Case:
    model: str
    ratios: tuple[float, ...]
    batches: tuple[int, ...]
    seq_len: int | None = None


FULL = (
    Case("deit_tiny", (0.975, 0.95, 0.925, 0.9), (1, 8)),
    Case("deit_small", (0.975, 0.95, 0.925, 0.9), (1, 8)),
    Case("deit_base", (0.975, 0.95, 0.925, 0.9), (1, 8)),
    Case("bert_base", (0.9, 0.7, 0.55), (1, 8), seq_len=128),
    Case("bert_base", (0.9, 0.7, 0.55), (1, 8), seq_len=256),
    # Hugging Face vision: random-init full-size architectures built from configs (no hub)
    Case("vit_base_hf", (0.95, 0.9), (1, 8)),
    Case("clip_b16", (0.95, 0.9), (1, 8)),
    Case("dinov2_small", (0.95, 0.9), (1, 8)),
)
QUICK = (Case("deit_small", (0.9,), (8,)), Case("bert_base", (0.7,), (8,), seq_len=128))
ALGOS = ("pitome", "tome")
RANDOM_INIT_SEED = 0  # the export job's default --seed: a rerun times the graphs of the same weights
# INT8 graphs beside FP32: dynamic (the CPU default) by default; static QDQ on request, calibrated
# on seeded synthetic inputs (random weights), FFN down-projections FP32 (its default).
INT8_SUFFIX = {"dynamic": " int8", "static": " int8 static"}
CALIBRATION_BATCHES = 4


def split_precision(name: str) -> tuple[str, str]:
    """A timed graph's name as (candidate, precision): "pitome@0.9 int8" -> ("pitome@0.9", "int8")."""
    for suffix in sorted(INT8_SUFFIX.values(), key=len, reverse=True):
        if name.endswith(suffix):
            return name.removesuffix(suffix), suffix.strip()
    return name, "fp32"


@dataclass
class Variants:
    """One model's exported graphs (by candidate name), their block-FLOP ideals, and the eager
    modules timed beside them; `profiled` is the PiToMe graph whose merge is measured."""

    signature: object
    profiled: str
    graphs: dict[str, Path]
    flops: dict[str, float]
    eager: dict[str, torch.nn.Module]


def run_case(
    case: Case,
    runs: int,
    threads: int,
    scratch: Path,
    log,
    breakdowns: list[dict] | None = None,
    int8_modes: tuple[str, ...] = ("dynamic",),
) -> list[dict]:
    """Every batch size of one model: export each variant once, time them interleaved.

    The PiToMe graph at the last ratio is also profiled; its merge breakdown goes to `breakdowns`.
    The unmerged graph and that PiToMe graph are also timed in INT8, once per `int8_modes`.
    """
    breakdowns = [] if breakdowns is None else breakdowns
    variants = export_variants(case, scratch, log)
    quantize_variants(variants, case, int8_modes, scratch, log)
    return [row for batch in case.batches for row in time_batch(variants, case, batch, runs, threads, log, breakdowns)]


def export_variants(case: Case, scratch: Path, log) -> Variants:
    """The unmerged graph, every algo x ratio, and the last PiToMe ratio with its merges skipped."""
    from exporter.signatures import signature_of
    from exporter.variants import Variant, export_module, export_variant
    from pipelines.models.registry import load_model, resolve

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        model, _ = load_model(resolve(case.model), random_init=True)
    signature = signature_of(model, case.seq_len)
    unmerged, unmerged_module = export_variant(model, Variant("unmerged"), scratch, seq_len=case.seq_len)
    variants = Variants(
        signature, f"pitome@{case.ratios[-1]}", graphs={"unmerged": unmerged}, flops={"unmerged": 1.0},
        eager={"unmerged": unmerged_module},
    )  # fmt: skip
    for variant, merged, ideal in merged_variants(model, case, ALGOS):
        log(f"  export {case.model} {variant.name}")
        variants.graphs[variant.name] = export_module(merged, variant, scratch / f"{variant.name}.onnx",
                                                      seq_len=case.seq_len)  # fmt: skip
        variants.flops[variant.name] = ideal
        if variant.name == variants.profiled:
            variants.eager[variant.name] = merged
            skipped = f"{variant.name} {SKIPPED}"
            path = scratch / "skipped.onnx"
            variants.graphs[skipped] = export_module(without_reduction(merged), variant, path, seq_len=case.seq_len)
            variants.flops[skipped] = ideal
    return variants


def quantize_variants(variants: Variants, case: Case, int8_modes: tuple[str, ...], scratch: Path, log) -> None:
    """INT8 beside FP32 for the unmerged graph and the profiled PiToMe one, so merging and
    quantization can be read apart and together, all against FP32 unmerged."""
    from exporter.variants import Conversion, Variant, convert_variant

    conversion = Conversion()
    if "static" in int8_modes:
        feeds = [variants.signature.example_inputs(8, seed=100 + i) for i in range(CALIBRATION_BATCHES)]
        conversion = Conversion([{k: v.numpy() for k, v in f.items()} for f in feeds], "seeded synthetic inputs")
    for mode in int8_modes:
        for name in ("unmerged", variants.profiled):
            log(f"  quantize {case.model} {name} to int8 ({mode})")
            quantized = name + INT8_SUFFIX[mode]
            variant = Variant(quantized, precision="int8", int8_mode=mode)
            path = scratch / f"{name}-int8-{mode}.onnx"
            variants.graphs[quantized] = convert_variant(variants.graphs[name], variant, path, conversion)
            variants.flops[quantized] = variants.flops[name]


def time_batch(
    variants: Variants, case: Case, batch: int, runs: int, threads: int, log, breakdowns: list[dict]
) -> list[dict]:
    """Every candidate at one batch size, interleaved in one run; the profiled graph's merge cost."""
    from exporter.profiling import profile_ort
    from exporter.variants import eager_call, time_graphs

    feeds = variants.signature.example_inputs(batch, seed=0)
    arrays = {k: v.numpy() for k, v in feeds.items()}
    eager = {f"eager {name}": eager_call(module, variants.signature, feeds) for name, module in variants.eager.items()}
    graphs = {f"ort {name}": path for name, path in variants.graphs.items()}
    log(f"  time {case.model} batch {batch}: {len(graphs) + len(eager)} candidates x {runs} runs")
    stats = time_graphs(graphs, arrays, batch, runs, threads, extra=eager)
    profiled = variants.profiled
    profile = profile_ort(variants.graphs[profiled], arrays, runs=5, threads=threads)
    breakdowns.append({"model": case.model, "graph": profiled, "batch": batch, **profile})
    merge = merge_cost(stats[f"ort {profiled}"], stats[f"ort {profiled} {SKIPPED}"], profile)
    rows = []
    for label, s in stats.items():
        backend, name = label.split(" ", 1)
        base = stats[f"{backend} unmerged"]
        candidate, precision = split_precision(name)
        rows.append(
            {
                "model": case.model + (f" (seq {case.seq_len})" if case.seq_len else ""),
                "backend": "onnxruntime-cpu" if backend == "ort" else "pytorch-eager",
                "candidate": candidate,
                "precision": precision,
                "batch": batch,
                "median_ms": s.median_ms,
                "p90_ms": s.p90_ms,
                "min_ms": s.min_ms,
                "cv": s.cv,
                "speedup": base.median_ms / s.median_ms,
                "speedup_min": base.min_ms / s.min_ms,
                "block_flop_ideal": variants.flops[name],
                **(merge if (backend, name) == ("ort", profiled) else {}),
            }
        )
    return rows


def merged_variants(model: torch.nn.Module, case: Case, algos: tuple[str, ...]):
    """Each algo x ratio of `case`, one at a time: (Variant, patched copy of `model`, block-FLOP ideal)."""
    from exporter.variants import Variant, variant_model
    from pipelines.jobs.benchmark import flops_summary

    for algo in algos:
        for ratio in case.ratios:
            variant = Variant(f"{algo}@{ratio}", algo, ratio)
            merged = variant_model(model, variant, case.seq_len)
            yield variant, merged, flops_summary(merged)["block_flop_speedup"]


SKIPPED = "(merge skipped)"


def merge_cost(merged, skipped, profile: dict) -> dict:
    """The merge's share of the merged graph's latency, end to end (median and fastest run) and
    as ONNX Runtime's profiler attributes kernel time (which also charges its per-node overhead)."""
    return {
        "merge_share_latency": 1.0 - skipped.median_ms / merged.median_ms,
        "merge_share_latency_min": 1.0 - skipped.min_ms / merged.min_ms,
        "merge_share": profile["merge_share"],
    }


def environment(threads: int) -> dict:
    from exporter.onnx_export import package_versions
    from exporter.runners import cpu_name

    return {"python": platform.python_version(), **package_versions(), "cpu": cpu_name(), "threads": threads}


def breakdown_markdown(breakdowns: list[dict]) -> list[str]:
    """Where the merge's time goes, by part and op type (ONNX Runtime profiler, kernel time per run)."""
    lines = []
    for b in breakdowns:
        parts = b["by_part_ms"]
        merge_ms = sum(v for k, v in parts.items() if k != "model")
        top = ", ".join(f"{name} {ms:.1f}" for name, ms in list(b["merge_by_op_ms"].items())[:8])
        lines += [
            f"- {b['model']} {b['graph']} batch {b['batch']}: kernel time {b['kernel_ms_per_run']:.1f} ms per run, "
            f"merge {merge_ms:.1f} ms = {b['merge_share']:.1%} ({b['merge_nodes_per_run']} merge nodes; assign "
            f"{parts.get('assign', 0):.1f} ms, combine {parts.get('combine', 0):.1f} ms). Largest (ms): {top}.",
        ]
    return ["", "## Merge breakdown", "", *lines] if lines else []


def markdown(rows: list[dict], env: dict, command: str, seconds: float, breakdowns: list[dict] = ()) -> str:
    lines = [
        "# Latency: merged vs unmerged",
        "",
        f"`{command}` ({seconds / 60:.1f} min). Random-init weights (latency does not depend on them).",
        f"CPU {env['cpu']}, {env['threads']} threads (torch and ONNX Runtime intra-op), ORT spinning off; "
        + ", ".join(f"{k} {v}" for k, v in env.items() if k not in ("cpu", "threads")),
        "",
        "Candidates of one model and batch size were timed in one interleaved run (median and p90 of the",
        "runs after warm-up); speed-up = FP32 unmerged median / candidate median on the same backend, next",
        "to the block-FLOP ideal from the schedule (attention at the tokens entering a block, MLP after its",
        "merge). int8 = ONNX Runtime dynamic quantization, int8 static = QDQ calibrated on seeded synthetic",
        "inputs with the FFN down-projections FP32; the merge is FP32 in both. `(merge skipped)` = the",
        "same graph with every merge step replaced by keeping the first N - r tokens: the schedule's shapes",
        "without the merge's work. `merge, latency` = 1 - skipped / merged (median; fastest run in",
        "brackets): what the merge costs end to end. `merge, profiled` = the merge nodes' share of ORT",
        "kernel time, which also charges the profiler's per-node overhead to the merge's many small nodes.",
        "",
        "| model | backend | candidate | precision | batch | median ms | p90 ms | cv | speed-up | (by min) | FLOP ideal "
        "| merge, latency | merge, profiled |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        latency = (
            f"{r['merge_share_latency']:.1%} ({r['merge_share_latency_min']:.1%})"
            if r.get("merge_share") is not None
            else ""
        )
        profiled = f"{r['merge_share']:.1%}" if r.get("merge_share") is not None else ""
        lines.append(
            f"| {r['model']} | {r['backend']} | {r['candidate']} | {r['precision']} | {r['batch']} | {r['median_ms']:.1f} | "
            f"{r['p90_ms']:.1f} | {r['cv']:.1%} | {r['speedup']:.2f}x | {r['speedup_min']:.2f}x | "
            f"{r['block_flop_ideal']:.2f}x | {latency} | {profiled} |"
        )
    lines += breakdown_markdown(list(breakdowns))
    return "\n".join(lines) + "\n"


def _int8_modes(text: str) -> tuple[str, ...]:
    modes = tuple(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))
    unknown = [m for m in modes if m not in INT8_SUFFIX]
    if unknown or not modes:
        raise argparse.ArgumentTypeError(f"expected dynamic, static or both, got {text!r}")
    return modes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.latency", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="deit_small b8 r0.9 and bert_base seq128 b8 r0.7")
    parser.add_argument("--runs", type=positive_int, default=20)
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--models", nargs="+", default=None, help="only these models of the grid")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for the .md/.json results (default results/quick or results/full)",
    )
    parser.add_argument("--int8-modes", type=_int8_modes, default=("dynamic",),
                        help="INT8 graphs to time: dynamic, static or dynamic,static (default dynamic)")  # fmt: skip
    args = parser.parse_args(argv)
    from rich.console import Console

    console = Console()
    torch.set_num_threads(args.threads)
    cases = QUICK if args.quick else FULL
    unknown = sorted(set(args.models or ()) - {case.model for case in cases})
    if unknown:
        parser.error(f"not in the grid: {', '.join(unknown)}")
    cases = tuple(case for case in cases if args.models is None or case.model in args.models)
    out = args.out or (RESULTS / ("quick" if args.quick else "full"))
    env = environment(args.threads)
    command = shlex.join(["python", "-m", "benchmarks.latency", *(argv if argv is not None else sys.argv[1:])])
    start = time.perf_counter()
    rows: list[dict] = []
    breakdowns: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="pitome-bench-") as scratch:
        for i, case in enumerate(cases):
            folder = Path(scratch) / str(i)
            folder.mkdir()
            case_start, case_breakdowns = time.perf_counter(), []
            case_rows = run_case(case, args.runs, args.threads, folder, console.print, case_breakdowns, args.int8_modes)
            rows, breakdowns = rows + case_rows, breakdowns + case_breakdowns
            if not args.quick or args.models:  # each case's table as soon as measured: a long run keeps its parts
                stem = case.model + (f"_seq{case.seq_len}" if case.seq_len else "")
                elapsed = time.perf_counter() - case_start
                write_results(
                    out,
                    stem,
                    markdown(case_rows, env, command, elapsed, case_breakdowns),
                    command,
                    env,
                    case_rows,
                    case_breakdowns,
                )
    text = markdown(rows, env, command, time.perf_counter() - start, breakdowns)
    if args.models is None:
        write_results(out, "latency", text, command, env, rows, breakdowns)
    console.print(text)
    return 0


def write_results(
    out: Path, stem: str, text: str, command: str, env: dict, rows: list[dict], breakdowns: list[dict]
) -> None:
    """`<stem>.md` and `<stem>.json` in `out`, each written whole or not at all."""
    from exporter.atomic import atomic_write_text

    record = {"command": command, "environment": env, "rows": rows, "merge_breakdown": breakdowns}
    atomic_write_text(out / f"{stem}.md", text)
    atomic_write_text(out / f"{stem}.json", json.dumps(record, indent=2))


if __name__ == "__main__":
    sys.exit(main())
