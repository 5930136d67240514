"""`pitome-export`: the command line. A thin layer over the library; heavy imports stay lazy.

pitome-export MODEL [--ratio R | --schedule 19,17,...] [--algo pitome|tome] [--target onnx|trt]
pitome-export schedule MODEL --ratio R
pitome-export inspect model.onnx
pitome-export env
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

EXIT_OK, EXIT_USAGE, EXIT_PARITY, EXIT_BACKEND, EXIT_INTERRUPTED = 0, 2, 3, 4, 130
SUBCOMMANDS = ("export", "sweep", "tune", "schedule", "inspect", "env")

EPILOG = """exit codes: 0 ok, 2 usage or input error, 3 parity failure, 4 missing backend (TensorRT, CUDA),
130 interrupted. Run `pitome-export MODEL ...` (same as `pitome-export export MODEL ...`)."""


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("pitome-export")
    except metadata.PackageNotFoundError:
        return "unknown"


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"ratio must be a number, got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"ratio must be in (0, 1], got {value}")
    return value


def _schedule(text: str) -> list[int]:
    from ops.errors import ScheduleError
    from ops.schedule import parse_schedule

    try:
        return parse_schedule(text)
    except ScheduleError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1], got {value}")
    return value


def _points(text: str) -> float:
    """argparse type: a finite number of accuracy points >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of points >= 0, got {text!r}") from None
    if not 0.0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of points >= 0, got {text}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1, or a one-line usage error."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _add_merge_flags(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    group = parser.add_argument_group("merging")
    group.add_argument("--algo", choices=("pitome", "tome"), default="pitome", help="merge algorithm")
    which = group.add_mutually_exclusive_group()
    which.add_argument("--ratio", type=_ratio, default=None, help="fraction of tokens kept per layer (default 0.9)")
    which.add_argument("--schedule", type=_schedule, default=None, help="explicit tokens merged per layer: 19,17,...")
    group.add_argument("--seq-len", type=positive_int, default=None, help="fixed sequence length for text models")
    return group


def _float_list(text: str) -> list[float]:
    return [_ratio(part) for part in text.split(",")]


def _algo_list(text: str) -> list[str]:
    algos = text.split(",")
    for algo in algos:
        if algo not in ("pitome", "tome"):
            raise argparse.ArgumentTypeError(f"unknown algo {algo!r}; choose from pitome, tome")
    return algos


