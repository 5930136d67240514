"""Launching the fused merge step: compile-time constants per layer, dtype handling, the launches.

`kernel_constants` is the one place that turns a `MergeStep` and the tensor shapes into the
kernel's constexprs; the PyTorch launcher here and TensorRT's ahead-of-time plugin
(`exporter.tensorrt.plugin`) both use it, so both run the same specialisation.
"""

from __future__ import annotations

import math

import torch
import triton
from triton.runtime.interpreter import InterpretedFunction

from ops.kernels import merge_step
from ops.kernels.merge_step import energy_kernel, token_merge_kernel
from ops.merge import MergeStep

KIND_CODES = {kind: getattr(merge_step, kind.upper()).value for kind in ("pitome", "pitome_bsm", "tome", "pitome_text")}
# Launches per merging layer: PiToMe kinds compute their energies in a launch of their own (all
# batch elements x row blocks), then one program per batch element does the rest; ToMe has no
# energies. TensorRT's AOT plugin runs the one kernel with the energies inline: 1 launch.
LAUNCHES_PER_LAYER = {"pitome": 2, "pitome_bsm": 2, "pitome_text": 2, "tome": 1}
ENERGY_CONSTANTS = ("N", "D", "P", "KIND", "MARGIN", "SIGMA", "GAUSS_NORM", "HAS_VALID", "TP", "DP", "BLOCK")
BLOCK = 32  # tokens per tile: the similarity tiles are BLOCK x BLOCK dots
MAX_TOKENS = 1 << 15  # ranks are packed into 16 bits beside the score
MAX_METRIC_DIM = 256  # a metric row is one register tile
NUM_WARPS = 4


_INTERPRETED = isinstance(token_merge_kernel, InterpretedFunction)


def interpreted() -> bool:
    """Whether the kernels run in Triton's interpreter (TRITON_INTERPRET=1 when they were defined)."""
    return _INTERPRETED


