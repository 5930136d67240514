"""Reduced-precision graphs, INT8 (dynamic or static QDQ) or FP16, with the merge kept in FP32.

Every node of the merge subgraph (the decisions: similarity, energy, ranking, matching; and
the size-weighted combine) is excluded from quantization and from FP16 conversion by its name
scope (`...token_merge.assign/`, `.combine/`, written at export). A rounded similarity could
flip a decision and move a whole token; the merge's share of the work is small, so it stays FP32.

INT8 uses onnxruntime.quantization on MatMul/Gemm with constant weights: int8 per-channel
weights, symmetric (zero point 0). Dynamic quantization computes activation scales at run time;
static quantization writes QuantizeLinear/DequantizeLinear pairs with symmetric activation
scales from calibration data, the explicit-quantization form TensorRT builds INT8 engines from.
FP16 uses onnxruntime's float16 converter with FP32 inputs and outputs.

Static INT8 also keeps each FFN down-projection (the MatMul fed by GELU) in FP32 by default.
Post-GELU activations are one-sided with rare large values; a symmetric per-tensor int8 scale
spends half its codes on negatives that never come and rounds the bulk coarsely. On
minilm_sentiment that one MatMul type cost most of static INT8's accuracy (full test split,
PiToMe 0.7: -1.87 points all INT8, -0.15 with it in FP32) for about a tenth of static INT8's
speed on ONNX Runtime CPU. Dynamic INT8 scales activations asymmetrically at run time and
quantizes it (the fast CPU default).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)

from exporter.onnx_export import METADATA_PREFIX, merge_node_part, save_onnx, set_metadata

PRECISIONS = ("fp32", "fp16", "int8")
INT8_MODES = ("dynamic", "static")
FFN_OUT_PRECISIONS = ("fp32", "int8")
QUANTIZED_OPS = ["MatMul", "Gemm"]


def fp32_node_names(proto: onnx.ModelProto) -> list[str]:
    """The merge subgraph's nodes: they keep FP32 in every precision."""
    return [node.name for node in proto.graph.node if merge_node_part(node.name) is not None]


def default_ffn_out(int8_mode: str) -> str:
    """Precision of the FFN down-projection when none is asked: FP32 in static INT8 (see above)."""
    return "fp32" if int8_mode == "static" else "int8"


def ffn_out_node_names(proto: onnx.ModelProto) -> list[str]:
    """MatMul/Gemm nodes whose input is a GELU's output: the FFN down-projections.

    A GELU is a `Gelu` node (opset 20) or, decomposed (opset 18), the node the exporter tagged
    as computing `aten.gelu`.
    """
    producers = {out: node for node in proto.graph.node for out in node.output}

    def is_gelu(node: onnx.NodeProto | None) -> bool:
        if node is None:
            return False
        if node.op_type == "Gelu":
            return True
        return any(p.key == "pkg.torch.onnx.fx_node" and "aten.gelu" in p.value for p in node.metadata_props)

    return [n.name for n in proto.graph.node if n.op_type in QUANTIZED_OPS and is_gelu(producers.get(n.input[0]))]


class FeedReader(CalibrationDataReader):
    """Calibration data for onnxruntime's static quantizer: a list of feed dicts."""

    def __init__(self, feeds: Sequence[dict[str, np.ndarray]]) -> None:
        self._feeds = list(feeds)
        self._next: Iterator[dict[str, np.ndarray]] = iter(self._feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._next, None)

    def rewind(self) -> None:
        self._next = iter(self._feeds)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The quantizer logs advice (pre-processing) on the root logger; our report says what matters."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _int8(src: Path, dst: str, mode: str, keep: list[str], calibration) -> None:
    common = dict(per_channel=True, nodes_to_exclude=keep, op_types_to_quantize=QUANTIZED_OPS)
    if mode == "dynamic":
        quantize_dynamic(src, dst, weight_type=QuantType.QInt8, extra_options={"MatMulConstBOnly": True}, **common)
        return
    quantize_static(
        src,
        dst,
        FeedReader(calibration),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "MatMulConstBOnly": True},
        **common,
    )


def convert_precision(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    precision: str,
    int8_mode: str = "dynamic",
    calibration: Sequence[dict[str, np.ndarray]] | None = None,
    calibration_source: str | None = None,
    ffn_out: str | None = None,
) -> Path:
    """Write `src` (an FP32 export) at `precision` to `dst`, merge nodes in FP32; return `dst`.

    `calibration` (feed dicts) is required for static INT8. `ffn_out` ("fp32" or "int8";
    default by mode, `default_ffn_out`) is the INT8 precision of the FFN down-projections. The
    precision, the INT8 mode, the FFN choice and where the calibration data came from go into
    the graph's `pitome.*` metadata.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "int8" and int8_mode not in INT8_MODES:
        raise ValueError(f"unknown INT8 mode {int8_mode!r}; choose one of {', '.join(INT8_MODES)}")
    if precision == "int8" and int8_mode == "static" and not calibration:
        raise ValueError("static INT8 quantization needs calibration feeds")
    if ffn_out is not None and ffn_out not in FFN_OUT_PRECISIONS:
        raise ValueError(f"unknown FFN-out precision {ffn_out!r}; choose one of {', '.join(FFN_OUT_PRECISIONS)}")
    ffn_out = (ffn_out or default_ffn_out(int8_mode)) if precision == "int8" else "none"
    src = Path(src)
    proto = onnx.load(src)
    keep = fp32_node_names(proto)
    ffn_fp32 = ffn_out_node_names(proto) if ffn_out == "fp32" else []
    if precision == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16
        from onnxscript import ir

        with _quiet():
            proto = convert_float_to_float16(proto, keep_io_types=True, node_block_list=keep)
        del proto.graph.value_info[:]  # stale types; shape inference on save writes them anew
        graph = ir.from_proto(proto)  # the converter appends its input casts at the end: re-sort
        graph.graph.sort()
        proto = ir.to_proto(graph)
    elif precision == "int8":
        with tempfile.TemporaryDirectory(prefix="pitome-quant-") as tmp, _quiet():
            # The quantizer infers shapes itself and fails on any exported shape hint it infers
            # differently (onnxruntime 1.30 does on the classifier head of timm models): drop them.
            del proto.graph.value_info[:]
            bare, out = Path(tmp) / "fp32.onnx", str(Path(tmp) / "int8.onnx")
            onnx.save_model(proto, bare, save_as_external_data=True, location="fp32.onnx.data")
            _int8(bare, out, int8_mode, keep + ffn_fp32, calibration)
            proto = onnx.load(out)
    stamp = {
        "precision": precision,
        "int8_mode": int8_mode if precision == "int8" else "none",
        "calibration": calibration_source or "none",
        "fp32_nodes": str(len(keep)),
        "int8_ffn_out": ffn_out,
        "int8_ffn_fp32_nodes": str(len(ffn_fp32)),
    }
    set_metadata(proto, {METADATA_PREFIX + key: value for key, value in stamp.items()})
    return save_onnx(proto, dst)
