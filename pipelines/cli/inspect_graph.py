"""`pitome-export inspect`: what an exported graph holds and whether TensorRT can take it."""

from __future__ import annotations

from pathlib import Path

from ops.errors import PitomeError


def _dims(value) -> str:
    dims = value.type.tensor_type.shape.dim
    return "[" + ", ".join(str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?") for d in dims) + "]"


def print_inspection(path: str, console) -> None:
    import onnx
    from rich.table import Table

    from exporter.graph_check import is_trt_compatible, op_census, trt_compatibility
    from exporter.onnx_export import read_metadata

    if not Path(path).is_file():
        raise PitomeError(f"no such ONNX file: {path}")
    try:
        model = onnx.load(path)
    except Exception as exc:  # noqa: BLE001 - protobuf raises several types for a bad file
        raise PitomeError(f"{path} is not a readable ONNX model ({type(exc).__name__})") from None
    elem = onnx.helper.tensor_dtype_to_np_dtype
    console.print(f"[bold]{path}[/]  opset {next((o.version for o in model.opset_import if o.domain in ('', 'ai.onnx')), '?')}, "
                  f"{len(model.graph.node)} nodes")  # fmt: skip
    for title, values in (("inputs", model.graph.input), ("outputs", model.graph.output)):
        for v in values:
            console.print(f"  {title[:-1]} {v.name}: {elem(v.type.tensor_type.elem_type)} {_dims(v)}")
    census = Table(title="ops by count")
    census.add_column("op")
    census.add_column("count", justify="right")
    for op, count in op_census(model).most_common():
        census.add_row(op, str(count))
    console.print(census)
    meta = read_metadata(model)
    schedule = meta.pop("schedule", None)
    for key, value in meta.items():
        console.print(f"  {key}: {value}")
    if schedule:
        console.print(f"  schedule r: {','.join(map(str, schedule['merges']))}")
        console.print(f"  tokens in:  {','.join(map(str, schedule['tokens_in']))}")
    findings = trt_compatibility(model)
    verdict = "yes" if is_trt_compatible(findings) else "no"
    console.print(f"[bold]TensorRT compatible: {verdict}[/] ({len(findings)} findings)")
    for f in findings:
        console.print(f"  {f.severity}: node {f.node} ({f.op_type}): {f.reason}", markup=False)
