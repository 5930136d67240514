"""Parity of an export against the PyTorch reference, with polygraphy's comparator.

Polygraphy runs both runners on the same feeds and judges each output elementwise
(|diff| <= atol or rel <= rtol); we add what matters for classifiers: cosine similarity and
top-1 agreement (of `logits`; features have no classes). The verdict and every figure go to `parity.json` and a printed table.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
from polygraphy.comparator import Comparator, CompareFunc
from polygraphy.logger import G_LOGGER

from exporter.signatures import ModelSignature


@dataclass(frozen=True)
class Tolerances:
    """Pass/fail bounds; the FP32 defaults are the issue's, FP16 is looser by design."""

    atol: float = 1e-4
    rtol: float = 1e-3
    min_top1: float = 1.0
    min_cosine: float = -1.0  # worst sample's cosine; only INT8 engines, judged without elementwise bounds, set it


TOLERANCES = {"fp32": Tolerances(), "fp16": Tolerances(atol=2e-2, rtol=2e-2, min_top1=0.99)}


@dataclass
class OutputParity:
    name: str
    max_abs: float
    max_rel: float
    mean_abs: float
    min_cosine: float
    top1_agreement: float | None  # None for feature outputs (hidden states, embeddings): no classes
    elementwise_passed: bool
    passed: bool

    def top1_passed(self, tolerances: Tolerances) -> bool:
        return self.top1_agreement is None or self.top1_agreement >= tolerances.min_top1

    def top1_text(self) -> str:
        return "n/a" if self.top1_agreement is None else f"{self.top1_agreement:.2%}"


@dataclass
class ParityReport:
    reference: str
    candidate: str
    tolerances: Tolerances
    batch_sizes: list[int]
    samples: int
    outputs: list[OutputParity] = field(default_factory=list)
    schedule: dict | None = None
    decisions: dict | None = None  # filled by `verify_export` when the direct comparison fails

    @property
    def passed(self) -> bool:
        """Direct agreement, or agreement once PyTorch takes the graph's own merge decisions."""
        if all(o.passed for o in self.outputs):
            return True
        d = self.decisions
        return bool(d and d["forced_passed"] and all(o.top1_passed(self.tolerances) for o in self.outputs))

    def to_dict(self) -> dict:
        out = asdict(self)
        out["passed"] = self.passed
        return out

    def verdict(self) -> str:
        """One line in polygraphy's style: PASSED/FAILED with the tolerances used."""
        t = self.tolerances
        worst = max(self.outputs, key=lambda o: o.max_abs)
        state = "PASSED" if self.passed else "FAILED"
        line = (
            f"{state} | atol={t.atol:g} rtol={t.rtol:g} min top-1={t.min_top1:.0%} | "
            f"max abs {worst.max_abs:.3g}, max rel {worst.max_rel:.3g}, top-1 {worst.top1_text()}"
        )
        if self.decisions:
            d = self.decisions
            line += (
                f" | merge decisions differ in {d['samples_with_flips']}/{self.samples} samples "
                f"(lowest layer agreement {min(d['layer_agreement'].values()):.2%}); with the graph's decisions "
                f"forced: max abs {d['forced_max_abs']:.3g} {'within' if d['forced_passed'] else 'OUTSIDE'} tolerance"
            )
        return line


def parity_feeds(signature: ModelSignature, batch_sizes=(1, 4), batches_per_size: int = 2, seed: int = 0):
    """Seeded synthetic feeds as numpy dicts: several batches at each batch size."""
    feeds = []
    for i, batch in enumerate(batch_sizes):
        for j in range(batches_per_size):
            tensors = signature.example_inputs(batch, seed=seed + 1000 * i + j)
            feeds.append({name: tensors[name].numpy() for name in signature.input_names})
    return feeds


