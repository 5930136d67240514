"""The fused merge kernels (`ops.kernels`) against `ops.merge`, on the CPU.

Interpreter checks: `python -m tests.kernel_cases` runs once per session in a subprocess with
TRITON_INTERPRET=1 (triton reads it when the kernels are defined, so it must be set before
`ops.kernels` is first imported, whatever this session imported before); each test reads its
case's result. PTX checks: `triton.compile` for sm_90 in this process, without the interpreter;
the TensorRT plugin's AOT function runs against a stand-in `tensorrt.plugin` module that only
records what the plugin hands TensorRT (TensorRT itself cannot be installed here).
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from ops.merge import MergeStep
from tests.kernel_cases import CASES, MODEL_FAMILIES

ROOT = Path(__file__).resolve().parents[1]
ATOL = {"float32": 1e-5, "float16": 4e-3, "bfloat16": 3e-2}  # outputs rounded to their dtype
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
needs_compiler = pytest.mark.skipif(INTERPRETING, reason="TRITON_INTERPRET=1 in this session: no PTX compilation")


@pytest.fixture(scope="module")
def interpreted() -> dict[str, dict]:
    """Every case of tests.kernel_cases, run once under Triton's interpreter: results by name."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.kernel_cases"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {row["name"]: row for row in map(json.loads, proc.stdout.splitlines())}


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_kernel_takes_the_decisions_of_ops_merge(interpreted, case):
    """Identical slots for every token, equal sizes, outputs to 1e-5 in FP32, 2 launches (PiToMe) or 1
    (ToMe, or the energies inline as in TensorRT's plugin)."""
    from ops.kernels import LAUNCHES_PER_LAYER

    result = interpreted[case.name]
    assert result["decisive"], "the case's data lies within FP32 rounding of a tie: it cannot test decisions"
    assert result["slots_equal"]
    assert result["sizes_equal"]
    assert result["max_abs_error"] <= ATOL[case.dtype]
    assert result["dtypes_kept"]
    assert result["shape"] == [case.batch, case.tokens - case.r, case.channels]
    assert result["launches"] == (LAUNCHES_PER_LAYER[case.kind] if case.split_energy else 1)
    assert result["launches"] <= 3


@pytest.mark.parametrize("family", MODEL_FAMILIES)
def test_fused_model_equals_decomposed_with_its_launches_per_merging_layer(interpreted, family):
    from ops.kernels import LAUNCHES_PER_LAYER

    result = interpreted[f"model-{family}"]
    assert result["max_abs_error"] <= 1e-5
    assert len(result["merging_kinds"]) >= 3
    assert result["launches"] == sum(LAUNCHES_PER_LAYER[kind] for kind in result["merging_kinds"])


def test_cpu_tensors_need_the_interpreter():
    if INTERPRETING:
        pytest.skip("TRITON_INTERPRET=1 in this session: CPU tensors are the interpreter's")
    from ops.kernels import token_merge

    x = torch.randn(1, 17, 8)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        token_merge(x, torch.ones(1, 17, 1), torch.randn(1, 17, 4), None, MergeStep("pitome", 4, 0.5), 1)


@pytest.mark.parametrize(
    "kind, r, tokens, message",
    [
        ("pitome", 9, 17, "cannot merge r=9 of 16"),
        ("tome", 10, 17, "cannot merge r=10"),
        ("pitome_text", 2, 17, "valid"),
    ],
)
def test_impossible_steps_are_refused(kind, r, tokens, message):
    from ops.kernels import kernel_constants

    with pytest.raises(ValueError, match=message):
        kernel_constants(MergeStep(kind, r, 0.5), tokens, 8, 4, 1, has_valid=False)


def test_patch_model_merge_impl_fused_runs_the_operator_and_survives_repatch():
    """On the CPU the operator runs the decomposed code: same logits; the setting is recorded."""
    from ops import patch_model, repatch
    from ops.merge import TokenMerge
    from tests.models import small_vit

    images = torch.randn(2, 3, 64, 64)
    model = patch_model(small_vit("deit"), ratio=0.75)
    with torch.no_grad():
        decomposed = model(images)
        repatch(model, merge_impl="fused")
        fused = model(images)
    assert model.merge_config["merge_impl"] == "fused"
    assert all(m.fused for m in model.modules() if isinstance(m, TokenMerge))
    torch.testing.assert_close(fused, decomposed, atol=1e-6, rtol=0)
    assert repatch(model, ratio=0.9).merge_config["merge_impl"] == "fused"


@needs_compiler
@pytest.mark.parametrize(
    "kind, tokens, channels, has_valid, dtype",
    [("pitome_bsm", 197, 384, False, "float16"), ("pitome_text", 128, 770, True, "float32")],
)
def test_ptx_for_sm90_has_the_parameters_the_plugin_passes(kind, tokens, channels, has_valid, dtype):
    """Inputs then outputs as .u64 pointers, then only Triton's scratch pointers, which the kernel never uses."""
    from ops.kernels.aot import compile_merge, plugin_arguments, triton_scratch_parameters

    compiled = compile_merge(MergeStep(kind, 19, 0.75), tokens, channels, 64, 1, has_valid, dtype, capability=90)
    params = compiled.ptx_parameters()
    passed = plugin_arguments(has_valid)
    assert len(params) == len(passed) + len(triton_scratch_parameters())
    assert all(p.startswith(".param .u64") for p in params)
    assert ".target sm_90" in compiled.ptx
    assert compiled.threads == 128 and 0 < compiled.shared_bytes <= 48 * 1024  # no opt-in for more shared memory


