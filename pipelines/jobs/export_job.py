"""The main job: load -> patch -> export -> parity -> benchmark -> report folder.

Everything is written into a temporary folder beside the output and renamed into place at the
end, so an error or Ctrl-C never leaves a half-written artifact folder.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from exporter.atomic import make_temp_dir
from exporter.errors import ParityError
from ops.errors import PitomeError
from pipelines.jobs import interrupts, options
from pipelines.jobs.options import EXPLORE_COMMANDS, RUN_COMMANDS, option, part

TARGETS = ("onnx", "trt")
DEFAULT_INT8_MODE = "dynamic"  # the faster on ONNX Runtime CPU, measured (README, Quantization)
if TYPE_CHECKING:
    from pipelines.models.registry import ModelSpec

T = TypeVar("T")
# The fields that judge a converted graph (exporter.agreement.AcceptanceRule): meaningless on FP32
ACCEPTANCE_FIELDS = ("max_accuracy_drop", "min_cosine", "min_top1_agreement", "min_decision_agreement")


class OutputExistsError(PitomeError):
    """The output folder exists and --force was not given."""


@dataclass
class ExportJob:
    """What the user asked for. A field a flag sets declares that flag here (`option`): the CLI,
    its defaults and the report's option list are built from these declarations."""

    model: str = option("model", default=dataclasses.MISSING, group="model", commands=(*RUN_COMMANDS, "schedule"),
                        help="short name (deit_small, bert_base, ...), timm name or HF id")  # fmt: skip
    checkpoint: str | None = option(
        "--checkpoint", group="model", help="local weights: timm .pth/.safetensors or a HF model folder"
    )
    random_init: bool = option(
        "--random-init", default=False, group="model", action="store_true",
        help="random weights (reports say so first)",
    )  # fmt: skip
    algo: str = option("--algo", default="pitome", group="merging", choices=options.ALGOS, commands=("export", "schedule"),
                       help="merge algorithm")  # fmt: skip
    ratio: float | None = option(
        "--ratio", default=0.9, group="merging", type=options.ratio, exclusive=True, commands=("export", "schedule"),
        help="fraction of tokens kept per layer (default 0.9)",
    )  # fmt: skip
    schedule: list[int] | None = option(
        "--schedule", group="merging", type=options.schedule, exclusive=True, commands=("export", "schedule"),
        help="explicit tokens merged per layer: 19,17,...",
    )  # fmt: skip
    seq_len: int | None = option("--seq-len", group="merging", type=options.positive_int, commands=(*RUN_COMMANDS, "schedule"),
                                 help="fixed sequence length for text models")  # fmt: skip
    prop_attn: bool | None = option(
        "--prop-attn", group="merging", action="store_true", negation="--no-prop-attn", commands=EXPLORE_COMMANDS,
        help="proportional attention (default: off for pitome, on for tome)",
    )  # fmt: skip
    lowering: str = option(
        "--merge-impl", default="matmul", group="export", choices=("matmul", "scatter", "plugin", "fused"),
        commands=EXPLORE_COMMANDS,
        help="merge lowering: one-hot MatMul (default, plugin-free), ScatterElements add, one pitome::TokenMerge "
        "node per layer for the TensorRT plugin, or fused: those nodes and the PyTorch model on CUDA running the "
        "fused Triton merge kernels (export only)",
    )  # fmt: skip
    opset: int = option("--opset", default=20, group="export", type=int, choices=(18, 19, 20), metavar="{18,19,20}")
    target: str = option("--target", default="onnx", group="export", choices=TARGETS, commands=("export", "tune"))
    static_batch: bool = option("--static-batch", default=False, group="export", action="store_true",
                                commands=("export",), help="fix the batch dimension")  # fmt: skip
    device: str | None = option("--device", group="validation", choices=("cpu", "cuda"),
                                help="PyTorch reference device")  # fmt: skip
    data: str | None = option(
        "--data", group="validation", help="labelled data for accuracy: image folder (class/*.jpg), "
        "Fashion-MNIST IDX folder, or text .csv/.jsonl with text,label",
    )  # fmt: skip
    limit: int | None = option("--limit", group="validation", type=options.positive_int,
                               help="use N samples of --data (seeded)")  # fmt: skip
    precision: str = option(
        "--precision", default="fp32", group="precision", choices=("fp32", "fp16", "bf16", "int8"),
        commands=("export",), help="graph precision; the merge subgraph stays FP32 in every one (default fp32; "
        "bf16 only for --target trt)",
    )  # fmt: skip
    # None: the CPU default (DEFAULT_INT8_MODE), static when calibrating
    int8_mode: str | None = option(
        "--int8-mode", group="precision", choices=("dynamic", "static"), commands=("export",),
        help="INT8 by run-time activation scales (dynamic, the CPU default) or calibrated QDQ (static; what "
        "TensorRT builds from)",
    )  # fmt: skip
    int8_ffn_out: str | None = option(
        "--int8-ffn-out", group="precision", choices=("fp32", "int8"), commands=("export",),
        help="precision of the FFN down-projections (the MatMuls after GELU) in an INT8 graph (default: fp32 in "
        "static INT8, whose symmetric scales lose accuracy on post-GELU activations; int8 in dynamic)",
    )  # fmt: skip
    calibration: str | None = option(
        "--calibration", group="precision", metavar="DIR|FILE|N", commands=("export",),
        help="static INT8 calibration data: an image/IDX folder, a text file, a packaged data set "
        "(fashion-mnist:train), or N samples of the model's own training data",
    )  # fmt: skip
    # Acceptance of a reduced-precision graph against FP32 merged (exporter.agreement.AcceptanceRule)
    max_accuracy_drop: float = option(
        "--max-accuracy-drop", default=0.5, group="precision", type=options.points, metavar="POINTS", commands=("export",),
        help="acceptance with labelled data (--data, or the data a shipped model names): top-1 within POINTS of the "
        "FP32 merged graph on the same samples (default 0.5)",
    )  # fmt: skip
    min_cosine: tuple[float, float] = option(
        default=(0.99, 0.98), group="precision", commands=("export",), parts=(
            part("--min-mean-cosine", type=options.fraction, metavar="F",
                 help="acceptance without labels: mean logit cosine with FP32 merged (default 0.99)"),
            part("--min-cosine", type=options.fraction, metavar="F",
                 help="acceptance without labels: worst sample's logit cosine (default 0.98)"),
        ),
    )  # fmt: skip
    min_top1_agreement: float | None = option(
        "--min-top1-agreement", group="precision", type=options.fraction, metavar="F", commands=("export",),
        help="also gate top-1 agreement with FP32 merged (reported, not gated by default)",
    )  # fmt: skip
    min_decision_agreement: float | None = option(
        "--min-decision-agreement", group="precision", type=options.fraction, metavar="F", commands=("export",),
        help="also gate per-layer merge-decision agreement (reported, not gated by default)",
    )  # fmt: skip
    bench_batch: int = option("--batch", default=8, group="benchmark", type=options.positive_int,
                              help="benchmark batch size (default 8)")  # fmt: skip
    bench_runs: int = option("--runs", default=20, group="benchmark", type=options.positive_int,
                             help="timed runs per candidate (default 20)")  # fmt: skip
    threads: int = option("--threads", default=2, group="benchmark", type=options.positive_int,
                          help="intra-op threads, torch and ORT (default 2)")  # fmt: skip
    bench: bool = option("--no-bench", default=True, group="benchmark", action="store_false", commands=("export",),
                         help="skip the latency stage")  # fmt: skip
    ort_provider: str = option(
        "--ort-provider", default="cpu", group="benchmark", choices=("cpu", "cuda", "tensorrt"), commands=("export",),
        help="ONNX Runtime execution provider for parity and latency (cuda, tensorrt: onnxruntime-gpu)",
    )  # fmt: skip
    trt_batches: tuple[int, int, int] = option(
        default=(1, 8, 64), group="tensorrt", commands=("export",), parts=(
            part("--min-batch", type=options.positive_int, help="optimisation profile: smallest batch (default 1)"),
            part("--opt-batch", type=options.positive_int, help="batch the engine is tuned for (default 8)"),
            part("--max-batch", type=options.positive_int, help="largest batch (default 64)"),
        ),
    )  # fmt: skip
    workspace_mib: int = option("--workspace", default=4096, group="tensorrt", type=options.positive_int, metavar="MiB",
                                commands=("export",), help="builder workspace limit")  # fmt: skip
    timing_cache: str | None = option(
        "--timing-cache", group="tensorrt", metavar="FILE", commands=("export",),
        help="timing cache read before and written after each build",
    )  # fmt: skip
    out: str | None = option("-o", "--out", group="output", help="output folder (default under artifacts/)")
    force: bool = option("--force", default=False, group="output", action="store_true",
                         help="replace an existing output folder")  # fmt: skip
    parity_batches: tuple[int, ...] = (1, 4)
    seed: int = 0
    command_line: list[str] = field(default_factory=lambda: ["pitome-export", *sys.argv[1:]])

    def __post_init__(self) -> None:
        if self.schedule is not None:  # an explicit schedule replaces the ratio
            self.ratio = None

    def default_out(self) -> Path:
        ratio = f"r{self.ratio:g}" if self.schedule is None else "sched"
        precision = "" if self.precision == "fp32" else f"-{self.precision}"
        return Path("artifacts") / f"{self.model}-{self.algo}-{ratio}{precision}-{self.target}"

    @property
    def fused(self) -> bool:
        """`--merge-impl plugin` or `fused`: each merge step exported as one `pitome::TokenMerge` node."""
        return self.lowering in ("plugin", "fused")

    @property
    def patch_lowering(self) -> str:
        """The lowering the PyTorch model is patched with (the fused op runs the MatMul one)."""
        return "matmul" if self.fused else self.lowering

    def resolved_int8_mode(self) -> str | None:
        """The INT8 mode this job uses (None unless int8): asked, implied by --calibration, or the default."""
        if self.precision != "int8":
            return None
        if self.int8_mode is not None:
            return self.int8_mode
        return "static" if self.calibration is not None or self.target == "trt" else DEFAULT_INT8_MODE

    def acceptance_rule(self):
        """The `exporter.agreement.AcceptanceRule` of this job's flags."""
        from exporter.agreement import AcceptanceRule

        return AcceptanceRule(
            self.max_accuracy_drop, *self.min_cosine, self.min_top1_agreement, self.min_decision_agreement
        )

    @property
    def reduced_graph(self) -> bool:
        """Whether the job ships a converted graph (TensorRT makes FP16/BF16 engines from FP32's)."""
        return self.precision != "fp32" and not (self.target == "trt" and self.precision in ("fp16", "bf16"))

    def resolved_ffn_out(self) -> str | None:
        """Precision of the FFN down-projections in an INT8 graph (None unless int8)."""
        from exporter.quantize import default_ffn_out

        mode = self.resolved_int8_mode()
        return None if mode is None else self.int8_ffn_out or default_ffn_out(mode)