def top1_agrees(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per sample, whether two outputs `[B, ...]` have the same arg-max."""
    return a.reshape(a.shape[0], -1).argmax(-1) == b.reshape(b.shape[0], -1).argmax(-1)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per sample, the cosine similarity of two outputs `[B, ...]` (in float64)."""
    a2, b2 = a.reshape(a.shape[0], -1).astype(np.float64), b.reshape(b.shape[0], -1).astype(np.float64)
    denom = np.linalg.norm(a2, axis=1) * np.linalg.norm(b2, axis=1)
    return (a2 * b2).sum(axis=1) / np.maximum(denom, 1e-30)


def check_parity(reference, candidate, feeds: list[dict], tolerances: Tolerances = Tolerances()) -> ParityReport:
    """Run both runners on `feeds` and compare every output."""
    severity = G_LOGGER.module_severity
    G_LOGGER.module_severity = G_LOGGER.CRITICAL  # our report says what failed; keep polygraphy quiet
    try:
        results = Comparator.run([reference, candidate], data_loader=feeds)
        accuracy = Comparator.compare_accuracy(
            results, compare_func=CompareFunc.simple(atol=tolerances.atol, rtol=tolerances.rtol)
        )
    finally:
        G_LOGGER.module_severity = severity
    (ref_name, ref_iters), (cand_name, cand_iters) = list(results.items())
    per_iteration = accuracy[0][(ref_name, cand_name)]
    report = ParityReport(
        reference=ref_name.split("-N")[0],
        candidate=cand_name.split("-N")[0],
        tolerances=tolerances,
        batch_sizes=sorted({next(iter(f.values())).shape[0] for f in feeds}),
        samples=sum(next(iter(f.values())).shape[0] for f in feeds),
    )
    for name in ref_iters[0].keys():
        ref = [np.asarray(it[name]) for it in ref_iters]
        cand = [np.asarray(it[name]) for it in cand_iters]
        stats = [iteration[name] for iteration in per_iteration]
        cos = np.concatenate([cosines(r, c) for r, c in zip(ref, cand)])
        agree = np.concatenate([top1_agrees(r, c) for r, c in zip(ref, cand)])
        elementwise = all(bool(s) for s in stats)
        top1 = float(agree.mean()) if name == "logits" else None
        output = OutputParity(
            name=name,
            max_abs=float(max(s.max_absdiff for s in stats)),
            max_rel=float(max(s.max_reldiff for s in stats)),
            mean_abs=float(np.mean([s.mean_absdiff for s in stats])),
            min_cosine=float(cos.min()),
            top1_agreement=top1,
            elementwise_passed=elementwise,
            passed=False,
        )
        output.passed = elementwise and output.top1_passed(tolerances) and output.min_cosine >= tolerances.min_cosine
        report.outputs.append(output)
    return report


def within(diff: np.ndarray, ref: np.ndarray, tol: Tolerances) -> bool:
    """Polygraphy's elementwise rule: |diff| <= atol or |diff| <= rtol * |ref|."""
    return bool(np.all((diff <= tol.atol) | (diff <= tol.rtol * np.abs(ref))))


def explain_with_decisions(
    model,
    signature: ModelSignature,
    shipped_onnx,
    debug_onnx,
    feeds: list[dict],
    tol: Tolerances,
    device,
    threads=None,
    providers: str = "cpu",
) -> dict:
    """Compare merge decisions of PyTorch and a debug export, then rerun PyTorch with the graph's.

    Returns per-layer decision agreement (fraction of tokens given the same slot), how many
    samples saw any different decision, and whether the outputs agree once PyTorch is forced to
    the graph's decisions: if so, the export computes the same function and only near-ties in
    the scores were broken differently. The debug graph must reproduce the shipped graph's
    outputs, or it explains nothing. Both graphs run on `providers`, the provider whose parity
    failed: a GPU failure is never excused with CPU decisions.
    """
    from exporter.decisions import decision_output_names, run_eager
    from exporter.runners import ort_session, placed_on

    session, shipped = (ort_session(path, providers, threads) for path in (debug_onnx, shipped_onnx))
    layers = decision_output_names(model)
    agree: dict[str, list[np.ndarray]] = {name: [] for name in layers}
    flipped, forced_max, forced_ok = 0, 0.0, True
    main = session.get_outputs()[0].name
    with placed_on(model, device):  # once for every run_eager below
        for feed in feeds:
            graph_out, *graph_slots = session.run([main, *layers], feed)
            forced_ok &= within(np.abs(shipped.run(None, feed)[0] - graph_out), graph_out, tol)
            _, eager_slots = run_eager(model, signature, feed, device)
            same = np.ones(graph_out.shape[0], dtype=bool)
            for name, g, e in zip(layers, graph_slots, eager_slots):
                equal = g == e.numpy()
                agree[name].append(equal.reshape(-1))
                same &= equal.reshape(equal.shape[0], -1).all(axis=1)
            flipped += int((~same).sum())
            forced, _ = run_eager(model, signature, feed, device, forced=graph_slots)
            diff = np.abs(forced.numpy() - graph_out)
            forced_max = max(forced_max, float(diff.max()))
            forced_ok &= within(diff, forced.numpy(), tol)
    return {
        "layer_agreement": {name: float(np.concatenate(v).mean()) for name, v in agree.items()},
        "samples_with_flips": int(flipped),
        "forced_max_abs": forced_max,
        "forced_passed": forced_ok,
    }


def verify_export(
    model,
    signature: ModelSignature,
    onnx_path,
    feeds: list[dict],
    tol: Tolerances,
    device,
    threads=None,
    scratch=None,
    providers: str = "cpu",
) -> ParityReport:
    """Parity of `onnx_path` vs `model`; a failure is re-judged with merge decisions forced.

    The direct comparison (polygraphy) decides when it passes. When it fails and the model
    merges tokens, a debug export with the decisions as outputs shows whether the difference
    comes from near-tied scores broken differently (the graph is right) or not.
    """
    import tempfile
    from pathlib import Path

    from exporter.runners import TorchRunner, ort_runner

    report = check_parity(
        TorchRunner(model, signature, str(device)), ort_runner(onnx_path, providers, threads=threads), feeds, tol
    )
    schedule = getattr(model, "token_schedule", None)
    if report.passed or schedule is None or not any(schedule.merges):
        return report
    from exporter.decisions import export_decisions_like
    from exporter.onnx_export import export_settings

    with tempfile.TemporaryDirectory(prefix="pitome-decisions-", dir=scratch) as tmp:
        seq_len = signature.input_shapes.get("input_ids", (None,))[0]
        debug = export_decisions_like(model, onnx_path, Path(tmp) / "decisions.onnx", seq_len)
        report.decisions = explain_with_decisions(
            model, signature, onnx_path, debug, feeds, tol, device, threads, providers
        )
        report.decisions["debug_graph"] = export_settings(debug)
    return report


def print_report(report: ParityReport, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"Parity: {report.candidate} vs {report.reference} ({report.samples} samples)")
    for column in (
        "output",
        "max abs (min atol)",
        "max rel (min rtol)",
        "mean abs",
        "min cosine",
        "top-1 agree",
        "result",
    ):
        table.add_column(column, justify="right" if column != "output" else "left")
    for o in report.outputs:
        table.add_row(
            o.name,
            f"{o.max_abs:.3g}",
            f"{o.max_rel:.3g}",
            f"{o.mean_abs:.3g}",
            f"{o.min_cosine:.7f}",
            o.top1_text(),
            "[green]PASSED[/]" if o.passed else "[red]FAILED[/]",
        )
    console.print(table)
    console.print(report.verdict())
