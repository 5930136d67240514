"""The token-reduction algorithms by name, each behind one small interface.

An `Algorithm` says how a ratio becomes per-layer counts (`ops.schedule.COUNT_RULES`), builds
one `ops.reduction.Reduction` per layer for vision or text models (the reduction says where in
the block it acts and what it reads: keys, attention probabilities, sizes), and whether sizes
carry from layer to layer. The shared pieces (plans, rankings, gathers, the size-weighted
merge) are `ops.merge`'s.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ops.algos import crossget, dct, diffrate, mctf, pitome, tofu, tome
from ops.errors import UnsupportedModelError
from ops.merge import LOWERINGS as PLAN_LOWERINGS
from ops.merge import TokenMerge
from ops.reduction import Reduction
from ops.schedule import COUNT_RULES, CountRule, TokenSchedule

Layers = Callable[..., list[Reduction]]


@dataclass(frozen=True)
class Algorithm:
    """One algorithm: its layers for vision (`schedule, flavor, lowering`) and text (`schedule,
    lowering`; None with the reason when it has no text variant here; a reduction's
    `text_families` names the encoders it runs on) and its defaults."""

    name: str
    reduction: type[Reduction]  # what one layer runs (where in the block, what it reads)
    vision: Layers
    text: Layers | None = None
    no_text: str = ""  # why `text` is None
    prop_attn: bool = False  # attention weighted by token size, on vision models, by default
    lowerings: tuple[str, ...] = ("matmul",)  # merge lowerings it implements

    @property
    def counts(self) -> CountRule:
        return COUNT_RULES[self.name]

    @property
    def stage(self) -> str:
        return self.reduction.stage


ALGORITHMS = {
    a.name: a
    for a in (
        Algorithm("pitome", TokenMerge, pitome.vision_reductions, pitome.text_reductions, lowerings=PLAN_LOWERINGS),
        Algorithm("tome", TokenMerge, tome.vision_reductions, tome.text_reductions, prop_attn=True,
                  lowerings=PLAN_LOWERINGS),
        Algorithm("tofu", tofu.ToFu, tofu.vision_reductions, tofu.text_reductions),
        Algorithm("dct", dct.DCT, dct.vision_reductions, dct.text_reductions),
        Algorithm("mctf", mctf.MCTF, mctf.vision_reductions, mctf.text_reductions, prop_attn=True),  # BERT only
        Algorithm("crossget", crossget.CrossGET, crossget.vision_reductions, crossget.text_reductions),
        Algorithm("diffrate", diffrate.DiffRate, diffrate.vision_reductions,
                  no_text="has no text variant (the authors' code has none)", prop_attn=True),
    )
}  # fmt: skip
NAMES = tuple(ALGORITHMS)


def algorithm(name: str) -> Algorithm:
    if name not in ALGORITHMS:
        raise UnsupportedModelError(f"unknown algo {name!r}; choose one of {', '.join(NAMES)}")
    return ALGORITHMS[name]


def vision_layers(name: str, schedule: TokenSchedule, flavor: str, lowering: str) -> list[Reduction]:
    """One reduction per layer of a vision model."""
    return _checked(name, lowering).vision(schedule, flavor, lowering)


def text_layers(name: str, schedule: TokenSchedule, lowering: str) -> list[Reduction]:
    """One reduction per layer of a BERT/DistilBERT model; refuses algorithms without a text variant."""
    algo = _checked(name, lowering)
    if algo.text is None:
        raise UnsupportedModelError(f"{name} {algo.no_text}")
    return algo.text(schedule, lowering)


def check_text_family(name: str, family: str | None) -> None:
    """Refuse, in one line, an algorithm with no text variant, or none for the text family
    `family` ("bert", "distilbert"; None: not known yet, the patch checks it)."""
    from ops.patch.hf_text import FAMILIES  # ops.patch imports this package: imported when called
    from ops.reduction import text_family_refusal

    algo = algorithm(name)
    if algo.text is None:
        raise UnsupportedModelError(f"{name} {algo.no_text}")
    refusal = None if family is None else text_family_refusal(algo.reduction, family, FAMILIES[family].label)
    if refusal is not None:
        raise UnsupportedModelError(refusal)


def _checked(name: str, lowering: str) -> Algorithm:
    algo = algorithm(name)
    if lowering not in algo.lowerings:
        raise UnsupportedModelError(
            f"{name} implements the {' and '.join(algo.lowerings)} lowering only, not {lowering!r}"
        )
    return algo


__all__ = ["ALGORITHMS", "NAMES", "Algorithm", "algorithm", "check_text_family", "text_layers", "vision_layers"]
