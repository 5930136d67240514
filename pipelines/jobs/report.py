"""Human and machine reports: run context, schedule line, latency table, report.md."""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
from pathlib import Path

from exporter.atomic import atomic_write_text
from exporter.onnx_export import package_versions
from exporter.runners import cpu_name
from ops.schedule import TokenSchedule
from pipelines.jobs.options import options_by_group


def git_commit() -> str:
    try:
        here = Path(__file__).resolve().parent
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def tensorrt_version() -> str:
    import importlib.util

    if importlib.util.find_spec("tensorrt") is None:
        return "not installed"
    from importlib import metadata

    try:
        return metadata.version("tensorrt")
    except metadata.PackageNotFoundError:
        return "installed (version unknown)"


def run_context(job, spec, origin: str, reference_device: str, reference_kind: str) -> dict:
    """Everything a reader needs to reproduce or judge the run."""
    return {
        "weights": origin,
        "model": spec.name,
        "source": spec.source,
        "command_line": shlex.join(job.command_line),
        "git_commit": git_commit(),
        "versions": {**package_versions(), "tensorrt": tensorrt_version(), "python": platform.python_version()},
        "cpu": cpu_name(),
        "reference_device": f"{reference_kind} ({reference_device})",
        "threads": job.threads,
        "parity_batch_sizes": list(job.parity_batches),
        "bench_batch": job.bench_batch,
        "seed": job.seed,
        "options": options_by_group(job),  # the options this run changed from their defaults, by group
    }


def options_lines(grouped: dict[str, dict]) -> list[str]:
    """The run's non-default options as markdown list items, one per help group."""
    if not grouped:
        return ["- options: all defaults"]
    return [
        f"- {group} options: " + ", ".join(f"`{flag} {value}`" for flag, value in values.items())
        for group, values in grouped.items()
    ]


def schedule_line(schedule: TokenSchedule) -> str:
    merges = ",".join(str(r) for r in schedule.merges)
    return (
        f"schedule r = {merges}; tokens {schedule.tokens[0] + schedule.num_prefix} -> "
        f"{schedule.final_tokens + schedule.num_prefix}"
    )


def print_bench(bench: dict, console) -> None:
    from rich.table import Table

    table = Table(title=f"Latency, batch {bench['batch']}, {bench['threads']} threads")
    for column in ("candidate", "median ms", "min ms", "p90 ms", "p99 ms", "items/s", "cv"):
        table.add_column(column, justify="left" if column == "candidate" else "right")
    for name, s in bench["latency"].items():
        cv = f"{s['cv']:.1%}" + (" [yellow]noisy[/]" if s["noisy"] else "")
        table.add_row(
            name, f"{s['median_ms']:.1f}", f"{s['min_ms']:.1f}", f"{s['p90_ms']:.1f}", f"{s['p99_ms']:.1f}",
            f"{s['throughput']:.1f}", cv,
        )  # fmt: skip
    console.print(table)
    console.print(
        f"speed-up merged vs unmerged: onnxruntime {bench['speedup_onnxruntime']:.2f}x, "
        f"pytorch eager {bench['speedup_pytorch_eager']:.2f}x; block-FLOP ideal {bench['block_flop_speedup']:.2f}x"
    )
    speedups = bench.get("speedup_vs_fp32_unmerged", {})
    if len(speedups) > 1:
        console.print("onnxruntime vs fp32 unmerged: " + ", ".join(f"{name} {x:.2f}x" for name, x in speedups.items()))


