"""The export job's stages, in order, over one context: load, patch, export, parity, precision,
engine, baseline, latency, accuracy; then the report.

Each stage is a function of the context alone: it reads what earlier stages left there and adds
what it makes, so a stage can be run (and tested) on a context built by hand. A stage that does
not apply to the job (no reduced precision, no TensorRT target, no data) returns at once.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from exporter.atomic import atomic_write_text
from pipelines.jobs import interrupts

if TYPE_CHECKING:
    import torch

    from exporter.agreement import AgreementReport
    from exporter.parity import ParityReport
    from exporter.signatures import ModelSignature
    from pipelines.data.labelled import LabelledData
    from pipelines.jobs.export_job import ExportJob
    from pipelines.models.registry import ModelSpec

ACCURACY_BATCH = 32  # samples per ONNX Runtime call when scoring accuracy


@dataclass
class JobContext:
    """What the stages share: the job, the output folders, and what each stage made."""

    job: ExportJob
    spec: ModelSpec
    out: Path  # the temporary output folder (published whole at the end)
    scratch: Path  # files that are not shipped
    console: Any
    progress: Any = None  # a rich Progress, or None (then stages print nothing while running)
    model: torch.nn.Module | None = None
    origin: str = ""  # where the weights came from (report)
    seq_len: int | None = None
    signature: ModelSignature | None = None
    data: LabelledData | None = None
    calibration: list[dict] = field(default_factory=list)
    calibration_source: str | None = None
    fp32_graph: Path | None = None
    onnx_path: Path | None = None  # the shipped graph: the FP32 graph or its conversion
    device: torch.device | None = None
    feeds: list[dict] = field(default_factory=list)  # parity inputs
    parity: ParityReport | None = None
    ffn_fp32_nodes: int = 0
    agreement: AgreementReport | None = None
    engine: dict | None = None
    unmerged: torch.nn.Module | None = None
    baseline: Path | None = None  # the unmerged FP32 graph
    extra_graphs: dict[str, Path] = field(default_factory=dict)  # timed and scored beside the shipped one

    bench: dict | None = None
    accuracy: dict | None = None
    predictions: dict | None = None  # per-sample top-1 by graph name (pipelines.jobs.accuracy.predict)

    @contextlib.contextmanager
    def step(self, text: str, total: int = 1) -> Iterator[Callable[[], None]]:
        """A progress line for one stage; yields a callable that advances it by one unit."""
        interrupts.check()
        if self.progress is None:
            yield lambda: None
            return
        task = self.progress.add_task(text, total=total)
        yield lambda: self.progress.advance(task)
        self.progress.update(task, completed=total)

    def convert(self, src: Path, dst: Path) -> Path:
        """`src` (an FP32 export) at the job's precision, as the shipped graph is converted."""
        from exporter.quantize import convert_precision

        job = self.job
        mode = job.resolved_int8_mode() or "dynamic"
        return convert_precision(
            src, dst, job.precision, mode, self.calibration, self.calibration_source, job.resolved_ffn_out()
        )


def load(ctx: JobContext) -> None:
    """Load the model; a context built with its model (finetune's trained one, unpatched) keeps it."""
    from pipelines.models.registry import load_model

    if ctx.model is not None:
        return
    with ctx.step(f"load {ctx.spec.name}"):
        ctx.model, ctx.origin = load_model(ctx.spec, ctx.job.checkpoint, ctx.job.random_init)


def patch(ctx: JobContext) -> None:
    """Patch the model, freeze its schedule, and open the data it will need (before any export)."""
    from exporter.signatures import signature_of
    from ops import patch_model
    from pipelines.jobs import report

    job, spec = ctx.job, ctx.spec
    with ctx.step(f"patch: {job.algo}"):
        ctx.seq_len = job.seq_len or spec.seq_len
        text_kwargs = {"seq_len": ctx.seq_len} if spec.kind == "text" else {}
        if spec.kind == "hf_vision":
            from pipelines.models.image_processor import frozen_image_size, job_processor

            processor = job_processor(ctx.model, spec, job.checkpoint, job.random_init)
            text_kwargs = {"image_size": frozen_image_size(ctx.model, processor)}
        patch_model(
            ctx.model, algo=job.algo, ratio=job.ratio, schedule=job.schedule, prop_attn=job.prop_attn,
            lowering=job.patch_lowering, merge_impl="fused" if job.lowering == "fused" else "decomposed",
            **text_kwargs,
        )  # fmt: skip
        ctx.signature = signature_of(ctx.model, ctx.seq_len)
        classifier = "logits" in ctx.signature.output_names
        # a context built with its data (tune's held-out split) keeps it; feature models have no classes
        if ctx.data is None and job.data and classifier:
            ctx.data = open_data(job, spec, ctx.model, ctx.seq_len, ctx.signature)
        if job.resolved_int8_mode() == "static" and not ctx.calibration:
            from pipelines.jobs.calibration import calibration_feeds

            ctx.calibration, ctx.calibration_source = calibration_feeds(
                job, spec, ctx.model, ctx.signature, ctx.seq_len
            )
    if job.data and not classifier:
        ctx.console.print("[yellow]no accuracy stage: a feature model has no classes to score (--data ignored)[/]")
    ctx.console.print(report.schedule_line(ctx.model.token_schedule))