def check_target(target: str) -> None:
    """Fail fast (before loading anything) when the target's backend is missing."""
    if target not in TARGETS:
        raise PitomeError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    if target == "trt":
        from exporter.tensorrt import require_cuda, require_tensorrt

        require_tensorrt()
        require_cuda()


def check_merge_impl(lowering: str) -> None:
    """`--merge-impl fused` runs the Triton merge kernels: fail fast (exit 4) without a CUDA device."""
    if lowering != "fused":
        return
    import torch

    from exporter.errors import MissingBackendError

    if not torch.cuda.is_available():
        raise MissingBackendError("--merge-impl fused runs the Triton merge kernels on a CUDA GPU; PyTorch sees none")


def check_algo_fits(algo: str, spec: ModelSpec) -> None:
    """Refuse, before anything loads, an algorithm the model's family has no variant of."""
    from ops.algos import check_text_family

    if spec.kind == "text":
        check_text_family(algo, spec.text_family)


def check_precision_flags(job: ExportJob) -> None:
    """Reject flag combinations that cannot mean anything, before any work."""
    from exporter.runners import require_ort_provider

    options.check_choices(job)
    if job.int8_mode is not None and job.precision != "int8":
        raise PitomeError("--int8-mode applies to --precision int8")
    if job.int8_ffn_out is not None and job.precision != "int8":
        raise PitomeError("--int8-ffn-out applies to --precision int8")
    defaults = {f.name: (opt, options.default_of(f)) for f, opt in options.declared(ExportJob)}
    changed = [
        options.flag_text(defaults[name][0]) for name in ACCEPTANCE_FIELDS if getattr(job, name) != defaults[name][1]
    ]
    if changed and not job.reduced_graph:
        raise PitomeError(
            f"{changed[0]} judges a converted graph: use it with --precision int8 (or fp16 with --target onnx)"
        )
    if job.calibration is not None and job.calibration.isdigit() and int(job.calibration) < 1:
        raise PitomeError("--calibration N needs N >= 1 samples")
    if job.calibration is not None and job.resolved_int8_mode() != "static":
        raise PitomeError("--calibration applies to --precision int8 with static quantization")
    if job.target == "trt" and job.precision == "int8" and job.resolved_int8_mode() != "static":
        raise PitomeError("TensorRT builds INT8 engines from the static QDQ graph: drop --int8-mode dynamic")
    if job.precision == "bf16" and job.target != "trt":
        raise PitomeError("--precision bf16 is a TensorRT engine precision: use it with --target trt")
    if job.lowering == "fused" and job.device == "cpu":
        raise PitomeError("--merge-impl fused runs the PyTorch model on CUDA: drop --device cpu")
    if job.fused and job.precision == "int8":
        raise PitomeError("--merge-impl plugin does not combine with int8: calibration runs the graph on ONNX Runtime")
    if job.fused and job.precision == "fp16" and job.target == "onnx":
        raise PitomeError("--merge-impl plugin with fp16 is for --target trt (the engine keeps the plugin in FP32)")
    if job.ort_provider != "cpu":
        require_ort_provider(job.ort_provider)  # before any export work
    if job.target == "trt":
        from exporter.tensorrt.build import BatchProfile

        profile = BatchProfile(*job.trt_batches)
        if job.static_batch:
            raise PitomeError("--static-batch does not combine with --target trt: the engine's batch profile sets it")
        if job.bench and not profile.min <= job.bench_batch <= profile.max:
            raise PitomeError(
                f"--batch {job.bench_batch} is outside the engine's batch profile {profile.min}..{profile.max}"
            )


