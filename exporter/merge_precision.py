"""Proof, read from the graph, that a reduced-precision graph still merges in FP32.

Names alone prove nothing: a conversion can keep every merge node's name and op while feeding
it rounded values. So every merge node (found by its name scope) is checked for what it is and
what it reads: no quantize/dequantize op and no cast to a 16-bit float inside the merge; no
input that comes, through layout-only ops, from a QuantizeLinear/DequantizeLinear pair or a
16-bit cast; and no 16-bit float among the values it reads or writes. Element types are
propagated from the graph's inputs, initializers and casts, not read from `value_info`, which
is empty when a graph is too large for ONNX shape inference.
"""

from __future__ import annotations

import onnx

from exporter.onnx_export import merge_node_part

HALF_TYPES = frozenset({onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16})
QUANTIZING_OPS = frozenset(
    {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "QLinearMatMul",
     "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QGemm"}
)  # fmt: skip
# Ops that move or reshape values without computing on them: what passes through them unchanged.
LAYOUT_OPS = frozenset(
    {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Slice", "Gather", "GatherElements",
     "GatherND", "Expand", "Concat", "Split", "Tile"}
)  # fmt: skip
_INDEX_OUTPUT_OPS = frozenset({"Shape", "Size", "ArgMax", "ArgMin", "NonZero"})
_BOOL_OUTPUT_OPS = frozenset(
    {"Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "Not", "And", "Or", "Xor", "IsNaN", "IsInf"}
)


def _attribute(node: onnx.NodeProto, name: str, default=None):
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default


def _output_types(node: onnx.NodeProto, types: dict[str, int]) -> list[int | None]:
    """Element type of each output of `node`, given the types known for its inputs."""
    op, inputs = node.op_type, [types.get(name) for name in node.input]
    known = next((t for t in inputs if t is not None), None)
    n = len(node.output)
    if op == "Cast":
        return [_attribute(node, "to")]
    if op == "CastLike":
        return [inputs[1]]
    if op == "Constant":
        value = _attribute(node, "value")
        return [value.data_type if value is not None else None]
    if op == "ConstantOfShape":
        value = _attribute(node, "value")
        return [value.data_type if value is not None else onnx.TensorProto.FLOAT]
    if op == "QuantizeLinear":
        return [inputs[2] if len(inputs) > 2 and inputs[2] is not None else onnx.TensorProto.UINT8]
    if op == "DequantizeLinear":
        return [inputs[1]]
    if op == "DynamicQuantizeLinear":
        return [onnx.TensorProto.UINT8, onnx.TensorProto.FLOAT, onnx.TensorProto.UINT8]
    if op in ("MatMulInteger", "QLinearMatMul"):
        return [onnx.TensorProto.INT32 if op == "MatMulInteger" else inputs[-1]]
    if op in ("DynamicQuantizeMatMul", "MatMulIntegerToFloat"):
        return [onnx.TensorProto.FLOAT]
    if op in _INDEX_OUTPUT_OPS:
        return [onnx.TensorProto.INT64]
    if op in _BOOL_OUTPUT_OPS:
        return [onnx.TensorProto.BOOL]
    if op == "TopK":
        return [inputs[0], onnx.TensorProto.INT64]
    if op == "Where":
        return [inputs[1]]
    if op == "OneHot":
        return [inputs[2]]
    return [known] * n


def element_types(proto: onnx.ModelProto) -> dict[str, int]:
    """Element type of every value in the main graph, propagated in graph (topological) order."""
    types = {init.name: init.data_type for init in proto.graph.initializer}
    types.update({value.name: value.type.tensor_type.elem_type for value in proto.graph.input})
    for node in proto.graph.node:
        for name, elem_type in zip(node.output, _output_types(node, types)):
            if name and elem_type is not None:
                types[name] = elem_type
    return types


def _reads_rounded_value(name: str, producers: dict[str, onnx.NodeProto]) -> str | None:
    """What rounded `name`, when it comes through layout ops from a Q/DQ op or a 16-bit cast."""
    stack, seen = [name], set()
    while stack:
        value = stack.pop()
        node = producers.get(value)
        if node is None or value in seen:
            continue
        seen.add(value)
        if node.op_type in QUANTIZING_OPS:
            return f"{node.op_type} {node.name}"
        if node.op_type == "Cast" and _attribute(node, "to") in HALF_TYPES:
            return f"16-bit Cast {node.name}"
        if node.op_type in LAYOUT_OPS:
            stack.extend(node.input[:1] if node.op_type != "Concat" else node.input)
    return None


def reduced_merge_nodes(proto: onnx.ModelProto, fp32: onnx.ModelProto | None = None) -> list[str]:
    """`"node: why"` for every merge node that computes or reads reduced precision; empty when the
    merge is FP32 throughout. Tests and the export job read the graph with it. With `fp32`, the
    graph it was converted from, what that graph already holds is the algorithm's own (DCT rounds
    its tokens through float16 by design) and not reported: only what the conversion did."""
    findings = _findings(proto)
    if fp32 is None:
        return findings
    own = set(_findings(fp32))
    return [finding for finding in findings if finding not in own]


def _findings(proto: onnx.ModelProto) -> list[str]:
    producers = {out: node for node in proto.graph.node for out in node.output}
    types = element_types(proto)
    findings = []
    for node in proto.graph.node:
        if merge_node_part(node.name) is None:
            continue
        if node.op_type in QUANTIZING_OPS or (node.op_type == "Cast" and _attribute(node, "to") in HALF_TYPES):
            findings.append(f"{node.name}: is a {node.op_type} (converts to reduced precision)")
            continue
        half = [name for name in (*node.input, *node.output) if types.get(name) in HALF_TYPES]
        if half:
            findings.append(f"{node.name}: reads or writes 16-bit floats ({half[0]})")
            continue
        rounded = ((name, _reads_rounded_value(name, producers)) for name in node.input if name)
        name, source = next(((name, source) for name, source in rounded if source), (None, None))
        if source is not None:
            findings.append(f"{node.name}: reads {name}, rounded by {source}")
    return findings
