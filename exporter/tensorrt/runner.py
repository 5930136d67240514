"""Run a TensorRT engine behind polygraphy's runner interface, with PyTorch CUDA tensors as buffers.

`TensorRTRunner` serves parity (numpy in, numpy out, like the ORT and PyTorch runners) and
latency: `timed_call` returns device milliseconds measured with CUDA events around one
`execute_async_v3` on the runner's stream, the figure trtexec reports as GPU compute time.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
from polygraphy.backend.base import BaseRunner

from exporter.tensorrt import require_cuda, require_tensorrt
from exporter.tensorrt.build import check_sidecar, sidecar_path
from ops.errors import PitomeError


def _torch_dtype(trt, dtype):
    import torch

    table = {
        trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
        trt.int64: torch.int64, trt.int32: torch.int32, trt.int8: torch.int8, trt.bool: torch.bool,
    }  # fmt: skip
    return table[dtype]


class TensorRTRunner(BaseRunner):
    """A deserialised engine, one execution context, one CUDA stream; inputs may have any batch
    inside the engine's profile."""

    def __init__(self, engine_path: str | Path, name: str | None = None) -> None:
        super().__init__(name=name, prefix="tensorrt-runner")
        self.engine_path = Path(engine_path)

    def activate_impl(self) -> None:
        import torch

        trt = require_tensorrt()
        require_cuda()
        sidecar = json.loads(sidecar_path(self.engine_path).read_text())
        check_sidecar(sidecar, trt.__version__, torch.cuda.get_device_name())
        if sidecar.get("merge_impl") == "plugin":
            import exporter.tensorrt.plugin  # noqa: F401  (the engine calls the registered plugin)
        self.trt = trt
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(self.engine_path.read_bytes())
        if self.engine is None:
            raise RuntimeError(f"TensorRT could not deserialise {self.engine_path}")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.input_names = [n for n in names if is_input[n]]
        self.output_names = [n for n in names if not is_input[n]]

    def get_input_metadata_impl(self):
        from polygraphy.common import TensorMetadata

        meta = TensorMetadata()
        for name in self.input_names:
            meta.add(
                name, self.trt.nptype(self.engine.get_tensor_dtype(name)), tuple(self.engine.get_tensor_shape(name))
            )
        return meta

    def _bind(self, feeds: dict) -> dict:
        """Bind device inputs (converted to the engine's dtypes) and fresh outputs; return the outputs."""
        import torch

        self._inputs = []
        for name in self.input_names:
            tensor = torch.as_tensor(feeds[name]).to("cuda", _torch_dtype(self.trt, self.engine.get_tensor_dtype(name)))
            tensor = tensor.contiguous()
            self._inputs.append(tensor)  # keep alive until the run is over
            if not self.context.set_input_shape(name, tuple(tensor.shape)):
                raise PitomeError(
                    f"input {name} of shape {tuple(tensor.shape)} is outside the engine's optimisation profile "
                    f"({self.engine_path.name}.json: profile)"
                )
            self.context.set_tensor_address(name, tensor.data_ptr())
        outputs = OrderedDict()
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            dtype = _torch_dtype(self.trt, self.engine.get_tensor_dtype(name))
            outputs[name] = torch.empty(shape, dtype=dtype, device="cuda")
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        self.stream.wait_stream(torch.cuda.current_stream())  # the copies and casts above ran there
        return outputs

    def _execute(self) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError(f"TensorRT execution of {self.engine_path} failed")

    def infer_impl(self, feed_dict):
        import time

        outputs = self._bind(feed_dict)
        start = time.perf_counter()
        self._execute()
        self.stream.synchronize()
        self.inference_time = time.perf_counter() - start
        return OrderedDict((name, tensor.float().cpu().numpy()) for name, tensor in outputs.items())

    def timed_call(self, feeds: dict[str, np.ndarray]):
        """A callable for `exporter.latency.time_interleaved`: one run, returns GPU milliseconds."""
        import torch

        self._outputs = self._bind(feeds)  # bound by address: must outlive every call
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        def call() -> float:
            start.record(self.stream)
            self._execute()
            end.record(self.stream)
            end.synchronize()
            return start.elapsed_time(end)

        return call

    def deactivate_impl(self) -> None:
        del self.context, self.engine, self.runtime, self.stream
        self._inputs, self._outputs = [], {}