def print_summary(summary: dict, spec, folder: Path, console) -> None:
    """The closing table of a run: what was exported, whether it is right, how much faster."""
    from rich.table import Table

    ctx, sched, bench, accuracy = summary["context"], summary["schedule"], summary["bench"], summary["accuracy"]
    cfg = summary["merge_config"]
    table = Table(title="pitome-export summary", show_header=False)
    table.add_row("model", f"{spec.name} ({ctx['weights']})")
    merging = f"{cfg['algo']} ratio {cfg['ratio']}, lowering {cfg['lowering']}" if any(sched["merges"]) else "none"
    table.add_row("merge", merging)
    table.add_row(
        "tokens", f"{sched['tokens_in'][0]} -> {sched['tokens_out'][-1]} ({','.join(map(str, sched['merges']))})"
    )
    passed = summary["parity"]["passed"]
    table.add_row(
        "parity", ("[green]PASSED[/]" if passed else "[red]FAILED[/]") + f" vs PyTorch on {ctx['reference_device']}"
    )
    precision = summary.get("precision") or {}
    if precision.get("agreement"):
        ok = precision["agreement"]["passed"]
        mode = f" ({precision['int8_mode']})" if precision["int8_mode"] else ""
        table.add_row(
            precision["precision"] + mode,
            ("[green]PASSED[/]" if ok else "[red]FAILED[/]") + " " + precision["agreement_line"].split(" | ")[1],
        )
    engine = summary.get("engine")
    if engine:
        ok = engine["passed"]
        table.add_row(
            "engine",
            ("[green]PASSED[/]" if ok else "[red]FAILED[/]") + f" vs PyTorch on CUDA ({engine['sidecar']['gpu']})",
        )
        if engine.get("bench"):
            table.add_row(
                "speed-up", f"tensorrt {engine['bench']['speedup_tensorrt']:.2f}x (batch {engine['bench']['batch']})"
            )
    if bench:
        table.add_row(
            "speed-up",
            f"onnxruntime {bench['speedup_onnxruntime']:.2f}x, eager {bench['speedup_pytorch_eager']:.2f}x "
            f"(block-FLOP ideal {bench['block_flop_speedup']:.2f}x, batch {bench['batch']})",
        )
    if accuracy:
        table.add_row(
            "accuracy",
            f"{accuracy['top1_merged']:.2%} merged vs {accuracy['top1_unmerged']:.2%} unmerged "
            f"({change_text(accuracy)}, {accuracy['samples']} samples)",
        )
    table.add_row("report", str(folder / "report.md"))
    console.print(table)


def precision_markdown(precision: dict | None) -> list[str]:
    """report.md's section on a reduced-precision graph: how it was made and its agreement."""
    if not precision or precision["precision"] == "fp32":
        return []
    lines = [f"## Precision: {precision['precision']}", ""]
    if precision["int8_mode"]:
        lines.append(f"- INT8 mode: {precision['int8_mode']}; calibration: {precision['calibration'] or 'none'}")
        kept = precision.get("int8_ffn_fp32_nodes", 0)
        if precision.get("int8_ffn_out") == "fp32" and kept:
            lines.append(f"- the {kept} FFN down-projections (MatMuls after GELU) are kept in FP32 (`--int8-ffn-out`)")
        elif precision.get("int8_ffn_out") == "fp32":
            lines.append("- `--int8-ffn-out fp32` found no FFN down-projection (no MatMul after a GELU): all are INT8")
    lines.append("- the merge subgraph (decisions and weighted mean) is kept in FP32")
    agreement = precision["agreement"]
    if agreement:
        lines += ["", precision["agreement_line"], "", *acceptance_markdown(agreement)]
        if agreement["layer_agreement"]:
            lines += [
                agreement["decisions_meaning"],
                "",
                "Per merging layer: the layer's own decisions (tokens whose merge destination, the token owning "
                "their slot, is FP32's, among tokens that entered in FP32's groups) and cumulative (tokens in "
                "exactly FP32's groups).",
                "",
                "| merging layer | own decisions (destinations) | cumulative (groups) |",
                "|---|---:|---:|",
            ]
            lines += [
                f"| {name} | {value:.2%} | {agreement['cumulative_agreement'][name]:.2%} |"
                for name, value in agreement["layer_agreement"].items()
            ]
            lines.append("")
    return lines


