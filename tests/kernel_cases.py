"""The fused merge kernels under Triton's interpreter, against `ops.merge`: cases and their runner.

`python -m tests.kernel_cases` (with TRITON_INTERPRET=1, which triton reads when the kernels are
defined) runs every case and prints one JSON object per case; tests/test_kernels.py runs it in a
subprocess, so the interpreter is on whatever else the test session imported first.

Inputs have a wide spread of energies (a per-token pull towards one direction), so that the
gaps the ranking must resolve lie far above FP32 rounding (a random metric of 577 tokens has
energies within 1e-9 of each other, where two correct FP32 sums may order differently); each
case checks that as a precondition (the FP64 reference takes the same decisions). Exact ties
come from duplicated tokens.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class KernelCase:
    kind: str
    batch: int
    tokens: int
    prefix: int
    r: int
    channels: int = 24
    metric_dim: int = 16
    duplicates: bool = False
    padded: bool = False
    dtype: str = "float32"
    split_energy: bool = True  # False: energies inside the one merge kernel, as TensorRT's AOT plugin runs it
    gpu_dot: bool = False  # the GPU's tl.dot similarity (numpy's BLAS here: no exact ties, so no duplicates)
    seed: int = 0

    @property
    def name(self) -> str:
        extras = [flag for flag in ("duplicates", "padded") if getattr(self, flag)]
        extras += [] if self.split_energy else ["inline"]
        extras += ["tl.dot"] if self.gpu_dot else []
        extras += [] if self.dtype == "float32" else [self.dtype]
        return "-".join([self.kind, f"b{self.batch}", f"n{self.tokens}", f"p{self.prefix}", f"r{self.r}", *extras])


CASES = [
    KernelCase("pitome", 1, 17, 1, 4),
    KernelCase("pitome", 3, 40, 2, 9, duplicates=True),
    KernelCase("pitome", 8, 24, 0, 5),
    KernelCase("pitome", 2, 197, 1, 19, channels=40),
    KernelCase("pitome_bsm", 1, 17, 0, 3),
    KernelCase("pitome_bsm", 4, 40, 1, 11, duplicates=True),
    KernelCase("pitome_bsm", 8, 24, 2, 6),
    KernelCase("pitome_bsm", 1, 577, 1, 57, channels=16),  # the largest token count, once
    KernelCase("tome", 1, 17, 1, 4),
    KernelCase("tome", 3, 40, 0, 12, duplicates=True),
    KernelCase("tome", 8, 24, 2, 7),
    KernelCase("tome", 2, 65, 1, 20, padded=True),
    KernelCase("pitome_text", 1, 17, 1, 4, padded=True),
    KernelCase("pitome_text", 3, 40, 1, 10, duplicates=True, padded=True),
    KernelCase("pitome_text", 8, 24, 1, 6),
    KernelCase("pitome_text", 2, 128, 1, 30, channels=66, padded=True),
    KernelCase("pitome", 2, 40, 1, 9, dtype="float16"),
    KernelCase("pitome_bsm", 2, 40, 1, 9, dtype="bfloat16"),
    KernelCase("pitome", 3, 40, 2, 9, duplicates=True, split_energy=False),
    KernelCase("pitome_bsm", 2, 197, 1, 40, split_energy=False),
    KernelCase("pitome_text", 3, 40, 1, 10, duplicates=True, padded=True, split_energy=False),
    KernelCase("pitome_bsm", 2, 70, 1, 20, gpu_dot=True),
    KernelCase("pitome_text", 2, 70, 1, 20, padded=True, gpu_dot=True, split_energy=False),
    KernelCase("tome", 2, 70, 2, 20, padded=True, gpu_dot=True),
]

MODEL_FAMILIES = ("vit", "text")


def case_inputs(case: KernelCase) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(x, size, metric, valid) of a case: spread energies, duplicated rows, padding at the end."""
    gen = torch.Generator().manual_seed(case.seed)
    b, n = case.batch, case.tokens
    x = torch.randn(b, n, case.channels, generator=gen)
    size = torch.randint(1, 4, (b, n, 1), generator=gen).float()
    direction = torch.randn(case.metric_dim, generator=gen)
    pull = torch.rand(b, n, 1, generator=gen) * 2.0
    metric = pull * direction + torch.randn(b, n, case.metric_dim, generator=gen)
    if case.duplicates:  # 6 copies of one token: exact ties in energy and similarity
        metric[:, case.prefix + 3 : case.prefix + 9] = metric[:, case.prefix + 2 : case.prefix + 3]
    valid = None
    if case.padded or case.kind == "pitome_text":
        valid = torch.ones(b, n)
        if case.padded:
            valid[-1, n - n // 3 :] = 0  # the last sequence padded, as text batches are
        size = valid[..., None].clone()
    return x.to(getattr(torch, case.dtype)), size.to(getattr(torch, case.dtype)), metric, valid


def _reference(x, size, metric, valid, step, prefix):
    from ops.merge import merge_assignment, plan_slots, size_weighted_merge

    plan = merge_assignment(metric, step, prefix, valid)
    x_out, size_out = size_weighted_merge(x, size, plan)
    return x_out, size_out, plan_slots(plan)


class LaunchCounter:
    """Counts the launches (`kernel[grid](...)`) of both kernels of `ops.kernels.launch` while it
    stands in for them."""

    NAMES = ("energy_kernel", "token_merge_kernel")

    def __init__(self) -> None:
        self.launches = 0

    def __enter__(self) -> LaunchCounter:
        from ops.kernels import launch

        self.kernels = {name: getattr(launch, name) for name in self.NAMES}
        for name, kernel in self.kernels.items():
            setattr(launch, name, _Counted(kernel, self))
        return self

    def __exit__(self, *_) -> None:
        from ops.kernels import launch

        for name, kernel in self.kernels.items():
            setattr(launch, name, kernel)


class _Counted:
    def __init__(self, kernel, counter: LaunchCounter) -> None:
        self.kernel, self.counter = kernel, counter

    def __getitem__(self, grid):
        self.counter.launches += 1
        return self.kernel[grid]


def run_case(case: KernelCase) -> dict:
    """The kernel against `ops.merge` on one case: decisions, outputs, launches, time."""
    from ops.kernels import launch
    from ops.merge import MergeStep

    x, size, metric, valid = case_inputs(case)
    step = MergeStep(case.kind, case.r, 0.7 if case.kind == "pitome_text" else 0.6)
    ref_x, ref_size, ref_slots = _reference(x.float(), size.float(), metric, valid, step, case.prefix)
    double = _reference(x.double(), size.double(), metric.double(), valid, step, case.prefix)
    constants = launch.kernel_constants
    if case.gpu_dot:  # the kernels' GPU similarity code path (tl.dot), which the interpreter otherwise avoids
        launch.kernel_constants = lambda *args: {**constants(*args), "BROADCAST_DOT": False}
    try:
        with LaunchCounter() as counter:
            start = time.perf_counter()
            out_x, out_size, slots = launch.token_merge_with_slots(
                x, size, metric, valid, step, case.prefix, with_slots=True, split_energy=case.split_energy
            )
            seconds = time.perf_counter() - start
    finally:
        launch.kernel_constants = constants
    return {
        "name": case.name,
        "decisive": torch.equal(double[2], ref_slots),
        "slots_equal": torch.equal(slots.long(), ref_slots),
        "max_abs_error": (out_x.float() - ref_x).abs().max().item(),
        "sizes_equal": torch.equal(out_size.float(), ref_size),
        "dtypes_kept": out_x.dtype == x.dtype and out_size.dtype == size.dtype,
        "shape": list(out_x.shape),
        "launches": counter.launches,
        "seconds": seconds,
    }


def run_model(family: str) -> dict:
    """A small patched model (vit: DeiT-shaped, text: BERT with padding), every merge step through
    the kernel (the operator's CPU kernel routed to it) against the decomposed merge."""
    from ops import patch_model, repatch
    from ops.kernels import launch
    from ops.merge import MergeStep, TokenMerge
    from tests.models import small_text, small_vit, text_batch

    if family == "vit":
        model = patch_model(small_vit("deit"), ratio=0.75)
        inputs = {"x": torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))}
    else:
        model = patch_model(small_text("bert"), ratio=0.75, seq_len=32)
        ids, mask = text_batch()
        inputs = {"input_ids": ids, "attention_mask": mask}

    def logits() -> torch.Tensor:
        with torch.no_grad():
            out = model(**inputs)
        return out if isinstance(out, torch.Tensor) else out.logits

    def fused_kernel(x, size, metric, valid, kind, r, margin, num_prefix):
        return launch.token_merge(x, size, metric, valid, MergeStep(kind, r, margin), num_prefix)

    decomposed = logits()
    kinds = [m.step.kind for m in model.modules() if isinstance(m, TokenMerge) and m.step.r > 0]
    repatch(model, merge_impl="fused")
    torch.library.register_kernel("pitome::token_merge", "cpu", fused_kernel)
    with LaunchCounter() as counter:
        fused = logits()
    return {
        "name": f"model-{family}",
        "max_abs_error": (fused - decomposed).abs().max().item(),
        "merging_kinds": kinds,
        "launches": counter.launches,
    }


def main() -> int:
    torch.set_num_threads(1)
    if os.environ.get("TRITON_INTERPRET") != "1":
        print("set TRITON_INTERPRET=1: these cases run the kernels in Triton's interpreter", file=sys.stderr)
        return 2
    names = set(sys.argv[1:])
    for case in CASES:
        if not names or case.name in names:
            print(json.dumps({"case": asdict(case), **run_case(case)}), flush=True)
    for family in MODEL_FAMILIES:
        if not names or f"model-{family}" in names:
            print(json.dumps(run_model(family)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
