"""The `trt` target and the fused merge: everything that needs no GPU runs here; engine tests skip
with the reason where TensorRT or CUDA is missing."""

from __future__ import annotations

import importlib.util
import json
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from exporter.errors import MissingBackendError
from exporter.graph_check import is_trt_compatible, trt_compatibility
from exporter.merge_node import OP_TYPES, plugin_nodes
from exporter.onnx_export import export_onnx, merge_node_part
from exporter.runners import ort_session
from exporter.tensorrt.build import (
    BatchProfile,
    EngineMismatchError,
    EngineSpec,
    _pin_merge_layers,
    check_buildable,
    check_sidecar,
    graph_inputs,
    make_sidecar,
)
from ops.errors import PitomeError
from tests.cli_helpers import cli, one_line_error
from tests.models import text_batch

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
needs_engine = pytest.mark.skipif(
    not (HAS_TENSORRT and torch.cuda.is_available()),
    reason="needs TensorRT and a CUDA GPU (neither can be installed on this project's CI machines)",
)


@pytest.fixture(scope="module")
def vision_pair(tmp_path_factory, deit_pitome_export):
    """A small PiToMe ViT (the session's small DeiT at 0.9) in two graphs: decomposed merge (the
    session's shared export) and fused plugin nodes."""
    model = deit_pitome_export.model()
    fused = export_onnx(model, None, tmp_path_factory.mktemp("plugin") / "fused.onnx", fused=True)
    return model, deit_pitome_export.path, fused


def test_profile_shapes_follow_trtexec_min_opt_max():
    shapes = BatchProfile(1, 8, 32).shapes({"pixel_values": (3, 224, 224)})
    assert shapes == {"pixel_values": ((1, 3, 224, 224), (8, 3, 224, 224), (32, 3, 224, 224))}
    for bad in ((0, 1, 2), (4, 2, 8), (1, 8, 4)):
        with pytest.raises(PitomeError, match="min <= opt <= max"):
            BatchProfile(*bad)


def test_engine_spec_flags_and_bad_values():
    assert EngineSpec("fp16").builder_flags() == {"fp16": True, "bf16": False, "int8": False}
    assert EngineSpec("bf16").builder_flags()["bf16"] and not any(EngineSpec("fp32").builder_flags().values())
    with pytest.raises(PitomeError, match="unknown engine precision 'fp8'"):
        EngineSpec("fp8")
    with pytest.raises(PitomeError, match="at least 1 MiB"):
        EngineSpec(workspace_mib=0)


def test_fused_export_is_one_node_per_merging_layer_and_matches_decomposed(vision_pair):
    model, decomposed, fused = vision_pair
    graph = onnx.load(fused)
    nodes = plugin_nodes(graph)
    assert len(nodes) == sum(1 for r in model.token_schedule.merges if r) == 4
    assert {n.op_type for n in nodes} == {OP_TYPES[False]}
    assert all(merge_node_part(n.name) == "fused" for n in nodes), [n.name for n in nodes]
    attrs = {a.name: helper.get_attribute_value(a) for a in nodes[0].attribute}
    assert attrs["plugin_namespace"] == b"pitome" and attrs["r"] == model.token_schedule.merges[0]
    assert not any(n.op_type in ("TopK", "Elu") for n in graph.graph.node)  # the decisions live in the node
    x = np.random.default_rng(1).standard_normal((3, 3, 64, 64)).astype(np.float32)
    want = ort_session(decomposed).run(None, {"pixel_values": x})[0]
    got = ort_session(fused).run(None, {"pixel_values": x})[0]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    eager = model(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(got, eager, rtol=0, atol=1e-4)


def test_fused_text_export_carries_the_mask(tmp_path, bert_pitome_export):
    """On padded batches (the graphs are traced on the default inputs: the mask is an input,
    not a constant) the fused graph computes what the decomposed one does."""
    model = bert_pitome_export.model()
    ids, mask = text_batch(32)
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    assert not mask.all()
    decomposed = bert_pitome_export.path
    fused = export_onnx(model, None, tmp_path / "f.onnx", seq_len=32, fused=True)
    assert {n.op_type for n in plugin_nodes(onnx.load(fused))} == {OP_TYPES[True]}
    numpy_feeds = {k: v.numpy() for k, v in feeds.items()}
    np.testing.assert_allclose(
        ort_session(fused).run(None, numpy_feeds)[0], ort_session(decomposed).run(None, numpy_feeds)[0], atol=1e-5
    )


def test_plugin_graph_passes_the_trt_check_with_a_warning(vision_pair):
    findings = trt_compatibility(onnx.load(vision_pair[2]))
    assert is_trt_compatible(findings)
    assert any(f.severity == "warning" and "pitome TensorRT plugin" in f.reason for f in findings)


def test_unknown_custom_op_is_refused_by_name():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])
    node = helper.make_node("Mystery", ["x"], ["y"], name="odd_node", domain="vendor")
    model = helper.make_model(
        helper.make_graph([node], "g", [x], [y]),
        opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("vendor", 1)],
    )
    with pytest.raises(
        MissingBackendError, match=r"graph not TensorRT-compatible: node odd_node: custom op vendor::Mystery"
    ):
        check_buildable(model)


