"""Acceptance of a reduced-precision (INT8/FP16) graph against the FP32 merged graph it came from.

INT8 and FP16 change every number a little, so elementwise tolerances say nothing useful. A
reduced graph is judged by what a deploying engineer measures: with labelled data, its top-1
accuracy must stay within `max_accuracy_drop` points of the FP32 merged graph's on the same
samples (what users lose); without labels, its logits must point the way FP32's do (cosine,
mean and worst sample, as polygraphy compares outputs). Top-1 agreement and merge-decision
agreement are always measured and reported, and gated only when asked: decisions between
near-identical tokens flip under ~1% perturbations without changing what the model predicts.

Decisions are read from debug exports, FP32 and reduced, that output every merging layer's
slots and slot owners (the shipped graph has no such outputs); the reduced debug graph must
reproduce the shipped reduced graph's logits, or its decisions are not the shipped graph's.
Slot numbers are positions, and one different decision shifts every later token's position, so
they are not compared directly. A token is named by its content, the input tokens merged in it
(merging a into b or b into a makes the same token: the mean is symmetric), and each input token
is followed through the layers. Two figures per layer: `layer_agreement`, the fraction of tokens
whose merge destination (the token owning the slot they land in, itself if it stays) equals
FP32's, among tokens that entered the layer in FP32's groups (a destination whose content an
earlier layer changed is a different token); and `cumulative_agreement`, the fraction of input
tokens whose group is exactly FP32's after the layer, every earlier difference included.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx

from exporter.decisions import owner_output_name
from exporter.merge_precision import reduced_merge_nodes
from exporter.near_ties import within
from exporter.onnx_export import export_settings
from exporter.parity import Tolerances, cosines, top1_agrees
from exporter.runners import ort_session

DECISIONS_MEANING = (
    "Merge-decision agreement is the share of tokens whose merge destination is the FP32 graph's. Reduced "
    "precision moves similarity scores by about a percent; where two destinations are nearly equally similar "
    "(near-identical tokens, e.g. flat background patches) the choice flips, so a figure below 100% usually "
    "means flipped decisions between interchangeable tokens, not a wrong graph. Accuracy (or output cosine) "
    "decides acceptance; --min-decision-agreement gates this figure too."
)


# With this few logits a sample's cosine measures little but the sign of its margin: two logits
# near a tie point anywhere (minilm_sentiment's good INT8 graphs: worst sample -0.93).
FEW_CLASSES = 3


@dataclass(frozen=True)
class AcceptanceRule:
    """When a reduced graph passes. Drops are in points of top-1 accuracy (0.5 = half a point)."""

    max_accuracy_drop: float = 0.5  # with labelled data: what users lose
    min_mean_cosine: float = 0.99  # without labels: logits point where FP32's do, on average
    min_cosine: float = 0.98  # ... and on the worst sample
    min_top1: float | None = None  # gated only when asked
    min_decisions: float | None = None  # per merging layer; gated only when asked


@dataclass
class AgreementReport:
    precision: str
    samples: int  # parity inputs behind the output figures
    rule: AcceptanceRule
    top1_agreement: float
    min_cosine: float
    mean_cosine: float
    max_abs: float
    classes: int = 0  # size of the compared output per sample (logits)
    nonfinite: int = 0  # output values that are Inf/NaN in the reduced graph where FP32's are finite
    layer_agreement: dict[str, float] = field(default_factory=dict)
    cumulative_agreement: dict[str, float] = field(default_factory=dict)
    debug_graph: dict | None = None  # opset, batch mode, and whether it reproduces the shipped graph
    merge_findings: list[str] = field(default_factory=list)  # merge nodes the conversion reduced
    accuracy: dict | None = None  # labelled data: samples, top-1 of FP32 merged and reduced

    def attach_accuracy(
        self, accuracy: dict, reduced: str = "merged", fp32: str = "merged fp32", why_not: str | None = None
    ) -> None:
        """Judge by accuracy from now on, if it can tell: `accuracy` is `pipelines.jobs.accuracy.
        measure_accuracy`'s result, in which `reduced` and `fp32` name the two graphs scored on the
        same samples. Accuracy is only reported, and the outputs decide, when `why_not` says why it
        cannot mean anything (a random-init model) or when FP32 itself scores at chance
        (`at_chance`): there, any broken graph would "keep" the budget."""
        self.accuracy = {
            "data": accuracy["data"],
            "samples": accuracy["samples"],
            "top1_fp32": accuracy["top1"][fp32],
            "top1_reduced": accuracy["top1"][reduced],
            "chance": accuracy.get("chance"),
        }
        self.accuracy["uninformative"] = why_not or at_chance(self.accuracy)

    @property
    def decided_by(self) -> str:
        return "accuracy" if self.accuracy is not None and not self.accuracy["uninformative"] else "outputs"

    def checks(self) -> list[tuple[bool, str]]:
        """(passed, what it says) for every check that gates this graph, the deciding rule first."""
        rule, checks = self.rule, [self._rule_check()]
        if self.nonfinite:
            checks.append(self._finite_check())
        if self.merge_findings:
            checks.append((False, f"the conversion reduced {len(self.merge_findings)} merge nodes, first "
                                  f"{self.merge_findings[0]}"))  # fmt: skip
        if rule.min_top1 is not None:
            ok = self.top1_agreement >= rule.min_top1
            checks.append((ok, f"top-1 agreement {self.top1_agreement:.2%} (min {rule.min_top1:.0%})"))
        if rule.min_decisions is not None:
            checks.append(self._decisions_check(rule.min_decisions))
        return checks

    def _rule_check(self) -> tuple[bool, str]:
        rule, acc = self.rule, self.accuracy
        if self.decided_by == "accuracy":
            drop = 100.0 * (acc["top1_fp32"] - acc["top1_reduced"])
            ok = drop <= rule.max_accuracy_drop + 1e-9
            miss = "" if ok else f"; {drop - rule.max_accuracy_drop:.2f} points more than allowed"
            return ok, (
                f"accuracy on {acc['samples']} labelled samples ({acc['data']}): {acc['top1_reduced']:.2%} vs "
                f"{acc['top1_fp32']:.2%} FP32 merged, {-drop:+.2f} points (allowed drop {rule.max_accuracy_drop:g}{miss})"
            )
        figures = {"mean": (self.mean_cosine, rule.min_mean_cosine), "worst": (self.min_cosine, rule.min_cosine)}
        # `not value >= bound`, not `bound - value > 0`: a NaN cosine (non-finite outputs) misses
        misses = [
            f"{which} {bound - value:.5f} short" for which, (value, bound) in figures.items() if not value >= bound
        ]
        hint = ""
        if misses and self.classes <= FEW_CLASSES:
            hint = f" ({self.classes} logits: their cosine swings near the decision boundary; judge by --data)"
        return not misses, (
            f"logit cosine on {self.samples} parity samples: mean {self.mean_cosine:.5f} (bound "
            f"{rule.min_mean_cosine:g}), worst sample {self.min_cosine:.5f} (bound {rule.min_cosine:g})"
            + (f"; {', '.join(misses)}{hint}" if misses else "")
        )

    def _finite_check(self) -> tuple[bool, str]:
        n = self.nonfinite
        return n == 0, f"{n} output values are Inf or NaN where FP32's are finite" if n else "outputs finite"

    def _decisions_check(self, bound: float) -> tuple[bool, str]:
        if not self.layer_agreement:
            return True, "no merging layer: no decisions to compare"
        if self.debug_graph and not self.debug_graph["reproduces"]:
            return False, "merge decisions unverifiable: the debug graph does not reproduce the shipped graph"
        worst = min(self.layer_agreement, key=self.layer_agreement.get)
        value = self.layer_agreement[worst]
        miss = "" if value >= bound else f"; {bound - value:.2%} short"
        return value >= bound, f"lowest per-layer decision agreement {value:.2%} ({worst}; min {bound:.0%}{miss})"

    @property
    def passed(self) -> bool:
        return all(ok for ok, _ in self.checks())

    def to_dict(self) -> dict:
        return {**asdict(self), "decided_by": self.decided_by, "passed": self.passed,
                "decisions_meaning": DECISIONS_MEANING}  # fmt: skip

    def verdict(self) -> str:
        """One line: PASSED/FAILED, the rule that decided and on how many samples, then what is reported."""
        (_, rule_text), *others = self.checks()
        state = "PASSED" if self.passed else "FAILED"
        line = f"{state} | {self.precision} vs fp32 merged graph by {self.decided_by}: {rule_text}"
        line += "".join(f" | {'passed' if ok else 'FAILED'}: {text}" for ok, text in others)
        line += f" | reported: top-1 agreement {self.top1_agreement:.2%} on {self.samples} parity samples"
        if self.accuracy is not None and self.decided_by == "outputs":
            acc = self.accuracy
            line += (f", accuracy {acc['top1_reduced']:.2%} vs {acc['top1_fp32']:.2%} FP32 merged on {acc['samples']} "
                     f"samples (not deciding: {acc['uninformative']})")  # fmt: skip
        if self.decided_by == "accuracy":
            line += f", logit cosine mean {self.mean_cosine:.5f}, worst {self.min_cosine:.5f}"
        if self.layer_agreement:
            worst = min(self.layer_agreement, key=self.layer_agreement.get)
            last = list(self.cumulative_agreement.values())[-1]
            line += (
                f", lowest per-layer decision agreement {self.layer_agreement[worst]:.2%} ({worst}), "
                f"tokens in FP32's groups after the last layer {last:.2%}"
            )
        if self.debug_graph and not self.debug_graph["reproduces"]:
            line += f" (debug graph off the shipped graph by max abs {self.debug_graph['max_abs']:.3g})"
        return line


# Accuracy tells graphs apart only where FP32 scores clearly above guessing the most frequent
# class: three binomial standard errors of that guess on the samples, and at least one point.
CHANCE_MARGIN_SE, CHANCE_MARGIN_MIN = 3.0, 0.01


def at_chance(accuracy: dict) -> str | None:
    """Why accuracy cannot tell a broken graph from a good one on these samples, or None: FP32
    merged scores within the margin above chance (`accuracy["chance"]`, the most frequent label's
    share)."""
    chance = accuracy.get("chance")
    if chance is None:
        return None
    margin = max(CHANCE_MARGIN_MIN, CHANCE_MARGIN_SE * float(np.sqrt(chance * (1 - chance) / accuracy["samples"])))
    if accuracy["top1_fp32"] > chance + margin:
        return None
    return f"FP32 merged scores {accuracy['top1_fp32']:.2%}, at chance (most frequent label {chance:.2%})"


def token_destinations(slots_per_layer: list[np.ndarray]) -> list[np.ndarray]:
    """After each merging layer, the slot `[B, N0]` that every input token has reached."""
    batch, n0 = slots_per_layer[0].shape
    where = np.broadcast_to(np.arange(n0), (batch, n0))
    out = []
    for slots in slots_per_layer:
        where = np.take_along_axis(slots, where, axis=1)
        out.append(where)
    return out


def destinations(slots: np.ndarray, owners: np.ndarray, where: np.ndarray) -> np.ndarray:
    """`[B, N0, N0]`: for input token i, which input tokens make up the token it is merged into.

    `where [B, N0]` is each input token's position entering the layer, `slots [B, N]` and
    `owners [B, n_out]` the layer's decisions; a token that stays is its own destination.
    """
    owner = np.take_along_axis(owners, np.take_along_axis(slots, where, axis=1), axis=1)
    return owner[:, :, None] == where[:, None, :]


def layer_figures(
    fp32: tuple[list[np.ndarray], list[np.ndarray]], reduced: tuple[list[np.ndarray], list[np.ndarray]]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per merging layer, for one batch: (destination agreement of the tokens that entered in
    FP32's groups, group agreement of every input token). Each side is (slots, owners) per layer."""
    paths = [token_destinations(slots) for slots, _ in (fp32, reduced)]
    where = [np.broadcast_to(np.arange(paths[0][0].shape[1]), paths[0][0].shape)] * 2
    same_before = np.ones(where[0].shape, dtype=bool)
    figures = []
    for k in range(len(paths[0])):
        dest = [destinations(slots[k], owners[k], where[side]) for side, (slots, owners) in enumerate((fp32, reduced))]
        same = same_groups(paths[0][k], paths[1][k])
        figures.append(((dest[0] == dest[1]).all(-1)[same_before], same.reshape(-1)))
        same_before, where = same, [paths[0][k], paths[1][k]]
    return figures


