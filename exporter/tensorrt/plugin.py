"""The fused merge as a TensorRT plugin, with TensorRT's Python plugin API (`tensorrt.plugin`, 10.6+).

Importing this module registers `pitome::TokenMerge` (vision: x, size, metric) and
`pitome::TokenMergeMasked` (text: + valid) with TensorRT's plugin registry; the ONNX parser maps
the nodes that `exporter.merge_node` emits (op type + `plugin_namespace`) to them. Both
implementations are the Triton kernel of `ops.kernels` (one launch per merge step):

- `@trtp.aot_impl` (the nodes carry `aot=1`): the kernel compiled by `ops.kernels.aot` to PTX
  for the building GPU, with the layer's shapes, r and margin baked in, so the engine holds the
  kernel and runs without Python. Triton >= 3.3 kernels end with scratch-pointer parameters that
  the plugin does not pass (the kernel never reads them); NVIDIA's own sample compiles with
  Triton 3.5 from TensorRT 10.16 on, so older TensorRT versions are refused with such a Triton.
- `@trtp.impl`: the runtime fallback (nodes with `aot=0`), the same kernel launched from Python
  on TensorRT's stream.

Every IO stays FP32, so the merge decisions are FP32 inside FP16/BF16/INT8 engines too.
Written against the documented API; TensorRT cannot be installed on this project's machines, so
it has not been run here (see README, TensorRT).
"""

# No `from __future__ import annotations`: tensorrt.plugin reads the type hints at registration.
from typing import Tuple

import tensorrt as trt
import tensorrt.plugin as trtp
import torch

from exporter.merge_node import DOMAIN, OP_TYPES
from ops.merge import MergeStep

AOT_MIN_TENSORRT = (10, 16)  # NVIDIA's plugin sample moved to Triton 3.5 (kernels with scratch parameters) here


def _out_descs(x: "trtp.TensorDesc", size: "trtp.TensorDesc", r: int):
    merged, merged_size = x.like(), size.like()
    merged.shape_expr[1] = x.shape_expr[1] - r
    merged_size.shape_expr[1] = size.shape_expr[1] - r
    return merged, merged_size


def _step(kind: str, r: int, margin: float) -> MergeStep:
    # the ONNX parser hands string attributes over with their C terminator
    return MergeStep(kind.rstrip("\x00"), r, margin)


def _run(inputs, valid, kind: str, r: int, margin: float, num_prefix: int, outputs, stream: int) -> None:
    from ops.kernels import token_merge

    with torch.cuda.stream(torch.cuda.ExternalStream(stream)), torch.no_grad():
        x, size, metric = (torch.as_tensor(t, device="cuda") for t in inputs)
        valid = None if valid is None else torch.as_tensor(valid, device="cuda")
        merged, merged_size = token_merge(x, size, metric, valid, _step(kind, r, margin), num_prefix)
        torch.as_tensor(outputs[0], device="cuda").copy_(merged)
        torch.as_tensor(outputs[1], device="cuda").copy_(merged_size)


def _static(desc: "trtp.TensorDesc", dim: int, name: str) -> int:
    extent = desc.shape_expr[dim]
    if not extent.is_constant:
        raise ValueError(f"the fused merge needs a static {name}: export with a fixed sequence length / image size")
    return extent.constant_value()


def _check_aot_versions() -> None:
    """Refuse an AOT build whose kernel ends with parameters this TensorRT may not fill."""
    from ops.kernels.aot import triton_scratch_parameters

    version = tuple(int(part) for part in trt.__version__.split(".")[:2])
    if triton_scratch_parameters() and version < AOT_MIN_TENSORRT:
        raise RuntimeError(
            f"TensorRT {trt.__version__} with Triton kernels that end in scratch parameters: use TensorRT >= "
            f"{'.'.join(map(str, AOT_MIN_TENSORRT))}, Triton < 3.3, or export the nodes with aot=0 (runtime path)"
        )


def _aot(x, size, metric, valid, kind: str, r: int, margin: float, num_prefix: int):
    """(kernel name, PTX, launch parameters, extra args) of one layer: one program per batch element."""
    from ops.kernels.aot import compile_merge

    _check_aot_versions()
    major, minor = torch.cuda.get_device_capability()
    compiled = compile_merge(
        _step(kind, r, margin), _static(x, 1, "token count"), _static(x, 2, "width"), _static(metric, 2, "key width"),
        num_prefix, valid is not None, "float32", 10 * major + minor,
    )  # fmt: skip
    launch = trtp.KernelLaunchParams()
    launch.grid_x = x.shape_expr[0]
    launch.block_x = compiled.threads
    launch.shared_mem = compiled.shared_bytes
    return compiled.name.encode(), compiled.ptx.encode(), launch, trtp.SymIntExprs(0)


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


@trtp.aot_impl(f"{DOMAIN}::{OP_TYPES[False]}")
def token_merge_aot(
    x: trtp.TensorDesc, size: trtp.TensorDesc, metric: trtp.TensorDesc, kind: str, r: int, margin: float,
    num_prefix: int, outputs: Tuple[trtp.TensorDesc],
) -> Tuple[bytes, bytes, trtp.KernelLaunchParams, trtp.SymExprs]:  # fmt: skip
    return _aot(x, size, metric, None, kind, r, margin, num_prefix)


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


@trtp.aot_impl(f"{DOMAIN}::{OP_TYPES[True]}")
def token_merge_masked_aot(
    x: trtp.TensorDesc, size: trtp.TensorDesc, metric: trtp.TensorDesc, valid: trtp.TensorDesc,
    kind: str, r: int, margin: float, num_prefix: int, outputs: Tuple[trtp.TensorDesc],
) -> Tuple[bytes, bytes, trtp.KernelLaunchParams, trtp.SymExprs]:  # fmt: skip
    return _aot(x, size, metric, valid, kind, r, margin, num_prefix)
