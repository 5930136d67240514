"""The search space of `pitome-export tune`: what one trial exports, and how Optuna proposes it.

A trial is a `Candidate`: an algorithm, proportional attention on or off, a per-layer schedule
and a precision. The schedule is drawn as a kept-token curve: the fraction of tokens each
merging layer keeps, linear between a few knots spread over the merging layers (deep models),
or one free fraction per merging layer (models that merge in at most `FREE_LAYERS` layers).
Knots move in steps of `KEEP_STEP` so that nearby proposals give the same schedule and are
not exported twice; equal knots give exactly the uniform schedule of that ratio.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ops.schedule import keep_curve, merges_from_layer_ratios

KNOTS = 3  # knots of the kept-token curve on deep models: first, middle and last merging layer
FREE_LAYERS = 4  # models merging in at most this many layers get one free fraction per layer
KEEP_STEP = 0.025  # grid of the kept fractions (0.975, 0.95, ... are on it)
MIN_KEEP = 0.5  # a merge step removes at most half the tokens entering it
INT8_MODES = ("dynamic", "static")


@dataclass(frozen=True)
class ScheduleLayout:
    """What a schedule is drawn over: non-prefix tokens entering layer 0, depth, merging layers,
    prefix tokens (some algorithms count them: `ops.schedule.COUNT_RULES`)."""

    num_tokens: int
    depth: int
    merge_layers: tuple[int, ...]
    num_prefix: int = 1

    @property
    def knots(self) -> int:
        return len(self.merge_layers) if len(self.merge_layers) <= FREE_LAYERS else KNOTS

    def merges(self, keep: Sequence[float], algo: str = "pitome") -> tuple[int, ...]:
        """Tokens `algo` removes per layer along the kept-token curve through `keep`, counted by its
        own rule, so that equal knots are `--algo ALGO --ratio R` exactly."""
        curve = keep_curve(keep, self.merge_layers)
        return tuple(merges_from_layer_ratios(self.num_tokens, self.depth, curve, algo, self.num_prefix))


@dataclass(frozen=True)
class Candidate:
    """One exported graph of the search: merged (or not) at a precision."""

    algo: str
    prop_attn: bool
    merges: tuple[int, ...]
    precision: str = "fp32"  # fp32, fp16, int8
    int8_mode: str | None = None  # dynamic or static for int8

    @property
    def merged(self) -> bool:
        return any(self.merges)

    @property
    def key(self) -> str:
        """Identity of the exported graph: two trials with the same key export the same graph."""
        if not self.merged:
            return f"unmerged {self.precision_label}"
        attn = "prop" if self.prop_attn else "plain"
        return f"{self.algo} {attn} {','.join(map(str, self.merges))} {self.precision_label}"

    @property
    def precision_label(self) -> str:
        return f"{self.precision} {self.int8_mode}" if self.int8_mode else self.precision

    def to_dict(self) -> dict:
        return {
            "algo": self.algo if self.merged else None,
            "prop_attn": self.prop_attn if self.merged else None,
            "merges": list(self.merges),
            "precision": self.precision,
            "int8_mode": self.int8_mode,
        }

    @classmethod
    def from_dict(cls, record: dict) -> Candidate:
        return cls(
            record["algo"] or "pitome", bool(record["prop_attn"]), tuple(record["merges"]),
            record["precision"], record["int8_mode"],
        )  # fmt: skip


@dataclass(frozen=True)
class SearchSpace:
    """The choices a study draws from (all fixed for the study's lifetime)."""

    layout: ScheduleLayout
    algos: tuple[str, ...]
    prop_attn: tuple[bool, ...]  # (False,) where the model has no proportional attention
    precisions: tuple[str, ...]

    def describe(self) -> dict:
        return {
            "algos": list(self.algos), "prop_attn": list(self.prop_attn), "precisions": list(self.precisions),
            "knots": self.layout.knots, "keep_step": KEEP_STEP, "min_keep": MIN_KEEP,
            "merge_layers": list(self.layout.merge_layers), "num_tokens": self.layout.num_tokens,
        }  # fmt: skip

    def suggest(self, trial) -> Candidate:
        """The candidate an Optuna trial proposes (define-by-run: the INT8 mode only for int8)."""
        algo = trial.suggest_categorical("algo", list(self.algos))
        prop_attn = trial.suggest_categorical("prop_attn", list(self.prop_attn))
        keep = [
            on_grid(trial.suggest_float(f"keep{i}", MIN_KEEP, 1.0, step=KEEP_STEP)) for i in range(self.layout.knots)
        ]
        precision = trial.suggest_categorical("precision", list(self.precisions))
        mode = trial.suggest_categorical("int8_mode", list(INT8_MODES)) if precision == "int8" else None
        return Candidate(algo, prop_attn, self.layout.merges(keep, algo), precision, mode)

    def uniform_params(self, algo: str, ratio: float, precision: str, int8_mode: str | None = None) -> dict:
        """Optuna parameters of the uniform schedule `ratio` (every knot equal), with the
        algorithm's default proportional attention (on for ToMe, MCTF and DiffRate where the model
        has it)."""
        from ops.algos import algorithm

        prop_attn = algorithm(algo).prop_attn and True in self.prop_attn
        params = {"algo": algo, "prop_attn": prop_attn, "precision": precision}
        params.update({f"keep{i}": ratio for i in range(self.layout.knots)})
        if precision == "int8":
            params["int8_mode"] = int8_mode or "dynamic"
        return params

    def seeds(self, ratios: Sequence[float]) -> list[dict]:
        """The uniform schedules a user would sweep, first in the study: each algorithm at each
        ratio in the first precision, and the unmerged graph in every reduced precision (the
        unmerged FP32 graph is the reference every choice is measured against, not a trial)."""
        seeds = [self.uniform_params(algo, ratio, self.precisions[0]) for ratio in ratios for algo in self.algos]
        for precision in self.precisions:
            modes = INT8_MODES if precision == "int8" else (None,)
            if precision != "fp32":
                seeds += [self.uniform_params(self.algos[0], 1.0, precision, mode) for mode in modes]
        return seeds


def on_grid(keep: float) -> float:
    """`keep` as the decimal step of KEEP_STEP it stands for. Optuna's stepped floats are
    MIN_KEEP + n * KEEP_STEP in binary (0.9750000000000001, 0.8500000000000001), and a fraction a
    hair above its step merges one token less in some layers than the ratio it is reported as
    (60 tokens, first layer: 9 at 0.85, 8 at 0.8500000000000001)."""
    return round(round(keep / KEEP_STEP) * KEEP_STEP, 6)


def uniform_ratio(params: dict, knots: int) -> float | None:
    """The ratio when a trial's knots are all equal (a uniform schedule), else None."""
    keep = {on_grid(params[f"keep{i}"]) for i in range(knots)}
    return keep.pop() if len(keep) == 1 else None
