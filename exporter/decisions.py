"""Merge decisions as data: capture them, export them as extra outputs, or force them.

A merge decision compares floating-point scores; where two candidates tie to within the float
noise that separates two correct implementations (ONNX Runtime vs PyTorch kernels), they may
choose differently, and a whole token moves. To tell such a near-tie from a wrong export, the
parity check reruns PyTorch with the exported graph's own decisions forced in: given the same
decisions, the numbers must agree to the usual tolerance.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from exporter.runners import placed_on
from exporter.signatures import ExportWrapper, ModelSignature, as_outputs
from ops.merge import MergeAssign, MergePlan, plan_from_slots, plan_slots


@contextlib.contextmanager
def decision_hooks(
    model: torch.nn.Module, forced: list[torch.Tensor] | None = None, owners: list[torch.Tensor] | None = None
) -> Iterator[list[torch.Tensor]]:
    """Yield a list that fills with each merging layer's slots `[B, N_l]`, in call order.

    With `forced`, layer k uses `forced[k]` as its slots instead of computing them. `owners`, if
    given, fills with each layer's kept tokens `[B, n_out]`: the token that owns each slot (the
    one that stays; the others in its slot merge into it).
    """
    captured: list[torch.Tensor] = []

    def hook(module, args, plan: MergePlan) -> MergePlan:
        slots = plan_slots(plan)
        if forced is not None:
            wanted = forced[len(captured)].to(slots.device)
            # Same decisions keep the layer's own plan, so that the sums run in the same order.
            if not torch.equal(wanted, slots):
                plan, slots = plan_from_slots(wanted, plan.n_out), wanted
        captured.append(slots)
        if owners is not None:
            owners.append(plan.kept)
        return plan

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, MergeAssign)]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


class DecisionWrapper(torch.nn.Module):
    """ExportWrapper that also returns every merging layer's slots, then its slot owners (for a
    debug export)."""

    def __init__(self, model: torch.nn.Module, signature: ModelSignature) -> None:
        super().__init__()
        self.inner = ExportWrapper(model, signature)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        owners: list[torch.Tensor] = []
        with decision_hooks(self.inner, owners=owners) as slots:
            out = self.inner(*inputs)
        return (*as_outputs(out), *slots, *owners)


def decision_output_names(model: torch.nn.Module) -> list[str]:
    """`slots_<layer>` for each layer that merges, in order."""
    return [f"slots_{i}" for i, r in enumerate(model.token_schedule.merges) if r > 0]


def owner_output_name(slots_name: str) -> str:
    """The debug output with the slot owners of the layer whose slots are `slots_name`."""
    return slots_name.replace("slots_", "owners_", 1)


def owner_output_names(model: torch.nn.Module) -> list[str]:
    """`owners_<layer>` for each layer that merges, in order (after the slots in a debug export)."""
    return [owner_output_name(name) for name in decision_output_names(model)]


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


def run_eager(
    model: torch.nn.Module, signature: ModelSignature, feeds: dict, device: torch.device, forced=None
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Main (first) output and slots of the PyTorch model on numpy `feeds` on `device`, optionally
    with forced slots; the model is left where it was."""
    wrapper = ExportWrapper(model, signature).eval()
    inputs = [torch.as_tensor(feeds[name]).to(device) for name in signature.input_names]
    forced_t = None if forced is None else [torch.as_tensor(f) for f in forced]
    with torch.no_grad(), placed_on(wrapper, device), decision_hooks(wrapper, forced_t) as slots:
        out = as_outputs(wrapper(*inputs))[0]
        return out.float().cpu(), [s.cpu() for s in slots]
