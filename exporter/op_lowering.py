"""ONNX lowerings for the merge's building blocks that `torch.onnx` has no good entry for.

- `aten.sort.stable`: no entry in `torch.onnx`'s function library. ONNX TopK with k equal to
  the axis length is one: its spec breaks ties by the lower index, which is exactly the order a
  stable sort keeps, so eager PyTorch and the exported graph rank tied scores alike.
- `pitome.gather_rows`: one GatherND with batch_dims 1 (rows of each batch item).
"""

from __future__ import annotations

import torch

import ops.merge  # noqa: F401  (registers torch.ops.pitome.gather_rows)


def _stable_sort(self, stable: bool | None = None, dim: int = -1, descending: bool = False):
    """`aten.sort.stable` -> (values, indices) from one TopK."""
    from onnxscript import opset18 as op

    length = op.Gather(op.Shape(self), op.Constant(value_ints=[dim]))
    values, indices = op.TopK(self, length, axis=dim, largest=int(descending), sorted=1)
    return values, indices


def _gather_rows(x, index):
    """`pitome.gather_rows` -> GatherND(x, index[..., None], batch_dims=1)."""
    from onnxscript import opset18 as op

    return op.GatherND(x, op.Unsqueeze(index, op.Constant(value_ints=[-1])), batch_dims=1)


def translation_table() -> dict:
    """`custom_translation_table` entries that every export uses."""
    return {torch.ops.aten.sort.stable: _stable_sort, torch.ops.pitome.gather_rows.default: _gather_rows}
