"""When parity fails: a near-tie broken otherwise, or a graph that decides otherwise?

A merge decides by ranking scores and picking best matches. Two correct runtimes compute those
scores a rounding error apart, so where two candidates are within that error of each other,
they may choose differently and a whole token moves: the outputs then differ far beyond any
elementwise tolerance, yet the graph is right. A graph that ranks by another rule (another
algorithm, a wrong margin, a broken lowering) also moves tokens. To tell the two apart, a debug
export of the graph outputs every choice its merge made (`ops.decision_tape`) and the PyTorch
reference is rerun with those choices forced in, layer by layer, so that at every layer both
sides start from the same tokens. Then, per layer:

- each of the graph's choices must be a near-tie under the **reference's own scores**: a
  ranking may put a token before one that out-scores it by at most `tie_atol`, a best match may
  fall short of the row's best score by at most `tie_atol`;
- the tokens whose merge group differs from the one the reference chooses by itself from the
  same input must be at most `max_flip_share` of the layer's tokens;
- the graph's slots must be the ones its choices make under the reference's merge;
- given the same decisions, every output must agree within the elementwise tolerance.

DCT makes no ranking: its one decision is the float16 neighbour each value rounds to, and a
value within float32 noise of a float16 midpoint rounds up in one runtime and down in the other
(a step of 1e-3 at 1.0 that the next layers carry to the logits). The same rescue applies with
the graph's rounded values as its choices: each must be the float16 rounding of a number within
`tie_atol` of the reference's value (relative above 1), at most `max_flip_share` of a layer's
values may round otherwise, and with the graph's roundings forced every output must agree.

A choice the reference cannot have made at all (another number of choices, another shape, a
value float16 cannot hold) fails at once. Every comparison fails closed on NaN.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from ops.decision_tape import DecisionMismatch


def order_gap(scores: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Per sample, how far a ranking `order [B, T]` of `scores [B, T]` is from descending: the
    most by which a token out-scores one ranked before it (0 for a descending order)."""
    ranked = np.take_along_axis(scores.astype(np.float64), order, axis=-1)
    later_best = np.maximum.accumulate(ranked[..., ::-1], axis=-1)[..., ::-1][..., 1:]
    return _fail_closed(np.clip(later_best - ranked[..., :-1], 0.0, None).max(axis=-1, initial=0.0))


def match_gap(scores: np.ndarray, choice: np.ndarray) -> np.ndarray:
    """Per sample, the most by which a row's chosen column `choice [B, R]` falls short of the
    row's best score in `scores [B, R, C]` (0 when every choice is a best one)."""
    scores = scores.astype(np.float64)
    chosen = np.take_along_axis(scores, choice[..., None], axis=-1)[..., 0]
    return _fail_closed((scores.max(axis=-1) - chosen).max(axis=-1, initial=0.0))


def round_gap(values: np.ndarray, rounded: np.ndarray) -> np.ndarray:
    """Per sample, how far the reference's float32 `values` lie outside the interval of numbers
    that round to the graph's float16 `rounded` (to nearest), relative to the value where it
    exceeds 1 (float32 noise scales with it): 0 where the graph rounded as the reference does,
    a hair where float32 noise carried a value across a float16 midpoint, half a float16 step
    and more where the graph rounds otherwise. Infinite for values float16 cannot hold."""
    wide, half = values.astype(np.float64), rounded.astype(np.float16)
    below, above = (np.nextafter(half, np.float16(side)).astype(np.float64) for side in (-np.inf, np.inf))
    centre = half.astype(np.float64)
    with np.errstate(invalid="ignore"):  # inf - inf: NaN, which fails closed below
        outside = np.maximum(np.maximum((below + centre) / 2 - wide, wide - (centre + above) / 2), 0.0)
    gap = np.where(centre == rounded, outside / np.maximum(np.abs(wide), 1.0), np.inf)
    return _fail_closed(gap).reshape(gap.shape[0], -1).max(axis=-1, initial=0.0)


CHOICE_GAPS = {"order": order_gap, "match": match_gap, "round": round_gap}


def own_choice(kind: str, scores: np.ndarray) -> np.ndarray:
    """The choice the reference makes on `scores`: descending order, ties to the lower index;
    the first best column of each row; each value rounded to float16 (to nearest, ties to even)."""
    if kind == "round":
        return scores.astype(np.float16).astype(np.float32)
    return np.argsort(-scores, axis=-1, kind="stable") if kind == "order" else scores.argmax(axis=-1)


