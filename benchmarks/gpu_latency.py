"""GPU latency harness: merged (PiToMe, ToMe) vs unmerged in PyTorch on CUDA, batch 1, 8 and 64.

    python -m benchmarks.gpu_latency                      # the grid of benchmarks.latency, on CUDA
    python -m benchmarks.gpu_latency --models deit_small --batches 64
    python -m benchmarks.gpu_latency --merge-impls fused --no-merge-share

The CPU harness (benchmarks.latency) times exported graphs in ONNX Runtime; this one times the
patched PyTorch modules where ML engineers often serve them first: on the GPU, FP32 and FP16
(autocast), each both as plain eager calls and replayed as a CUDA graph. The frozen schedule makes
every shape static, so a merged model captures like any other; eager calls show what the merge's
small kernels cost in launches, the graph what it costs on the GPU itself. Each merged variant
runs with the decomposed merge (`<algo>@<ratio>`, ~50 small kernels per merging layer) and the
fused one (`... fused`, one Triton kernel per layer: `ops.kernels`), beside the same model with
every merge step replaced by keeping the first N - r tokens (`... (merge skipped)`): the merge's
share of the merged model's time is 1 - skipped / merged (in graph mode: of its GPU time). Every candidate of a
model and batch size runs in one interleaved series (synchronised wall time per call); speed-up =
unmerged median / candidate median in the same precision and mode, beside the block-FLOP ideal.
`--device cpu` runs the eager FP32 part on the CPU (a smoke test; the CPU figures that matter come
from benchmarks.latency).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import platform
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.latency import ALGOS, FULL, RESULTS, SKIPPED, merged_variants
from ops.reduction import without_reduction
from pipelines.jobs.options import positive_int

MODES = ("eager", "graph")
PRECISIONS = ("fp32", "fp16")
MERGE_IMPLS = ("decomposed", "fused")


def _runner(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], half: bool, mode: str) -> Callable[[], None]:
    """A no-argument call of `module` on `inputs`: autocast to FP16 if `half`, a CUDA graph replay if `mode` is "graph"."""
    device_type = inputs[0].device.type

    def call() -> None:
        autocast = (
            torch.autocast(device_type, dtype=torch.float16, cache_enabled=False) if half else contextlib.nullcontext()
        )
        with torch.no_grad(), autocast:
            module(*inputs)

    if mode == "eager":
        return call
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
        for _ in range(3):
            call()
    torch.cuda.current_stream().wait_stream(side)
    captured = torch.cuda.CUDAGraph()
    with torch.cuda.graph(captured):
        call()
    return captured.replay


def _timed(run: Callable[[], None], device: torch.device) -> Callable[[], float]:
    """`run` as a candidate of `time_interleaved`: returns its own synchronised wall time in ms."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def call() -> float:
        sync()
        start = time.perf_counter()
        run()
        sync()
        return (time.perf_counter() - start) * 1000.0

    return call


def model_variants(model, case, algos: tuple[str, ...], impls: tuple[str, ...], merge_share: bool):
    """{candidate name: (module, block-FLOP ideal, decomposed variant it belongs to)}: unmerged, then
    each algo@ratio with every merge implementation, and its merge-skipped twin if `merge_share`."""
    from exporter.variants import variant_model

    variants = {"unmerged": (model, 1.0, None)}
    for variant, merged, ideal in merged_variants(model, case, algos):
        name = variant.name
        for impl in impls:
            fused = impl == "fused"
            module = (
                variant_model(model, dataclasses.replace(variant, lowering="fused"), case.seq_len) if fused else merged
            )
            variants[f"{name} fused" if fused else name] = (module, ideal, name)
        if merge_share:
            variants[f"{name} {SKIPPED}"] = (without_reduction(merged), ideal, name)
    return variants


def merge_share(stats: dict, candidate: str, base: str, flavour: str) -> float | None:
    """The merge's share of `candidate`'s median time: 1 - (its merge-skipped twin) / (it), or None."""
    skipped = stats.get(f"{flavour} {base} {SKIPPED}")
    if base is None or skipped is None or candidate.endswith(SKIPPED):
        return None
    return 1.0 - skipped.median_ms / stats[f"{flavour} {candidate}"].median_ms


