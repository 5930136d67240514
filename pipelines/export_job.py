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
from exporter.errors import ParityError
from ops.errors import PitomeError
from pipelines import interrupts
from pipelines.models import ModelSpec, load_model, resolve

TARGETS = ("onnx", "trt")
DEFAULT_INT8_MODE = "dynamic"  # the faster on ONNX Runtime CPU, measured (README, Quantization)
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
    precision: str = "fp32"
    int8_mode: str | None = None  # None: the CPU default (DEFAULT_INT8_MODE), static when calibrating
    calibration: str | None = None  # DIR, FILE, data set name, or a sample count
    int8_ffn_out: str | None = None  # FFN down-projection in INT8 graphs: fp32, int8; None: by mode
    min_agreement: tuple[float, float] = (0.99, 0.99)  # reduced precision: (top-1, per-layer decisions)
    trt_batches: tuple[int, int, int] = (1, 8, 64)  # TensorRT optimisation profile: min, opt, max batch
    workspace_mib: int = 4096
    timing_cache: str | None = None
    ort_provider: str = "cpu"  # ONNX Runtime route for parity and latency: cpu, cuda, tensorrt
    command_line: list[str] = field(default_factory=lambda: ["pitome-export", *sys.argv[1:]])

    def default_out(self) -> Path:
        ratio = f"r{self.ratio:g}" if self.schedule is None else "sched"
        precision = "" if self.precision == "fp32" else f"-{self.precision}"
        return Path("artifacts") / f"{self.model}-{self.algo}-{ratio}{precision}-{self.target}"

    @property
    def fused(self) -> bool:
        """`--merge-impl plugin` or `fused`: each merge step exported as one `pitome::TokenMerge` node."""
        return self.lowering in ("plugin", "fused")

    @property
    def patch_lowering(self) -> str:
        """The lowering the PyTorch model is patched with (the fused op runs the MatMul one)."""
        return "matmul" if self.fused else self.lowering

    def resolved_int8_mode(self) -> str | None:
        """The INT8 mode this job uses (None unless int8): asked, implied by --calibration, or the default."""
        if self.precision != "int8":
            return None
        if self.int8_mode is not None:
            return self.int8_mode
        return "static" if self.calibration is not None or self.target == "trt" else DEFAULT_INT8_MODE

    def resolved_ffn_out(self) -> str | None:
        """Precision of the FFN down-projections in an INT8 graph (None unless int8)."""
        from exporter.quantize import default_ffn_out

        mode = self.resolved_int8_mode()
        return None if mode is None else self.int8_ffn_out or default_ffn_out(mode)


def check_target(target: str) -> None:
    """Fail fast (before loading anything) when the target's backend is missing."""
    if target not in TARGETS:
        raise PitomeError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    if target == "trt":
        from exporter.tensorrt import require_cuda, require_tensorrt

        require_tensorrt()
        require_cuda()


def check_merge_impl(lowering: str) -> None:
    """`--merge-impl fused` runs the Triton merge kernels: fail fast (exit 4) without a CUDA device."""
    if lowering != "fused":
        return
    import torch

    from exporter.errors import MissingBackendError

    if not torch.cuda.is_available():
        raise MissingBackendError("--merge-impl fused runs the Triton merge kernels on a CUDA GPU; PyTorch sees none")


