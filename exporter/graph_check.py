"""Static graph tools: an op census, and a check against TensorRT 10's ONNX parser support.

TensorRT cannot be installed on every machine that exports, so this check reads the graph the
way the parser would and reports findings with node names before anyone tries to build.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import onnx
from onnx import numpy_helper

from exporter import merge_node

TRT_MIN_OPSET, TRT_MAX_OPSET = 9, 20
TRT_TOPK_MAX_K = 3840
# Parser-unsupported operators (TensorRT 10.x operators.md), and ops whose output shape depends
# on data values, which a static engine cannot hold.
TRT_UNSUPPORTED = frozenset(
    {
        "BitShift", "ConcatFromSequence", "ConvInteger", "Det", "DynamicQuantizeLinear", "MatMulInteger",
        "MaxRoiPool", "MaxUnpool", "Multinomial", "NegativeLogLikelihoodLoss", "Optional",
        "OptionalGetElement", "OptionalHasElement", "QLinearConv", "QLinearMatMul", "RegexFullMatch",
        "SequenceAt", "SequenceConstruct", "SequenceEmpty", "SequenceErase", "SequenceInsert",
        "SequenceLength", "SoftmaxCrossEntropyLoss", "SplitToSequence", "StringConcat",
        "StringNormalizer", "StringSplit", "TfIdfVectorizer", "Unique", "Attention", "RotaryEmbedding",
    }
)  # fmt: skip
DATA_DEPENDENT_SHAPE = frozenset({"NonZero", "NonMaxSuppression", "Compress"})
CONTROL_FLOW = frozenset({"If", "Loop", "Scan"})
PLUGIN_DOMAINS = frozenset({merge_node.DOMAIN})
PLUGIN_OPS = frozenset(merge_node.OP_TYPES.values())
# Inputs that TensorRT needs as shape tensors, by op.
_SHAPE_INPUTS = {
    "Reshape": (1,), "Expand": (1,), "Tile": (1,), "Slice": (1, 2, 3, 4), "ConstantOfShape": (0,),
    "Range": (0, 1, 2), "TopK": (1,), "Pad": (1,), "Resize": (2, 3), "Upsample": (1,), "OneHot": (1,),
}  # fmt: skip


@dataclass(frozen=True)
class Finding:
    """One observation about one node: `error` blocks a TensorRT build, `warning` does not."""

    severity: str
    node: str
    op_type: str
    reason: str


def op_census(model: onnx.ModelProto) -> Counter:
    """Count of each op type in the main graph (domain-qualified when not the default domain)."""
    return Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}" for n in model.graph.node)


def _constants(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    consts = {init.name: init for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    consts[node.output[0]] = attr.t
    return consts


def _attr(node: onnx.NodeProto, name: str, default: object) -> object:
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def trt_compatibility(model: onnx.ModelProto) -> list[Finding]:
    """Findings for TensorRT 10's ONNX parser, in graph order; errors make a build fail or lie."""
    findings: list[Finding] = []
    opset = _opset(model)
    if not TRT_MIN_OPSET <= opset <= TRT_MAX_OPSET:
        findings.append(
            Finding("error", "<model>", "opset", f"opset {opset} outside TensorRT's {TRT_MIN_OPSET}..{TRT_MAX_OPSET}")
        )
    consts = _constants(model)
    for node in model.graph.node:
        name, op = node.name or f"<{node.op_type}>", node.op_type

        def add(severity: str, reason: str, name: str = name, op: str = op) -> None:
            findings.append(Finding(severity, name, op, reason))

        if node.domain not in ("", "ai.onnx"):
            if node.domain not in PLUGIN_DOMAINS or op not in PLUGIN_OPS:
                add("error", f"custom op {node.domain}::{op} has no TensorRT importer or plugin")
            else:
                add("warning", "runs as the pitome TensorRT plugin: the builder loads exporter.tensorrt.plugin")
            continue
        if op in TRT_UNSUPPORTED:
            add("error", "operator not supported by TensorRT's ONNX parser")
        elif op in CONTROL_FLOW:
            add("error", "control flow (If/Loop/Scan) has no place in a static-shape merge graph")
        elif op in DATA_DEPENDENT_SHAPE:
            add("error", "output shape depends on data values")
        elif op == "TopK":
            if _attr(node, "sorted", 1) != 1:
                add("error", "TopK must be sorted=1")
            k = consts.get(node.input[1])
            if k is None:
                add("error", "TopK's K is not a build-time constant")
            elif int(numpy_helper.to_array(k).reshape(-1)[0]) >= TRT_TOPK_MAX_K:
                add("error", f"TopK K={int(numpy_helper.to_array(k).reshape(-1)[0])} >= {TRT_TOPK_MAX_K}")
        elif op == "ScatterND" and _attr(node, "reduction", b"none") not in (b"none", "none"):
            add("error", "ScatterND with a reduction is rejected by the parser before TensorRT 10.9")
        elif op == "ScatterElements" and _attr(node, "reduction", b"none") not in (b"none", "none"):
            add("warning", "reducing ScatterElements runs as a plugin with atomics (sum order not fixed)")
    for value in model.graph.input:
        if value.type.tensor_type.elem_type == onnx.TensorProto.INT64:
            findings.append(
                Finding(
                    "warning", value.name, "input", "int64 input: TensorRT 10 takes it, older versions cast to int32"
                )
            )
    findings.extend(_data_dependent_shapes(model))
    return findings


def _data_dependent_shapes(model: onnx.ModelProto) -> list[Finding]:
    """Shape-like inputs (Reshape's shape, Slice's bounds, ...) computed from tensor values.

    A value is shape-only when it comes from constants and Shape/Size ops; anything reached from
    a graph input through other ops depends on data, and a static engine cannot hold it.
    """
    producer = {out: node for node in model.graph.node for out in node.output}
    consts = set(_constants(model))
    memo: dict[str, bool] = {}

    def depends_on_data(name: str) -> bool:
        stack = [name]
        while stack:  # iterative post-order: graphs are deep
            value = stack.pop()
            if value in memo or value in consts or not value:
                continue
            node = producer.get(value)
            if node is None or node.op_type in ("Shape", "Size"):
                memo[value] = node is None
                continue
            pending = [i for i in node.input if i and i not in memo and i not in consts]
            if pending:
                stack.append(value)
                stack.extend(pending)
                continue
            memo[value] = any(memo.get(i, False) for i in node.input if i)
        return memo.get(name, False)

    findings = []
    for node in model.graph.node:
        for position in _SHAPE_INPUTS.get(node.op_type, ()):
            if position < len(node.input) and depends_on_data(node.input[position]):
                findings.append(
                    Finding("error", node.name, node.op_type, f"input {position} (a shape) depends on data values")
                )
                break
    return findings


def is_trt_compatible(findings: list[Finding]) -> bool:
    return not any(f.severity == "error" for f in findings)