class _Recorder:
    """Stands in for `tensorrt.plugin`'s decorators and launch types: records what the plugin registers."""

    def __init__(self) -> None:
        self.registered: dict[tuple[str, str], object] = {}

    def _decorator(self, kind):
        def bind(plugin_id):
            def keep(fn):
                self.registered[(kind, plugin_id)] = fn
                return fn

            return keep

        return bind

    def module(self) -> types.ModuleType:
        trtp = types.ModuleType("tensorrt.plugin")
        for kind in ("register", "impl", "aot_impl", "autotune"):
            setattr(trtp, kind, self._decorator(kind))
        for name in ("TensorDesc", "Tensor", "SymExprs", "AutoTuneCombination"):
            setattr(trtp, name, type(name, (), {}))
        trtp.KernelLaunchParams = type("KernelLaunchParams", (), {})
        trtp.SymIntExprs = lambda length: ("no extra args", length)
        return trtp


class _Extent:
    def __init__(self, value) -> None:
        self.value, self.is_constant = value, isinstance(value, int)

    def constant_value(self) -> int:
        return self.value


class _Desc:
    def __init__(self, *shape) -> None:
        self.shape_expr = [_Extent(v) for v in shape]


@needs_compiler
def test_plugin_aot_impl_hands_tensorrt_the_ptx_and_one_program_per_batch_element(monkeypatch):
    recorder = _Recorder()
    trt = types.ModuleType("tensorrt")
    trt.__version__ = "10.16.0"
    trt.plugin = recorder.module()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "tensorrt.plugin", trt.plugin)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *_: (9, 0))
    import exporter.tensorrt as trt_package

    # Imported afresh against the stand-in; both entries get their previous state back afterwards.
    monkeypatch.setitem(sys.modules, "exporter.tensorrt.plugin", None)
    monkeypatch.setattr(trt_package, "plugin", None, raising=False)
    del sys.modules["exporter.tensorrt.plugin"]
    importlib.import_module("exporter.tensorrt.plugin")  # registers with the recorder

    aot = recorder.registered[("aot_impl", "pitome::TokenMergeMasked")]
    batch = "the batch dimension (symbolic)"
    x, size, metric, valid = _Desc(batch, 128, 66), _Desc(batch, 128, 1), _Desc(batch, 128, 64), _Desc(batch, 128)
    name, ptx, launch, extra = aot(x, size, metric, valid, "pitome_text\x00", 30, 0.85, 1, outputs=())
    assert name == b"token_merge_kernel" and ptx.startswith(b"//") and b".entry token_merge_kernel" in ptx
    assert launch.grid_x is x.shape_expr[0] and launch.block_x == 128 and launch.shared_mem > 0
    assert extra == ("no extra args", 0)
    assert {("impl", "pitome::TokenMerge"), ("aot_impl", "pitome::TokenMerge")} <= set(recorder.registered)
    with pytest.raises(ValueError, match="static token count"):
        aot(_Desc(batch, "dynamic", 66), size, metric, valid, "pitome_text", 30, 0.85, 1, outputs=())
    trt.__version__ = "10.9.0"
    with pytest.raises(RuntimeError, match="TensorRT >= 10.16"):
        aot(x, size, metric, valid, "pitome_text", 30, 0.85, 1, outputs=())


def test_cli_merge_impl_fused_without_cuda_exits_4_with_one_line(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible: --merge-impl fused would run")
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.cli", "export", "deit_tiny", "--random-init", "--merge-impl", "fused",
         "-o", str(tmp_path / "out")],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 4
    assert proc.stderr.strip().splitlines() == [
        "pitome-export: error: --merge-impl fused runs the Triton merge kernels on a CUDA GPU; PyTorch sees none"
    ]
    assert not (tmp_path / "out").exists()


@needs_compiler
@pytest.mark.parametrize("kind, has_valid", [("pitome", False), ("pitome_text", True)])
def test_runtime_kernels_compile_for_sm90(kind, has_valid):
    """The CUDA path's two launches (energies, then the step reading them) compile for an H100/H200."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ops.kernels import kernel_constants
    from ops.kernels.launch import ENERGY_CONSTANTS
    from ops.kernels.merge_step import energy_kernel, token_merge_kernel

    constants = kernel_constants(MergeStep(kind, 19, 0.75), 197, 384, 64, 1, has_valid)
    valid = {"valid_ptr": "*fp32"} if has_valid else {"valid_ptr": "constexpr"}
    absent = {} if has_valid else {"valid_ptr": None}
    energy_names = (*ENERGY_CONSTANTS, "BROADCAST_DOT")
    sources = {
        energy_kernel: (
            {"metric_ptr": "*fp16", **valid, "energy_ptr": "*fp32", **dict.fromkeys(energy_names, "constexpr")},
            {**{name: constants[name] for name in energy_names}, **absent},
        ),
        token_merge_kernel: (
            {name: "*fp16" for name in ("x_ptr", "size_ptr", "metric_ptr", "x_out_ptr", "size_out_ptr")}
            | valid
            | {"slots_ptr": "constexpr", "energy_ptr": "*fp32", **dict.fromkeys(constants, "constexpr")},
            {**constants, "slots_ptr": None, **absent},
        ),
    }
    for kernel, (signature, constexprs) in sources.items():
        source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
        assert ".entry " + compiled.metadata.name in compiled.asm["ptx"]
