"""Merge decisions as data: capture them, export them as extra outputs, or force them.

A merge decision compares floating-point scores; where two candidates tie to within the float
noise that separates two correct implementations (ONNX Runtime vs PyTorch kernels), they may
choose differently, and a whole token moves. To tell such a near-tie from a wrong export, the
parity check reruns PyTorch with the exported graph's own decisions forced in: every ranking
and best match the graph made (`ops.decision_tape`), judged against the scores PyTorch computes
for them, and the slots they lead to. Given the same decisions, the numbers must agree to the
usual tolerance.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from exporter.runners import placed_on
from exporter.signatures import ExportWrapper, ModelSignature, as_outputs
from ops.decision_tape import CHOICE_KINDS, DecisionTape, paused, recording
from ops.merge import MergePlan, PlanAssign, plan_from_slots, plan_slots
from ops.reduction import Reduction

_KINDS = "|".join(CHOICE_KINDS)
_CHOICE_NAME = re.compile(rf"^({_KINDS})_(\d+)_(\d+)$")  # a choice output: kind, layer, call
_DECISION_NAME = re.compile(rf"^(slots|owners)_\d+$|^({_KINDS})(_scores)?_\d+_\d+$")  # any debug output


@dataclass
class LayerCapture:
    """What the merging layers did in one run, in call order (each `[B, N_l]` or `[B, n_out]`)."""

    slots: list[torch.Tensor] = field(default_factory=list)  # the slots each layer used
    owners: list[torch.Tensor] = field(default_factory=list)  # each slot's kept token
    own_slots: list[torch.Tensor] = field(default_factory=list)  # forced runs: what the layer would have chosen
    choice_slots: list[torch.Tensor] = field(default_factory=list)  # forced runs: the slots the forced choices make


@contextlib.contextmanager
def decision_hooks(
    model: torch.nn.Module, forced: list[torch.Tensor] | None = None, tape: DecisionTape | None = None
) -> Iterator[LayerCapture]:
    """Yield a capture that fills as the merging layers run.

    With `forced`, layer k uses `forced[k]` as its slots instead of computing them, and the
    capture also records the slots the layer made from its (possibly forced) choices and the
    slots it would have chosen by itself from the same input. With `tape`, each merging layer
    opens a new layer of it, so that the primitives' choices are grouped by layer.
    """
    capture = LayerCapture()

    def begin(module, args) -> None:
        if tape is not None:
            tape.begin_layer()

    def hook(module, args, plan: MergePlan) -> MergePlan:
        slots = plan_slots(plan)
        if forced is not None:
            capture.choice_slots.append(slots)
            with paused():
                capture.own_slots.append(plan_slots(module.forward(*args)))
            wanted = forced[len(capture.slots)].to(slots.device)
            # Same decisions keep the layer's own plan, so that the sums run in the same order.
            if not torch.equal(wanted, slots):
                dropped = 0 if plan.dropped is None else plan.dropped.shape[1]
                plan, slots = plan_from_slots(wanted, plan.n_out, dropped), wanted
        capture.slots.append(slots)
        capture.owners.append(plan.kept)
        return plan

    merges = [m for m in model.modules() if isinstance(m, PlanAssign)]
    rounding = [m for m in model.modules() if isinstance(m, Reduction) and decides_by_rounding(m)]
    handles = [m.register_forward_pre_hook(begin) for m in merges + rounding]
    handles += [m.register_forward_hook(hook) for m in merges]
    try:
        yield capture
    finally:
        for handle in handles:
            handle.remove()


class DecisionWrapper(torch.nn.Module):
    """ExportWrapper that also returns every merging layer's slots, then its slot owners, then
    every choice of its merge with the scores it was made on (for a debug export)."""

    def __init__(self, model: torch.nn.Module, signature: ModelSignature) -> None:
        super().__init__()
        self.inner = ExportWrapper(model, signature)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        tape = DecisionTape()
        with recording(tape), decision_hooks(self.inner, tape=tape) as capture:
            out = self.inner(*inputs)
        choices = [t for calls in tape.layers for call in calls for t in (call.choice, call.scores)]
        return (*as_outputs(out), *capture.slots, *capture.owners, *choices)


def decides_by_rounding(layer: Reduction) -> bool:
    """Whether a reduction's decision is its float16 rounding (DCT's, when it reduces)."""
    return layer.r > 0 and layer.rounds


def decision_layer_names(model: torch.nn.Module) -> list[str]:
    """One name per layer that decides, in order: `slots_<layer>` for a layer that reduces by a
    merge plan (`PlanAssign`), `round_<layer>` for one whose only decision is its float16
    rounding (DCT's fixed linear map). `<layer>` counts every reduction, reducing or not."""
    layers = [m for m in model.modules() if isinstance(m, Reduction)]
    names = []
    for i, m in enumerate(layers):
        if m.r > 0 and isinstance(getattr(m, "assign", None), PlanAssign):
            names.append(f"slots_{i}")
        elif decides_by_rounding(m):
            names.append(f"round_{i}")
    return names


def decision_output_names(model: torch.nn.Module) -> list[str]:
    """`slots_<layer>` for each layer that reduces by a merge plan, in order (a debug export's
    outputs; a rounding layer has no slots)."""
    return slot_layers(decision_layer_names(model))


def slot_layers(layer_names: list[str]) -> list[str]:
    """Of `decision_layer_names`, those of the layers that reduce by a merge plan (they have slots)."""
    return [name for name in layer_names if name.startswith("slots_")]


def owner_output_name(slots_name: str) -> str:
    """The debug output with the slot owners of the layer whose slots are `slots_name`."""
    return slots_name.replace("slots_", "owners_", 1)


def owner_output_names(model: torch.nn.Module) -> list[str]:
    """`owners_<layer>` for each layer that merges, in order (after the slots in a debug export)."""
    return [owner_output_name(name) for name in decision_output_names(model)]


def choice_kinds(
    model: torch.nn.Module, example: tuple[torch.Tensor, ...], signature: ModelSignature
) -> list[list[str]]:
    """The kinds of the choices each merging layer makes, in call order (one eager run)."""
    tape = DecisionTape()
    with torch.no_grad(), recording(tape), decision_hooks(model, tape=tape):
        ExportWrapper(model, signature).eval()(*example)
    return [[call.kind for call in calls] for calls in tape.layers]


def choice_output_names(model: torch.nn.Module, kinds: list[list[str]]) -> list[str]:
    """`<kind>_<layer>_<k>` and `<kind>_scores_<layer>_<k>` for every choice, in call order."""
    layers = [int(name.split("_")[1]) for name in decision_layer_names(model)]
    return [
        name
        for layer, layer_kinds in zip(layers, kinds)
        for k, kind in enumerate(layer_kinds)
        for name in (f"{kind}_{layer}_{k}", f"{kind}_scores_{layer}_{k}")
    ]


class GraphChoice(NamedTuple):
    """One choice a debug graph made: its kind, the choice and the scores it was made on."""

    kind: str
    choice: np.ndarray
    scores: np.ndarray


def graph_choices(outputs: dict[str, np.ndarray]) -> list[list[GraphChoice]]:
    """A debug graph's choices (outputs by name), grouped by merging layer, in call order."""
    layers: dict[int, list[tuple[int, GraphChoice]]] = {}
    for name, value in outputs.items():
        match = _CHOICE_NAME.match(name)
        if match:
            kind, layer, k = match[1], int(match[2]), int(match[3])
            scores = outputs[f"{kind}_scores_{layer}_{k}"]
            layers.setdefault(layer, []).append((k, GraphChoice(kind, value, scores)))
    return [[choice for _, choice in sorted(calls, key=lambda c: c[0])] for _, calls in sorted(layers.items())]


def unnamed_outputs(output_names: list[str], signature: ModelSignature) -> list[str]:
    """Outputs of a debug graph that are neither the model's nor decisions: an export names
    the choices its eager run makes, so extra ones come from a merge that traces otherwise."""
    return [name for name in output_names if name not in signature.output_names and not _DECISION_NAME.match(name)]


def export_decisions_like(
    model: torch.nn.Module, shipped: str | os.PathLike, path: str | os.PathLike, seq_len: int | None = None
) -> Path:
    """The debug graph of `model` (its decisions as extra outputs) at `path`, exported with the
    opset and batch mode of the `shipped` graph: decisions read from a graph exported otherwise
    are not the shipped graph's."""
    from exporter.onnx_export import export_onnx, export_settings
    from exporter.signatures import signature_of

    settings = export_settings(shipped)
    example = signature_of(model, seq_len).example_inputs(settings["batch"]) if settings["batch"] else None
    return export_onnx(
        model, example, path, opset=settings["opset"], dynamic_batch=settings["dynamic_batch"], seq_len=seq_len,
        decisions=True,
    )  # fmt: skip


@dataclass
class EagerRun:
    """One PyTorch run with its decisions: every output (float32, CPU), what the merging layers
    did, and the tape of their choices with the scores PyTorch computed for them."""

    outputs: list[torch.Tensor]
    layers: LayerCapture
    tape: DecisionTape


def run_eager(
    model: torch.nn.Module,
    signature: ModelSignature,
    feeds: dict,
    device: torch.device,
    forced: list | None = None,
    forced_choices: list[list[GraphChoice]] | None = None,
) -> EagerRun:
    """The PyTorch model on numpy `feeds` on `device`, optionally with forced slots per layer and
    forced choices per layer (`graph_choices`); the model is left where it was. Forced choices
    this model's merge could not have made raise `ops.decision_tape.DecisionMismatch`."""
    wrapper = ExportWrapper(model, signature).eval()
    inputs = [torch.as_tensor(feeds[name]).to(device) for name in signature.input_names]
    forced_t = None if forced is None else [torch.as_tensor(f) for f in forced]
    tape = DecisionTape(None if forced_choices is None else [[(c.kind, torch.as_tensor(c.choice)) for c in calls]
                                                              for calls in forced_choices])  # fmt: skip
    with torch.no_grad(), placed_on(wrapper, device), recording(tape), decision_hooks(wrapper, forced_t, tape) as cap:
        outputs = [out.float().cpu() for out in as_outputs(wrapper(*inputs))]
    tape.check_complete()
    on_cpu = LayerCapture(
        *([t.cpu() for t in part] for part in (cap.slots, cap.owners, cap.own_slots, cap.choice_slots))
    )
    return EagerRun(outputs, on_cpu, tape)
