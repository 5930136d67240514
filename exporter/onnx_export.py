"""Static-shape ONNX export of a (patched) model with the dynamo exporter.

The frozen schedule makes every token dimension a constant; only the batch stays dynamic unless
asked otherwise. The result is checked (ONNX checker, shape inference), stamped with the schedule
and versions in `metadata_props`, and written atomically.
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
import logging
import os
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import onnx
import torch

from exporter import op_lowering
from exporter.atomic import atomic_write
from exporter.signatures import ExportWrapper, ModelSignature, signature_of
from ops import repatch

DEFAULT_OPSET = 20
EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf's limit is 2 GiB; leave room for the graph
METADATA_PREFIX = "pitome."


def package_versions() -> dict[str, str]:
    """Versions of the packages an exported graph depends on (for metadata and reports)."""
    from importlib import metadata

    versions = {}
    for name in ("pitome-export", "torch", "timm", "transformers", "onnx", "onnxruntime", "onnxscript"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def export_metadata(model: torch.nn.Module, opset: int, dynamic_batch: bool, merge_impl: str) -> dict[str, str]:
    """`metadata_props` entries: schedule, merge settings, opset and versions, all as strings."""
    schedule = getattr(model, "token_schedule", None)
    merge_config = dict(getattr(model, "merge_config", None) or {})
    props = {
        "algo": merge_config.get("algo", "none"),
        "ratio": json.dumps(merge_config.get("ratio")),
        "lowering": merge_config.get("lowering", "none"),
        "merge_impl": merge_impl,
        "schedule": json.dumps(schedule.to_dict() if schedule else None),
        "merge_config": json.dumps(merge_config, sort_keys=True),
        "opset": str(opset),
        "dynamic_batch": json.dumps(dynamic_batch),
        "versions": json.dumps(package_versions(), sort_keys=True),
    }
    return {METADATA_PREFIX + key: value for key, value in props.items()}


def set_metadata(proto: onnx.ModelProto, props: dict[str, str]) -> None:
    """Write `props` into `metadata_props`, replacing entries with the same keys."""
    kept = [p for p in proto.metadata_props if p.key not in props]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value


def read_metadata(model: onnx.ModelProto) -> dict[str, object]:
    """The `pitome.*` metadata of an exported model, JSON values decoded."""
    out: dict[str, object] = {}
    for prop in model.metadata_props:
        if prop.key.startswith(METADATA_PREFIX):
            key = prop.key[len(METADATA_PREFIX) :]
            try:
                out[key] = json.loads(prop.value)
            except json.JSONDecodeError:
                out[key] = prop.value
    return out


def _trace(
    wrapper: torch.nn.Module,
    inputs: tuple[torch.Tensor, ...],
    sig: ModelSignature,
    output_names: list[str],
    opset: int,
    dynamic_batch: bool,
    translations: dict | None = None,
) -> onnx.ModelProto:
    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1)
        dynamic_shapes = (tuple({0: batch} for _ in inputs),)  # one entry: the wrapper's *inputs
    # The exporter reports progress on stdout and through warnings; keep our own output clean.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        program = torch.onnx.export(
            wrapper,
            inputs,
            input_names=list(sig.input_names),
            output_names=output_names,
            opset_version=opset,
            dynamo=True,
            dynamic_shapes=dynamic_shapes,
            custom_translation_table=translations,
            optimize=True,
            verbose=False,
        )
    return program.model_proto


@contextlib.contextmanager
def _lowered(model: torch.nn.Module, lowering: str | None) -> Iterator[None]:
    """`model` re-patched with merge `lowering` inside the block (same schedule), as it was after."""
    current = getattr(model, "merge_config", {}).get("lowering", lowering)
    if lowering is None or current == lowering:
        yield
        return
    repatch(model, lowering=lowering)
    try:
        yield
    finally:
        repatch(model, lowering=current)


def export_onnx(
    model: torch.nn.Module,
    example_inputs: dict[str, torch.Tensor] | None,
    path: str | os.PathLike,
    opset: int = DEFAULT_OPSET,
    lowering: str | None = None,
    dynamic_batch: bool = True,
    seq_len: int | None = None,
    decisions: bool = False,
    fused: bool = False,
) -> Path:
    """Export `model` (patched or not) to ONNX at `path` and return the path.

    `example_inputs` default to seeded synthetic inputs of batch 2. `lowering` exports the model
    patched with that merge lowering (same schedule) and leaves it patched as it was. Names follow Optimum: `pixel_values`
    -> `logits` (or a feature model's `last_hidden_state` and `pooler_output`/`image_embeds`),
    `input_ids`/`attention_mask`/`token_type_ids` -> `logits`. `decisions` adds
    each merging layer's token slots and slot owners as outputs `slots_<layer>`, `owners_<layer>`,
    then every ranking and best match of its merge with its scores, `<kind>_<layer>_<k>` and
    `<kind>_scores_<layer>_<k>` (a debug graph, never shipped).
    `fused` emits each merge step as one `pitome::TokenMerge` node (the TensorRT plugin's op,
    `exporter.merge_node`) instead of decomposed ONNX ops.
    """
    if fused and decisions:
        raise ValueError("a decision (debug) export needs the decomposed merge")
    with _lowered(model, lowering):
        sig = signature_of(model, seq_len)
        feeds = example_inputs if example_inputs is not None else sig.example_inputs(2)
        inputs = tuple(feeds[name] for name in sig.input_names)
        was_training = model.training
        model.eval()
        wrapper, names = ExportWrapper(model, sig), list(sig.output_names)
        if decisions:
            from exporter import decisions as debug

            wrapper = debug.DecisionWrapper(model, sig)
            kinds = debug.choice_kinds(model, inputs, sig)
            names += debug.decision_output_names(model) + debug.owner_output_names(model)
            names += debug.choice_output_names(model, kinds)
        translations, fusing = op_lowering.translation_table(), contextlib.nullcontext()
        if fused:
            from exporter.merge_node import fused_merges, translation_table

            translations, fusing = translations | translation_table(), fused_merges(model)
        try:
            with torch.no_grad(), fusing:
                proto = _trace(wrapper, inputs, sig, names, opset, dynamic_batch, translations)
        finally:
            model.train(was_training)
        scope_merge_nodes(proto)
        set_metadata(proto, export_metadata(model, opset, dynamic_batch, "plugin" if fused else "decomposed"))
        proto.producer_name = "pitome-export"
        return save_onnx(proto, path)


MERGE_PARTS = ("assign", "combine")
_FUSED_SCOPE = re.compile(r"\.(token_merge|token_merges\.\d+)$")  # a TokenMerge module's own path


def export_settings(path: str | os.PathLike) -> dict:
    """The opset and batch (symbolic for a dynamic batch, else its size) a graph was exported
    with, read from its header without loading weights."""
    header = onnx.load(str(path), load_external_data=False)
    batch = header.graph.input[0].type.tensor_type.shape.dim[0]
    return {
        "opset": next(o.version for o in header.opset_import if o.domain in ("", "ai.onnx")),
        "dynamic_batch": not batch.HasField("dim_value"),
        "batch": batch.dim_value if batch.HasField("dim_value") else None,
    }


def _merge_part(scope: str) -> str | None:
    """ "assign", "combine" or "fused" when `scope` is a `...token_merge(s.N)[.assign|.combine]` path."""
    if _FUSED_SCOPE.search(scope):
        return "fused"
    part = scope.rsplit(".", 1)[-1]
    return part if part in MERGE_PARTS and ".token_merge" in scope else None


def _merge_scope(node: onnx.NodeProto) -> str | None:
    """The innermost merge scope a node was traced in, if any."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            for scope in reversed(ast.literal_eval(prop.value)):
                if _merge_part(scope):
                    return scope.removeprefix("model.")
    return None


def scope_merge_nodes(proto: onnx.ModelProto) -> None:
    """Prefix the merge's node names with their module scope (`blocks.3.token_merge.assign/...`).

    Reduced-precision passes keep the decision nodes in FP32 by this name, a lookup rather than
    a guess at which MatMul computes a similarity.
    """
    for node in proto.graph.node:
        scope = _merge_scope(node)
        if scope is not None:
            node.name = f"{scope}/{node.name}"


def merge_node_part(name: str) -> str | None:
    """ "assign", "combine" or None for a node name written by `scope_merge_nodes`."""
    return _merge_part(name.split("/", 1)[0]) if "/" in name else None


def save_onnx(proto: onnx.ModelProto, path: str | os.PathLike) -> Path:
    """Check, infer shapes, and write `proto` atomically (external data beside it when large)."""
    path = Path(path)
    large = proto.ByteSize() > EXTERNAL_DATA_BYTES if _serializable(proto) else True
    if not large:
        onnx.checker.check_model(proto)
        proto = onnx.shape_inference.infer_shapes(proto, strict_mode=True)

    def write(tmp: str) -> None:
        if large:
            onnx.save_model(
                proto, tmp, save_as_external_data=True, all_tensors_to_one_file=True, location=path.name + ".data"
            )
            onnx.checker.check_model(tmp)
        else:
            onnx.save_model(proto, tmp)

    atomic_write(path, write)
    return path


def _serializable(proto: onnx.ModelProto) -> bool:
    try:
        proto.ByteSize()
    except ValueError:
        return False
    return True