def check_precision_flags(job: ExportJob) -> None:
    """Reject flag combinations that cannot mean anything, before any work."""
    from exporter.quantize import FFN_OUT_PRECISIONS, INT8_MODES, PRECISIONS
    from exporter.runners import ORT_PROVIDERS, require_ort_provider

    if job.precision not in (*PRECISIONS, "bf16"):
        raise PitomeError(f"unknown precision {job.precision!r}; choose one of {', '.join(PRECISIONS)}")
    if job.int8_mode is not None and job.int8_mode not in INT8_MODES:
        raise PitomeError(f"unknown INT8 mode {job.int8_mode!r}; choose one of {', '.join(INT8_MODES)}")
    if job.int8_mode is not None and job.precision != "int8":
        raise PitomeError("--int8-mode applies to --precision int8")
    if job.int8_ffn_out is not None and job.int8_ffn_out not in FFN_OUT_PRECISIONS:
        raise PitomeError(f"unknown --int8-ffn-out {job.int8_ffn_out!r}; choose one of {', '.join(FFN_OUT_PRECISIONS)}")
    if job.int8_ffn_out is not None and job.precision != "int8":
        raise PitomeError("--int8-ffn-out applies to --precision int8")
    if job.calibration is not None and job.calibration.isdigit() and int(job.calibration) < 1:
        raise PitomeError("--calibration N needs N >= 1 samples")
    if job.calibration is not None and job.resolved_int8_mode() != "static":
        raise PitomeError("--calibration applies to --precision int8 with static quantization")
    if job.target == "trt" and job.precision == "int8" and job.resolved_int8_mode() != "static":
        raise PitomeError("TensorRT builds INT8 engines from the static QDQ graph: drop --int8-mode dynamic")
    if job.precision == "bf16" and job.target != "trt":
        raise PitomeError("--precision bf16 is a TensorRT engine precision: use it with --target trt")
    if job.lowering == "fused" and job.device == "cpu":
        raise PitomeError("--merge-impl fused runs the PyTorch model on CUDA: drop --device cpu")
    if job.fused and job.precision == "int8":
        raise PitomeError("--merge-impl plugin does not combine with int8: calibration runs the graph on ONNX Runtime")
    if job.fused and job.precision == "fp16" and job.target == "onnx":
        raise PitomeError("--merge-impl plugin with fp16 is for --target trt (the engine keeps the plugin in FP32)")
    if job.ort_provider not in ORT_PROVIDERS:
        raise PitomeError(
            f"unknown ONNX Runtime provider {job.ort_provider!r}; choose one of {', '.join(ORT_PROVIDERS)}"
        )
    if job.ort_provider != "cpu":
        require_ort_provider(job.ort_provider)  # before any export work
    if job.target == "trt":
        from exporter.tensorrt.build import BatchProfile

        profile = BatchProfile(*job.trt_batches)
        if job.static_batch:
            raise PitomeError("--static-batch does not combine with --target trt: the engine's batch profile sets it")
        if job.bench and not profile.min <= job.bench_batch <= profile.max:
            raise PitomeError(
                f"--batch {job.bench_batch} is outside the engine's batch profile {profile.min}..{profile.max}"
            )


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
    from pipelines.data import DataError, named_data

    check_precision_flags(job)
    for what, source in (("data", job.data), ("calibration data", job.calibration)):
        if source is not None and not source.isdigit() and named_data(source) is None and not Path(source).exists():
            raise DataError(f"{what} not found: {source}")
    final, tmp = prepare_output(job)
    try:
        result = build(tmp)
        interrupts.check()  # a Ctrl-C that a library swallowed still stops the publish
        publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final, result


def run_job(job: ExportJob, console) -> Path:
    """Run the whole job and return the published output folder; raise PitomeError on failure."""
    check_target(job.target)
    check_merge_impl(job.lowering)
    spec = resolve(job.model)
    if job.random_init:
        console.print("[yellow]RANDOM-INIT WEIGHTS: accuracy is meaningless; parity and latency are real.[/]")
    final, summary = build_output_folder(job, lambda tmp: _run_stages(job, spec, tmp, console))
    from pipelines.report import print_summary

    print_summary(summary, spec, final, console)
    if not summary["parity"]["passed"]:
        raise ParityError(f"parity FAILED: {summary['parity_line']} (artifacts kept in {final} for inspection)")
    engine = summary.get("engine")
    if engine is not None and not engine["passed"]:
        raise ParityError(f"engine parity FAILED: {engine['parity_line']} (artifacts kept in {final} for inspection)")
    agreement = summary["precision"]["agreement"]
    if agreement is not None and not agreement["passed"]:
        line = summary["precision"]["agreement_line"]
        raise ParityError(f"{job.precision} parity FAILED: {line} (artifacts kept in {final} for inspection)")
    return final


