"""Variants of one loaded model: export each (unmerged, or merged by a ratio or an explicit
schedule, at a precision) from a copy, and time their graphs together in one interleaved run.

The export job (its unmerged baseline), the sweep (a grid of algo x ratio), the latency harnesses
and a schedule search all do this loop: load once, then patch -> export -> time many variants.
The caller's model is never changed: each variant is made from a deep copy.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from exporter.latency import LatencyStats, time_interleaved
from exporter.signatures import ExportWrapper, ModelSignature

FUSED_LOWERINGS = ("plugin", "fused")  # exported as one pitome::TokenMerge node per merge step


@dataclass(frozen=True)
class Variant:
    """One graph to make from a loaded model: unmerged (`algo` None) or merged by `algo` at
    `ratio` or by an explicit `schedule` (tokens merged per layer), with `lowering` (matmul,
    scatter, plugin, fused: as `--merge-impl`), at `precision` (`int8_mode` for int8)."""

    name: str
    algo: str | None = None
    ratio: float | None = None
    schedule: tuple[int, ...] | None = None
    prop_attn: bool | None = None
    lowering: str = "matmul"
    precision: str = "fp32"
    int8_mode: str | None = None

    @property
    def merged(self) -> bool:
        return self.algo is not None

    @property
    def fused(self) -> bool:
        """Whether each merge step is exported as one `pitome::TokenMerge` node."""
        return self.lowering in FUSED_LOWERINGS

    def fp32(self) -> Variant:
        """The FP32 variant this one is converted from (itself when FP32)."""
        return Variant(self.name, self.algo, self.ratio, self.schedule, self.prop_attn, self.lowering)


@dataclass(frozen=True)
class Conversion:
    """What converting an FP32 graph to a reduced precision needs beyond the variant: static INT8
    calibration feeds (and where they came from, for the graph's metadata), the FFN down-projections'
    precision (None: by mode)."""

    calibration: Sequence[dict[str, np.ndarray]] | None = None
    calibration_source: str | None = None
    ffn_out: str | None = None


def variant_model(model: torch.nn.Module, variant: Variant, seq_len: int | None = None) -> torch.nn.Module:
    """A copy of `model` (patched or not) as `variant`: unpatched, or patched by its merge
    settings (`seq_len` for text models). `model` itself is left as it was."""
    from ops import patch_model, unpatch_model

    twin = copy.deepcopy(model)
    if not variant.merged:
        return unpatch_model(twin)
    schedule = list(variant.schedule) if variant.schedule is not None else None
    image_size = (getattr(model, "merge_config", None) or {}).get("image_size")  # an HF vision model's frozen size
    return patch_model(
        twin, algo=variant.algo, ratio=variant.ratio, schedule=schedule, prop_attn=variant.prop_attn,
        lowering="matmul" if variant.fused else variant.lowering, seq_len=seq_len, image_size=image_size,
        merge_impl="fused" if variant.lowering == "fused" else "decomposed",
    )  # fmt: skip


def export_module(
    module: torch.nn.Module,
    variant: Variant,
    path: Path,
    *,
    seq_len: int | None = None,
    opset: int = 20,
    dynamic_batch: bool = True,
    example_inputs: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Export `module` (the FP32 model of `variant`, e.g. from `variant_model`) to `path`, traced
    on `example_inputs` (default: the module's own signature's)."""
    from exporter.onnx_export import export_onnx

    return export_onnx(
        module, example_inputs, path, opset=opset, dynamic_batch=dynamic_batch, seq_len=seq_len, fused=variant.fused
    )


def convert_variant(fp32_graph: Path, variant: Variant, path: Path, conversion: Conversion = Conversion()) -> Path:
    """`fp32_graph` (the export of `variant.fp32()`) at `variant`'s precision, written to `path`;
    the merge stays FP32."""
    from exporter.quantize import convert_precision

    return convert_precision(
        fp32_graph, path, variant.precision, variant.int8_mode or "dynamic", conversion.calibration,
        conversion.calibration_source, conversion.ffn_out,
    )  # fmt: skip


def export_variant(
    model: torch.nn.Module,
    variant: Variant,
    folder: Path,
    *,
    seq_len: int | None = None,
    opset: int = 20,
    dynamic_batch: bool = True,
    conversion: Conversion = Conversion(),
) -> tuple[Path, torch.nn.Module]:
    """Export `variant` of `model` into `folder` as `<name>.onnx`; return the graph and the FP32
    module it was exported from. A reduced-precision variant is converted from an FP32 export
    (`<name>.fp32.onnx`). `model` is left unchanged."""
    from exporter.signatures import signature_of

    module = variant_model(model, variant, seq_len)
    stem = variant_file_stem(variant.name)
    # `model`'s inputs, whatever the variant: an unpatched copy of an HF vision model frozen at another
    # image size than its config's (DINOv2 at its processor's crop) would otherwise trace the config's
    settings = dict(seq_len=seq_len, opset=opset, dynamic_batch=dynamic_batch,
                    example_inputs=signature_of(model, seq_len).example_inputs(2))  # fmt: skip
    if variant.precision == "fp32":
        return export_module(module, variant, folder / f"{stem}.onnx", **settings), module
    fp32_graph = export_module(module, variant, folder / f"{stem}.fp32.onnx", **settings)
    return convert_variant(fp32_graph, variant, folder / f"{stem}.onnx", conversion), module


def variant_file_stem(name: str) -> str:
    """A file name for a variant's graph: its name with path-unsafe characters replaced."""
    return "".join(c if c.isalnum() or c in "@.-_" else "_" for c in name)


def eager_call(
    module: torch.nn.Module, signature: ModelSignature, feeds: dict[str, torch.Tensor]
) -> Callable[[], None]:
    """A no-argument call of `module` in PyTorch eager on `feeds` (no autograd): a timing candidate."""
    wrapper = ExportWrapper(module, signature).eval()
    inputs = tuple(feeds[name] for name in signature.input_names)

    def call() -> None:
        with torch.no_grad():
            wrapper(*inputs)

    return call


def time_graphs(
    graphs: dict[str, Path],
    feeds: dict[str, np.ndarray],
    batch: int,
    runs: int,
    threads: int,
    provider: str = "cpu",
    extra: dict[str, Callable[[], object]] | None = None,
) -> dict[str, LatencyStats]:
    """Time every graph (ONNX Runtime on `provider`, `threads` intra-op threads, spinning off) on
    `feeds`, and every `extra` candidate (e.g. `eager_call`s), in ONE interleaved run
    (`exporter.latency.time_interleaved`); stats by name, graphs first."""
    from exporter.runners import ort_session

    sessions = {name: ort_session(path, provider, threads=threads) for name, path in graphs.items()}
    candidates: dict[str, Callable[[], object]] = {
        name: (lambda session=session: session.run(None, feeds)) for name, session in sessions.items()
    }
    candidates.update(extra or {})
    return time_interleaved(candidates, batch, runs=runs)
