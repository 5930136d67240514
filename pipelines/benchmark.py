"""Latency of the exported graph against the unmerged model, same backend, one process, interleaved."""

from __future__ import annotations

from pathlib import Path

import torch

from exporter.latency import time_interleaved
from exporter.runners import cpu_name, ort_session
from exporter.signatures import ExportWrapper, ModelSignature
from ops.flops import schedule_flops


def model_width(model: torch.nn.Module) -> tuple[int, float]:
    """(embedding width, MLP ratio) of a timm ViT or HF BERT-family model."""
    config = getattr(model, "config", None)
    if config is not None:
        dim = getattr(config, "hidden_size", None) or config.dim
        hidden = getattr(config, "intermediate_size", None) or config.hidden_dim
        return dim, hidden / dim
    return model.embed_dim, model.blocks[0].mlp.fc1.out_features / model.embed_dim


def flops_summary(model: torch.nn.Module) -> dict:
    dim, mlp_ratio = model_width(model)
    merged, unmerged = schedule_flops(model.token_schedule, dim, mlp_ratio)
    return {
        "block_gflops_merged": sum(merged) / 1e9,
        "block_gflops_unmerged": sum(unmerged) / 1e9,
        "block_flop_speedup": sum(unmerged) / sum(merged),
        "per_layer_gflops_merged": [f / 1e9 for f in merged],
    }


def benchmark_artifact(
    model: torch.nn.Module, unmerged: torch.nn.Module, signature: ModelSignature, onnx_path: Path, baseline: Path, job
) -> dict:
    """Time ORT merged vs unmerged and PyTorch eager merged vs unmerged at the job's batch size."""
    batch = 2 if job.static_batch else job.bench_batch  # a static graph runs at its export batch
    feeds = signature.example_inputs(batch, seed=job.seed)
    numpy_feeds = {name: feeds[name].numpy() for name in signature.input_names}
    inputs = tuple(feeds[name] for name in signature.input_names)
    merged_session = ort_session(onnx_path, threads=job.threads)
    baseline_session = ort_session(baseline, threads=job.threads)
    eager_merged = ExportWrapper(model, signature).eval()
    eager_unmerged = ExportWrapper(unmerged, signature).eval()

    def eager(module):
        def call():
            with torch.no_grad():
                module(*inputs)

        return call

    candidates = {
        "onnxruntime merged": lambda: merged_session.run(None, numpy_feeds),
        "onnxruntime unmerged": lambda: baseline_session.run(None, numpy_feeds),
        "pytorch eager merged": eager(eager_merged),
        "pytorch eager unmerged": eager(eager_unmerged),
    }
    stats = time_interleaved(candidates, batch, runs=job.bench_runs)
    ort_speedup = stats["onnxruntime unmerged"].median_ms / stats["onnxruntime merged"].median_ms
    eager_speedup = stats["pytorch eager unmerged"].median_ms / stats["pytorch eager merged"].median_ms
    return {
        "how": (
            f"{job.bench_runs} interleaved runs after 3 warm-up rounds, batch {batch}, "
            f"{job.threads} threads (torch and ORT intra-op), ORT spinning off, CPU {cpu_name()}"
        ),
        "batch": batch,
        "threads": job.threads,
        "latency": {name: s.to_dict() for name, s in stats.items()},
        "speedup_onnxruntime": ort_speedup,
        "speedup_pytorch_eager": eager_speedup,
        **flops_summary(model),
    }