def open_data(
    job: ExportJob, spec: ModelSpec, model, seq_len: int | None, signature, source=None, limit=None, split="test"
):
    """The data for the accuracy stage (`job.data`), or `source` (calibration), checked before any
    export work; `split`: which split an IDX folder is read for (finetune reads "train")."""
    from pipelines.data.labelled import open_text_data, open_vision_data
    from pipelines.models.registry import tokenizer_source

    labelled = source is None
    source, limit = (job.data, job.limit) if labelled else (source, limit)
    if spec.kind == "vision":
        from timm.data import resolve_data_config

        return open_vision_data(source, resolve_data_config({}, model=model), limit, job.seed, split)
    if spec.kind == "hf_vision":
        from pipelines.models.image_processor import job_processor, timm_data_config

        size = signature.input_shapes["pixel_values"][-1]
        processor = job_processor(model, spec, job.checkpoint, job.random_init)
        return open_vision_data(source, timm_data_config(processor, size), limit, job.seed, split)
    tokenizer = tokenizer_source(model, spec, job.checkpoint)
    return open_text_data(source, tokenizer, seq_len, signature.input_names, limit, job.seed, labelled=labelled)


def export(ctx: JobContext) -> None:
    """The FP32 graph: shipped as is, or the source of the reduced graph (then kept in scratch).

    A context built with `fp32_graph` (the tune job's trial graph of this very schedule) writes
    that graph instead of exporting it again, when its opset and batch mode are the job's; the
    parity stage then checks it against this job's model like any other export."""
    from exporter.onnx_export import export_onnx

    job = ctx.job
    path = ctx.scratch / "model_fp32.onnx" if job.reduced_graph else ctx.out / "model.onnx"
    with ctx.step("export ONNX"):
        if ctx.fp32_graph is not None and _exported_as(ctx.fp32_graph, job):
            ctx.fp32_graph = _rewrite(ctx.fp32_graph, path)
        else:
            ctx.fp32_graph = export_onnx(
                ctx.model, None, path, opset=job.opset, dynamic_batch=not job.static_batch, seq_len=ctx.seq_len,
                fused=job.fused,
            )  # fmt: skip
    ctx.onnx_path = ctx.fp32_graph


def _exported_as(graph: Path, job: ExportJob) -> bool:
    """Whether `graph` was exported with the job's opset and batch mode (and no fused node)."""
    from exporter.onnx_export import export_settings

    settings = export_settings(graph)
    return not job.fused and settings["opset"] == job.opset and settings["dynamic_batch"] == (not job.static_batch)


def _rewrite(graph: Path, path: Path) -> Path:
    """`graph` written to `path` (checked, external data renamed with it when large)."""
    import onnx

    from exporter.onnx_export import save_onnx

    return save_onnx(onnx.load(str(graph)), path)