def rounding_flips(kind: str, scores: np.ndarray, choice: np.ndarray) -> tuple[int, int]:
    """Positions of `choice` that differ from the reference's own choice on `scores`, as (between
    different scores, between exactly equal scores). A tie broken by another rule (ONNX
    Runtime's TopK takes the lower index, OpenVINO's does not) is the second kind: both choices
    are equally right; rounding decides the first kind."""
    own = own_choice(kind, scores)
    if kind == "round":  # no exact ties: a value either sits on a midpoint or it does not
        return int((choice != own).sum()), 0
    if kind == "order":
        picked, wanted = (np.take_along_axis(scores, c, axis=-1) for c in (choice, own))
    else:
        picked, wanted = (np.take_along_axis(scores, c[..., None], axis=-1)[..., 0] for c in (choice, own))
    differ = choice != own
    return int((differ & (picked != wanted)).sum()), int((differ & (picked == wanted)).sum())


def within(diff: np.ndarray, ref: np.ndarray, tol) -> bool:
    """Polygraphy's elementwise rule: |diff| <= atol or |diff| <= rtol * |ref|."""
    return bool(np.all((diff <= tol.atol) | (diff <= tol.rtol * np.abs(ref))))


def _fail_closed(values: np.ndarray) -> np.ndarray:
    """NaN becomes +inf: a figure that cannot be computed never passes a bound."""
    return np.where(np.isnan(values), np.inf, values)


