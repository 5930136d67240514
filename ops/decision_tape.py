"""Every choice a merge's decisions make, as data: the scores each ranking or best match saw and
what it chose, recorded in call order, or replaced by choices made elsewhere.

A merge decides through two primitives only (`ops.merge.descending_order`, a ranking, and
`ops.merge.best_match`, an arg-max per row); DCT's one decision is its float16 rounding
(`ops.algos.dct`, kind "round": each value rounds to one of two neighbours). With a tape active, each primitive writes its
scores and its choice to it, one list per merging layer (`begin_layer`); with forced choices,
each primitive returns the forced one instead, after checking that it has the shape it would
have made. That is how parity tells a near-tie broken otherwise from a graph that decides by
another rule: the exported graph's own choices are fed to the PyTorch reference, primitive by
primitive, and judged against the reference's own scores (`exporter.parity`).

No tape is active outside those checks; then the primitives cost one list lookup.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

# A ranking `[B, T]` of scores `[B, T]`; an arg-max `[B, R]` of `[B, R, C]`; float16 values of float32 ones, same shape
CHOICE_KINDS = ("order", "match", "round")


class DecisionMismatch(ValueError):
    """Forced choices that this model's merge could not have made: another number of choices in
    a layer, another kind, or another shape. The graph decides by another rule."""


@dataclass
class Choice:
    """One primitive's call: its `kind`, the `scores` it ranked and the `choice` it returned."""

    kind: str
    scores: torch.Tensor
    choice: torch.Tensor


@dataclass
class DecisionTape:
    """Choices per merging layer, in call order; `forced[layer][k]`, a (kind, choice) pair,
    replaces the k-th choice of that layer."""

    forced: list[list[tuple[str, torch.Tensor]]] | None = None
    layers: list[list[Choice]] = field(default_factory=list)

    def begin_layer(self) -> None:
        self.layers.append([])

    def record(self, kind: str, scores: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
        """Write one call; return the forced choice if there is one, else `choice`."""
        if not self.layers:
            self.begin_layer()
        layer, calls = len(self.layers) - 1, self.layers[-1]
        if self.forced is not None:
            choice = self._forced(layer, len(calls), kind, choice, scores.shape[-1])
        calls.append(Choice(kind, scores, choice))
        return choice

    def _forced(self, layer: int, index: int, kind: str, own: torch.Tensor, candidates: int) -> torch.Tensor:
        """The forced choice in `own`'s place, if it is one this primitive could have made: same
        shape, indices among its `candidates` (the scores' last axis), a permutation for an order,
        values float16 holds for a rounding (whether the right ones is the parity check's question)."""
        where = f"merging layer {layer}, choice {index} ({kind} of {tuple(own.shape)})"
        if layer >= len(self.forced) or index >= len(self.forced[layer]):
            raise DecisionMismatch(f"the graph made no {where}")
        wanted_kind, wanted = self.forced[layer][index]
        if wanted_kind != kind:
            raise DecisionMismatch(f"the graph made a {wanted_kind} where this model's merge makes a {where}")
        wanted = torch.as_tensor(wanted).to(own.device)
        if wanted.shape != own.shape:
            raise DecisionMismatch(f"the graph's {where} has shape {tuple(wanted.shape)}")
        if kind == "round":
            wanted = wanted.to(own.dtype)
            if not torch.equal(wanted.to(torch.float16).to(own.dtype), wanted):  # NaN too: never equal
                raise DecisionMismatch(f"the graph's {where} holds values float16 cannot hold")
            return wanted
        if wanted.numel() and (int(wanted.min()) < 0 or int(wanted.max()) >= candidates):
            raise DecisionMismatch(f"the graph's {where} holds indices outside 0..{candidates - 1}")
        if kind == "order" and not torch.equal(wanted.sort(-1).values, own.sort(-1).values):
            raise DecisionMismatch(f"the graph's {where} is not a permutation")
        return wanted.to(own.dtype)

    def check_complete(self) -> None:
        """Raise DecisionMismatch if forced choices were left over (the graph made more)."""
        if self.forced is None:
            return
        made = [len(calls) for calls in self.layers]
        wanted = [len(calls) for calls in self.forced]
        if made != wanted:
            raise DecisionMismatch(f"the graph made {wanted} choices per merging layer, this model's merge {made}")


_active: list[DecisionTape] = []


def taped(kind: str, scores: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
    """What a primitive returns: `choice`, written to the active tape (or replaced by it)."""
    return _active[-1].record(kind, scores, choice) if _active else choice


@contextlib.contextmanager
def recording(tape: DecisionTape) -> Iterator[DecisionTape]:
    """Make `tape` the active one inside the block."""
    _active.append(tape)
    try:
        yield tape
    finally:
        _active.remove(tape)


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """No tape inside the block: the primitives make their own choices (the reference's, when a
    forced run wants to know what it would have chosen)."""
    saved = _active[:]
    _active.clear()
    try:
        yield
    finally:
        _active[:] = saved
