"""Frozen per-layer token schedules: how many tokens each layer merges away.

A schedule is a plain list of ints (`r_l` per layer). It is what export freezes into static
shapes, what reports print, and what a user may pass instead of a ratio.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ops.errors import ScheduleError


@dataclass(frozen=True)
class CountRule:
    """What a ratio means to one algorithm: `removed(T, P, ratio, layer)`, the tokens layer `layer`
    removes when `T` non-prefix and `P` prefix tokens enter it (floor/ceil in Python float
    arithmetic, exactly as the reference), and `most(T)`, the most it can remove."""

    removed: Callable[[int, int, float, int], int]
    most: Callable[[int], int]
    most_text: str  # how `most` reads in an error
    min_ratio: float = 0.0  # ratios below are refused (PiToMe merges at most half)


def _of_non_prefix(t: int, p: int, ratio: float, layer: int) -> int:
    return math.floor(t - t * ratio)  # PiToMe, ToMe, CrossGET: on the non-prefix tokens


def _of_all_tokens(t: int, p: int, ratio: float, layer: int) -> int:
    return math.floor((t + p) - (t + p) * ratio)  # ToFu, MCTF: the class token counted


def _kept_of_non_prefix(t: int, p: int, ratio: float, layer: int) -> int:
    return t - math.ceil(t * ratio)  # DCT keeps ceil(T ratio) frequencies


def _diffrate(t: int, p: int, ratio: float, layer: int) -> int:
    """DiffRate's kept count k starts at the patch count, class token inside it: the first layer
    prunes one token more (197 -> 196 on DeiT) before it merges."""
    k = t + p - 1 if layer == 0 else t + p
    return math.floor(k - k * ratio) + (1 if layer == 0 else 0)


HALF = (lambda t: t // 2, "at most half")
ALL_BUT_ONE = (lambda t: t - 1, "at least one stays")
COUNT_RULES = {
    "pitome": CountRule(_of_non_prefix, *HALF, min_ratio=0.5),
    "tome": CountRule(_of_non_prefix, *HALF),
    "tofu": CountRule(_of_all_tokens, *HALF),
    "mctf": CountRule(_of_all_tokens, *HALF),
    "crossget": CountRule(_of_non_prefix, *ALL_BUT_ONE),
    "dct": CountRule(_kept_of_non_prefix, *ALL_BUT_ONE),
    "diffrate": CountRule(_diffrate, *ALL_BUT_ONE),
}
ALGOS = tuple(COUNT_RULES)


@dataclass(frozen=True)
class TokenSchedule:
    """A validated schedule for one model.

    `merges[l]` tokens are removed in layer `l`; `tokens[l]` non-prefix tokens enter layer `l`.
    Prefix tokens (class, distillation) are never merged and are counted in `num_prefix`.
    """

    merges: tuple[int, ...]
    tokens: tuple[int, ...]
    num_prefix: int
    merge_layers: tuple[int, ...] | None = None  # the layers allowed to merge; None: every layer

    @property
    def depth(self) -> int:
        return len(self.merges)

    @property
    def final_tokens(self) -> int:
        """Non-prefix tokens that leave the last layer."""
        return self.tokens[-1] - self.merges[-1]

    def to_dict(self) -> dict:
        return {
            "merges": list(self.merges),
            "tokens_in": [t + self.num_prefix for t in self.tokens],
            "tokens_out": [t - r + self.num_prefix for t, r in zip(self.tokens, self.merges)],
            "num_prefix": self.num_prefix,
        }


def merges_from_ratio(
    num_tokens: int, depth: int, ratio: float, merge_layers: Sequence[int] | None = None, algo: str = "pitome",
    num_prefix: int = 1,
) -> list[int]:  # fmt: skip
    """Per-layer removals when every merging layer keeps the fraction `ratio` (of the tokens
    entering it, as `algo` counts them); layers outside `merge_layers` (default: all) keep all."""
    layers = range(depth) if merge_layers is None else merge_layers
    return merges_from_layer_ratios(num_tokens, depth, dict.fromkeys(layers, ratio), algo, num_prefix)


def merges_from_layer_ratios(
    num_tokens: int, depth: int, ratios: dict[int, float], algo: str = "pitome", num_prefix: int = 1
) -> list[int]:
    """Removals when layer `l` keeps the fraction `ratios[l]` of the tokens entering it (PiToMe's
    `floor(T_l - T_l * ratio)`, or `algo`'s rule); layers not in `ratios` keep everything."""
    for ratio in ratios.values():
        if not 0.0 < ratio <= 1.0:
            raise ScheduleError(f"ratio must be in (0, 1], got {ratio}")
    rule = count_rule(algo)
    merges, t = [], num_tokens
    for layer in range(depth):
        ratio = ratios.get(layer, 1.0)
        r = rule.removed(t, num_prefix, ratio, layer) if ratio < 1.0 else 0
        merges.append(r)
        t -= r
    return merges


def count_rule(algo: str) -> CountRule:
    if algo not in COUNT_RULES:
        raise ScheduleError(f"unknown algo {algo!r}; choose one of {', '.join(ALGOS)}")
    return COUNT_RULES[algo]


def keep_curve(knots: Sequence[float], merge_layers: Sequence[int]) -> dict[int, float]:
    """Per-layer kept fractions along a piecewise-linear curve through `knots`, spaced evenly over
    the merging layers (first knot at the first, last at the last); as many knots as layers
    gives each layer its own. Equal knots give the uniform ratio exactly, so a curve search
    contains every uniform schedule."""
    layers = list(merge_layers)
    if not knots:
        raise ScheduleError("a keep curve needs at least one knot")
    if len(knots) == 1 or len(layers) == 1:
        return dict.fromkeys(layers, float(knots[0]))
    curve = {}
    for position, layer in enumerate(layers):
        at = position * (len(knots) - 1) / (len(layers) - 1)  # where this layer sits among the knots
        left = min(int(at), len(knots) - 2)
        weight = at - left
        low, high = knots[left], knots[left + 1]
        curve[layer] = float(low if low == high else low + (high - low) * weight)
    return curve


def build_schedule(
    num_tokens: int,
    depth: int,
    *,
    algo: str,
    ratio: float | None = None,
    merges: Sequence[int] | None = None,
    num_prefix: int = 1,
    merge_layers: Sequence[int] | None = None,
) -> TokenSchedule:
    """Validate a ratio or an explicit list of merges and freeze it into a TokenSchedule."""
    rule = count_rule(algo)
    if (ratio is None) == (merges is None):
        raise ScheduleError("give exactly one of ratio or schedule")
    if ratio is not None:
        if 0.0 < ratio < rule.min_ratio:
            raise ScheduleError(f"PiToMe needs ratio >= 0.5 (it merges at most half the tokens), got {ratio}")
        merges = merges_from_ratio(num_tokens, depth, ratio, merge_layers, algo, num_prefix)
    merges = _per_layer(list(merges), depth, merge_layers)
    tokens, t = [], num_tokens
    for layer, r in enumerate(merges):
        if not isinstance(r, int) or isinstance(r, bool) or r < 0:
            raise ScheduleError(f"schedule entry {layer} must be a non-negative int, got {r!r}")
        if merge_layers is not None and r and layer not in set(merge_layers):
            raise ScheduleError(f"layer {layer} does not merge in this model, but the schedule asks for {r}")
        if r > rule.most(t):
            raise ScheduleError(f"layer {layer}: cannot merge {r} of {t} tokens ({rule.most_text}, {rule.most(t)})")
        tokens.append(t)
        t -= r
    layers = None if merge_layers is None else tuple(sorted(set(merge_layers)))
    return TokenSchedule(tuple(merges), tuple(tokens), num_prefix, layers)


def _per_layer(merges: list, depth: int, merge_layers: Sequence[int] | None) -> list:
    """One entry per layer. A model that merges in some layers only (BERT: the first three) also
    takes one entry per merging layer, as `tune` reports its schedules; the others merge none."""
    if len(merges) == depth:
        return merges
    layers = sorted(set(merge_layers)) if merge_layers is not None else None
    if layers is not None and len(merges) == len(layers):
        per_layer = [0] * depth
        for layer, r in zip(layers, merges):
            per_layer[layer] = r
        return per_layer
    merging = f" or its {len(layers)} merging layers ({','.join(map(str, layers))})" if layers is not None else ""
    raise ScheduleError(f"schedule has {len(merges)} entries but the model has {depth} layers{merging}")


def parse_schedule(text: str) -> list[int]:
    """Parse `19,17,16` into a list of ints, with a user-facing error."""
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise ScheduleError(f"schedule must be comma-separated integers, got {text!r}") from None