def same_groups(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """`[B, N0]`: whether input token i shares its slot with the same input tokens under `a` and `b`."""
    return ((a[:, :, None] == a[:, None, :]) == (b[:, :, None] == b[:, None, :])).all(-1)


@dataclass
class LayerFigures:
    """One merging layer over all parity samples."""

    tokens: int = 0  # input tokens seen, over all samples
    regrouped: int = 0  # of them, tokens whose merge group differs from the reference's own choice
    choices: int = 0  # ranked positions, matched rows or rounded values, over all samples
    flipped: int = 0  # of them, those that differ from the reference's own choice on its scores
    exact_tie_flips: int = 0  # of the flipped, those between exactly equal scores (another tie rule)
    tie_gap: float = 0.0  # the worst choice's shortfall under the reference's scores
    score_noise: float = 0.0  # max |graph's scores - reference's scores|
    slots_follow_choices: bool = True  # the graph's slots are what its choices make

    @property
    def agreement(self) -> float:
        """Share of tokens in the reference's own group; of values rounded alike, in a rounding layer."""
        if self.tokens:
            return 1.0 - self.regrouped / self.tokens
        return 1.0 - self.flipped / self.choices if self.choices else 1.0

    @property
    def flip_share(self) -> float:
        """Share of the layer's choices flipped by rounding (exact ties excluded: either choice is right)."""
        return (self.flipped - self.exact_tie_flips) / self.choices if self.choices else 0.0


@dataclass
class DecisionsReport:
    """What the forced-decision rerun found, and the checks it allows (`checks`)."""

    samples: int = 0
    samples_with_flips: int = 0  # samples where some layer's slots differ from the reference's own
    layers: dict[str, LayerFigures] = field(default_factory=dict)
    forced_max_abs: float = 0.0  # graph vs PyTorch with the graph's decisions, over every output
    forced_within: bool = True
    reproduces: bool = True  # the debug graph's outputs equal the shipped graph's
    mismatch: str | None = None  # why the reference could not take the graph's choices
    debug_graph: dict | None = None

    def layer(self, name: str) -> LayerFigures:
        return self.layers.setdefault(name, LayerFigures())

    @property
    def layer_agreement(self) -> dict[str, float]:
        return {name: figures.agreement for name, figures in self.layers.items()}

    def checks(self, tie_atol: float, max_flip_share: float) -> list[tuple[bool, str]]:
        """(passed, what it says) for every condition the rescue needs."""
        if self.mismatch is not None:
            return [(False, f"the graph decides by another rule: {self.mismatch}")]
        checks = [(self.reproduces, "the debug graph reproduces the shipped graph" if self.reproduces else
                   "the debug graph, exported from the PyTorch model, does not reproduce the shipped graph")]  # fmt: skip
        for name, figures in self.layers.items():
            if not figures.slots_follow_choices:
                checks.append((False, f"{name}: the graph's slots are not what its own choices make"))
            if not figures.tie_gap <= tie_atol:
                what = (
                    "a value was rounded as if {:.3g} from the reference's"
                    if name.startswith("round_")
                    else "a choice falls {:.3g} short of the reference's best"
                ).format(figures.tie_gap)
                checks.append((False, f"{name}: {what} (near-tie bound {tie_atol:g})"))  # fmt: skip
            if not figures.flip_share <= max_flip_share:
                checks.append((False, f"{name}: {figures.flip_share:.1%} of its choices flipped "
                                      f"(at most {max_flip_share:.0%})"))  # fmt: skip
        checks.append((self.forced_within, f"with the graph's decisions forced: max abs {self.forced_max_abs:.3g} "
                                            f"{'within' if self.forced_within else 'OUTSIDE'} tolerance"))  # fmt: skip
        return checks

    def summary(self) -> str:
        """What differed and by how much, for the verdict line."""
        line = f"merge decisions differ in {self.samples_with_flips}/{self.samples} samples"
        if self.mismatch is not None or not self.layers:
            return line
        worst = max(f.tie_gap for f in self.layers.values())
        noise = max(f.score_noise for f in self.layers.values())
        return line + (
            f" (lowest layer agreement {min(self.layer_agreement.values()):.2%}; worst choice {worst:.3g} short of "
            f"the reference's best, scores apart by up to {noise:.3g}); with the graph's decisions forced: max abs "
            f"{self.forced_max_abs:.3g} {'within' if self.forced_within else 'OUTSIDE'} tolerance"
        )

    def to_dict(self) -> dict:
        out = asdict(self)
        out["layer_agreement"] = self.layer_agreement
        return out


def explain_with_decisions(
    model,
    signature,
    shipped_onnx,
    debug_onnx,
    feeds: list[dict],
    tol,
    device,
    threads=None,
    providers: str = "cpu",
) -> DecisionsReport:
    """Rerun PyTorch with the debug graph's decisions forced and gather the figures `checks` reads.

    Both graphs run on `providers`, the provider whose parity failed: a GPU failure is never
    excused with CPU decisions.
    """
    from exporter.decisions import decision_layer_names, graph_choices, run_eager, slot_layers, unnamed_outputs
    from exporter.runners import ort_session, placed_on

    debug, shipped = (ort_session(path, providers, threads) for path in (debug_onnx, shipped_onnx))
    output_names = [o.name for o in debug.get_outputs()]
    main = [o.name for o in shipped.get_outputs()]
    layers = decision_layer_names(model)
    report = DecisionsReport()
    extra = unnamed_outputs(output_names, signature)
    if extra:
        report.mismatch = (
            f"its debug graph returns {len(extra)} values this model's merge does not make ({extra[0]}, ...)"
        )
        return report
    with_slots = slot_layers(layers)
    with placed_on(model, device):  # once for every run_eager below
        for feed in feeds:
            graph = dict(zip(output_names, debug.run(None, feed)))
            for name, expected in zip(main, shipped.run(None, feed)):
                report.reproduces &= within(np.abs(graph[name] - expected), expected, tol)
            slots = [graph[name] for name in with_slots]
            choices = graph_choices(graph)
            try:
                forced = run_eager(model, signature, feed, device, forced=slots, forced_choices=choices)
            except DecisionMismatch as mismatch:
                report.mismatch = str(mismatch)
                return report
            _add_layers(report, layers, with_slots, graph, forced, choices)
            for name, out in zip(main, forced.outputs):
                diff = np.abs(out.numpy() - graph[name])
                report.forced_max_abs = float(np.max([report.forced_max_abs, np.max(diff, initial=0.0)]))
                report.forced_within &= within(diff, out.numpy(), tol)
    return report


def _add_layers(
    report: DecisionsReport, layers: list[str], with_slots: list[str], graph: dict, forced, choices
) -> None:
    """Fold one batch's per-layer figures into `report`: `layers` are the deciding layers' names
    (`with_slots` those that have slots), `graph` the debug graph's outputs by name, `choices` its
    choices, `forced` the reference's run with them forced."""
    flipped = np.zeros(forced.outputs[0].shape[0], dtype=bool)
    for k, name in enumerate(layers):
        figures = report.layer(name)
        if name in with_slots:
            _add_slots(figures, with_slots.index(name), graph[name], forced, flipped)
        for call, graph_choice in zip(forced.tape.layers[k], choices[k]):
            reference = call.scores.numpy()
            gap = CHOICE_GAPS[call.kind](reference, graph_choice.choice)
            by_rounding, at_exact_ties = rounding_flips(call.kind, reference, graph_choice.choice)
            if call.kind == "round":  # no slots: a sample differs where any of its values rounded otherwise
                flipped |= (graph_choice.choice != own_choice("round", reference)).reshape(flipped.size, -1).any(1)
            figures.choices += graph_choice.choice.size
            figures.flipped += by_rounding + at_exact_ties
            figures.exact_tie_flips += at_exact_ties
            noise = _fail_closed(np.abs(graph_choice.scores.astype(np.float64) - reference))
            figures.tie_gap = float(np.max([figures.tie_gap, *gap]))
            figures.score_noise = float(np.max([figures.score_noise, np.max(noise, initial=0.0)]))
    report.samples += int(flipped.size)
    report.samples_with_flips += int(flipped.sum())


def _add_slots(figures: LayerFigures, index: int, graph_slots: np.ndarray, forced, flipped: np.ndarray) -> None:
    """A merging layer's slot figures: tokens regrouped against the reference's own choice, and
    whether the graph's slots are what its choices make; marks the samples whose slots differ."""
    own = forced.layers.own_slots[index].numpy()
    figures.tokens += graph_slots.size
    figures.regrouped += int((~same_groups(own, graph_slots)).sum())
    figures.slots_follow_choices &= bool(np.array_equal(forced.layers.choice_slots[index].numpy(), graph_slots))
    flipped |= (own != graph_slots).any(axis=1)