def test_sidecar_records_what_the_engine_computes(vision_pair):
    model, _, fused = vision_pair
    graph = onnx.load(fused)
    spec = EngineSpec("fp16", BatchProfile(1, 4, 16), 512, "cache.bin")
    car = make_sidecar(graph, spec, "10.9.0", "NVIDIA H100", 12.34)
    assert car["merge_impl"] == "plugin" and car["merge_layers_fp32"] and car["precision"] == "fp16"
    assert car["profile"]["shapes"]["pixel_values"] == [[1, 3, 64, 64], [4, 3, 64, 64], [16, 3, 64, 64]]
    assert car["schedule"]["merges"] == list(model.token_schedule.merges)
    json.dumps(car)  # written as JSON
    check_sidecar(car, "10.9.0", "NVIDIA H100")
    with pytest.raises(EngineMismatchError, match="built with TensorRT 10.9.0 on NVIDIA H100.*rebuild it here"):
        check_sidecar(car, "10.9.0", "NVIDIA L4")
    with pytest.raises(EngineMismatchError):
        check_sidecar(car, "10.13.0", "NVIDIA H100")


def test_dynamic_text_axis_is_refused():
    seq = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])
    y = helper.make_tensor_value_info("y", TensorProto.INT64, ["batch", "seq"])
    model = helper.make_model(helper.make_graph([helper.make_node("Identity", ["input_ids"], ["y"])], "g", [seq], [y]))
    with pytest.raises(PitomeError, match="dynamic non-batch axis"):
        graph_inputs(model)


def test_reduced_precision_pins_exactly_the_merge_layers_to_fp32(vision_pair):
    """The builder-side twin of the ONNX block list: layers named by a merge scope stay FP32."""
    graph = onnx.load(vision_pair[1])  # the decomposed export
    trt = SimpleNamespace(float32="fp32", float16="fp16", bfloat16="bf16")

    class Layer:
        def __init__(self, name, dtype):
            self.name, self.precision, self.num_outputs = name, "default", 1
            self.outputs = [SimpleNamespace(dtype=dtype)]

        def get_output(self, i):
            return self.outputs[i]

        def set_output_type(self, i, value):
            self.outputs[i].dtype = value

    kinds = {1: "fp16", 7: "int64", 9: "bool"}  # the graph's float / index / mask tensors, as TensorRT types
    element = {v.name: v.type.tensor_type.elem_type for v in onnx.shape_inference.infer_shapes(graph).graph.value_info}
    layers = [Layer(node.name, kinds.get(element.get(node.output[0]), "fp16")) for node in graph.graph.node]
    network = SimpleNamespace(num_layers=len(layers), get_layer=layers.__getitem__)
    pinned = _pin_merge_layers(trt, network)
    merge = [layer for layer in layers if merge_node_part(layer.name)]
    floating = [layer for layer in merge if layer.outputs[0].dtype != "int64" and layer.outputs[0].dtype != "bool"]
    assert pinned == len(floating) > 0 and len(floating) < len(merge)  # index and mask layers are left alone
    assert all(layer.precision == "fp32" and layer.outputs[0].dtype == "fp32" for layer in floating)
    assert all(layer.precision == "default" for layer in layers if layer not in floating)


