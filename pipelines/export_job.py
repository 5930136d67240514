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
from typing import TypeVar

from exporter.atomic import make_temp_dir
from exporter.errors import ParityError
from ops.errors import PitomeError
from pipelines import interrupts
from pipelines.models import ModelSpec, resolve

TARGETS = ("onnx", "trt")
DEFAULT_INT8_MODE = "dynamic"  # the faster on ONNX Runtime CPU, measured (README, Quantization)
T = TypeVar("T")


class OutputExistsError(PitomeError):
    """The output folder exists and --force was not given."""


@dataclass
class ExportJob:
    """What the user asked for; the CLI fills it from flags."""

    model: str
    algo: str = "pitome"
    ratio: float | None = 0.9
    schedule: list[int] | None = None
    prop_attn: bool | None = None
    lowering: str = "matmul"
    target: str = "onnx"
    checkpoint: str | None = None
    random_init: bool = False
    seq_len: int | None = None
    opset: int = 20
    static_batch: bool = False
    out: str | None = None
    force: bool = False
    device: str | None = None
    parity_batches: tuple[int, ...] = (1, 4)
    bench: bool = True
    bench_batch: int = 8
    bench_runs: int = 20
    data: str | None = None
    limit: int | None = None
    threads: int = 2
    seed: int = 0
    precision: str = "fp32"
    int8_mode: str | None = None  # None: the CPU default (DEFAULT_INT8_MODE), static when calibrating
    calibration: str | None = None  # DIR, FILE, data set name, or a sample count
    int8_ffn_out: str | None = None  # FFN down-projection in INT8 graphs: fp32, int8; None: by mode
    # Acceptance of a reduced-precision graph against FP32 merged (exporter.agreement.AcceptanceRule)
    max_accuracy_drop: float = 0.5  # points of top-1, with labelled data
    min_cosine: tuple[float, float] = (0.99, 0.98)  # logit cosine (mean, worst sample), without labels
    min_top1_agreement: float | None = None  # gated only when given
    min_decision_agreement: float | None = None  # per merging layer; gated only when given
    trt_batches: tuple[int, int, int] = (1, 8, 64)  # TensorRT optimisation profile: min, opt, max batch
    workspace_mib: int = 4096
    timing_cache: str | None = None
    ort_provider: str = "cpu"  # ONNX Runtime route for parity and latency: cpu, cuda, tensorrt
    command_line: list[str] = field(default_factory=lambda: ["pitome-export", *sys.argv[1:]])

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


def check_precision_flags(job: ExportJob) -> None:
    """Reject flag combinations that cannot mean anything, before any work."""
    from exporter.quantize import FFN_OUT_PRECISIONS, INT8_MODES, PRECISIONS
    from exporter.runners import ORT_PROVIDERS, require_ort_provider

    if job.precision not in (*PRECISIONS, "bf16"):
        raise PitomeError(f"unknown precision {job.precision!r}; choose one of {', '.join(PRECISIONS)}")
    if job.int8_mode is not None and job.int8_mode not in INT8_MODES:
        raise PitomeError(f"unknown INT8 mode {job.int8_mode!r}; choose one of {', '.join(INT8_MODES)}")
    if job.int8_mode is not None and job.precision != "int8":
        raise PitomeError("--int8-mode applies to --precision int8")
    if job.int8_ffn_out is not None and job.int8_ffn_out not in FFN_OUT_PRECISIONS:
        raise PitomeError(f"unknown --int8-ffn-out {job.int8_ffn_out!r}; choose one of {', '.join(FFN_OUT_PRECISIONS)}")
    if job.int8_ffn_out is not None and job.precision != "int8":
        raise PitomeError("--int8-ffn-out applies to --precision int8")
    acceptance_flags = {  # job field -> the flags that set it
        "max_accuracy_drop": "--max-accuracy-drop", "min_cosine": "--min-mean-cosine/--min-cosine",
        "min_top1_agreement": "--min-top1-agreement", "min_decision_agreement": "--min-decision-agreement",
    }  # fmt: skip
    defaults = {f.name: f.default for f in dataclasses.fields(ExportJob)}
    changed = [flag for name, flag in acceptance_flags.items() if getattr(job, name) != defaults[name]]
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
    if job.ort_provider not in ORT_PROVIDERS:
        raise PitomeError(
            f"unknown ONNX Runtime provider {job.ort_provider!r}; choose one of {', '.join(ORT_PROVIDERS)}"
        )
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
    from pipelines.data import DataError, named_data

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
    from pipelines.data import named_data_installed

    if not job.reduced_graph or job.data is not None or job.random_init or spec.data is None:
        return job
    if not named_data_installed(spec.data):
        console.print(f"[yellow]{spec.data} is not installed: {job.precision} is accepted on output similarity[/]")
        return job
    console.print(f"accuracy data: {spec.data} (what {spec.name} was trained for; --data to choose other)")
    return dataclasses.replace(job, data=spec.data)


def run_job(job: ExportJob, console) -> Path:
    """Run the whole job and return the published output folder; raise PitomeError on failure."""
    from pipelines.report import print_summary
    from pipelines.stages import run_stages

    check_target(job.target)
    check_merge_impl(job.lowering)
    spec = resolve(job.model)
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
