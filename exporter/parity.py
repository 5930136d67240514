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

from exporter.near_ties import DecisionsReport, explain_with_decisions
from exporter.signatures import ModelSignature

# The near-tie bound on the reference's merge scores (cosine similarities in [-1, 1] and energies
# of about that scale). Measured between PyTorch and ONNX Runtime or OpenVINO (CPU, FP32; real
# MiniLM and vit_fmnist, random-init DeiT-S and BERT): scores at most 8.3e-7 apart, honest flips
# at most 1.5e-8 short of the reference's best; a graph ranking by another rule falls 1e-2 and
# more short (docs/precision.md). 2e-5 leaves 24x the noise and stays far below a wrong rule.
TIE_ATOL_FP32 = 2e-5
TIE_ATOL_FP16 = 1e-2  # FP16 activations feed the (FP32) merge: scores a rounding of 1e-3 apart, with room
# Honest flips moved at most 0.8% of a layer's choices in the same runs; a wrong rule most of
# them. Ties between exactly equal scores do not count (either choice is right).
MAX_FLIP_SHARE = 0.05
# With a token or two moved, every output still points where the reference's does.
MIN_RESCUED_COSINE = 0.99


@dataclass(frozen=True)
class Tolerances:
    """Pass/fail bounds; FP16 is looser by design. The last three bound the near-tie rescue
    (`exporter.near_ties`): when merge decisions differ, the graph passes only if every choice
    it made is within `tie_atol` of the reference's best under the reference's own scores, at
    most `max_flip_share` of a layer's tokens changed group, and every output still points where
    the reference's does (worst sample's cosine `min_rescued_cosine`, top-1 as above)."""

    atol: float = 1e-4
    rtol: float = 1e-3
    min_top1: float = 1.0
    min_cosine: float = -1.0  # worst sample's cosine; only INT8 engines, judged without elementwise bounds, set it
    tie_atol: float = TIE_ATOL_FP32
    max_flip_share: float = MAX_FLIP_SHARE
    min_rescued_cosine: float = MIN_RESCUED_COSINE


TOLERANCES = {
    "fp32": Tolerances(),
    "fp16": Tolerances(atol=2e-2, rtol=2e-2, min_top1=0.99, tie_atol=TIE_ATOL_FP16),
}


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
    decisions: DecisionsReport | None = None  # filled by `verify_export` when the direct comparison fails

    @property
    def passed(self) -> bool:
        """Direct agreement, or near-ties only: see `rescue_checks`."""
        if all(o.passed for o in self.outputs):
            return True
        return self.decisions is not None and all(ok for ok, _ in self.rescue_checks())

    def rescue_checks(self) -> list[tuple[bool, str]]:
        """(passed, what it says) for every condition under which differing merge decisions are
        excused as near-ties, the decisions' own first, then each output's direction."""
        t = self.tolerances
        checks = self.decisions.checks(t.tie_atol, t.max_flip_share)
        for o in self.outputs:
            if o.top1_agreement is not None:
                checks.append((o.top1_passed(t), f"{o.name} top-1 agreement {o.top1_text()} (min {t.min_top1:.0%})"))
            ok = bool(o.min_cosine >= t.min_rescued_cosine)
            checks.append((ok, f"{o.name} worst sample's cosine {o.min_cosine:.6f} (min {t.min_rescued_cosine:g})"))
        return checks

    def to_dict(self) -> dict:
        out = asdict(self)
        if self.decisions is not None:
            out["decisions"] = self.decisions.to_dict()
            out["rescue_checks"] = [{"passed": ok, "check": text} for ok, text in self.rescue_checks()]
        out["passed"] = self.passed
        return out

    def verdict(self) -> str:
        """One line in polygraphy's style: PASSED/FAILED with the tolerances used."""
        t = self.tolerances
        worst = max(self.outputs, key=lambda o: np.inf if np.isnan(o.max_abs) else o.max_abs)
        state = "PASSED" if self.passed else "FAILED"
        line = (
            f"{state} | atol={t.atol:g} rtol={t.rtol:g} min top-1={t.min_top1:.0%} | "
            f"max abs {worst.max_abs:.3g}, max rel {worst.max_rel:.3g}, top-1 {worst.top1_text()}"
        )
        if self.decisions is None:
            return line
        failed = [text for ok, text in self.rescue_checks() if not ok]
        line += f" | {self.decisions.summary()}"
        return line + (" | not near-ties: " + "; ".join(failed) if failed else " | near-ties only")


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
            # np.max, not max(): it keeps a NaN (Python's max drops it when it comes after a number)
            max_abs=float(np.max([s.max_absdiff for s in stats])),
            max_rel=float(np.max([s.max_reldiff for s in stats])),
            mean_abs=float(np.mean([s.mean_absdiff for s in stats])),
            min_cosine=float(cos.min()),
            top1_agreement=top1,
            elementwise_passed=elementwise,
            passed=False,
        )
        output.passed = elementwise and output.top1_passed(tolerances) and output.min_cosine >= tolerances.min_cosine
        report.outputs.append(output)
    return report


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
    from exporter.decisions import decision_layer_names

    if not decision_layer_names(model):
        return report
    from exporter.decisions import export_decisions_like
    from exporter.onnx_export import export_settings

    with tempfile.TemporaryDirectory(prefix="pitome-decisions-", dir=scratch) as tmp:
        seq_len = signature.input_shapes.get("input_ids", (None,))[0]
        debug = export_decisions_like(model, onnx_path, Path(tmp) / "decisions.onnx", seq_len)
        report.decisions = explain_with_decisions(
            model, signature, onnx_path, debug, feeds, tol, device, threads, providers
        )
        report.decisions.debug_graph = export_settings(debug)
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