def claim_output(job: ExportJob) -> Path:
    """The job's output folder; refuses an existing one without --force."""
    final = Path(job.out) if job.out else job.default_out()
    if final.exists() and not job.force:
        raise OutputExistsError(f"output folder {final} exists; pass --force to replace it")
    return final


def prepare_output(job: ExportJob) -> tuple[Path, Path]:
    """(final folder, temporary folder beside it); refuses an existing folder without --force."""
    final = claim_output(job)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = make_temp_dir(final)
    except OSError as exc:
        raise OutputExistsError(f"cannot write to {final.parent}: {exc.strerror}") from None
    return final, tmp


def publish(tmp: Path, final: Path) -> None:
    """Move the finished temporary folder into place (replacing an old one under --force)."""
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)


def build_output_folder(job: ExportJob, build: Callable[[Path], T]) -> tuple[Path, T]:
    """Check the inputs that need no model, run `build` on a temporary folder, publish it.

    Whatever stops `build` (an error, Ctrl-C) removes the temporary folder: nothing partial stays.
    """
    from pipelines.data.labelled import DataError, named_data

    check_precision_flags(job)
    for what, source in (("data", job.data), ("calibration data", job.calibration)):
        if source is not None and not source.isdigit() and named_data(source) is None and not Path(source).exists():
            raise DataError(f"{what} not found: {source}")
    final, tmp = prepare_output(job)
    try:
        result = build(tmp)
        interrupts.check()  # a Ctrl-C that a library swallowed still stops the publish
        publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final, result


