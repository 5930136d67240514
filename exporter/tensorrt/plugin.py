"""The fused merge as a TensorRT plugin, with TensorRT's Python plugin API (`tensorrt.plugin`, 10.6+).

Importing this module registers `pitome::TokenMerge` (vision: x, size, metric) and
`pitome::TokenMergeMasked` (text: + valid) with TensorRT's plugin registry; the ONNX parser maps
the nodes that `exporter.merge_node` emits (op type + `plugin_namespace`) to them. The kernels are
the PyTorch CUDA kernels of `ops.merge.token_merge_op` run on TensorRT's stream, so the plugin
computes exactly what eager PyTorch and the ONNX Runtime reference compute; every IO stays FP32,
so the merge decisions are FP32 inside FP16/BF16/INT8 engines too.

Written against the documented API; TensorRT cannot be installed on this project's machines, so
it has not been run here (see README, TensorRT).
"""

# No `from __future__ import annotations`: tensorrt.plugin reads the type hints at registration.
from typing import Tuple

import tensorrt.plugin as trtp
import torch

from exporter.merge_node import DOMAIN, OP_TYPES
from ops.merge import token_merge_op


def _out_descs(x: "trtp.TensorDesc", size: "trtp.TensorDesc", r: int):
    merged, merged_size = x.like(), size.like()
    merged.shape_expr[1] = x.shape_expr[1] - r
    merged_size.shape_expr[1] = size.shape_expr[1] - r
    return merged, merged_size


def _run(inputs, valid, kind: str, r: int, margin: float, num_prefix: int, outputs, stream: int) -> None:
    kind = kind.rstrip("\x00")  # the ONNX parser hands string attributes over with their C terminator
    with torch.cuda.stream(torch.cuda.ExternalStream(stream)), torch.no_grad():
        x, size, metric = (torch.as_tensor(t, device="cuda") for t in inputs)
        valid = None if valid is None else torch.as_tensor(valid, device="cuda")
        merged, merged_size = token_merge_op(x, size, metric, valid, kind, r, margin, num_prefix)
        torch.as_tensor(outputs[0], device="cuda").copy_(merged)
        torch.as_tensor(outputs[1], device="cuda").copy_(merged_size)


@trtp.register(f"{DOMAIN}::{OP_TYPES[False]}")
def token_merge_desc(
    x: trtp.TensorDesc,
    size: trtp.TensorDesc,
    metric: trtp.TensorDesc,
    kind: str,
    r: int,
    margin: float,
    num_prefix: int,
) -> Tuple[trtp.TensorDesc, trtp.TensorDesc]:
    return _out_descs(x, size, r)


@trtp.autotune(f"{DOMAIN}::{OP_TYPES[False]}")
def token_merge_formats(x, size, metric, outputs):
    return [trtp.AutoTuneCombination("FP32, FP32, FP32, FP32, FP32")]


@trtp.impl(f"{DOMAIN}::{OP_TYPES[False]}")
def token_merge_impl(
    x: trtp.Tensor, size: trtp.Tensor, metric: trtp.Tensor, kind: str, r: int, margin: float, num_prefix: int,
    outputs: Tuple[trtp.Tensor], stream: int,
) -> None:  # fmt: skip
    _run((x, size, metric), None, kind, r, margin, num_prefix, outputs, stream)


@trtp.register(f"{DOMAIN}::{OP_TYPES[True]}")
def token_merge_masked_desc(
    x: trtp.TensorDesc, size: trtp.TensorDesc, metric: trtp.TensorDesc, valid: trtp.TensorDesc,
    kind: str, r: int, margin: float, num_prefix: int,
) -> Tuple[trtp.TensorDesc, trtp.TensorDesc]:  # fmt: skip
    return _out_descs(x, size, r)


@trtp.autotune(f"{DOMAIN}::{OP_TYPES[True]}")
def token_merge_masked_formats(x, size, metric, valid, outputs):
    return [trtp.AutoTuneCombination("FP32, FP32, FP32, FP32, FP32, FP32")]


@trtp.impl(f"{DOMAIN}::{OP_TYPES[True]}")
def token_merge_masked_impl(
    x: trtp.Tensor, size: trtp.Tensor, metric: trtp.Tensor, valid: trtp.Tensor,
    kind: str, r: int, margin: float, num_prefix: int, outputs: Tuple[trtp.Tensor], stream: int,
) -> None:  # fmt: skip
    _run((x, size, metric), valid, kind, r, margin, num_prefix, outputs, stream)