def acceptance_markdown(agreement: dict) -> list[str]:
    """Which rule accepted (or refused) the reduced graph, on what, and what else was checked."""
    rule = agreement["rule"]
    if agreement["decided_by"] == "accuracy":
        acc = agreement["accuracy"]
        how = (f"top-1 accuracy within {rule['max_accuracy_drop']:g} points of the FP32 merged graph on the same "
               f"{acc['samples']} labelled samples ({acc['data']})")  # fmt: skip
    else:
        acc = agreement["accuracy"]
        why = f"accuracy cannot decide ({acc['uninformative']})" if acc else "no labelled data"
        how = (f"{why}, so output similarity on {agreement['samples']} parity samples: logit cosine "
               f"mean >= {rule['min_mean_cosine']:g} and every sample >= {rule['min_cosine']:g}")  # fmt: skip
    lines = [f"- accepted by: {how}"]
    gated = [name for name, key in (("top-1 agreement", "min_top1"), ("decision agreement", "min_decisions"))
             if rule[key] is not None]  # fmt: skip
    lines.append(
        f"- also gated: {', '.join(gated)}" if gated else "- top-1 and decision agreement: reported, not gated"
    )
    if agreement["merge_findings"]:
        lines.append(f"- merge nodes the conversion reduced ({len(agreement['merge_findings'])}): "
                     + "; ".join(agreement["merge_findings"][:5]))  # fmt: skip
    else:
        lines.append("- merge subgraph read from the graph: every merge node computes and reads FP32")
    debug = agreement.get("debug_graph")
    if debug:
        state = "reproduces" if debug["reproduces"] else "does NOT reproduce"
        batch = "dynamic" if debug["dynamic_batch"] else "static"
        lines.append(f"- decision debug graph (opset {debug['opset']}, {batch} batch) {state} the shipped graph's "
                     f"logits (max abs {debug['max_abs']:.3g})")  # fmt: skip
    return [*lines, ""]


def change_text(accuracy: dict) -> str:
    """`-0.23 points, 95% CI -0.41 to -0.05`: the change and, where measured, its paired interval."""
    text = f"{accuracy['delta_points']:+.2f} points"
    if "paired" in accuracy:
        low, high = accuracy["paired"]["delta_points_ci95"]
        text += f", 95% CI {low:+.2f} to {high:+.2f}"
    return text


def print_accuracy(accuracy: dict, console) -> None:
    console.print(
        f"accuracy on {accuracy['samples']} samples ({accuracy['data']}): merged {accuracy['top1_merged']:.2%}, "
        f"unmerged {accuracy['top1_unmerged']:.2%} ({change_text(accuracy)}), "
        f"prediction agreement {accuracy['agreement']:.2%}"
    )
    others = {k: v for k, v in accuracy.get("top1", {}).items() if k not in ("merged", "unmerged")}
    if others:
        console.print("  also: " + ", ".join(f"{name} {top1:.2%}" for name, top1 in others.items()))


def write_preprocessing(model, spec, out: Path, job) -> None:
    """timm: the data config as JSON; HF: config.json (and the tokenizer when it is local, or the
    image processor's preprocessor_config.json), what optimum's ORTModel classes load."""
    if spec.kind == "hf_vision":
        from pipelines.models.image_processor import FILE, job_processor

        model.config.save_pretrained(out)
        processor = job_processor(model, spec, job.checkpoint, job.random_init)
        atomic_write_text(out / FILE, json.dumps(processor, indent=2))
        return
    if spec.kind == "vision":
        from timm.data import resolve_data_config

        config = resolve_data_config({}, model=model)
        atomic_write_text(out / "data_config.json", json.dumps(config, indent=2, default=list))
        return
    config = getattr(model, "config", None)
    if config is not None:
        config.save_pretrained(out)
    from pipelines.models.registry import tokenizer_source

    source = tokenizer_source(model, spec)
    if os.path.isdir(source):
        try:
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(source).save_pretrained(out)
        except (OSError, ValueError):
            pass  # a model folder without a tokenizer: config.json alone still describes the graph


