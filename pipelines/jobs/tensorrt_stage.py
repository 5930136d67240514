"""The `trt` target's stages: build the engine, check it against the PyTorch GPU reference, time it.

Runs after the ONNX export has passed parity on ONNX Runtime. The engine is built from the
folder's `model.onnx` (the graph at the requested precision; FP16/BF16 engines are built from the
FP32 graph with the builder flag and the merge layers pinned to FP32), then compared with the
PyTorch model on CUDA, then timed against an unmerged engine and PyTorch eager, interleaved.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from exporter.latency import time_interleaved
from exporter.parity import TOLERANCES, Tolerances, check_parity
from exporter.runners import TorchRunner, placed_on
from exporter.signatures import ExportWrapper, ModelSignature
from exporter.tensorrt.build import BatchProfile, EngineSpec, build_engine
from exporter.tensorrt.runner import TensorRTRunner
from ops.errors import PitomeError

ENGINE_NAME = "model.engine"


def engine_spec(job) -> EngineSpec:
    return EngineSpec(job.precision, BatchProfile(*job.trt_batches), job.workspace_mib, job.timing_cache)


def build_and_check(
    job, model: torch.nn.Module, signature: ModelSignature, onnx_path: Path, feeds: list[dict], out: Path
):
    """Build `out/model.engine` (+ sidecar) and its parity report against PyTorch on CUDA."""
    spec = engine_spec(job)
    sidecar = build_engine(onnx_path, out / ENGINE_NAME, spec)
    if job.precision == "int8":  # judged like an unlabelled INT8 graph: logit cosine, not elementwise error
        rule = job.acceptance_rule()
        tolerance = Tolerances(atol=float("inf"), rtol=float("inf"), min_top1=0.0, min_cosine=rule.min_cosine)
    else:
        tolerance = TOLERANCES["fp32" if job.precision == "fp32" else "fp16"]
    fits = [feed for feed in feeds if spec.profile.min <= len(next(iter(feed.values()))) <= spec.profile.max]
    if not fits:
        raise PitomeError(f"no parity batch fits the engine's batch profile {spec.profile.min}..{spec.profile.max}")
    report = check_parity(TorchRunner(model, signature, "cuda"), TensorRTRunner(out / ENGINE_NAME), fits, tolerance)
    return sidecar, report


def benchmark_engines(
    job, model: torch.nn.Module, unmerged: torch.nn.Module, signature: ModelSignature, engine: Path, baseline_onnx: Path,
    scratch: Path,
) -> dict:  # fmt: skip
    """TensorRT merged vs unmerged (CUDA events) and PyTorch eager on CUDA, one interleaved run."""
    baseline_engine = Path(scratch) / "unmerged.engine"
    build_engine(baseline_onnx, baseline_engine, engine_spec(job))
    batch = job.bench_batch
    feeds = signature.example_inputs(batch, seed=job.seed)
    numpy_feeds = {name: feeds[name].numpy() for name in signature.input_names}
    cuda_inputs = tuple(feeds[name].cuda() for name in signature.input_names)
    runners = {"tensorrt merged": TensorRTRunner(engine), "tensorrt unmerged": TensorRTRunner(baseline_engine)}
    for runner in runners.values():
        runner.activate()
    placements = contextlib.ExitStack()  # the caller's models go back where they were
    try:

        def eager(module: torch.nn.Module):
            wrapper = placements.enter_context(placed_on(ExportWrapper(module, signature).eval(), "cuda"))
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

            def call() -> float:
                with torch.no_grad():
                    start.record()
                    wrapper(*cuda_inputs)
                    end.record()
                end.synchronize()
                return start.elapsed_time(end)

            return call

        candidates = {name: runner.timed_call(numpy_feeds) for name, runner in runners.items()}
        candidates["pytorch eager merged (cuda)"] = eager(model)
        candidates["pytorch eager unmerged (cuda)"] = eager(unmerged)
        stats = time_interleaved(candidates, batch, runs=job.bench_runs, warmup=10)
    finally:
        for runner in runners.values():
            runner.deactivate()
        placements.close()
    return {
        "how": f"{job.bench_runs} interleaved runs after 10 warm-up rounds, batch {batch}, GPU time by CUDA events, "
        f"{torch.cuda.get_device_name()}",
        "batch": batch,
        "latency": {name: s.to_dict() for name, s in stats.items()},
        "speedup_tensorrt": stats["tensorrt unmerged"].median_ms / stats["tensorrt merged"].median_ms,
        "speedup_pytorch_eager_cuda": stats["pytorch eager unmerged (cuda)"].median_ms
        / stats["pytorch eager merged (cuda)"].median_ms,
    }