def parity(ctx: JobContext) -> None:
    """The FP32 graph against the PyTorch model, on seeded inputs and, with data, real ones."""
    from exporter.parity import TOLERANCES, parity_feeds, verify_export
    from exporter.runners import torch_device

    job = ctx.job
    with ctx.step("parity vs PyTorch"):
        ctx.device = torch_device(job.device)
        ctx.feeds = parity_feeds(ctx.signature, (2,) if job.static_batch else job.parity_batches, seed=job.seed)
        if ctx.data is not None:  # real inputs too: up to two full batches at a size the graph takes
            size = 2 if job.static_batch else 4
            real = ctx.data.batches(size)
            ctx.feeds += [next(real)[0] for _ in range(min(2, len(ctx.data) // size))]
        ctx.parity = verify_export(
            ctx.model, ctx.signature, ctx.fp32_graph, ctx.feeds, TOLERANCES["fp32"], ctx.device, job.threads,
            ctx.scratch, job.ort_provider,
        )  # fmt: skip
        ctx.parity.schedule = ctx.model.token_schedule.to_dict()


def precision(ctx: JobContext) -> None:
    """Convert to the job's precision (merge kept FP32) and measure it against the FP32 graph."""
    from exporter.agreement import check_reduced_precision
    from exporter.decisions import export_decisions_like

    job = ctx.job
    if not job.reduced_graph:
        return
    mode = job.resolved_int8_mode()
    with ctx.step(f"convert to {job.precision}{f' ({mode})' if mode else ''}, merge kept FP32"):
        ctx.onnx_path = ctx.convert(ctx.fp32_graph, ctx.out / "model.onnx")
        if job.resolved_ffn_out() == "fp32":
            import onnx

            from exporter.onnx_export import read_metadata

            stamp = read_metadata(onnx.load(str(ctx.onnx_path), load_external_data=False))
            ctx.ffn_fp32_nodes = int(stamp["int8_ffn_fp32_nodes"])
    with ctx.step(f"parity of {job.precision} by agreement with FP32"):
        merges = any(ctx.model.token_schedule.merges)

        def debug(path: Path) -> Path:
            return export_decisions_like(ctx.model, ctx.fp32_graph, path, ctx.seq_len)

        ctx.agreement = check_reduced_precision(
            job.precision, ctx.fp32_graph, ctx.onnx_path, ctx.feeds, debug if merges else None,
            ctx.convert if merges else None, job.acceptance_rule(), threads=job.threads, providers=job.ort_provider,
        )  # fmt: skip


def engine(ctx: JobContext) -> None:
    """`--target trt`: build the engine from the shipped graph and check it on CUDA."""
    if ctx.job.target != "trt":
        return
    from pipelines.jobs.tensorrt_stage import build_and_check

    with ctx.step(f"build TensorRT engine ({ctx.job.precision}) and check it on CUDA"):
        sidecar, checked = build_and_check(ctx.job, ctx.model, ctx.signature, ctx.onnx_path, ctx.feeds, ctx.out)
    ctx.engine = {"sidecar": sidecar, "parity": checked.to_dict(), "parity_line": checked.verdict(),
                  "passed": checked.passed}  # fmt: skip


def baseline(ctx: JobContext) -> None:
    """The unmerged model and its graph, for latency and accuracy (and its reduced twin)."""
    from exporter.variants import Variant, export_variant, variant_model

    job = ctx.job
    if not job.bench and ctx.data is None:
        return
    with ctx.step("export the unmerged baseline"):
        if ctx.baseline is None:  # a context built with it (the tune job's reference graph) keeps it
            ctx.baseline, ctx.unmerged = export_variant(
                ctx.model, Variant("unmerged"), ctx.scratch, seq_len=ctx.seq_len, opset=job.opset,
                dynamic_batch=not job.static_batch,
            )  # fmt: skip
        else:
            ctx.unmerged = variant_model(ctx.model, Variant("unmerged"))
        if job.reduced_graph:
            ctx.extra_graphs["merged fp32"] = ctx.fp32_graph
            ctx.extra_graphs[f"unmerged {job.precision}"] = ctx.convert(
                ctx.baseline, ctx.scratch / "unmerged_reduced.onnx"
            )


def latency(ctx: JobContext) -> None:
    """Merged against unmerged, interleaved: ONNX Runtime and eager, or the engines on CUDA."""
    from pipelines.jobs.benchmark import benchmark_artifact

    job = ctx.job
    if not job.bench:
        return
    if job.target == "trt":
        from pipelines.jobs.tensorrt_stage import ENGINE_NAME, benchmark_engines

        with ctx.step(f"benchmark engines, batch {job.bench_batch} x {job.bench_runs} runs"):
            ctx.engine["bench"] = benchmark_engines(
                job, ctx.model, ctx.unmerged, ctx.signature, ctx.out / ENGINE_NAME, ctx.baseline, ctx.scratch
            )
    elif job.fused:
        ctx.console.print("[yellow]no latency stage: ONNX Runtime runs the plugin node through a Python reference[/]")
    else:
        with ctx.step(f"benchmark batch {job.bench_batch} x {job.bench_runs} runs"):
            ctx.bench = benchmark_artifact(
                ctx.model, ctx.unmerged, ctx.signature, ctx.onnx_path, ctx.baseline, job, ctx.extra_graphs
            )


def accuracy(ctx: JobContext) -> None:
    """Top-1 of every graph on the labelled data; a reduced graph is then accepted by it."""
    from pipelines.jobs.accuracy import accuracy_figures, predict

    if ctx.data is None:
        return
    graphs = {"merged": ctx.onnx_path, "unmerged": ctx.baseline, **(ctx.extra_graphs or {})}
    with ctx.step(f"accuracy on {len(ctx.data)} samples", total=-(-len(ctx.data) // ACCURACY_BATCH)) as advance:
        ctx.predictions = predict(graphs, ctx.data, ACCURACY_BATCH, ctx.job.threads, progress=advance)
    ctx.accuracy = accuracy_figures(ctx.predictions, ctx.data)
    if ctx.agreement is not None:
        why_not = "random-init weights: accuracy means nothing" if ctx.origin == "random-init" else None
        ctx.agreement.attach_accuracy(ctx.accuracy, why_not=why_not)


STAGES: tuple[Callable[[JobContext], None], ...] = (
    load, patch, export, parity, precision, engine, baseline, latency, accuracy,
)  # fmt: skip


def summarize(ctx: JobContext) -> dict:
    """Everything the report, the JSON files and the exit code are made from."""
    from exporter.runners import device_name
    from pipelines.jobs import report

    job, agreement = ctx.job, ctx.agreement
    schedule = ctx.model.token_schedule
    return {
        "context": report.run_context(job, ctx.spec, ctx.origin, device_name(ctx.device), str(ctx.device)),
        "schedule": schedule.to_dict(),
        "merge_config": ctx.model.merge_config,
        "parity": ctx.parity.to_dict(),
        "parity_line": ctx.parity.verdict(),
        "precision": {
            "precision": job.precision,
            "int8_mode": job.resolved_int8_mode(),
            "int8_ffn_out": job.resolved_ffn_out(),
            "int8_ffn_fp32_nodes": ctx.ffn_fp32_nodes,
            "calibration": ctx.calibration_source,
            "agreement": agreement.to_dict() if agreement is not None else None,
            "agreement_line": agreement.verdict() if agreement is not None else None,
        },
        "bench": ctx.bench,
        "engine": ctx.engine,
        "accuracy": ctx.accuracy,
    }


def write_reports(ctx: JobContext, summary: dict) -> None:
    """The report stage: print the figures and write the JSON files and report.md into the folder."""
    from exporter.parity import print_report
    from pipelines.jobs import report

    out, console, context = ctx.out, ctx.console, summary["context"]

    def write_json(name: str, record: dict) -> None:
        atomic_write_text(out / name, json.dumps({"context": context, **record}, indent=2))

    print_report(ctx.parity, console)
    if ctx.agreement is not None:
        console.print(f"{ctx.job.precision} parity: {summary['precision']['agreement_line']}")
    atomic_write_text(out / "schedule.json", json.dumps({**summary["schedule"], **summary["merge_config"]}, indent=2))
    write_json("parity.json", {**summary["parity"], "precision": summary["precision"]})
    if ctx.engine is not None and ctx.engine.get("bench"):
        write_json("bench.json", ctx.engine["bench"])
    if ctx.bench is not None:
        write_json("bench.json", ctx.bench)
        report.print_bench(ctx.bench, console)
    if ctx.accuracy is not None:
        from pipelines.jobs.accuracy import PREDICTIONS, save_predictions

        write_json("accuracy.json", ctx.accuracy)
        save_predictions(out / PREDICTIONS, ctx.predictions, ctx.data)
        report.print_accuracy(ctx.accuracy, console)
    report.write_preprocessing(ctx.model, ctx.spec, out, ctx.job)
    atomic_write_text(out / "report.md", report.markdown(summary, ctx.spec))


@contextlib.contextmanager
def torch_settings(threads: int, seed: int | None = None) -> Iterator[None]:
    """Inside the block PyTorch uses `threads` intra-op threads and (with `seed`) a seeded global
    generator; both are as they were after it, so a job leaves its caller's process unchanged."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            yield
    finally:
        torch.set_num_threads(before)


def run_stages(job: ExportJob, spec: ModelSpec, out: Path, console, **preset: Any) -> dict:
    """Run every stage into `out` and write the reports; return the summary. `preset` fills
    context fields before the first stage (the tune job's held-out data, calibration, the chosen
    trial's FP32 graph, the unmerged graph and the uniform schedules to score beside the chosen
    one: `data`, `calibration`, `fp32_graph`, `baseline`, `extra_graphs`)."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console)
    with torch_settings(job.threads, job.seed), progress, tempfile.TemporaryDirectory(prefix="pitome-") as scratch:
        ctx = JobContext(job, spec, out, Path(scratch), console, progress, **preset)
        for stage in STAGES:
            stage(ctx)
    summary = summarize(ctx)
    write_reports(ctx, summary)
    return summary