def run_model(
    case,
    batches: tuple[int, ...],
    flavours: list[tuple[str, str]],
    algos: tuple[str, ...],
    runs: int,
    device: torch.device,
    log,
    impls: tuple[str, ...] = ("decomposed",),
    with_share: bool = False,
) -> list[dict]:
    """Every batch size of one model of the grid: all variants x `flavours` (precision, mode), interleaved."""
    from exporter.latency import time_interleaved
    from exporter.signatures import ExportWrapper, signature_of
    from pipelines.models.registry import load_model, resolve

    spec = resolve(case.model)
    model, _ = load_model(spec, random_init=True)
    signature = signature_of(model, case.seq_len)
    variants = model_variants(model, case, algos, impls, with_share)
    modules = {name: ExportWrapper(m, signature).eval().to(device) for name, (m, _, _) in variants.items()}
    rows = []
    for batch in batches:
        feeds = signature.example_inputs(batch, seed=0)
        inputs = tuple(feeds[name].to(device) for name in signature.input_names)
        candidates = {}
        for precision, mode in flavours:
            for name, module in modules.items():
                run = _runner(module, inputs, half=precision == "fp16", mode=mode)
                candidates[f"{precision} {mode} {name}"] = _timed(run, device)
        label = case.model + (f" seq {case.seq_len}" if case.seq_len else "")
        log(f"  time {label} batch {batch}: {len(candidates)} candidates x {runs} runs")
        stats = time_interleaved(candidates, batch, runs=runs, warmup=5)
        for key, s in stats.items():
            precision, mode, name = key.split(" ", 2)
            base = stats[f"{precision} {mode} unmerged"]
            rows.append(
                {
                    "model": case.model + (f" (seq {case.seq_len})" if case.seq_len else ""),
                    "backend": f"pytorch-{device.type}",
                    "precision": precision,
                    "mode": mode,
                    "candidate": name,
                    "batch": batch,
                    "median_ms": s.median_ms,
                    "p90_ms": s.p90_ms,
                    "min_ms": s.min_ms,
                    "cv": s.cv,
                    "throughput": s.throughput,
                    "speedup": base.median_ms / s.median_ms,
                    "block_flop_ideal": variants[name][1],
                    "merge_impl": "fused" if name.endswith(" fused") else None if name == "unmerged" else "decomposed",
                    "merge_share": merge_share(stats, name, variants[name][2], f"{precision} {mode}"),
                }
            )
        del candidates  # frees the captured graphs' memory before the next batch size
    return rows


def environment(device: torch.device) -> dict:
    from exporter.onnx_export import package_versions
    from exporter.runners import device_name

    return {
        "python": platform.python_version(),
        **package_versions(),
        "device": device_name(device),
        "cuda": torch.version.cuda,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "triton": _triton_version(),
    }


def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "not installed"
    return triton.__version__


def markdown(rows: list[dict], env: dict, command: str, seconds: float) -> str:
    """One line per model, batch, precision and mode: unmerged ms, then each merged variant's speed-up."""
    lines = [
        "# GPU latency: merged vs unmerged, PyTorch",
        "",
        f"`{command}` ({seconds / 60:.1f} min). Random-init weights (latency does not depend on them).",
        "Device " + ", ".join(f"{k} {v}" for k, v in env.items()) + ".",
        "",
        "Cells: speed-up over unmerged in the same precision and mode (median of synchronised wall time per",
        "call, all candidates of a model and batch interleaved); `eager` = plain calls, `graph` = CUDA graph",
        "replay; fp16 = autocast. The FLOP-ideal line is the schedule's block-FLOP speed-up.",
        "",
    ]
    by_model: dict[str, list[dict]] = {}
    for r in rows:
        by_model.setdefault(r["model"], []).append(r)
    for model, model_rows in by_model.items():
        present = list(dict.fromkeys(r["candidate"] for r in model_rows if r["candidate"] != "unmerged"))
        ideal = {r["candidate"]: r["block_flop_ideal"] for r in model_rows}
        lines += [
            f"## {model}",
            "",
            "| batch | precision | mode | unmerged ms | " + " | ".join(present) + " |",
            "|---:|---|---|---:|" + "---:|" * len(present),
            "| | | FLOP ideal | | " + " | ".join(f"{ideal[n]:.2f}x" for n in present) + " |",
        ]
        keys = list(dict.fromkeys((r["batch"], r["precision"], r["mode"]) for r in model_rows))
        for batch, precision, mode in keys:
            cell = {
                r["candidate"]: r
                for r in model_rows
                if (r["batch"], r["precision"], r["mode"]) == (batch, precision, mode)
            }
            lines.append(
                f"| {batch} | {precision} | {mode} | {cell['unmerged']['median_ms']:.2f} | "
                + " | ".join(f"{cell[n]['speedup']:.2f}x" for n in present)
                + " |"
            )
        lines += ["", *_share_lines(model_rows)]
    return "\n".join(lines)