def with_acceptance_data(job: ExportJob, spec: ModelSpec, console) -> ExportJob:
    """A reduced graph is accepted by accuracy where there are labels: without `--data`, the
    data the model was trained for (shipped models name it) when it is installed."""
    from pipelines.data.labelled import named_data_installed

    if not job.reduced_graph or job.data is not None or job.random_init or spec.data is None:
        return job
    if not named_data_installed(spec.data):
        console.print(f"[yellow]{spec.data} is not installed: {job.precision} is accepted on output similarity[/]")
        return job
    console.print(f"accuracy data: {spec.data} (what {spec.name} was trained for; --data to choose other)")
    return dataclasses.replace(job, data=spec.data)


def run_job(job: ExportJob, console) -> Path:
    """Run the whole job and return the published output folder; raise PitomeError on failure."""
    from pipelines.jobs.report import print_summary
    from pipelines.jobs.stages import run_stages
    from pipelines.models.registry import resolve

    check_target(job.target)
    check_merge_impl(job.lowering)
    spec = resolve(job.model)
    check_algo_fits(job.algo, spec)
    if job.random_init:
        console.print("[yellow]RANDOM-INIT WEIGHTS: accuracy is meaningless; parity and latency are real.[/]")
    job = with_acceptance_data(job, spec, console)
    final, summary = build_output_folder(job, lambda tmp: run_stages(job, spec, tmp, console))
    print_summary(summary, spec, final, console)
    raise_on_failure(summary, job.precision, final)
    return final


def raise_on_failure(summary: dict, precision: str, final: Path) -> None:
    """ParityError (exit 3) for the first check that failed, its artifacts published for inspection."""
    kept = f"(artifacts kept in {final} for inspection)"
    if not summary["parity"]["passed"]:
        raise ParityError(f"parity FAILED: {summary['parity_line']} {kept}")
    engine = summary.get("engine")
    if engine is not None and not engine["passed"]:
        raise ParityError(f"engine parity FAILED: {engine['parity_line']} {kept}")
    agreement = summary["precision"]["agreement"]
    if agreement is not None and not agreement["passed"]:
        raise ParityError(f"{precision} parity FAILED: {summary['precision']['agreement_line']} {kept}")
