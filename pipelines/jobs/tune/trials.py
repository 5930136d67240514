"""What one tuning trial measures: its graph's top-1 on the tuning split and its latency against
the unmerged FP32 graph, on the target backend (ONNX Runtime), interleaved in one run."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from statistics import NormalDist

import numpy as np
import torch

from exporter.variants import Conversion, Variant, convert_variant, export_module, time_graphs, variant_model
from pipelines.jobs.tune.space import Candidate, ScheduleLayout

REFERENCE = "unmerged fp32"


@dataclass
class TrialBench:
    """Everything a trial is measured with, built once per tuning run.

    `batches` is the tuning split in memory (feeds, labels) at the accuracy batch size, so every
    trial scores the same samples in the same batches (dynamic INT8 depends on the batch).
    """

    model: torch.nn.Module  # loaded, unpatched; trials patch copies
    kind: str  # vision or text
    seq_len: int | None
    signature: object  # exporter.signatures.ModelSignature
    layout: ScheduleLayout
    num_prefix: int
    width: tuple[int, float]  # embedding width, MLP ratio (block FLOPs)
    batches: list[tuple[dict[str, np.ndarray], np.ndarray]]
    calibration: list[dict[str, np.ndarray]]
    calibration_source: str
    scratch: Path
    threads: int
    bench_batch: int
    runs: int
    opset: int
    seed: int = 0
    confidence: float = 0.9  # one-sided level of the drop's upper bound (see drop_points)
    graphs: dict[str, Path] = field(default_factory=dict)  # candidate key -> exported graph (this process)
    fp32_graphs: dict[str, Path] = field(default_factory=dict)  # candidate key -> its FP32 export
    reference_correct: np.ndarray | None = None  # per tuning sample: the unmerged FP32 graph is right

    @property
    def samples(self) -> int:
        return sum(len(labels) for _, labels in self.batches)

    @property
    def reference_top1(self) -> float:
        return float(self.reference_correct.mean())

    def graph(self, candidate: Candidate, model: torch.nn.Module | None = None) -> Path:
        """The candidate's graph, exported (and converted) once per process; `model` is its
        patched model when the caller has it already."""
        if candidate.key not in self.graphs:
            model = model if model is not None else patched(self, candidate)
            stem = self.scratch / f"g{len(self.graphs)}"
            self.fp32_graphs[candidate.key], self.graphs[candidate.key] = export_candidate(self, candidate, model, stem)
        return self.graphs[candidate.key]

    @property
    def reference(self) -> Path:
        """The unmerged FP32 graph: the budget's and the speed-ups' reference."""
        return self.graph(Candidate("pitome", False, (0,) * self.layout.depth))


def variant_of(candidate: Candidate) -> Variant:
    """The candidate as an `exporter.variants.Variant` (its key names it)."""
    if not candidate.merged:
        return Variant(candidate.key, precision=candidate.precision, int8_mode=candidate.int8_mode)
    return Variant(
        candidate.key, candidate.algo, schedule=candidate.merges, prop_attn=candidate.prop_attn,
        precision=candidate.precision, int8_mode=candidate.int8_mode,
    )  # fmt: skip


def patched(bench: TrialBench, candidate: Candidate) -> torch.nn.Module:
    """A copy of the model merging as the candidate says (the caller's model is left as it was)."""
    return variant_model(bench.model, variant_of(candidate), bench.seq_len if bench.kind == "text" else None)


def export_candidate(bench: TrialBench, candidate: Candidate, model: torch.nn.Module, stem: Path) -> tuple[Path, Path]:
    """Export the candidate's patched model and convert it to the candidate's precision:
    (FP32 export, the candidate's graph), the same file for an FP32 candidate."""
    variant = variant_of(candidate)
    fp32 = export_module(model, variant, stem.with_suffix(".fp32.onnx"), seq_len=bench.seq_len, opset=bench.opset)
    if candidate.precision == "fp32":
        return fp32, fp32
    conversion = Conversion(bench.calibration, bench.calibration_source)
    return fp32, convert_variant(fp32, variant, stem.with_suffix(f".{candidate.precision}.onnx"), conversion)


def eager_correct(bench: TrialBench, model: torch.nn.Module) -> np.ndarray:
    """Per tuning sample, whether the patched PyTorch model (FP32) is right: the cheap accuracy
    pre-filter (the FP32 export equals it to ~1e-6, proven by the parity suite)."""
    from exporter.signatures import ExportWrapper

    wrapper = ExportWrapper(model, bench.signature).eval()
    names = bench.signature.input_names
    with torch.no_grad():
        return _correct(bench, lambda feeds: wrapper(*(torch.from_numpy(feeds[name]) for name in names)).numpy())


def graph_correct(bench: TrialBench, graph: Path) -> np.ndarray:
    """Per tuning sample, whether the graph (ONNX Runtime) is right."""
    from exporter.runners import ort_session

    session = ort_session(graph, threads=bench.threads)
    return _correct(bench, lambda feeds: session.run(None, feeds)[0])


def _correct(bench: TrialBench, logits_of) -> np.ndarray:
    """Per tuning sample, whether the top-1 class of `logits_of(feeds)` is the label."""
    right = [logits_of(feeds).reshape(len(labels), -1).argmax(-1) == labels for feeds, labels in bench.batches]
    return np.concatenate(right)


def drop_points(bench: TrialBench, correct: np.ndarray) -> tuple[float, float]:
    """(estimate, upper bound) of the top-1 points lost against the unmerged FP32 model.

    The tuning split is a sample: a schedule chosen at the budget's edge loses more on the test
    split about as often as less (measured: 0.5 on the tuning split, 0.62 on the test split).
    The bound is the one-sided `bench.confidence` limit of the paired difference (both graphs
    score the same samples, so only the samples they disagree on carry its variance; normal
    approximation), and the budget is kept on it.
    """
    reference = bench.reference_correct
    count = len(reference)
    lost = int(np.sum(reference & ~correct))
    gained = int(np.sum(~reference & correct))
    drop = (lost - gained) / count
    variance = max(0.0, (lost + gained) / count - drop**2) / count
    z = NormalDist().inv_cdf(bench.confidence)
    return 100.0 * drop, 100.0 * (drop + z * math.sqrt(variance))


def time_against(bench: TrialBench, graphs: dict[str, Path], runs: int | None = None) -> dict:
    """Latency stats of every graph, timed in one interleaved run on ONNX Runtime CPU."""
    inputs = bench.signature.example_inputs(bench.bench_batch, seed=bench.seed)
    feeds = {name: inputs[name].numpy() for name in bench.signature.input_names}
    return time_graphs(graphs, feeds, bench.bench_batch, runs or bench.runs, bench.threads)


def flop_speedup(bench: TrialBench, candidate: Candidate) -> float:
    """Block-FLOP speed-up of the candidate's schedule over the unmerged model (where its
    algorithm reduces: DCT after the MLP)."""
    from ops.algos import algorithm
    from ops.flops import flop_speedup as schedule_speedup
    from ops.schedule import build_schedule

    layout = bench.layout
    schedule = build_schedule(
        layout.num_tokens, layout.depth, algo=candidate.algo, merges=list(candidate.merges),
        num_prefix=bench.num_prefix,
    )  # fmt: skip
    return schedule_speedup(schedule, *bench.width, algorithm(candidate.algo).stage)


def evaluate(bench: TrialBench, candidate: Candidate, model: torch.nn.Module | None = None) -> dict:
    """Export the candidate, score it on the tuning split, time it against the unmerged graph."""
    began = time.perf_counter()
    graph = bench.graph(candidate, model)
    correct = graph_correct(bench, graph)
    drop, bound = drop_points(bench, correct)
    graphs = {"candidate": graph, REFERENCE: bench.reference}
    stats = time_against(bench, graphs)
    return {
        "top1": float(correct.mean()),
        "drop_points": drop,
        "drop_bound_points": bound,
        "speedup": stats[REFERENCE].median_ms / stats["candidate"].median_ms,
        "latency_ms": stats["candidate"].median_ms,
        "latency_cv": stats["candidate"].cv,
        "seconds": time.perf_counter() - began,
    }