def _share_lines(model_rows: list[dict]) -> list[str]:
    """The merge's share of each merged candidate's time, one line per batch/precision/mode (if measured)."""
    shared = [r for r in model_rows if r.get("merge_share") is not None]
    if not shared:
        return []
    lines = ["Merge share of the merged model's time (1 - merge-skipped / merged; graph mode = GPU time):", ""]
    for key in dict.fromkeys((r["batch"], r["precision"], r["mode"]) for r in shared):
        cells = [
            f"{r['candidate']} {100 * r['merge_share']:.1f}%"
            for r in shared
            if (r["batch"], r["precision"], r["mode"]) == key
        ]
        lines.append(f"- batch {key[0]} {key[1]} {key[2]}: " + ", ".join(cells))
    return [*lines, ""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_latency", description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=None, help="only these models of the grid")
    parser.add_argument("--ratios", nargs="+", type=float, default=None, help="these ratios instead of the grid's")
    parser.add_argument("--seq-lens", nargs="+", type=positive_int, default=None, help="only these text lengths")
    parser.add_argument("--algos", nargs="+", choices=ALGOS, default=list(ALGOS))
    parser.add_argument("--batches", nargs="+", type=positive_int, default=[1, 8, 64])
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=None, help="default: all")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=None, help="default: all")
    parser.add_argument("--runs", type=positive_int, default=50)
    parser.add_argument("--merge-impls", nargs="+", choices=MERGE_IMPLS, default=None,
                        help="merge implementations per merged variant (default: both on CUDA, decomposed on CPU)")  # fmt: skip
    parser.add_argument("--no-merge-share", dest="merge_share", action="store_false",
                        help="skip the merge-skipped twins that measure the merge's share of the time")  # fmt: skip
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--out", type=Path, default=RESULTS / "gpu", help="folder for gpu_latency.md/.json")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.models or ()) - {case.model for case in FULL})
    if unknown:
        parser.error(f"not in the grid: {', '.join(unknown)}")
    if args.ratios is not None and not all(0.0 < r <= 1.0 for r in args.ratios):
        parser.error("--ratios must lie in (0, 1]")
    if args.device == "cpu":
        if set(args.precisions or ["fp32"]) != {"fp32"} or set(args.modes or ["eager"]) != {"eager"}:
            parser.error("--device cpu times fp32 eager only")
        if "fused" in (args.merge_impls or ()):
            parser.error("--merge-impls fused runs the Triton kernels on CUDA: not with --device cpu")
        args.merge_impls = args.merge_impls or ["decomposed"]
        flavours = [("fp32", "eager")]
    else:
        if not torch.cuda.is_available():
            parser.exit(4, "error: no CUDA device visible to PyTorch (use --device cpu for a CPU smoke run)\n")
        flavours = [(p, m) for p in args.precisions or PRECISIONS for m in args.modes or MODES]
        args.merge_impls = args.merge_impls or list(MERGE_IMPLS)
    from rich.console import Console

    from benchmarks.latency import write_results

    console = Console()
    device = torch.device(args.device)
    cases = tuple(
        case if args.ratios is None else dataclasses.replace(case, ratios=tuple(args.ratios))
        for case in FULL
        if (args.models is None or case.model in args.models)
        and (args.seq_lens is None or case.seq_len is None or case.seq_len in args.seq_lens)
    )
    env = environment(device)
    command = shlex.join(["python", "-m", "benchmarks.gpu_latency", *(argv if argv is not None else sys.argv[1:])])
    start = time.perf_counter()
    rows: list[dict] = []
    for case in cases:
        rows += run_model(
            case, tuple(args.batches), flavours, tuple(args.algos), args.runs, device, console.print,
            tuple(args.merge_impls), args.merge_share,
        )  # fmt: skip
        text = markdown(rows, env, command, time.perf_counter() - start)
        write_results(
            args.out, "gpu_latency", text, command, env, rows, []
        )  # after each model: a long run keeps its parts
    console.print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
