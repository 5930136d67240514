"""Every GPU check of the fused merge in one call (a few minutes on an H100/H200), results to files.

    python -m benchmarks.device_check --out benchmarks/results/gpu/fused

1. Steps: `ops.kernels.token_merge` against `ops.merge` on CUDA for every kind at real shapes
   (DeiT-S 197 tokens, BERT-base 128 with padding), FP32 and FP16: identical slots, max error.
2. The merging layer on CUDA: kernels launched per call (torch.profiler), fused vs decomposed;
   `torch.compile(fullgraph=True)` of a fused layer (no graph break).
3. Models (random init): DeiT-S PiToMe 0.9 and BERT-base seq 128 PiToMe 0.7, fused vs
   decomposed logits in FP32 and FP16 (autocast): max difference, top-1 agreement.
4. The latency grid of issue 20 through `benchmarks.gpu_latency` (unmerged, decomposed, fused,
   merge skipped; eager and CUDA graph): DeiT-S batch 1/8/64 FP32/FP16, DeiT-B and BERT-base
   FP16 batch 64; then the targets met or not.

Triton compiles each merging layer's kernels on first use (every layer has its own shapes, r and
margin: ~100 compiles in all); a first stage compiles them in parallel worker processes, which
fill Triton's on-disk cache for the measuring process.

Writes `device_check.json` and `device_check.md` after every stage (a run cut short keeps what it
measured) and the grid's `gpu_latency.md/.json` per model under `--out`. A stage that fails is
recorded and the others still run (exit 1); exits 4 without CUDA.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import copy
import json
import multiprocessing
import sys
import time
import traceback
from pathlib import Path

import torch

from benchmarks.latency import RESULTS
from ops.merge import MergeStep, merge_assignment, plan_slots, size_weighted_merge

# (kind, tokens, channels, metric width, prefix, r, padded): shapes of the models the targets name
STEP_SHAPES = (
    ("pitome_bsm", 197, 384, 64, 1, 19, False),
    ("pitome", 197, 384, 64, 1, 19, False),
    ("tome", 197, 384, 64, 1, 16, False),
    ("pitome_text", 128, 770, 64, 1, 38, True),
    ("pitome", 577, 768, 64, 1, 57, False),
)
# (model, ratio, seq_len, batches, precisions, modes): issue 20's targets
GRID = (
    ("deit_small", 0.9, None, (1, 8, 64), ("fp32", "fp16"), ("eager", "graph")),
    ("deit_base", 0.9, None, (64,), ("fp16",), ("graph",)),
    ("bert_base", 0.7, 128, (64,), ("fp16",), ("graph",)),
)
# (model, precision, batch, minimum speed-up of the fused variant over unmerged, CUDA graph)
TARGETS = (
    ("deit_small", "fp16", 64, 1.6),
    ("deit_small", "fp32", 64, 1.65),
    ("deit_small", "fp16", 8, 1.2),
    ("deit_small", "fp16", 1, 1.0),
    ("deit_small", "fp32", 1, 1.0),
    ("deit_base", "fp16", 64, 1.65),
    ("bert_base (seq 128)", "fp16", 64, 2.0),
)
MAX_MERGE_SHARE = 0.05  # of the merged model's GPU time at FP16 batch 64


def _step_inputs(tokens: int, channels: int, width: int, padded: bool, batch: int, device: torch.device):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, tokens, channels, generator=gen)
    size = torch.randint(1, 4, (batch, tokens, 1), generator=gen).float()
    metric = torch.randn(batch, tokens, width, generator=gen)
    metric[:, 5:9] = metric[:, 4:5]  # exact ties
    valid = None
    if padded:
        valid = torch.ones(batch, tokens)
        valid[1:, tokens - tokens // 3 :] = 0
        size = valid[..., None].clone()
    return [t if t is None else t.to(device) for t in (x, size, metric, valid)]


def _warm(task: tuple) -> dict:
    """One worker's share of the compilation: a forward pass of one model in one precision, or the
    steps. A failure is reported, not raised: the measuring stages then compile what they need."""
    device = torch.device("cuda")
    began = time.perf_counter()
    try:
        if task[0] == "steps":
            check_steps(device, batch=2)
        else:
            _forward_fused(*task[1:], device)
        result = "ok"
    except Exception as exc:  # noqa: BLE001 - reported in the record
        result = f"failed: {_error(exc)}"
    return {"task": " ".join(map(str, task)), "result": result, "seconds": round(time.perf_counter() - began, 1)}


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}"


def _forward_fused(name: str, ratio: float, seq_len: int | None, precision: str, device: torch.device) -> None:
    from exporter.signatures import ExportWrapper, signature_of
    from ops import patch_model
    from pipelines.models.registry import load_model, resolve

    model, _ = load_model(resolve(name), random_init=True)
    model = patch_model(model, ratio=ratio, merge_impl="fused", **({"seq_len": seq_len} if seq_len else {}))
    signature = signature_of(model, seq_len)
    feeds = signature.example_inputs(2, seed=0)
    wrapped = ExportWrapper(model, signature).eval().to(device)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16, enabled=precision == "fp16"):
        wrapped(*(feeds[n].to(device) for n in signature.input_names))


def precompile(workers: int) -> list[dict]:
    """Compile every kernel the later stages launch, in parallel processes (Triton's disk cache)."""
    tasks = [("steps",)] + [
        ("model", name, ratio, seq_len, precision)
        for name, ratio, seq_len, _, precisions, _ in GRID
        for precision in sorted({*precisions, "fp32", "fp16"} if name != "deit_base" else set(precisions))
    ]
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        return list(pool.map(_warm, tasks))


def check_steps(device: torch.device, batch: int = 8) -> list[dict]:
    """Each kind's step, fused against `ops.merge` on the same CUDA tensors."""
    from ops.kernels import token_merge_with_slots

    rows = []
    for kind, tokens, channels, width, prefix, r, padded in STEP_SHAPES:
        x, size, metric, valid = _step_inputs(tokens, channels, width, padded, batch, device)
        step = MergeStep(kind, r, 0.8 if kind == "pitome_text" else 0.6)
        for dtype in (torch.float32, torch.float16):
            x_in, size_in, metric_in = (t.to(dtype) for t in (x, size, metric))
            plan = merge_assignment(metric_in.float(), step, prefix, valid)  # FP32 decisions on the same values
            ref_x, ref_size = size_weighted_merge(x_in.float(), size_in.float(), plan)
            out_x, out_size, slots = token_merge_with_slots(x_in, size_in, metric_in, valid, step, prefix, True)
            same = (slots.long() == plan_slots(plan)).all(dim=1)
            rows.append(
                {
                    "kind": kind,
                    "tokens": tokens,
                    "r": r,
                    "dtype": str(dtype).removeprefix("torch."),
                    "sequences_with_identical_slots": f"{int(same.sum())}/{batch}",
                    "max_abs_error_where_identical": (out_x.float() - ref_x)[same].abs().max().item()
                    if same.any()
                    else None,
                    "sizes_equal_where_identical": torch.equal(out_size.float()[same], ref_size[same]),
                }
            )
    return rows


def _kernels_per_call(run) -> int:
    from torch.profiler import ProfilerActivity, profile

    run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    return sum(1 for event in prof.events() if event.device_type.name == "CUDA")


def check_layer(device: torch.device) -> dict:
    """Kernels per merging layer (DeiT-S first layer shapes), fused and decomposed; torch.compile."""
    from ops.merge import TokenMerge

    x, size, metric, _ = _step_inputs(197, 384, 64, False, 64, device)
    result = {}
    for fused in (False, True):
        merge = TokenMerge(MergeStep("pitome_bsm", 19, 0.75), 1)
        merge.fused = fused
        with torch.no_grad():
            result[f"kernels_per_layer_{'fused' if fused else 'decomposed'}"] = _kernels_per_call(
                lambda merge=merge: merge(x, size, metric)
            )
    merge = TokenMerge(MergeStep("pitome_bsm", 19, 0.75), 1)
    merge.fused = True
    try:
        compiled = torch.compile(merge, fullgraph=True)
        with torch.no_grad():
            out, _ = compiled(x, size, metric)
            expected, _ = merge(x, size, metric)
        result["torch_compile_fullgraph"] = "ok" if torch.equal(out, expected) else "ran, different output"
    except Exception as exc:  # noqa: BLE001 - recorded, the other checks go on
        result["torch_compile_fullgraph"] = f"failed: {_error(exc)}"
    return result


def check_models(device: torch.device) -> list[dict]:
    """Fused vs decomposed logits of the targets' models (random init), FP32 and FP16 autocast."""
    from exporter.signatures import ExportWrapper, signature_of
    from ops import patch_model, repatch
    from pipelines.models.registry import load_model, resolve

    rows = []
    for name, ratio, seq_len in (("deit_small", 0.9, None), ("bert_base", 0.7, 128)):
        spec = resolve(name)
        model, _ = load_model(spec, random_init=True)
        text = {"seq_len": seq_len} if seq_len else {}
        decomposed = patch_model(model, ratio=ratio, **text)
        fused = repatch(copy.deepcopy(decomposed), merge_impl="fused")
        signature = signature_of(decomposed, seq_len)
        feeds = signature.example_inputs(16, seed=0)
        inputs = tuple(feeds[n].to(device) for n in signature.input_names)
        wrapped = {k: ExportWrapper(m, signature).eval().to(device) for k, m in (("d", decomposed), ("f", fused))}
        for precision in ("fp32", "fp16"):
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16, enabled=precision == "fp16"):
                ref, out = (wrapped[k](*inputs).float() for k in ("d", "f"))
            rows.append(
                {
                    "model": name + (f" (seq {seq_len})" if seq_len else ""),
                    "precision": precision,
                    "max_abs_logit_difference": (out - ref).abs().max().item(),
                    "top1_agreement": (out.argmax(-1) == ref.argmax(-1)).float().mean().item(),
                }
            )
    return rows


