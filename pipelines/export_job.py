"""The main job: load -> patch -> export -> parity -> benchmark -> report folder.

Everything is written into a temporary folder beside the output and renamed into place at the
end, so an error or Ctrl-C never leaves a half-written artifact folder.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from exporter.atomic import atomic_write_text, make_temp_dir
from exporter.errors import MissingBackendError, ParityError
from ops.errors import PitomeError
from pipelines.models import ModelSpec, load_model, resolve

TARGETS = ("onnx", "trt")
T = TypeVar("T")


class OutputExistsError(PitomeError):
    """The output folder exists and --force was not given."""


@dataclass
class ExportJob:
    """What the user asked for; the CLI fills it from flags."""

    model: str
    algo: str = "pitome"
    ratio: float | None = 0.9
    schedule: list[int] | None = None
    prop_attn: bool | None = None
    lowering: str = "matmul"
    target: str = "onnx"
    checkpoint: str | None = None
    random_init: bool = False
    seq_len: int | None = None
    opset: int = 20
    static_batch: bool = False
    out: str | None = None
    force: bool = False
    device: str | None = None
    parity_batches: tuple[int, ...] = (1, 4)
    bench: bool = True
    bench_batch: int = 8
    bench_runs: int = 20
    data: str | None = None
    limit: int | None = None
    threads: int = 2
    seed: int = 0
    command_line: list[str] = field(default_factory=lambda: ["pitome-export", *sys.argv[1:]])

    def default_out(self) -> Path:
        ratio = f"r{self.ratio:g}" if self.schedule is None else "sched"
        return Path("artifacts") / f"{self.model}-{self.algo}-{ratio}-{self.target}"


def check_target(target: str) -> None:
    """Fail fast (before loading anything) when the target's backend is missing."""
    import importlib.util

    if target not in TARGETS:
        raise PitomeError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    if target == "trt":
        if importlib.util.find_spec("tensorrt") is None:
            raise MissingBackendError("TensorRT not installed (pip install pitome-export[trt])")
        import torch

        if not torch.cuda.is_available():
            raise MissingBackendError("no CUDA device found: the trt target builds engines on an NVIDIA GPU")
        raise MissingBackendError("TensorRT engine building is not implemented in this version; use --target onnx")


def prepare_output(job: ExportJob) -> tuple[Path, Path]:
    """(final folder, temporary folder beside it); refuses an existing folder without --force."""
    final = Path(job.out) if job.out else job.default_out()
    if final.exists() and not job.force:
        raise OutputExistsError(f"output folder {final} exists; pass --force to replace it")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = make_temp_dir(final)
    except OSError as exc:
        raise OutputExistsError(f"cannot write to {final.parent}: {exc.strerror}") from None
    return final, tmp


def publish(tmp: Path, final: Path) -> None:
    """Move the finished temporary folder into place (replacing an old one under --force)."""
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)


def build_output_folder(job: ExportJob, build: Callable[[Path], T]) -> tuple[Path, T]:
    """Check the inputs that need no model, run `build` on a temporary folder, publish it.

    Whatever stops `build` (an error, Ctrl-C) removes the temporary folder: nothing partial stays.
    """
    if job.data is not None and not Path(job.data).exists():
        from pipelines.data import DataError

        raise DataError(f"data not found: {job.data}")
    final, tmp = prepare_output(job)
    try:
        result = build(tmp)
        publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final, result


def run_job(job: ExportJob, console) -> Path:
    """Run the whole job and return the published output folder; raise PitomeError on failure."""
    check_target(job.target)
    spec = resolve(job.model)
    if job.random_init:
        console.print("[yellow]RANDOM-INIT WEIGHTS: accuracy is meaningless; parity and latency are real.[/]")
    final, summary = build_output_folder(job, lambda tmp: _run_stages(job, spec, tmp, console))
    from pipelines.report import print_summary

    print_summary(summary, spec, final, console)
    if not summary["parity"]["passed"]:
        raise ParityError(f"parity FAILED: {summary['parity_line']} (artifacts kept in {final} for inspection)")
    return final


def open_data(job: ExportJob, spec: ModelSpec, model, seq_len: int | None, signature):
    """The labelled data for the accuracy stage, checked before any export work."""
    from pipelines.data import open_text_data, open_vision_data

    if spec.kind == "vision":
        from timm.data import resolve_data_config

        return open_vision_data(job.data, resolve_data_config({}, model=model), job.limit, job.seed)
    tokenizer_source = job.checkpoint or spec.source
    return open_text_data(job.data, tokenizer_source, seq_len, signature.input_names, job.limit, job.seed)