def random_init_banner(ctx: dict, real: str) -> list[str]:
    """The first lines of a report on random weights: say so before anything else."""
    if ctx["weights"] != "random-init":
        return []
    return [f"> **RANDOM-INIT WEIGHTS**: accuracy figures are meaningless; {real} are real.", ""]


def latency_markdown(latency: dict) -> list[str]:
    """A trtexec-shaped latency table, one row per candidate."""
    lines = [
        "| candidate | median ms | min ms | p90 ms | p99 ms | items/s | cv |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s in latency.items():
        noisy = " (noisy)" if s["noisy"] else ""
        ms = [_ms(s[key]) for key in ("median_ms", "min_ms", "p90_ms", "p99_ms")]
        lines.append(f"| {name} | {' | '.join(ms)} | {s['throughput']:.1f} | {s['cv']:.1%}{noisy} |")
    return lines


def _percent(value: float | None) -> str:
    """A share as a percentage; "n/a" where a figure does not apply (top-1 of a feature output)."""
    return "n/a" if value is None else f"{value:.2%}"


def _ms(value: float) -> str:
    """Milliseconds to 0.1 ms (CPU runs), or 3 significant digits below 1 ms (GPU runs)."""
    return f"{value:.1f}" if value >= 1 else f"{value:.3g}"


def engine_markdown(engine: dict | None) -> list[str]:
    """report.md's TensorRT section: how the engine was built, its parity on CUDA, its latency."""
    if not engine:
        return []
    car = engine["sidecar"]
    profile = car["profile"]
    lines = [
        "## TensorRT engine",
        "",
        f"`model.engine` ({car['precision']}, merge {car['merge_impl']}) built with TensorRT {car['tensorrt']} on "
        f"{car['gpu']} in {car['build_seconds']} s; batch profile {profile['min']}/{profile['opt']}/{profile['max']}, "
        f"workspace {car['workspace_mib']} MiB, timing cache {car['timing_cache'] or 'none'}.",
        "",
        f"Parity vs PyTorch on CUDA: {engine['parity_line']}",
        "",
    ]
    bench = engine.get("bench")
    if bench:
        lines += [bench["how"], "", *latency_markdown(bench["latency"]), ""]
        lines += [
            f"Speed-up merged vs unmerged: TensorRT {bench['speedup_tensorrt']:.2f}x, "
            f"PyTorch eager on CUDA {bench['speedup_pytorch_eager_cuda']:.2f}x.",
            "",
        ]
    return lines


def markdown(summary: dict, spec) -> str:
    """report.md: random-init warning first, then the run context, schedule, parity and latency."""
    ctx = summary["context"]
    lines = random_init_banner(ctx, "parity and latency")
    lines += _context_markdown(ctx, spec.name)
    lines += _schedule_markdown(summary["schedule"], summary["merge_config"])
    lines += _parity_markdown(summary["parity"], summary["parity_line"])
    lines += precision_markdown(summary.get("precision"))
    lines += engine_markdown(summary.get("engine"))
    lines += _bench_markdown(summary["bench"])
    lines += _accuracy_markdown(summary.get("accuracy"))
    return "\n".join(lines)


def _context_markdown(ctx: dict, name: str) -> list[str]:
    return [
        f"# pitome-export report: {name}",
        "",
        f"- weights: {ctx['weights']}",
        f"- command: `{ctx['command_line']}`",
        f"- git commit: {ctx['git_commit']}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in ctx["versions"].items()),
        f"- CPU: {ctx['cpu']}; reference device: {ctx['reference_device']}; threads: {ctx['threads']}",
        f"- seed: {ctx['seed']}; parity batch sizes: {ctx['parity_batch_sizes']}",
        *options_lines(ctx["options"]),
        "",
    ]


def _schedule_markdown(sched: dict, merge_config: dict) -> list[str]:
    if any(sched["merges"]):
        settings = (
            f"algo {merge_config['algo']}, ratio {merge_config['ratio']}, "
            f"lowering {merge_config['lowering']}, proportional attention {merge_config['prop_attn']}"
        )
    else:  # e.g. the unmerged graph chosen by `tune`: its merge settings do nothing
        settings = "no token merging: every layer keeps all its tokens"
    lines = [
        "## Schedule",
        "",
        settings,
        "",
        "| layer | tokens in | merged | tokens out | step |",
        "|---:|---:|---:|---:|---|",
    ]
    rows = zip(sched["tokens_in"], sched["merges"], sched["tokens_out"], merge_config["steps"])
    lines += [f"| {i} | {tin} | {r} | {tout} | {step} |" for i, (tin, r, tout, step) in enumerate(rows)]
    return lines + [""]


def _parity_markdown(parity: dict, parity_line: str) -> list[str]:
    lines = [
        "## Parity (ONNX Runtime CPU vs PyTorch reference)",
        "",
        "Max abs and max rel are also the minimum atol (or rtol) that would have passed.",
        "",
        "| output | max abs | max rel | mean abs | min cosine | top-1 agreement | result |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for o in parity["outputs"]:
        state = "PASSED" if o["passed"] else "FAILED"
        lines.append(
            f"| {o['name']} | {o['max_abs']:.3g} | {o['max_rel']:.3g} | {o['mean_abs']:.3g} | "
            f"{o['min_cosine']:.7f} | {_percent(o['top1_agreement'])} | {state} |"
        )
    return lines + ["", parity_line, ""]


def _bench_markdown(bench: dict | None) -> list[str]:
    if not bench:
        return []
    lines = ["## Latency", "", bench["how"], ""]
    lines += latency_markdown(bench["latency"])
    lines += [
        "",
        f"Speed-up merged vs unmerged: ONNX Runtime {bench['speedup_onnxruntime']:.2f}x, "
        f"PyTorch eager {bench['speedup_pytorch_eager']:.2f}x. Block FLOPs {bench['block_gflops_merged']:.2f} vs "
        f"{bench['block_gflops_unmerged']:.2f} GFLOP per item: ideal {bench['block_flop_speedup']:.2f}x.",
        "",
    ]
    if len(bench.get("speedup_vs_fp32_unmerged", {})) > 1:
        lines += [
            "ONNX Runtime speed-ups against the FP32 unmerged graph (`merged` is the shipped "
            f"{bench['precision']} graph): "
            + ", ".join(f"{name} {x:.2f}x" for name, x in bench["speedup_vs_fp32_unmerged"].items()),
            "",
        ]
    return lines


def _accuracy_markdown(accuracy: dict | None) -> list[str]:
    if not accuracy:
        return []
    return [
        "## Accuracy (ONNX Runtime, merged vs unmerged graphs)",
        "",
        f"{accuracy['samples']} samples from {accuracy['data']}.",
        "",
        "| graph | top-1 |",
        "|---|---:|",
        *(f"| {name} | {top1:.2%} |" for name, top1 in accuracy.get("top1", {}).items()),
        "",
        f"Change {accuracy['delta_points']:+.2f} points; the two graphs agree on {accuracy['agreement']:.2%} of predictions.",
        *_paired_markdown(accuracy.get("paired")),
        "",
    ]


def _paired_markdown(paired: dict | None) -> list[str]:
    if not paired:
        return []
    low, high = paired["delta_points_ci95"]
    return [
        f"Paired on the same samples: the merged graph alone is right on {paired['only_first_right']}, the unmerged "
        f"alone on {paired['only_second_right']}; the change's 95% confidence interval is {low:+.2f} to {high:+.2f} "
        f"points (McNemar's exact p = {paired['mcnemar_p']:.2g}, the chance of a split at least this uneven "
        "between equally accurate graphs)."
    ]