def open_data(
    job: ExportJob, spec: ModelSpec, model, seq_len: int | None, signature, source: str | None = None, limit=None
):
    """The data for the accuracy stage (`job.data`), or `source` (calibration), checked before any export work."""
    from pipelines.data import open_text_data, open_vision_data
    from pipelines.models import tokenizer_source

    labelled = source is None
    source, limit = (job.data, job.limit) if labelled else (source, limit)
    if spec.kind == "vision":
        from timm.data import resolve_data_config

        return open_vision_data(source, resolve_data_config({}, model=model), limit, job.seed)
    tokenizer = tokenizer_source(model, spec, job.checkpoint)
    return open_text_data(source, tokenizer, seq_len, signature.input_names, limit, job.seed, labelled=labelled)


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
            interrupts.check()
            return progress.add_task(text, total=1)

        task = stage(f"load {spec.name}")
        model, origin = load_model(spec, job.checkpoint, job.random_init)
        progress.update(task, completed=1)

        task = stage(f"patch: {job.algo}")
        seq_len = job.seq_len or spec.seq_len
        text_kwargs = {"seq_len": seq_len} if spec.kind == "text" else {}
        patch_model(
            model, algo=job.algo, ratio=job.ratio, schedule=job.schedule, prop_attn=job.prop_attn,
            lowering=job.patch_lowering, merge_impl="fused" if job.lowering == "fused" else "decomposed", **text_kwargs,
        )  # fmt: skip
        schedule = model.token_schedule
        signature = signature_of(model, seq_len)
        data = open_data(job, spec, model, seq_len, signature) if job.data else None
        int8_mode, ffn_out, ffn_fp32_nodes = job.resolved_int8_mode(), job.resolved_ffn_out(), 0
        calibration, calibration_source = ([], None)
        if int8_mode == "static":
            from pipelines.calibration import calibration_feeds

            calibration, calibration_source = calibration_feeds(job, spec, model, signature, seq_len)
        progress.update(task, completed=1)
        console.print(report.schedule_line(schedule))

        task = stage("export ONNX")
        dynamic = not job.static_batch
        # TensorRT makes FP16/BF16 engines from the FP32 graph; only INT8 needs a converted (QDQ) graph.
        reduced = job.precision != "fp32" and not (job.target == "trt" and job.precision in ("fp16", "bf16"))
        fp32_path = Path(scratch) / "model_fp32.onnx" if reduced else out / "model.onnx"
        fp32_graph = export_onnx(
            model, None, fp32_path, opset=job.opset, dynamic_batch=dynamic, seq_len=seq_len, fused=job.fused
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
        parity = verify_export(
            model, signature, fp32_graph, feeds, TOLERANCES["fp32"], device, job.threads, scratch, job.ort_provider
        )
        parity.schedule = schedule.to_dict()
        progress.update(task, completed=1)

        onnx_path, agreement = fp32_graph, None
        if reduced:
            from exporter.agreement import AgreementThresholds, check_reduced_precision
            from exporter.quantize import convert_precision

            def convert(src: Path, dst: Path) -> Path:
                return convert_precision(
                    src, dst, job.precision, int8_mode or "dynamic", calibration, calibration_source, ffn_out
                )

            label = job.precision + (f" ({int8_mode})" if int8_mode else "")
            task = stage(f"convert to {label}, merge kept FP32")
            onnx_path = convert(fp32_graph, out / "model.onnx")
            if ffn_out == "fp32":
                import onnx

                from exporter.onnx_export import read_metadata

                stamp = read_metadata(onnx.load(str(onnx_path), load_external_data=False))
                ffn_fp32_nodes = int(stamp["int8_ffn_fp32_nodes"])
            progress.update(task, completed=1)
            task = stage(f"parity of {job.precision} by agreement with FP32")
            merges = any(schedule.merges)
            debug = (
                (lambda path: export_onnx(model, None, path, seq_len=seq_len, decisions=True, dynamic_batch=dynamic))
                if merges
                else None
            )
            agreement = check_reduced_precision(
                job.precision, fp32_graph, onnx_path, feeds, debug, convert if merges else None,
                AgreementThresholds(*job.min_agreement), threads=job.threads,
            )  # fmt: skip
            progress.update(task, completed=1)

        engine = None
        if job.target == "trt":
            from pipelines.tensorrt_stage import ENGINE_NAME, benchmark_engines, build_and_check

            task = stage(f"build TensorRT engine ({job.precision}) and check it on CUDA")
            sidecar, engine_parity = build_and_check(job, model, signature, onnx_path, feeds, out)
            engine = {"sidecar": sidecar, "parity": engine_parity.to_dict(), "parity_line": engine_parity.verdict(),
                      "passed": engine_parity.passed}  # fmt: skip
            progress.update(task, completed=1)

        bench = accuracy = None
        ort_bench = job.bench and job.target == "onnx" and not job.fused
        if job.bench and job.fused and job.target == "onnx":
            console.print("[yellow]no latency stage: ONNX Runtime runs the plugin node through a Python reference[/]")
        extra_graphs: dict[str, Path] = {}
        if job.bench or data is not None:
            task = stage("export the unmerged baseline")
            unmerged = unpatch_model(copy.deepcopy(model))
            baseline = export_onnx(
                unmerged, None, Path(scratch) / "unmerged.onnx", opset=job.opset, dynamic_batch=dynamic, seq_len=seq_len
            )
            if reduced:
                extra_graphs["merged fp32"] = fp32_graph
                extra_graphs[f"unmerged {job.precision}"] = convert(baseline, Path(scratch) / "unmerged_reduced.onnx")
            progress.update(task, completed=1)
        if ort_bench:
            task = stage(f"benchmark batch {job.bench_batch} x {job.bench_runs} runs")
            bench = benchmark_artifact(model, unmerged, signature, onnx_path, baseline, job, extra_graphs)
            progress.update(task, completed=1)
        if engine is not None and job.bench:
            task = stage(f"benchmark engines, batch {job.bench_batch} x {job.bench_runs} runs")
            engine["bench"] = benchmark_engines(job, model, unmerged, signature, out / ENGINE_NAME, baseline, scratch)
            progress.update(task, completed=1)
        if data is not None:
            task = progress.add_task(f"accuracy on {len(data)} samples", total=-(-len(data) // 32))
            accuracy = measure_accuracy(
                onnx_path, baseline, data, 32, job.threads, progress=lambda: progress.advance(task), extra=extra_graphs
            )

    print_report(parity, console)
    if agreement is not None:
        console.print(f"{job.precision} parity: {agreement.verdict()}")
    context = report.run_context(job, spec, origin, device_name(device), str(device))
    summary = {
        "context": context,
        "schedule": schedule.to_dict(),
        "merge_config": model.merge_config,
        "parity": parity.to_dict(),
        "parity_line": parity.verdict(),
        "precision": {
            "precision": job.precision,
            "int8_mode": int8_mode,
            "int8_ffn_out": ffn_out,
            "int8_ffn_fp32_nodes": ffn_fp32_nodes,
            "calibration": calibration_source,
            "agreement": agreement.to_dict() if agreement is not None else None,
            "agreement_line": agreement.verdict() if agreement is not None else None,
        },
        "bench": bench,
        "engine": engine,
        "accuracy": accuracy,
    }
    atomic_write_text(out / "schedule.json", json.dumps({**schedule.to_dict(), **model.merge_config}, indent=2))
    parity_record = {"context": context, **parity.to_dict(), "precision": summary["precision"]}
    atomic_write_text(out / "parity.json", json.dumps(parity_record, indent=2))
    if engine is not None and engine.get("bench"):
        atomic_write_text(out / "bench.json", json.dumps({"context": context, **engine["bench"]}, indent=2))
    if bench is not None:
        atomic_write_text(out / "bench.json", json.dumps({"context": context, **bench}, indent=2))
        report.print_bench(bench, console)
    if accuracy is not None:
        atomic_write_text(out / "accuracy.json", json.dumps({"context": context, **accuracy}, indent=2))
        report.print_accuracy(accuracy, console)
    report.write_preprocessing(model, spec, out)
    atomic_write_text(out / "report.md", report.markdown(summary, spec))
    return summary