def run_grid(out: Path, runs: int, log) -> list[dict]:
    """The targets' latency grid, one `benchmarks.gpu_latency` run per model; its rows."""
    from benchmarks import gpu_latency

    rows = []
    for model, ratio, seq_len, batches, precisions, modes in GRID:
        folder = out / (model + (f"_seq{seq_len}" if seq_len else ""))
        argv = ["--models", model, "--ratios", str(ratio), "--algos", "pitome", "--runs", str(runs)]
        argv += ["--batches", *map(str, batches), "--precisions", *precisions, "--modes", *modes]
        argv += ["--out", str(folder)] + (["--seq-lens", str(seq_len)] if seq_len else [])
        log(f"gpu_latency {' '.join(argv)}")
        gpu_latency.main(argv)
        rows += json.loads((folder / "gpu_latency.json").read_text())["rows"]
    return rows


def judge_targets(rows: list[dict]) -> list[dict]:
    """Issue 20's targets against the measured rows (CUDA graph, fused variant)."""
    verdicts = []
    for model, precision, batch, minimum in TARGETS:
        found = [
            r
            for r in rows
            if r["model"] == model and r["precision"] == precision and r["batch"] == batch and r["mode"] == "graph"
        ]
        fused = next((r for r in found if r["merge_impl"] == "fused"), None)
        decomposed = next((r for r in found if r["merge_impl"] == "decomposed"), None)
        verdicts.append(
            {
                "target": f"{model} {precision} batch {batch} >= {minimum}x",
                "fused_speedup": fused and fused["speedup"],
                "decomposed_speedup": decomposed and decomposed["speedup"],
                "fused_merge_share": fused and fused["merge_share"],
                "met": None if fused is None else fused["speedup"] >= minimum,
                "merge_share_met": None
                if fused is None or fused["merge_share"] is None or (precision, batch) != ("fp16", 64)
                else fused["merge_share"] <= MAX_MERGE_SHARE,
            }
        )
    return verdicts