def same_groups(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """`[B, N0]`: whether input token i shares its slot with the same input tokens under `a` and `b`."""
    return ((a[:, :, None] == a[:, None, :]) == (b[:, :, None] == b[:, None, :])).all(-1)


def decision_agreement(
    fp32_debug: Path, reduced_debug: Path, feeds: list[dict], threads: int | None = None, providers: str = "cpu"
) -> tuple[dict[str, float], dict[str, float]]:
    """(per-layer destination agreement, cumulative group agreement), per merging layer."""
    fp32, reduced = (ort_session(path, providers, threads) for path in (fp32_debug, reduced_debug))
    names = [o.name for o in fp32.get_outputs() if o.name.startswith("slots_")]
    owner_names = [owner_output_name(name) for name in names]
    own: dict[str, list[np.ndarray]] = {name: [] for name in names}
    cumulative: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for feed in feeds:
        runs = [session.run(names + owner_names, feed) for session in (fp32, reduced)]
        sides = [(out[: len(names)], out[len(names) :]) for out in runs]
        for name, (layer_own, layer_cumulative) in zip(names, layer_figures(*sides)):
            own[name].append(layer_own)
            cumulative[name].append(layer_cumulative)

    def mean(values: list[np.ndarray]) -> float:
        joined = np.concatenate([v.reshape(-1) for v in values])
        return float(joined.mean()) if joined.size else 1.0

    return {n: mean(v) for n, v in own.items()}, {n: mean(v) for n, v in cumulative.items()}


def _output_figures(fp32_graph: Path, reduced_graph: Path, feeds: list[dict], providers: str, threads) -> dict:
    """Top-1 agreement, logit cosine (mean, min) and max abs difference over `feeds`."""
    fp32, reduced = (ort_session(path, providers, threads) for path in (fp32_graph, reduced_graph))
    agree, cos_parts, max_abs, nonfinite = [], [], [], 0
    for feed in feeds:
        a, b = fp32.run(None, feed)[0], reduced.run(None, feed)[0]
        agree.append(top1_agrees(a, b))
        cos_parts.append(cosines(a, b))
        max_abs.append(np.abs(a - b).max())
        nonfinite += int((np.isfinite(a) & ~np.isfinite(b)).sum())
    cos = np.concatenate(cos_parts)  # np.min/np.mean/np.max keep a NaN, so a NaN never passes a bound
    return {"samples": int(cos.size), "classes": int(a[0].size), "top1_agreement": float(np.concatenate(agree).mean()),
            "min_cosine": float(cos.min()), "mean_cosine": float(cos.mean()), "max_abs": float(np.max(max_abs)),
            "nonfinite": nonfinite}  # fmt: skip


def reproduces(debug_graph: Path, shipped_graph: Path, feeds: list[dict], providers: str = "cpu", threads=None) -> dict:
    """Whether a debug graph's main output equals the shipped graph's on `feeds` (FP32
    tolerances), with the debug graph's opset and batch mode: its decisions are the shipped
    graph's only if it computes the same thing."""
    debug, shipped = (ort_session(path, providers, threads) for path in (debug_graph, shipped_graph))
    main = debug.get_outputs()[0].name
    ok, max_abs = True, 0.0
    for feed in feeds:
        expected, got = shipped.run(None, feed)[0], debug.run([main], feed)[0]
        diff = np.abs(got - expected)
        max_abs, ok = float(np.max([max_abs, diff.max()])), ok and within(diff, expected, Tolerances())
    settings = export_settings(debug_graph)
    return {
        "opset": settings["opset"],
        "dynamic_batch": settings["dynamic_batch"],
        "reproduces": ok,
        "max_abs": max_abs,
    }


def check_reduced_precision(
    precision: str,
    fp32_graph: Path,
    reduced_graph: Path,
    feeds: list[dict],
    debug_export: Callable[[Path], Path] | None = None,
    convert: Callable[[Path, Path], Path] | None = None,
    rule: AcceptanceRule = AcceptanceRule(),
    threads: int | None = None,
    providers: str = "cpu",
) -> AgreementReport:
    """Compare `reduced_graph` with `fp32_graph` on `feeds`, and read its merge nodes from the
    graph; with `debug_export` (writes the FP32 debug graph to a path) and `convert` (the same
    precision conversion), merge decisions too. Accuracy, when there are labels, is attached
    later (`report.accuracy`) by whoever measured it on the same graphs."""
    report = AgreementReport(
        precision=precision, rule=rule, **_output_figures(fp32_graph, reduced_graph, feeds, providers, threads)
    )
    report.merge_findings = reduced_merge_nodes(
        onnx.load(str(reduced_graph), load_external_data=False), onnx.load(str(fp32_graph), load_external_data=False)
    )
    if debug_export is not None and convert is not None:
        with tempfile.TemporaryDirectory(prefix="pitome-agreement-") as tmp:
            fp32_debug = debug_export(Path(tmp) / "decisions_fp32.onnx")
            reduced_debug = convert(fp32_debug, Path(tmp) / f"decisions_{precision}.onnx")
            report.debug_graph = reproduces(reduced_debug, reduced_graph, feeds, providers, threads)
            report.layer_agreement, report.cumulative_agreement = decision_agreement(
                fp32_debug, reduced_debug, feeds, threads, providers
            )
    return report
