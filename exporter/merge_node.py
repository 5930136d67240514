"""The fused merge as one ONNX node: `pitome::TokenMerge` (and `TokenMergeMasked` for text).

`--merge-impl plugin` exports each merging layer's whole step (similarity, energy, ranking,
matching, weighted merge) as a single node that TensorRT runs through the plugin in
`exporter.tensorrt.plugin`. The node carries `plugin_namespace` / `plugin_version`, which is how
TensorRT's ONNX parser finds a registered plugin by the node's op type, and `aot=1`, which asks
the parser for the plugin's ahead-of-time implementation (the Triton kernel's PTX in the engine;
set it to 0 for the runtime Python path).

ONNX Runtime has no kernel for it, so `reference_model` rewrites the nodes to the custom-op
domain of onnxruntime-extensions, whose Python op runs `ops.merge.token_merge_op` on the CPU:
the same implementation as eager PyTorch, so a plugin graph can be checked here against the
decomposed one.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import numpy as np
import onnx
import torch
from onnx.defs import OpSchema

from ops.merge import TokenMerge

DOMAIN = "pitome"
PLUGIN_VERSION = "1"
OP_TYPES = {False: "TokenMerge", True: "TokenMergeMasked"}  # keyed by: has a `valid` input
ATTRIBUTES = {"kind": str, "r": int, "margin": float, "num_prefix": int}
_ORT_CONTRIB_DOMAIN = "ai.onnx.contrib"  # the only domain onnxruntime-extensions' Python ops live in


def _schema(op_type: str, masked: bool) -> OpSchema:
    kinds = {str: OpSchema.AttrType.STRING, int: OpSchema.AttrType.INT, float: OpSchema.AttrType.FLOAT}
    names = ["x", "size", "metric"] + (["valid"] if masked else [])
    attributes = [OpSchema.Attribute(name, kinds[kind], "") for name, kind in ATTRIBUTES.items()]
    attributes += [
        OpSchema.Attribute(name, OpSchema.AttrType.STRING, "") for name in ("plugin_namespace", "plugin_version")
    ]
    attributes.append(OpSchema.Attribute("aot", OpSchema.AttrType.INT, "1: TensorRT's ahead-of-time plugin"))
    return OpSchema(
        op_type, DOMAIN, 1,
        doc="PiToMe/ToMe merge step: x [B,N,C], size [B,N,1], metric [B,N,d] (, valid [B,N]) -> x' [B,N-r,C], size' [B,N-r,1]",
        inputs=[OpSchema.FormalParameter(name, "T") for name in names],
        outputs=[OpSchema.FormalParameter("merged", "T"), OpSchema.FormalParameter("merged_size", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], "merge inputs and outputs")],
        attributes=attributes,
    )  # fmt: skip


@functools.cache
def register_schemas() -> None:
    """Make the two ops known to onnx (checker, shape inference) and onnxscript (export)."""
    for masked, op_type in OP_TYPES.items():
        if not onnx.defs.has(op_type, DOMAIN):
            onnx.defs.register_schema(_schema(op_type, masked))


def _translate(x, size, metric, valid, kind: str, r: int, margin: float, num_prefix: int):
    """onnxscript translation of `torch.ops.pitome.token_merge`: one node, the plugin's attributes."""
    import onnxscript

    opset = onnxscript.values.Opset(DOMAIN, 1)
    inputs = (x, size, metric) if valid is None else (x, size, metric, valid)
    op = getattr(opset, OP_TYPES[valid is not None])
    return op(
        *inputs, kind=kind, r=r, margin=margin, num_prefix=num_prefix,
        plugin_namespace=DOMAIN, plugin_version=PLUGIN_VERSION, aot=1,
    )  # fmt: skip


def translation_table() -> dict:
    """`custom_translation_table` for `torch.onnx.export`."""
    register_schemas()
    return {torch.ops.pitome.token_merge.default: _translate}


@contextlib.contextmanager
def fused_merges(model: torch.nn.Module) -> Iterator[int]:
    """Run every `TokenMerge` of `model` as the fused operator inside the block; yields how many.

    Each merge gets its own setting back afterwards (a model patched with `merge_impl="fused"` stays fused)."""
    merges = [m for m in model.modules() if isinstance(m, TokenMerge)]
    before = [merge.fused for merge in merges]
    for merge in merges:
        merge.fused = True
    try:
        yield len(merges)
    finally:
        for merge, fused in zip(merges, before):
            merge.fused = fused


def plugin_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The fused merge nodes of a graph (empty for a decomposed export)."""
    return [n for n in model.graph.node if n.domain == DOMAIN and n.op_type in OP_TYPES.values()]


def _reference_kernel(masked: bool):
    def kernel(x, size, metric, *rest, kind, r, margin, num_prefix, plugin_namespace="", plugin_version="", aot=0):
        valid = torch.from_numpy(np.asarray(rest[0])) if masked else None
        as_torch = (torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)) for a in (x, size, metric))
        with torch.no_grad():
            merged, merged_size = torch.ops.pitome.token_merge(*as_torch, valid, kind, r, margin, num_prefix)
        return merged.numpy(), merged_size.numpy()

    return kernel


@functools.cache
def _register_reference_ops() -> str:
    """Register the Python reference kernels with onnxruntime-extensions; return its library path."""
    try:
        from onnxruntime_extensions import PyCustomOpDef, get_library_path, onnx_op
    except ImportError:
        from exporter.errors import MissingBackendError

        raise MissingBackendError(
            "running a plugin graph on ONNX Runtime needs onnxruntime-extensions (pip install onnxruntime-extensions)"
        ) from None
    kinds = {str: PyCustomOpDef.dt_string, int: PyCustomOpDef.dt_int64, float: PyCustomOpDef.dt_float}
    attrs = {name: kinds[kind] for name, kind in ATTRIBUTES.items()}
    attrs.update(
        plugin_namespace=PyCustomOpDef.dt_string, plugin_version=PyCustomOpDef.dt_string, aot=PyCustomOpDef.dt_int64
    )
    for masked, op_type in OP_TYPES.items():
        inputs = [PyCustomOpDef.dt_float] * (4 if masked else 3)
        outputs = [PyCustomOpDef.dt_float, PyCustomOpDef.dt_float]
        onnx_op(op_type=op_type, inputs=inputs, outputs=outputs, attrs=attrs)(_reference_kernel(masked))
    return get_library_path()


def reference_model(model: onnx.ModelProto) -> tuple[bytes, str]:
    """(serialized model, custom-op library) that ONNX Runtime runs with the reference kernels.

    The fused nodes move to onnxruntime-extensions' domain; nothing else changes.
    """
    library = _register_reference_ops()
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for node in plugin_nodes(copy):
        node.domain = _ORT_CONTRIB_DOMAIN
    kept = [o for o in copy.opset_import if o.domain not in (DOMAIN, _ORT_CONTRIB_DOMAIN)]
    del copy.opset_import[:]
    copy.opset_import.extend([*kept, onnx.helper.make_opsetid(_ORT_CONTRIB_DOMAIN, 1)])
    return copy.SerializeToString(), library