def markdown(record: dict) -> str:
    """The record for people: one table per stage."""
    lines = ["# Fused merge: device check", "", f"`{record['command']}` on {record['device']}", ""]
    for stage in ("compiled", "steps", "layer", "models", "grid", "targets"):
        value = record.get(stage)
        if value is None:
            continue
        lines += [f"## {stage}", ""]
        table = value if isinstance(value, list) else [value]
        if table:
            keys = list(table[0])
            lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
            lines += ["| " + " | ".join(_cell(row.get(k)) for k in keys) + " |" for row in table]
        lines.append("")
    return "\n".join(lines)


def _cell(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.device_check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS / "gpu" / "fused", help="folder for every result")
    parser.add_argument("--runs", type=int, default=50, help="timed runs per latency candidate")
    parser.add_argument("--skip-grid", action="store_true", help="parity checks only, no latency grid")
    parser.add_argument("--compile-workers", type=int, default=6, help="processes compiling kernels first (0: none)")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be >= 1")
    if not torch.cuda.is_available():
        parser.exit(4, "error: no CUDA device visible to PyTorch: the device check runs the fused kernels on a GPU\n")
    from benchmarks.gpu_latency import environment

    device = torch.device("cuda")
    args.out.mkdir(parents=True, exist_ok=True)
    record = {
        "command": " ".join(["python -m benchmarks.device_check", *(argv if argv is not None else sys.argv[1:])]),
        "device": torch.cuda.get_device_name(device),
        "environment": environment(device),
        "seconds": {},
    }
    stages = [("steps", check_steps), ("layer", check_layer), ("models", check_models)]
    if args.compile_workers > 0:
        stages.insert(0, ("compiled", lambda device: precompile(args.compile_workers)))
    if not args.skip_grid:
        stages.append(("grid", lambda device: run_grid(args.out, args.runs, print)))
    failed = []
    for stage, run in stages:
        began = time.perf_counter()
        print(f"device check: {stage}", flush=True)
        try:
            record[stage] = run(device)
        except Exception as exc:  # noqa: BLE001 - one stage's failure must not cost the others' GPU time
            traceback.print_exc()
            record[stage], stage = {"error": _error(exc)}, f"{stage} (failed)"
            failed.append(stage)
        record["seconds"][stage] = round(time.perf_counter() - began, 1)
        if stage == "grid":
            record["targets"] = judge_targets(record.pop("grid"))
        _write(args.out, record)
    print(markdown(record))
    return 1 if failed else 0


def _write(out: Path, record: dict) -> None:
    from exporter.atomic import atomic_write_text

    atomic_write_text(out / "device_check.json", json.dumps(record, indent=2))
    atomic_write_text(out / "device_check.md", markdown(record))


if __name__ == "__main__":
    sys.exit(main())
