"""`pitome-export`: the command line. A thin layer over the library; heavy imports stay lazy.

pitome-export MODEL [--ratio R | --schedule 19,17,...] [--algo pitome|tome] [--target onnx|trt]
pitome-export sweep MODEL [--ratios 0.95,0.9] [--algos pitome,tome]
pitome-export tune MODEL --max-drop 0.5 [--precision fp32,int8] [--time-budget MIN]
pitome-export finetune MODEL (--ratio R | --schedule S | --from-tune DIR) --data D [--epochs N]
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
INTERRUPTED = {  # what an interrupted command leaves, by command
    None: "nothing partial was left behind",
    "finetune": "no output folder was written; the training checkpoint is kept: run the same command to resume",
}
SUBCOMMANDS = ("export", "sweep", "tune", "finetune", "schedule", "inspect", "env")

EPILOG = """exit codes: 0 ok, 2 usage or input error, 3 parity failure (finetune: also a loss that is not finite),
4 missing backend (TensorRT, CUDA), 130 interrupted. Run `pitome-export MODEL ...` (same as `pitome-export export MODEL ...`)."""


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("pitome-export")
    except metadata.PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    """The `pitome-export` parser; the export, sweep and schedule flags come from the jobs' declarations."""
    from pipelines.jobs.export_job import ExportJob
    from pipelines.jobs.finetune.job import FinetuneJob
    from pipelines.jobs.options import add_options
    from pipelines.jobs.sweep import SweepJob
    from pipelines.jobs.tune.job import TuneJob

    parser = argparse.ArgumentParser(
        prog="pitome-export", description="Export token-merged (PiToMe/ToMe) transformers to ONNX.", epilog=EPILOG
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(SUBCOMMANDS) + "}")

    export = sub.add_parser("export", help="export, validate and benchmark a merged model", epilog=EPILOG)
    add_options(export, ExportJob, "export")
    sweep = sub.add_parser("sweep", help="grid of algos x ratios: accuracy (or agreement) vs throughput plot")
    add_options(sweep, SweepJob, "sweep")
    tune = sub.add_parser("tune", help="the fastest export within an accuracy budget (Optuna search)", epilog=EPILOG)
    add_options(tune, TuneJob, "tune")
    finetune = sub.add_parser(
        "finetune", help="distil the merged model from the unmerged one on training data, then export it",
        description="Fine-tune the merged model (the student, patched with its frozen schedule) against the "
        "unmerged original (the teacher) on the training split of --data, then export and check it like "
        "`pitome-export export`. Re-running the same command resumes an interrupted run; under "
        "`accelerate launch` or `torchrun` it trains data-parallel.", epilog=EPILOG,
    )  # fmt: skip
    add_options(finetune, FinetuneJob, "finetune")
    schedule = sub.add_parser("schedule", help="print the per-layer token schedule and block FLOPs")
    add_options(schedule, ExportJob, "schedule")

    inspect = sub.add_parser("inspect", help="op census, metadata and TensorRT compatibility of an ONNX file")
    inspect.add_argument("onnx_file")

    sub.add_parser("env", help="versions, devices and threads for bug reports")
    return parser


def off_the_main_process() -> bool:
    """Whether a launcher (`torchrun`, `accelerate launch`) started this process beside the main
    one (RANK 0): it trains its shard quietly and leaves the console to the main process; its
    errors still reach stderr."""
    return os.environ.get("RANK", "0") != "0"


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

    from pipelines.jobs import interrupts

    console = Console(quiet=off_the_main_process())
    try:
        with interrupts.watching():
            return _dispatch(args, console)
    except KeyboardInterrupt:
        # Cleanup has run (temporary folders are removed as the interrupt unwinds). Leave at once,
        # ignoring further interrupts: a second one during interpreter shutdown (library threads
        # being joined) would otherwise end the process by signal instead of with code 130.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        print(f"pitome-export: interrupted; {INTERRUPTED.get(args.command, INTERRUPTED[None])}", file=sys.stderr,
              flush=True)  # fmt: skip
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


def _dispatch(args: argparse.Namespace, console) -> int:
    if args.command == "env":
        from pipelines.cli.env_info import print_env

        print_env(console)
    elif args.command == "schedule":
        from pipelines.cli.schedule_table import print_schedule

        ratio = args.ratio if args.schedule is None else None
        print_schedule(args.model, args.algo, ratio, args.schedule, args.seq_len, console)
    elif args.command == "sweep":
        from pipelines.jobs.options import job_fields
        from pipelines.jobs.sweep import SweepJob, run_sweep

        run_sweep(SweepJob(**job_fields(args, SweepJob, "sweep")), console)
    elif args.command == "tune":
        from pipelines.jobs.options import job_fields
        from pipelines.jobs.tune.job import TuneJob, run_tune

        run_tune(TuneJob(**job_fields(args, TuneJob, "tune")), console)
    elif args.command == "finetune":
        from pipelines.jobs.finetune.job import FinetuneJob, run_finetune
        from pipelines.jobs.options import job_fields

        run_finetune(FinetuneJob(**job_fields(args, FinetuneJob, "finetune")), console)
    elif args.command == "inspect":
        from pipelines.cli.inspect_graph import print_inspection

        print_inspection(args.onnx_file, console)
    else:
        from pipelines.jobs.export_job import ExportJob, check_merge_impl, check_target, run_job
        from pipelines.jobs.options import job_fields

        check_target(args.target)  # before any heavy import: missing backends fail in well under 5 s
        check_merge_impl(args.lowering)
        run_job(ExportJob(**job_fields(args, ExportJob, "export")), console)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
