"""Runtimes behind polygraphy's runner interface (activate / infer / deactivate).

`TorchRunner` is the reference (CUDA when available, else CPU; which one is recorded).
`ort_runner` wraps polygraphy's own ONNX Runtime runner around a session we configure
(providers, threads, spinning), so timing and parity use the same sessions.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import OrderedDict
from collections.abc import Iterator
from types import SimpleNamespace

import numpy as np
import torch
from polygraphy.backend.base import BaseRunner
from polygraphy.backend.onnxrt import OnnxrtRunner

from exporter.signatures import ExportWrapper, ModelSignature, as_outputs

ORT_PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


def torch_device(prefer: str | None = None) -> torch.device:
    """`prefer` ("cpu"/"cuda") or CUDA when available."""
    if prefer:
        return torch.device(prefer)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


SIMD_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16")


def cpu_name() -> str:
    """The CPU model and the SIMD features that decide FP32/INT8 speed, e.g. "AMD EPYC (avx2)".

    The same model name covers CPUs with and without int8 dot-product units, which change
    INT8 speed-ups several-fold, so reports carry the features beside the name.
    """
    name, flags = None, set()
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name") and name is None:
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
                if name is not None and flags:
                    break
    except OSError:
        pass
    if name is None:
        import platform

        name = platform.processor() or platform.machine()
    features = [f for f in SIMD_FEATURES if f in flags]
    return f"{name} ({', '.join(features)})" if features else name


@contextlib.contextmanager
def placed_on(module: torch.nn.Module, device: torch.device | str) -> Iterator[torch.nn.Module]:
    """Run `module` on `device` inside the block, then give it back exactly where it was.

    The caller's parameters and buffers are restored as the very tensors they were (no copy
    back), so a model a stage borrowed for the GPU reference is still on the caller's device
    when the next stage feeds it.
    """
    # `.to` either swaps a parameter's data in place or replaces the Parameter (when the two
    # devices' tensors are not interchangeable): keep both the objects and their data.
    saved = [(m, dict(m._parameters), dict(m._buffers)) for m in module.modules()]
    data = [(p, p.data) for p in module.parameters()]
    module.to(device)
    try:
        yield module
    finally:
        for owner, params, buffers in saved:
            owner._parameters.update(params)
            owner._buffers.update(buffers)
        for param, original in data:
            param.data = original


class TorchRunner(BaseRunner):
    """PyTorch reference runner: feeds numpy arrays by input name, returns numpy outputs."""

    def __init__(self, model: torch.nn.Module, signature: ModelSignature, device: str | None = None, name=None):
        super().__init__(name=name, prefix="pytorch-runner")
        self.wrapper = ExportWrapper(model, signature).eval()
        self.signature = signature
        self.device = torch_device(device)
        self._placement = contextlib.ExitStack()

    def activate_impl(self) -> None:
        self._placement.enter_context(placed_on(self.wrapper, self.device))

    def get_input_metadata_impl(self):
        from polygraphy.common import TensorMetadata

        meta = TensorMetadata()
        for name in self.signature.input_names:
            dtype = np.float32 if self.signature.kind == "vision" else np.int64
            meta.add(name, dtype, (-1, *self.signature.input_shapes[name]))
        return meta

    def infer_impl(self, feed_dict):
        with torch.no_grad():
            inputs = [torch.as_tensor(feed_dict[name]).to(self.device) for name in self.signature.input_names]
            start = time.perf_counter()
            output = self.wrapper(*inputs)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.inference_time = time.perf_counter() - start
        outputs = as_outputs(output)
        return OrderedDict((name, out.float().cpu().numpy()) for name, out in zip(self.signature.output_names, outputs))

    def deactivate_impl(self) -> None:
        self._placement.close()  # the caller's model goes back where it was


def require_ort_provider(providers: str) -> list[str]:
    """The provider list for `providers` (cpu, cuda, tensorrt); MissingBackendError if ORT lacks it."""
    import onnxruntime as ort

    from exporter.errors import MissingBackendError

    wanted = ORT_PROVIDERS[providers]
    if wanted[0] not in ort.get_available_providers():
        raise MissingBackendError(
            f"ONNX Runtime provider {wanted[0]} is not available (installed: {', '.join(ort.get_available_providers())}); "
            "install onnxruntime-gpu for CUDA/TensorRT"
        )
    return wanted


class OpenVinoSession:
    """A graph compiled by OpenVINO for its CPU plugin, in FP32, behind the part of ONNX
    Runtime's `InferenceSession` that the checks and polygraphy's runner use (`get_inputs`,
    `get_outputs`, `run`). A second runtime with kernels of its own: what parity's near-tie
    verdicts are tested against (an honest runtime with other numerics)."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None) -> None:
        import openvino as ov

        config = {"INFERENCE_PRECISION_HINT": "f32"}  # the CPU plugin would pick BF16 on CPUs that have it
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        self.compiled = ov.Core().compile_model(str(path), "CPU", config)

        def port(p) -> SimpleNamespace:
            dtype = {"f32": "tensor(float)", "i64": "tensor(int64)", "i32": "tensor(int32)"}[
                p.get_element_type().get_type_name()
            ]
            shape = [d.get_length() if d.is_static else None for d in p.get_partial_shape()]
            return SimpleNamespace(name=p.get_any_name(), type=dtype, shape=shape)

        self._inputs, self._outputs = [port(p) for p in self.compiled.inputs], [port(p) for p in self.compiled.outputs]

    def get_inputs(self) -> list:
        return self._inputs

    def get_outputs(self) -> list:
        return self._outputs

    def run(self, output_names: list[str] | None, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        results = self.compiled(feed)
        by_name = {port.get_any_name(): value for port, value in results.items()}
        return [np.asarray(by_name[name]) for name in (output_names or [o.name for o in self._outputs])]


def ort_session(path: str | os.PathLike, providers: str = "cpu", threads: int | None = None, spinning: bool = False):
    """An ONNX Runtime session with fixed intra-op threads and spinning off (fair timing).

    `providers` names an ONNX Runtime provider set (`ORT_PROVIDERS`), or `openvino` for an
    `OpenVinoSession` (library use: a second runtime for parity). A graph with fused merge
    nodes (`--merge-impl plugin`) runs them through the Python reference kernels of
    `exporter.merge_node`: right numbers, not plugin speed.
    """
    import onnx
    import onnxruntime as ort

    from exporter.merge_node import plugin_nodes, reference_model

    if providers == "openvino":
        return OpenVinoSession(path, threads)
    wanted = require_ort_provider(providers)
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=wanted)
    except Exception:  # noqa: BLE001 - ORT reports an unknown op in several types; re-raised unless ours
        model = onnx.load(str(path))
        if not plugin_nodes(model):
            raise
    serialized, library = reference_model(model)
    options.register_custom_ops_library(library)
    return ort.InferenceSession(serialized, sess_options=options, providers=wanted)


def ort_runner(
    path: str | os.PathLike,
    providers: str = "cpu",
    threads: int | None = None,
    spinning: bool = False,
    name: str | None = None,
):
    """polygraphy's OnnxrtRunner around `ort_session`."""
    return OnnxrtRunner(lambda: ort_session(path, providers, threads, spinning), name=name)
