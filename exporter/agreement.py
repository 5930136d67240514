"""Parity of a reduced-precision graph by what matters: agreement with the FP32 merged graph.

INT8 and FP16 change every number a little, so elementwise tolerances say nothing useful; the
questions are whether the class stays the same (top-1 agreement), whether the logits point the
same way (cosine), and whether the same tokens merge. The last is read from debug exports, FP32
and reduced, that output every merging layer's slots (the shipped graph has no such outputs).

Slot numbers are positions, and one different decision shifts the positions of every later
token, so they are not compared directly. A token is named by its content, the input tokens
merged in it (merging a into b or b into a makes the same token: the mean is symmetric), and
each input token is followed through the layers. Two figures per layer: `layer_agreement`, the
layer's own decisions as the issue defines them, the fraction of tokens whose merge destination
(the token owning the slot they land in, itself if it stays) equals FP32's, among tokens that
entered the layer in FP32's groups; a destination whose content an earlier layer changed is a
different token. This is what the threshold judges. And `cumulative_agreement`, the fraction of
input tokens whose group is exactly FP32's after the layer, every earlier difference included.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from exporter.decisions import owner_output_name
from exporter.parity import cosines, top1_agrees
from exporter.runners import ort_session


@dataclass(frozen=True)
class AgreementThresholds:
    """Pass bounds for reduced precision (the issue's defaults)."""

    min_top1: float = 0.99
    min_decisions: float = 0.99  # per merging layer


@dataclass
class AgreementReport:
    precision: str
    samples: int
    thresholds: AgreementThresholds
    top1_agreement: float
    min_cosine: float
    mean_cosine: float
    max_abs: float
    layer_agreement: dict[str, float] = field(default_factory=dict)
    cumulative_agreement: dict[str, float] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        t = self.thresholds
        layers_ok = all(v >= t.min_decisions for v in self.layer_agreement.values())
        return self.top1_agreement >= t.min_top1 and layers_ok

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}

    def verdict(self) -> str:
        t = self.thresholds
        state = "PASSED" if self.passed else "FAILED"
        line = (
            f"{state} | {self.precision} vs fp32 merged graph, {self.samples} samples | top-1 agreement "
            f"{self.top1_agreement:.2%} (min {t.min_top1:.0%}), logit cosine min {self.min_cosine:.5f} "
            f"mean {self.mean_cosine:.5f}, max abs {self.max_abs:.3g}"
        )
        if self.layer_agreement:
            worst = min(self.layer_agreement, key=self.layer_agreement.get)
            last = list(self.cumulative_agreement.values())[-1]
            line += (
                f" | merge decisions: lowest per-layer agreement {self.layer_agreement[worst]:.2%} ({worst}; "
                f"min {t.min_decisions:.0%}), tokens in FP32's groups after the last layer {last:.2%}"
            )
        return line


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
    fp32_debug: Path, reduced_debug: Path, feeds: list[dict], threads: int | None = None
) -> tuple[dict[str, float], dict[str, float]]:
    """(per-layer destination agreement, cumulative group agreement), per merging layer."""
    fp32, reduced = ort_session(fp32_debug, threads=threads), ort_session(reduced_debug, threads=threads)
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


def check_reduced_precision(
    precision: str,
    fp32_graph: Path,
    reduced_graph: Path,
    feeds: list[dict],
    debug_export: Callable[[Path], Path] | None = None,
    convert: Callable[[Path, Path], Path] | None = None,
    thresholds: AgreementThresholds = AgreementThresholds(),
    threads: int | None = None,
) -> AgreementReport:
    """Compare `reduced_graph` with `fp32_graph` on `feeds`; with `debug_export` (writes the FP32
    debug graph to a path) and `convert` (the same precision conversion), merge decisions too."""
    fp32, reduced = ort_session(fp32_graph, threads=threads), ort_session(reduced_graph, threads=threads)
    agree, cos_parts, max_abs = [], [], 0.0
    for feed in feeds:
        a, b = fp32.run(None, feed)[0], reduced.run(None, feed)[0]
        agree.append(top1_agrees(a, b))
        cos_parts.append(cosines(a, b))
        max_abs = max(max_abs, float(np.abs(a - b).max()))
    cos = np.concatenate(cos_parts)
    report = AgreementReport(
        precision=precision,
        samples=int(cos.size),
        thresholds=thresholds,
        top1_agreement=float(np.concatenate(agree).mean()),
        min_cosine=float(cos.min()),
        mean_cosine=float(cos.mean()),
        max_abs=max_abs,
    )
    if debug_export is not None and convert is not None:
        with tempfile.TemporaryDirectory(prefix="pitome-agreement-") as tmp:
            fp32_debug = debug_export(Path(tmp) / "decisions_fp32.onnx")
            reduced_debug = convert(fp32_debug, Path(tmp) / f"decisions_{precision}.onnx")
            report.layer_agreement, report.cumulative_agreement = decision_agreement(
                fp32_debug, reduced_debug, feeds, threads
            )
    return report