def _run_stages(job: ExportJob, spec: ModelSpec, out: Path, console) -> dict:
    import copy

    import torch
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from exporter.onnx_export import export_onnx
    from exporter.parity import TOLERANCES, parity_feeds, print_report, verify_export
    from exporter.runners import device_name, torch_device
    from exporter.signatures import signature_of
    from ops import patch_model, unpatch_model
    from pipelines import report
    from pipelines.accuracy import measure_accuracy
    from pipelines.benchmark import benchmark_artifact

    torch.set_num_threads(job.threads)
    torch.manual_seed(job.seed)
    progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console)
    with progress, tempfile.TemporaryDirectory(prefix="pitome-scratch-") as scratch:

        def stage(text: str):
            return progress.add_task(text, total=1)

        task = stage(f"load {spec.name}")
        model, origin = load_model(spec, job.checkpoint, job.random_init)
        progress.update(task, completed=1)

        task = stage(f"patch: {job.algo}")
        seq_len = job.seq_len or spec.seq_len
        text_kwargs = {"seq_len": seq_len} if spec.kind == "text" else {}
        patch_model(
            model, algo=job.algo, ratio=job.ratio, schedule=job.schedule, prop_attn=job.prop_attn,
            lowering=job.lowering, **text_kwargs,
        )  # fmt: skip
        schedule = model.token_schedule
        signature = signature_of(model, seq_len)
        data = open_data(job, spec, model, seq_len, signature) if job.data else None
        progress.update(task, completed=1)
        console.print(report.schedule_line(schedule))

        task = stage("export ONNX")
        dynamic = not job.static_batch
        onnx_path = export_onnx(
            model, None, out / "model.onnx", opset=job.opset, dynamic_batch=dynamic, seq_len=seq_len
        )
        progress.update(task, completed=1)

        task = stage("parity vs PyTorch")
        device = torch_device(job.device)
        batches = (2,) if job.static_batch else job.parity_batches
        feeds = parity_feeds(signature, batches, seed=job.seed)
        if data is not None:  # real inputs too: up to two full batches at a size the graph takes
            size = 2 if job.static_batch else 4
            real = data.batches(size)
            feeds += [next(real)[0] for _ in range(min(2, len(data) // size))]
        parity = verify_export(model, signature, onnx_path, feeds, TOLERANCES["fp32"], device, job.threads, scratch)
        parity.schedule = schedule.to_dict()
        progress.update(task, completed=1)

        bench = accuracy = None
        if job.bench or data is not None:
            task = stage("export the unmerged baseline")
            unmerged = unpatch_model(copy.deepcopy(model))
            baseline = export_onnx(
                unmerged, None, Path(scratch) / "unmerged.onnx", opset=job.opset, dynamic_batch=dynamic, seq_len=seq_len
            )
            progress.update(task, completed=1)
        if job.bench:
            task = stage(f"benchmark batch {job.bench_batch} x {job.bench_runs} runs")
            bench = benchmark_artifact(model, unmerged, signature, onnx_path, baseline, job)
            progress.update(task, completed=1)
        if data is not None:
            task = progress.add_task(f"accuracy on {len(data)} samples", total=-(-len(data) // 32))
            accuracy = measure_accuracy(
                onnx_path, baseline, data, 32, job.threads, progress=lambda: progress.advance(task)
            )

    print_report(parity, console)
    context = report.run_context(job, spec, origin, device_name(device), str(device))
    summary = {
        "context": context,
        "schedule": schedule.to_dict(),
        "merge_config": model.merge_config,
        "parity": parity.to_dict(),
        "parity_line": parity.verdict(),
        "bench": bench,
        "accuracy": accuracy,
    }
    atomic_write_text(out / "schedule.json", json.dumps({**schedule.to_dict(), **model.merge_config}, indent=2))
    atomic_write_text(out / "parity.json", json.dumps({"context": context, **parity.to_dict()}, indent=2))
    if bench is not None:
        atomic_write_text(out / "bench.json", json.dumps({"context": context, **bench}, indent=2))
        report.print_bench(bench, console)
    if accuracy is not None:
        atomic_write_text(out / "accuracy.json", json.dumps({"context": context, **accuracy}, indent=2))
        report.print_accuracy(accuracy, console)
    report.write_preprocessing(model, spec, out)
    atomic_write_text(out / "report.md", report.markdown(summary, spec))
    return summary