def test_cuda_event_candidates_report_their_own_time():
    from exporter.latency import time_interleaved

    stats = time_interleaved({"device": lambda: 2.5, "host": lambda: None}, batch=4, runs=5, warmup=1)
    assert stats["device"].median_ms == 2.5 and stats["device"].throughput == pytest.approx(1600.0)
    assert stats["host"].median_ms < 1.0


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--precision", "bf16"), "--precision bf16 is a TensorRT engine precision"),
        (("--merge-impl", "plugin", "--precision", "int8"), "--merge-impl plugin does not combine with int8"),
        (("--ort-provider", "cuda"), "ONNX Runtime provider CUDAExecutionProvider is not available"),
    ],
)
def test_bad_combinations_exit_cleanly(tmp_path, flags, message):
    code = 4 if "cuda" in flags else 2
    one_line_error(cli("deit_tiny", "--random-init", *flags, "-o", str(tmp_path / "o")), code, message)
    assert not (tmp_path / "o").exists()


def test_cli_plugin_export_passes_parity_through_the_reference_op(tmp_path):
    out = tmp_path / "plugin"
    result = cli("test_vit", "--random-init", "--ratio", "0.9", "--merge-impl", "plugin", "-o", str(out), timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "no latency stage" in result.stdout
    graph = onnx.load(out / "model.onnx")
    merges = json.loads((out / "schedule.json").read_text())["merges"]
    assert len(plugin_nodes(graph)) == sum(1 for r in merges if r) == 6
    parity = json.loads((out / "parity.json").read_text())
    assert parity["passed"]
    assert {p.key: p.value for p in graph.metadata_props}["pitome.merge_impl"] == "plugin"


@needs_engine
@pytest.mark.tensorrt
@pytest.mark.parametrize("merge_impl", ["matmul", "plugin"])
def test_engine_matches_pytorch_on_cuda(tmp_path, merge_impl):
    out = tmp_path / merge_impl
    result = cli(
        "deit_tiny", "--random-init", "--target", "trt", "--merge-impl", merge_impl, "--runs", "20",
        "--timing-cache", str(tmp_path / "cache.bin"), "-o", str(out), timeout=1800,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    car = json.loads((out / "model.engine.json").read_text())
    assert car["merge_impl"] == ("plugin" if merge_impl == "plugin" else "decomposed")
    assert (tmp_path / "cache.bin").stat().st_size > 0
    assert json.loads((out / "bench.json").read_text())["speedup_tensorrt"] > 1.0


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"static_batch": True}, "--static-batch does not combine with --target trt"),
        ({"bench_batch": 128}, "--batch 128 is outside the engine's batch profile 1..64"),
        ({"trt_batches": (8, 4, 16)}, "min <= opt <= max"),
    ],
)
def test_trt_job_flags_are_checked_before_any_work(changes, message):
    from pipelines.jobs.export_job import ExportJob, check_precision_flags

    with pytest.raises(PitomeError, match=message):
        check_precision_flags(ExportJob(model="deit_tiny", target="trt", **changes))


def test_report_renders_the_engine_section(vision_pair):
    from pipelines.jobs.report import engine_markdown

    car = make_sidecar(onnx.load(vision_pair[2]), EngineSpec("fp16"), "10.9.0", "NVIDIA H100", 3.0)
    stats = {"median_ms": 1.5, "min_ms": 1.4, "p90_ms": 1.6, "p99_ms": 1.7, "throughput": 5333.3, "cv": 0.01,
             "noisy": False}  # fmt: skip
    engine = {
        "sidecar": car, "parity_line": "PASSED | fp16 tolerances", "passed": True,
        "bench": {"how": "20 runs", "batch": 8, "latency": {"tensorrt merged": stats, "tensorrt unmerged": stats},
                  "speedup_tensorrt": 1.0, "speedup_pytorch_eager_cuda": 1.0},
    }  # fmt: skip
    text = "\n".join(engine_markdown(engine))
    assert "## TensorRT engine" in text and "fp16, merge plugin" in text and "NVIDIA H100" in text
    assert "| tensorrt merged | 1.5 |" in text and "TensorRT 1.00x" in text
    assert engine_markdown(None) == []
