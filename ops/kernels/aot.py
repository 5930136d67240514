"""The fused merge kernel compiled ahead of time to PTX, for TensorRT's AOT plugin (no GPU needed).

TensorRT launches an AOT plugin's one kernel with its inputs, then extra int32 scalars (none
here: every shape, r and the margin are compile-time constants), then its outputs; the kernel
computes the energies itself (`energy_ptr` None), so a merging layer is 1 launch there. Triton >= 3.3
appends scratch-pointer parameters to every compiled kernel (`global_scratch`, and from 3.5
`profile_scratch`); this kernel uses neither (`compile_merge` refuses a build that would), so
those trailing parameters are never read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ops.kernels.launch import NUM_WARPS, interpreted, kernel_constants
from ops.kernels.merge_step import token_merge_kernel
from ops.merge import MergeStep

POINTER_TYPES = {"float32": "*fp32", "float16": "*fp16", "bfloat16": "*bf16"}
_ENTRY = re.compile(r"\.entry\s+(\w+)\s*\(([^)]*)\)", re.S)


def plugin_arguments(has_valid: bool) -> tuple[str, ...]:
    """The kernel's parameters in the order the TensorRT plugin passes them: inputs, then outputs."""
    return ("x_ptr", "size_ptr", "metric_ptr", *(("valid_ptr",) if has_valid else ()), "x_out_ptr", "size_out_ptr")


def triton_scratch_parameters() -> tuple[str, ...]:
    """The pointer parameters this Triton version appends to every kernel, after the kernel's own."""
    major, minor = (int(part) for part in triton.__version__.split(".")[:2])
    if (major, minor) < (3, 3):
        return ()
    return ("global_scratch",) if (major, minor) < (3, 5) else ("global_scratch", "profile_scratch")


@dataclass(frozen=True)
class CompiledMerge:
    """One layer's kernel as PTX with what a launch needs: its entry name, threads and shared memory."""

    name: str
    ptx: str
    num_warps: int
    shared_bytes: int

    @property
    def threads(self) -> int:
        return self.num_warps * 32

    def ptx_parameters(self) -> list[str]:
        """The `.param` declarations of the PTX entry, in order (e.g. `.param .u64 .ptr .global ...`)."""
        match = _ENTRY.search(self.ptx)
        if match is None or match.group(1) != self.name:
            raise ValueError(f"no PTX entry {self.name!r}")
        return [p.strip() for p in match.group(2).split(",") if p.strip()]


def compile_merge(
    step: MergeStep,
    tokens: int,
    channels: int,
    metric_dim: int,
    num_prefix: int,
    has_valid: bool,
    dtype: str = "float32",
    capability: int = 90,
) -> CompiledMerge:
    """PTX of the merge kernel for one layer's static shapes on a GPU of `capability` (90: H100/H200).

    `dtype` is that of x, size, metric and the outputs; `valid` (when present) is FP32.
    """
    if interpreted():
        raise RuntimeError("TRITON_INTERPRET=1 is set: Triton compiles no PTX for interpreted kernels")
    constants = kernel_constants(step, tokens, channels, metric_dim, num_prefix, has_valid)
    pointer = POINTER_TYPES[dtype]
    signature = {name: pointer for name in plugin_arguments(has_valid)}
    signature.update(valid_ptr="*fp32" if has_valid else "constexpr", slots_ptr="constexpr", energy_ptr="constexpr")
    signature.update({name: "constexpr" for name in constants})
    constexprs = {**constants, "slots_ptr": None, "energy_ptr": None, **({} if has_valid else {"valid_ptr": None})}
    source = ASTSource(fn=token_merge_kernel, signature=signature, constexprs=constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32), options={"num_warps": NUM_WARPS})
    scratch = (
        getattr(compiled.metadata, "global_scratch_size", 0),
        getattr(compiled.metadata, "profile_scratch_size", 0),
    )
    if any(scratch):
        raise RuntimeError(
            f"the merge kernel asks for scratch memory {scratch}, which a TensorRT AOT plugin cannot pass"
        )
    return CompiledMerge(
        compiled.metadata.name, compiled.asm["ptx"], compiled.metadata.num_warps, compiled.metadata.shared
    )