def _pow2(n: int, least: int) -> int:
    return max(least, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


def _a_count(step: MergeStep, patch_tokens: int, num_prefix: int) -> int:
    """How many A tokens the step's matching has (the r merged ones are among them)."""
    if step.kind in ("pitome", "pitome_text"):
        return step.r
    if step.kind == "pitome_bsm":
        return (patch_tokens + 1) // 2
    return (patch_tokens - num_prefix % 2 + 1) // 2


def kernel_constants(
    step: MergeStep, tokens: int, channels: int, metric_dim: int, num_prefix: int, has_valid: bool
) -> dict[str, int | float | bool]:
    """The kernel's constexprs for one layer: shapes, r, kind, margin and padded block sizes.

    Raises ValueError for a step the merge cannot do on these shapes (as `ops.merge` would fail).
    """
    patch_tokens = tokens - num_prefix
    a_count = _a_count(step, patch_tokens, num_prefix)
    if step.r < 1 or step.r > a_count or (step.kind in ("pitome", "pitome_text") and 2 * step.r > patch_tokens):
        raise ValueError(f"{step.kind} cannot merge r={step.r} of {patch_tokens} tokens")
    if tokens >= MAX_TOKENS or metric_dim > MAX_METRIC_DIM:
        raise ValueError(f"the fused merge takes < {MAX_TOKENS} tokens and metric rows <= {MAX_METRIC_DIM} wide")
    if step.kind == "pitome_text" and not has_valid:
        raise ValueError("pitome_text needs the valid mask")
    sigma = 1.0 - step.margin
    return {
        "N": tokens,
        "C": channels,
        "D": metric_dim,
        "P": num_prefix,
        "R": step.r,
        "KIND": KIND_CODES[step.kind],
        "MARGIN": float(step.margin),
        "SIGMA": sigma,
        "GAUSS_NORM": sigma * math.sqrt(2.0 * math.pi),  # as ops.merge.gaussian_energy computes it
        "HAS_VALID": has_valid and step.kind in ("tome", "pitome_text"),
        "TP": _pow2(patch_tokens, BLOCK),
        "AP": _pow2(a_count, BLOCK),
        "NOP": _pow2(tokens, BLOCK),
        "DP": _pow2(metric_dim, 16),
        "BLOCK": BLOCK,
        "BLOCK_C": min(64, _pow2(channels, 16)),
        "BROADCAST_DOT": interpreted(),
    }


def _check_device(x: torch.Tensor) -> None:
    if x.device.type == "cuda" and not interpreted():
        return
    if x.device.type == "cpu" and interpreted():
        return
    raise RuntimeError(
        f"the fused merge kernels run on CUDA tensors, or on CPU tensors under Triton's interpreter "
        f"(TRITON_INTERPRET=1 set before ops.kernels is imported); got a {x.device.type} tensor with the "
        f"{'interpreter' if interpreted() else 'compiler'}"
    )


def _launch_dtype(t: torch.Tensor) -> torch.Tensor:
    """The interpreter has no bfloat16: it computes on FP32 copies (the kernel computes in FP32 anyway)."""
    if interpreted() and t.dtype == torch.bfloat16:
        return t.float()
    return t


def token_merge_with_slots(
    x: torch.Tensor,
    size: torch.Tensor,
    metric: torch.Tensor,
    valid: torch.Tensor | None,
    step: MergeStep,
    num_prefix: int,
    with_slots: bool = False,
    split_energy: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`token_merge`, plus (if `with_slots`) each token's output slot `[B, N]` int32: the decisions,
    in the form `ops.merge.plan_slots` gives them. `split_energy=False` computes PiToMe energies
    inside the one merge kernel, as TensorRT's AOT plugin does (one launch instead of two)."""
    _check_device(x)
    batch, tokens, channels = x.shape
    if step.r == 0:
        return x.clone(), size.clone(), None
    constants = kernel_constants(step, tokens, channels, metric.shape[-1], num_prefix, valid is not None)
    x_in, size_in = _launch_dtype(x).contiguous(), _launch_dtype(size).reshape(batch, tokens).contiguous()
    metric_in = _launch_dtype(metric).contiguous()
    valid_in = valid.to(torch.float32).contiguous() if constants["HAS_VALID"] else None
    x_out = x_in.new_empty(batch, tokens - step.r, channels)
    size_out = size_in.new_empty(batch, tokens - step.r)
    slots = torch.empty(batch, tokens, dtype=torch.int32, device=x.device) if with_slots else None
    energy = None
    if split_energy and step.kind != "tome":
        energy = torch.empty(batch, tokens - num_prefix, dtype=torch.float32, device=x.device)
        energy_constants = {name: constants[name] for name in (*ENERGY_CONSTANTS, "BROADCAST_DOT")}
        row_blocks = triton.cdiv(tokens - num_prefix, BLOCK)
        energy_kernel[(batch, row_blocks)](metric_in, valid_in, energy, **energy_constants, num_warps=NUM_WARPS)
    token_merge_kernel[(batch,)](
        x_in, size_in, metric_in, valid_in, x_out, size_out, slots, energy, **constants, num_warps=NUM_WARPS
    )
    return x_out.to(x.dtype), size_out.to(size.dtype)[..., None], slots


def token_merge(
    x: torch.Tensor,
    size: torch.Tensor,
    metric: torch.Tensor,
    valid: torch.Tensor | None,
    step: MergeStep,
    num_prefix: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One merge step, fused: `x [B, N, C]`, `size [B, N, 1]`, `metric [B, N, d]`, `valid [B, N]`
    (or None) -> `(x_out [B, N - r, C], size_out [B, N - r, 1])`, as `ops.merge.token_merge_op`.

    `LAUNCHES_PER_LAYER[step.kind]` kernel launches (2 for PiToMe, 1 for ToMe), whatever the batch.
    Decisions in FP32; x and size keep their dtype (FP32, FP16 or BF16). CUDA tensors, or CPU
    tensors under TRITON_INTERPRET=1.
    """
    x_out, size_out, _ = token_merge_with_slots(x, size, metric, valid, step, num_prefix)
    return x_out, size_out
