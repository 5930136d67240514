"""Latency of the exported graph against the unmerged model, same backend, one process, interleaved."""

from __future__ import annotations

from pathlib import Path

import torch

from exporter.runners import cpu_name
from exporter.signatures import ModelSignature
from exporter.variants import eager_call, time_graphs
from ops.algos import algorithm
from ops.flops import schedule_flops


def model_width(model: torch.nn.Module) -> tuple[int, float]:
    """(embedding width, MLP ratio) of a timm ViT or an HF model (BERT family, ViT, CLIP, DINOv2)."""
    config = getattr(model, "config", None)
    if config is not None:
        dim = getattr(config, "hidden_size", None) or config.dim
        if getattr(config, "mlp_ratio", None):  # DINOv2 declares the ratio, not the width
            return dim, float(config.mlp_ratio)
        hidden = getattr(config, "intermediate_size", None) or config.hidden_dim
        return dim, hidden / dim
    return model.embed_dim, model.blocks[0].mlp.fc1.out_features / model.embed_dim


def flops_summary(model: torch.nn.Module) -> dict:
    dim, mlp_ratio = model_width(model)
    stage = algorithm(model.merge_config["algo"]).stage
    merged, unmerged = schedule_flops(model.token_schedule, dim, mlp_ratio, stage)
    return {
        "block_gflops_merged": sum(merged) / 1e9,
        "block_gflops_unmerged": sum(unmerged) / 1e9,
        "block_flop_speedup": sum(unmerged) / sum(merged),
        "per_layer_gflops_merged": [f / 1e9 for f in merged],
    }


def benchmark_artifact(
    model: torch.nn.Module,
    unmerged: torch.nn.Module,
    signature: ModelSignature,
    onnx_path: Path,
    baseline: Path,
    job,
    extra: dict[str, Path] | None = None,
) -> dict:
    """Time ORT merged vs unmerged and PyTorch eager merged vs unmerged at the job's batch size.

    `extra` graphs (e.g. "merged fp32" and "unmerged int8" beside an INT8 merged graph) join
    the same interleaved run; every ORT speed-up is against the FP32 unmerged graph.
    """
    batch = 2 if job.static_batch else job.bench_batch  # a static graph runs at its export batch
    feeds = signature.example_inputs(batch, seed=job.seed)
    graphs = {"merged": onnx_path, "unmerged": baseline, **(extra or {})}
    stats = time_graphs(
        {f"onnxruntime {name}": path for name, path in graphs.items()},
        {name: feeds[name].numpy() for name in signature.input_names}, batch, job.bench_runs, job.threads,
        job.ort_provider, extra={
            "pytorch eager merged": eager_call(model, signature, feeds),
            "pytorch eager unmerged": eager_call(unmerged, signature, feeds),
        },
    )  # fmt: skip
    reference = stats["onnxruntime unmerged"].median_ms
    ort_speedup = reference / stats["onnxruntime merged"].median_ms
    eager_speedup = stats["pytorch eager unmerged"].median_ms / stats["pytorch eager merged"].median_ms
    return {
        "how": (
            f"{job.bench_runs} interleaved runs after 3 warm-up rounds, batch {batch}, "
            f"{job.threads} threads (torch and ORT intra-op), ORT spinning off, ORT provider {job.ort_provider}, "
            f"CPU {cpu_name()}"
        ),
        "batch": batch,
        "threads": job.threads,
        "latency": {name: s.to_dict() for name, s in stats.items()},
        "precision": job.precision,
        "speedup_onnxruntime": ort_speedup,
        "speedup_vs_fp32_unmerged": {
            name.removeprefix("onnxruntime "): reference / s.median_ms
            for name, s in stats.items()
            if name.startswith("onnxruntime ") and name != "onnxruntime unmerged"
        },
        "speedup_pytorch_eager": eager_speedup,
        **flops_summary(model),
    }
