"""Build a TensorRT engine from an exported ONNX graph, with polygraphy's TensorRT loaders.

What a build needs is described by `EngineSpec` (precision, batch profile, workspace, timing
cache), checked without TensorRT; `build_engine` then parses, pins the merge layers to FP32,
builds, and writes `model.engine` plus a JSON sidecar (schedule, versions, GPU, flags)
atomically. Engines are tied to the GPU model and TensorRT version, so `check_sidecar`
refuses a plan built elsewhere with a clear message instead of TensorRT's deserialisation error.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import onnx

from exporter.atomic import atomic_write, atomic_write_text
from ops.errors import PitomeError

ENGINE_PRECISIONS = ("fp32", "fp16", "bf16", "int8")
DEFAULT_WORKSPACE_MIB = 4096
SIDECAR_SUFFIX = ".json"


class EngineMismatchError(PitomeError):
    """An engine built for another GPU or TensorRT version (exit 2: rebuild it)."""


@dataclass(frozen=True)
class BatchProfile:
    """The optimisation profile of the batch dimension (trtexec's --minShapes/--optShapes/--maxShapes)."""

    min: int = 1
    opt: int = 8
    max: int = 64

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise PitomeError(f"batch profile needs 1 <= min <= opt <= max, got {self.min}/{self.opt}/{self.max}")

    def shapes(self, input_shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[tuple[int, ...], ...]]:
        """(min, opt, max) shapes per input; `input_shapes` are the shapes without the batch axis."""
        return {
            name: tuple((b, *shape) for b in (self.min, self.opt, self.max)) for name, shape in input_shapes.items()
        }


@dataclass(frozen=True)
class EngineSpec:
    """What to build: precision, batch profile, workspace limit and the timing cache to reuse."""

    precision: str = "fp32"
    profile: BatchProfile = BatchProfile()
    workspace_mib: int = DEFAULT_WORKSPACE_MIB
    timing_cache: str | None = None

    def __post_init__(self) -> None:
        if self.precision not in ENGINE_PRECISIONS:
            raise PitomeError(
                f"unknown engine precision {self.precision!r}; choose one of {', '.join(ENGINE_PRECISIONS)}"
            )
        if self.workspace_mib < 1:
            raise PitomeError(f"workspace must be at least 1 MiB, got {self.workspace_mib}")

    def builder_flags(self) -> dict[str, bool]:
        """polygraphy `CreateConfig` precision flags (INT8 comes from the graph's Q/DQ nodes)."""
        return {"fp16": self.precision == "fp16", "bf16": self.precision == "bf16", "int8": self.precision == "int8"}


def graph_inputs(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Input shapes without the batch axis; refuses a graph whose other axes are not fixed."""
    shapes = {}
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim[1:]
        if any(not d.HasField("dim_value") for d in dims):
            raise PitomeError(f"input {value.name} has a dynamic non-batch axis: export with a fixed --seq-len")
        shapes[value.name] = tuple(d.dim_value for d in dims)
    return shapes


def check_buildable(model: onnx.ModelProto) -> None:
    """Refuse, naming the first offending node, a graph TensorRT's ONNX parser would reject.

    Exit 4 like the other missing pieces of the trt target: TensorRT has no support for it.
    """
    from exporter.errors import MissingBackendError
    from exporter.graph_check import trt_compatibility

    for finding in trt_compatibility(model):
        if finding.severity == "error":
            raise MissingBackendError(f"graph not TensorRT-compatible: node {finding.node}: {finding.reason}")


def sidecar_path(engine_path: str | Path) -> Path:
    return Path(engine_path).with_suffix(Path(engine_path).suffix + SIDECAR_SUFFIX)


def make_sidecar(
    model: onnx.ModelProto, spec: EngineSpec, tensorrt_version: str, gpu: str, build_seconds: float
) -> dict:
    """The JSON written beside an engine: what it computes, how and where it was built."""
    from exporter.merge_node import plugin_nodes
    from exporter.onnx_export import read_metadata

    metadata = read_metadata(model)
    inputs = graph_inputs(model)
    return {
        "tensorrt": tensorrt_version,
        "gpu": gpu,
        "precision": spec.precision,
        "profile": {
            **asdict(spec.profile),
            "shapes": {k: list(map(list, v)) for k, v in spec.profile.shapes(inputs).items()},
        },
        "workspace_mib": spec.workspace_mib,
        "timing_cache": spec.timing_cache,
        "merge_impl": "plugin" if plugin_nodes(model) else "decomposed",
        "merge_layers_fp32": spec.precision != "fp32",
        "schedule": metadata.get("schedule"),
        "merge_config": metadata.get("merge_config"),
        "onnx_metadata": metadata,
        "build_seconds": round(build_seconds, 1),
        "built": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def check_sidecar(sidecar: dict, tensorrt_version: str, gpu: str) -> None:
    """Refuse an engine built with another TensorRT version or on another GPU model."""
    if sidecar.get("tensorrt") != tensorrt_version or sidecar.get("gpu") != gpu:
        raise EngineMismatchError(
            f"engine was built with TensorRT {sidecar.get('tensorrt')} on {sidecar.get('gpu')}; "
            f"this machine has TensorRT {tensorrt_version} on {gpu}: rebuild it here"
        )


def _pin_merge_layers(trt, network) -> int:
    """Keep every floating-point merge layer (decisions and weighted mean) in FP32; returns how many."""
    from exporter.onnx_export import merge_node_part

    floats = (trt.float32, trt.float16, trt.bfloat16)
    pinned = 0
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        # Integer and boolean layers (indices, masks) have no reduced precision to avoid.
        if merge_node_part(layer.name) is None or layer.get_output(0).dtype not in floats:
            continue
        layer.precision = trt.float32
        for out in range(layer.num_outputs):
            if layer.get_output(out).dtype in floats:
                layer.set_output_type(out, trt.float32)
        pinned += 1
    return pinned


def build_engine(onnx_path: str | Path, engine_path: str | Path, spec: EngineSpec) -> dict:
    """Build `engine_path` (+ sidecar) from `onnx_path`; return the sidecar. Needs TensorRT and CUDA."""
    from exporter.tensorrt import require_cuda, require_tensorrt

    trt = require_tensorrt()
    require_cuda()
    import torch
    from polygraphy.backend.trt import (
        CreateConfig,
        EngineBytesFromNetwork,
        NetworkFromOnnxPath,
        PostprocessNetwork,
        Profile,
    )

    from exporter.merge_node import plugin_nodes

    model = onnx.load(str(onnx_path), load_external_data=False)
    check_buildable(model)
    if plugin_nodes(model):
        import exporter.tensorrt.plugin  # noqa: F401  (registers pitome::TokenMerge with TensorRT)
    profile = Profile()
    for name, (low, opt, high) in spec.profile.shapes(graph_inputs(model)).items():
        profile.add(name, min=low, opt=opt, max=high)
    network = NetworkFromOnnxPath(str(onnx_path))
    pinned: list[int] = []
    if spec.precision != "fp32":
        network = PostprocessNetwork(
            network, lambda network: pinned.append(_pin_merge_layers(trt, network)), name="pin merge layers to FP32"
        )
    config = CreateConfig(
        **spec.builder_flags(),
        profiles=[profile],
        precision_constraints="obey" if spec.precision != "fp32" else None,
        memory_pool_limits={trt.MemoryPoolType.WORKSPACE: spec.workspace_mib << 20},
        load_timing_cache=spec.timing_cache if spec.timing_cache and Path(spec.timing_cache).exists() else None,
    )
    from polygraphy.exception import PolygraphyException

    began = time.perf_counter()
    try:
        serialized = EngineBytesFromNetwork(network, config=config, save_timing_cache=spec.timing_cache)()
    except PolygraphyException as exc:
        raise PitomeError(f"TensorRT could not build an engine from {onnx_path}: {exc}") from None
    if spec.precision != "fp32" and not (pinned and pinned[0]) and not plugin_nodes(model):
        raise PitomeError("no merge layer was found to keep in FP32: the layer names lost their merge scope")
    sidecar = make_sidecar(model, spec, trt.__version__, torch.cuda.get_device_name(), time.perf_counter() - began)
    sidecar["merge_layers_pinned_fp32"] = pinned[0] if pinned else 0
    atomic_write(engine_path, lambda tmp: Path(tmp).write_bytes(bytes(serialized)))
    atomic_write_text(sidecar_path(engine_path), json.dumps(sidecar, indent=2))
    return sidecar