def _add_model_flags(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model")
    model.add_argument("model", help="short name (deit_small, bert_base, ...), timm name or HF id")
    model.add_argument("--checkpoint", help="local weights: timm .pth/.safetensors or a HF model folder")
    model.add_argument("--random-init", action="store_true", help="random weights (reports say so first)")


def _add_run_flags(parser: argparse.ArgumentParser, merging: argparse._ArgumentGroup) -> dict:
    """Flags shared by export and sweep: prop-attn, lowering, data, benchmark and output."""
    merging.add_argument("--prop-attn", dest="prop_attn", action="store_true", default=None,
                         help="proportional attention (default: off for pitome, on for tome)")  # fmt: skip
    merging.add_argument("--no-prop-attn", dest="prop_attn", action="store_false")
    out = parser.add_argument_group("export")
    out.add_argument("--merge-impl", dest="lowering", choices=("matmul", "scatter", "plugin", "fused"),
                     default="matmul", help="merge lowering: one-hot MatMul (default, plugin-free), ScatterElements "
                     "add, one pitome::TokenMerge node per layer for the TensorRT plugin, or fused: those nodes and "
                     "the PyTorch model on CUDA running the fused Triton merge kernels (export only)")  # fmt: skip
    out.add_argument("--opset", type=int, default=20, choices=range(18, 21), metavar="{18,19,20}")
    validation = parser.add_argument_group("validation")
    validation.add_argument("--device", choices=("cpu", "cuda"), default=None, help="PyTorch reference device")
    validation.add_argument("--data", help="labelled data for accuracy: image folder (class/*.jpg), "
                            "Fashion-MNIST IDX folder, or text .csv/.jsonl with text,label")  # fmt: skip
    validation.add_argument("--limit", type=positive_int, default=None, help="use N samples of --data (seeded)")
    bench = parser.add_argument_group("benchmark")
    bench.add_argument("--batch", type=positive_int, default=8, help="benchmark batch size (default 8)")
    bench.add_argument("--runs", type=positive_int, default=20, help="timed runs per candidate (default 20)")
    bench.add_argument("--threads", type=positive_int, default=2, help="intra-op threads, torch and ORT (default 2)")
    output = parser.add_argument_group("output")
    output.add_argument("-o", "--out", help="output folder (default under artifacts/)")
    output.add_argument("--force", action="store_true", help="replace an existing output folder")
    return {"export": out, "benchmark": bench}


def _precision_list(text: str) -> list[str]:
    precisions = text.split(",")
    for precision in precisions:
        if precision not in ("fp32", "fp16", "int8"):
            raise argparse.ArgumentTypeError(f"unknown precision {precision!r}; choose from fp32, fp16, int8")
    return precisions


def _minutes(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of minutes, got {text!r}") from None
    if not 0.0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of minutes, got {text}")
    return value


def _add_tune_parser(sub) -> None:
    tune = sub.add_parser("tune", help="the fastest export within an accuracy budget (Optuna search)", epilog=EPILOG)
    _add_model_flags(tune)
    budget = tune.add_argument_group("budget and search")
    budget.add_argument("--max-drop", type=_points, default=0.5, metavar="POINTS",
                        help="top-1 points the export may lose against the unmerged FP32 model (default 0.5)")  # fmt: skip
    budget.add_argument("--data", help="labelled data: its test split scores the chosen export (default: the data "
                        "a shipped model names)")  # fmt: skip
    budget.add_argument("--tune-data", help="labelled tuning split (default: the data set's training split, or a "
                        "seeded half of --data held out from the other half)")  # fmt: skip
    budget.add_argument("--tune-samples", type=positive_int, default=5000, help="tuning samples (default 5000)")
    budget.add_argument("--limit", type=positive_int, default=None, help="score the chosen export on N test samples")
    budget.add_argument("--algos", type=_algo_list, default=["pitome", "tome"], help="algorithms searched")
    budget.add_argument("--precision", dest="precisions", type=_precision_list, default=["fp32"],
                        help="precisions searched, e.g. fp32,int8 (int8 searches dynamic and static)")  # fmt: skip
    budget.add_argument("--trials", type=positive_int, default=40, help="completed trials in the study (default 40)")
    budget.add_argument("--time-budget", type=_minutes, default=None, metavar="MIN",
                        help="minutes for the whole command; the search stops in time for the final export")  # fmt: skip
    budget.add_argument("--objective", choices=("latency", "flops"), default="latency",
                        help="what the search maximises within the budget: measured speed-up or block FLOPs")  # fmt: skip
    budget.add_argument("--storage", metavar="URL", help="Optuna storage shared by workers (default: a SQLite file "
                        "beside the output folder; re-running resumes)")  # fmt: skip
    budget.add_argument("--search-only", action="store_true", help="a worker: add trials to the study, write no folder")
    budget.add_argument("--seq-len", type=positive_int, default=None, help="fixed sequence length for text models")
    export = tune.add_argument_group("export")
    export.add_argument("--target", choices=("onnx", "trt"), default="onnx")
    export.add_argument("--opset", type=int, default=20, choices=range(18, 21), metavar="{18,19,20}")
    bench = tune.add_argument_group("benchmark")
    bench.add_argument("--batch", type=positive_int, default=8, help="benchmark batch size (default 8)")
    bench.add_argument("--runs", type=positive_int, default=20, help="timed runs per trial (default 20)")
    bench.add_argument("--threads", type=positive_int, default=2, help="intra-op threads, torch and ORT (default 2)")
    output = tune.add_argument_group("output")
    output.add_argument("-o", "--out", help="output folder (default artifacts/MODEL-tune)")
    output.add_argument("--force", action="store_true", help="replace an existing output folder")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pitome-export", description="Export token-merged (PiToMe/ToMe) transformers to ONNX.", epilog=EPILOG
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="{export,sweep,tune,schedule,inspect,env}")

    export = sub.add_parser("export", help="export, validate and benchmark a merged model", epilog=EPILOG)
    _add_model_flags(export)
    merging = _add_merge_flags(export)
    groups = _add_run_flags(export, merging)
    groups["export"].add_argument("--target", choices=("onnx", "trt"), default="onnx")
    groups["export"].add_argument("--static-batch", action="store_true", help="fix the batch dimension")
    precision = export.add_argument_group("precision")
    precision.add_argument("--precision", choices=("fp32", "fp16", "bf16", "int8"), default="fp32",
                           help="graph precision; the merge subgraph stays FP32 in every one (default fp32; "
                           "bf16 only for --target trt)")  # fmt: skip
    precision.add_argument("--int8-mode", choices=("dynamic", "static"), default=None,
                           help="INT8 by run-time activation scales (dynamic, the CPU default) or calibrated "
                           "QDQ (static; what TensorRT builds from)")  # fmt: skip
    precision.add_argument("--int8-ffn-out", choices=("fp32", "int8"), default=None,
                           help="precision of the FFN down-projections (the MatMuls after GELU) in an INT8 graph "
                           "(default: fp32 in static INT8, whose symmetric scales lose accuracy on post-GELU "
                           "activations; int8 in dynamic)")  # fmt: skip
    precision.add_argument("--calibration", metavar="DIR|FILE|N", default=None,
                           help="static INT8 calibration data: an image/IDX folder, a text file, a packaged data "
                           "set (fashion-mnist:train), or N samples of the model's own training data")  # fmt: skip
    precision.add_argument("--max-accuracy-drop", type=_points, default=0.5, metavar="POINTS",
                           help="acceptance with labelled data (--data, or the data a shipped model names): top-1 "
                           "within POINTS of the FP32 merged graph on the same samples (default 0.5)")  # fmt: skip
    precision.add_argument("--min-mean-cosine", type=_fraction, default=0.99, metavar="F",
                           help="acceptance without labels: mean logit cosine with FP32 merged (default 0.99)")  # fmt: skip
    precision.add_argument("--min-cosine", type=_fraction, default=0.98, metavar="F",
                           help="acceptance without labels: worst sample's logit cosine (default 0.98)")  # fmt: skip
    precision.add_argument("--min-top1-agreement", type=_fraction, default=None, metavar="F",
                           help="also gate top-1 agreement with FP32 merged (reported, not gated by default)")  # fmt: skip
    precision.add_argument("--min-decision-agreement", type=_fraction, default=None, metavar="F",
                           help="also gate per-layer merge-decision agreement (reported, not gated by default)")  # fmt: skip
    groups["benchmark"].add_argument("--no-bench", dest="bench", action="store_false", help="skip the latency stage")
    groups["benchmark"].add_argument("--ort-provider", choices=("cpu", "cuda", "tensorrt"), default="cpu",
                                     help="ONNX Runtime execution provider for parity and latency (cuda, tensorrt: "
                                     "onnxruntime-gpu)")  # fmt: skip
    trt = export.add_argument_group("tensorrt (--target trt)")
    trt.add_argument(
        "--min-batch", type=positive_int, default=1, help="optimisation profile: smallest batch (default 1)"
    )
    trt.add_argument("--opt-batch", type=positive_int, default=8, help="batch the engine is tuned for (default 8)")
    trt.add_argument("--max-batch", type=positive_int, default=64, help="largest batch (default 64)")
    trt.add_argument("--workspace", type=positive_int, default=4096, metavar="MiB", help="builder workspace limit")
    trt.add_argument("--timing-cache", metavar="FILE", help="timing cache read before and written after each build")

    sweep = sub.add_parser("sweep", help="grid of algos x ratios: accuracy (or agreement) vs throughput plot")
    _add_model_flags(sweep)
    merging = sweep.add_argument_group("merging")
    merging.add_argument("--ratios", type=_float_list, default=[0.975, 0.95, 0.925, 0.9], help="e.g. 0.95,0.9")
    merging.add_argument("--algos", type=_algo_list, default=["pitome", "tome"], help="e.g. pitome,tome")
    merging.add_argument("--seq-len", type=positive_int, default=None, help="fixed sequence length for text models")
    _add_run_flags(sweep, merging)

    _add_tune_parser(sub)

    schedule = sub.add_parser("schedule", help="print the per-layer token schedule and block FLOPs")
    schedule.add_argument("model")
    _add_merge_flags(schedule)

    inspect = sub.add_parser("inspect", help="op census, metadata and TensorRT compatibility of an ONNX file")
    inspect.add_argument("onnx_file")

    sub.add_parser("env", help="versions, devices and threads for bug reports")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-") and argv[0] not in SUBCOMMANDS:
        argv.insert(0, "export")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    from rich.console import Console

    from pipelines import interrupts

    console = Console()
    try:
        with interrupts.watching():
            return _dispatch(args, console)
    except KeyboardInterrupt:
        # Cleanup has run (temporary folders are removed as the interrupt unwinds). Leave at once,
        # ignoring further interrupts: a second one during interpreter shutdown (library threads
        # being joined) would otherwise end the process by signal instead of with code 130.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        print("pitome-export: interrupted; nothing partial was left behind", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(EXIT_INTERRUPTED)
    except Exception as exc:  # noqa: BLE001 - the CLI edge: one line per known error, else re-raise
        code = _exit_code(exc)
        if code is None:
            raise
        print(f"pitome-export: error: {exc}", file=sys.stderr)  # one unwrapped line
        return code


def _exit_code(exc: Exception) -> int | None:
    from exporter.errors import MissingBackendError, ParityError
    from ops.errors import PitomeError

    if isinstance(exc, MissingBackendError):
        return EXIT_BACKEND
    if isinstance(exc, ParityError):
        return EXIT_PARITY
    if isinstance(exc, PitomeError):
        return EXIT_USAGE
    return None


def _common(args: argparse.Namespace) -> dict:
    """Job fields that export and sweep share, from their shared flags."""
    return {
        "prop_attn": args.prop_attn,
        "lowering": args.lowering,
        "checkpoint": args.checkpoint,
        "random_init": args.random_init,
        "seq_len": args.seq_len,
        "opset": args.opset,
        "out": args.out,
        "force": args.force,
        "device": args.device,
        "bench_batch": args.batch,
        "bench_runs": args.runs,
        "threads": args.threads,
        "data": args.data,
        "limit": args.limit,
    }


def _dispatch(args: argparse.Namespace, console) -> int:
    if args.command == "env":
        from pipelines.env_info import print_env

        print_env(console)
    elif args.command == "schedule":
        from pipelines.schedule_table import print_schedule

        print_schedule(args.model, args.algo, args.ratio, args.schedule, args.seq_len, console)
    elif args.command == "sweep":
        from pipelines.sweep import SweepJob, run_sweep

        run_sweep(SweepJob(model=args.model, ratios=args.ratios, algos=args.algos, **_common(args)), console)
    elif args.command == "tune":
        from pipelines.tune.job import TuneJob, run_tune

        fields = ("checkpoint", "random_init", "data", "tune_data", "tune_samples", "limit", "algos", "precisions",
                  "trials", "time_budget", "objective", "storage", "search_only", "seq_len", "target", "opset",
                  "out", "force", "threads")  # fmt: skip
        run_tune(TuneJob(model=args.model, max_drop=args.max_drop, bench_batch=args.batch, bench_runs=args.runs,
                         **{name: getattr(args, name) for name in fields}), console)  # fmt: skip
    elif args.command == "inspect":
        from pipelines.inspect_graph import print_inspection

        print_inspection(args.onnx_file, console)
    else:
        from pipelines.export_job import ExportJob, check_merge_impl, check_target, run_job

        check_target(args.target)  # before any heavy import: missing backends fail in well under 5 s
        check_merge_impl(args.lowering)
        ratio = None if args.schedule is not None else (args.ratio if args.ratio is not None else 0.9)
        job = ExportJob(
            model=args.model,
            algo=args.algo,
            ratio=ratio,
            schedule=args.schedule,
            target=args.target,
            static_batch=args.static_batch,
            bench=args.bench,
            precision=args.precision,
            int8_mode=args.int8_mode,
            int8_ffn_out=args.int8_ffn_out,
            calibration=args.calibration,
            max_accuracy_drop=args.max_accuracy_drop,
            min_cosine=(args.min_mean_cosine, args.min_cosine),
            min_top1_agreement=args.min_top1_agreement,
            min_decision_agreement=args.min_decision_agreement,
            trt_batches=(args.min_batch, args.opt_batch, args.max_batch),
            workspace_mib=args.workspace,
            timing_cache=args.timing_cache,
            ort_provider=args.ort_provider,
            **_common(args),
        )
        run_job(job, console)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
