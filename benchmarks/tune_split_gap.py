"""How far tune's accuracy estimate is from the held-out figure, with the tuning split it used
before (the packaged data set's training split, which the shipped models were fitted on) and with
the one it uses now (a seeded, class-stratified half of the test split, the other half quoted).

    python -m benchmarks.tune_split_gap                          # both models
    python -m benchmarks.tune_split_gap --models vit_fmnist      # one

For every uniform PiToMe and ToMe schedule of the model's grid, the eager FP32 model's top-1 drop
against the unmerged model is measured on each split (tune's pre-filter scores trials the same
way; the FP32 export equals it to ~1e-6). The estimate gap of a schedule is its drop on the
quoted test split minus its drop on the tuning split: positive when the tuning split promised
less loss than new data shows. Results: `benchmarks/results/tune/split_gap.{json,md}`.
"""

from __future__ import annotations

import argparse
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from benchmarks.records import write_record
from pipelines.jobs.options import choice_list

RESULTS = Path(__file__).resolve().parent / "results" / "tune"
TUNE_SAMPLES = 5000  # tune's default --tune-samples
PARTITIONS = 20  # seeded halvings of the test split (tune's --seed) the "after" gap is also averaged over


@dataclass(frozen=True)
class Grid:
    data: str  # the packaged data set (its test split; ":train" its training split)
    ratios: tuple[float, ...]


GRIDS = {
    "vit_fmnist": Grid("fashion-mnist", (0.95, 0.9, 0.85)),
    "minilm_sentiment": Grid("rotten-tomatoes", (0.8, 0.7)),
}


BATCH = 256  # eager scoring batch (the figures do not depend on it: FP32 eager, no dynamic quantization)


def correct(model: torch.nn.Module, signature, data) -> np.ndarray:
    """Per sample of `data`, whether the model's top-1 is the label."""
    from exporter.signatures import ExportWrapper

    wrapper = ExportWrapper(model, signature).eval()
    right = []
    with torch.no_grad():
        for feeds, labels in data.batches(BATCH):
            logits = wrapper(*(torch.from_numpy(feeds[name]) for name in signature.input_names)).numpy()
            right.append(logits.reshape(len(labels), -1).argmax(-1) == labels)
    return np.concatenate(right)


def splits(name: str, grid: Grid, model, signature, seq_len: int | None) -> dict:
    """The two scored sets: a training-split sample (tune's old tuning split) and the full test
    split, whose seeded halves (tune's `split_held_out`) are taken by index afterwards."""
    from pipelines.data.labelled import stratified_sample, subset
    from pipelines.jobs.export_job import ExportJob
    from pipelines.jobs.stages import open_data
    from pipelines.models.registry import resolve

    spec = resolve(name)
    job = ExportJob(model=name, data=grid.data)
    test = open_data(job, spec, model, seq_len, signature)
    job.data = f"{grid.data}:train"
    train = open_data(job, spec, model, seq_len, signature)
    train = subset(train, stratified_sample(train.labels, TUNE_SAMPLES, 0), f"{train.description}, {TUNE_SAMPLES}")
    return {"train sample": train, "full test": test}


def halves(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(tuning half, quoted half) of the test split as masks: `split_held_out(data, seed)`."""
    from pipelines.data.labelled import stratified_sample

    tuning = np.zeros(len(labels), dtype=bool)
    tuning[stratified_sample(labels, len(labels) // 2, seed)] = True
    return tuning, ~tuning


def drop(reference: np.ndarray, merged: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Top-1 points lost by `merged` against `reference` (per-sample correctness) on `mask`."""
    if mask is not None:
        reference, merged = reference[mask], merged[mask]
    return 100.0 * float(reference.mean() - merged.mean())


def schedule_row(algo: str, ratio: float, reference: dict, scored: dict, labels: np.ndarray) -> dict:
    """A schedule's drops on every split, the gap before, and the gap after on seed 0's halving
    and over PARTITIONS seeded halvings (mean, standard deviation, mean |gap|)."""
    test = reference["full test"], scored["full test"]
    tuning, quoted = halves(labels, 0)
    drops = {
        "train sample": drop(reference["train sample"], scored["train sample"]),
        "full test": drop(*test),
        "test tuning half": drop(*test, tuning),
        "test quoted half": drop(*test, quoted),
    }
    gaps = []
    for seed in range(PARTITIONS):
        tuning, quoted = halves(labels, seed)
        gaps.append(drop(*test, quoted) - drop(*test, tuning))
    return {
        "algo": algo, "ratio": ratio, "drop_points": drops, "gap_before": drops["full test"] - drops["train sample"],
        "gap_after": gaps[0], "gap_after_partitions": {"mean": float(np.mean(gaps)), "sd": float(np.std(gaps)),
                                                       "mean_abs": float(np.mean(np.abs(gaps)))},
    }  # fmt: skip


def measure(name: str, grid: Grid, threads: int) -> dict:
    """Per-sample correctness of the unmerged model and every uniform schedule; the gaps."""
    from exporter.signatures import signature_of
    from exporter.variants import Variant, variant_model
    from pipelines.models.registry import load_model, resolve

    torch.set_num_threads(threads)
    spec = resolve(name)
    model, _ = load_model(spec, None, False)
    signature = signature_of(model, spec.seq_len)
    data = splits(name, grid, model, signature, spec.seq_len)
    labels = data["full test"].labels
    reference = {split: correct(model, signature, d) for split, d in data.items()}
    rows = []
    for algo in ("pitome", "tome"):
        for ratio in grid.ratios:
            variant = Variant(f"{algo} {ratio}", algo, ratio=ratio)
            patched = variant_model(model, variant, spec.seq_len if spec.kind == "text" else None)
            scored = {split: correct(patched, signature, d) for split, d in data.items()}
            rows.append(schedule_row(algo, ratio, reference, scored, labels))
            print(f"{name} {algo} {ratio}: " + ", ".join(f"{k} {v:+.2f}" for k, v in rows[-1]["drop_points"].items()),
                  flush=True)  # fmt: skip
    tuning, quoted = halves(labels, 0)
    return {
        "model": name, "splits": [d.description for d in data.values()], "test_halves": [int(tuning.sum()),
                                                                                       int(quoted.sum())],
        "unmerged_top1": {split: float(r.mean()) for split, r in reference.items()}, "rows": rows,
        "mean_gap_before": float(np.mean([r["gap_before"] for r in rows])),
        "mean_abs_gap_before": float(np.mean([abs(r["gap_before"]) for r in rows])),
        "mean_gap_after": float(np.mean([r["gap_after_partitions"]["mean"] for r in rows])),
        "mean_abs_gap_after": float(np.mean([r["gap_after_partitions"]["mean_abs"] for r in rows])),
    }  # fmt: skip


def markdown(results: list[dict], setup: dict) -> str:
    lines = [
        "# Tune's estimate gap: training split vs a held-out half of the test split",
        "",
        f"Measured {setup['date']} on {setup['cpu']}, {setup['threads']} threads, torch {setup['torch']}; "
        f"`python -m benchmarks.tune_split_gap` ({setup['seconds']:.0f} s). Drops are top-1 points lost against the "
        "unmerged model by the eager FP32 model; gap = drop on the quoted test split - drop on the tuning split.",
        "",
        "Before: tuning on a 5,000-sample stratified draw of the training split (what the shipped models were fitted "
        "on), quoting the full test split. After (tune today): tuning on a seeded class-stratified half of the test "
        f"split, quoting the other half: seed 0's halves, and the gap over {PARTITIONS} seeded halvings (mean +- sd).",
        "",
    ]
    for result in results:
        lines += [
            f"## {result['model']}",
            "",
            f"Test split halves: {result['test_halves'][0]} + {result['test_halves'][1]} samples.",
            "",
            "| schedule | drop, train sample | drop, full test | gap before | drop, tuning half | drop, quoted half "
            f"| gap after | gap after, {PARTITIONS} halvings |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for row in result["rows"]:
            d = row["drop_points"]
            lines.append(
                f"| {row['algo']} {row['ratio']} | {d['train sample']:.2f} | {d['full test']:.2f} "
                f"| {row['gap_before']:+.2f} | {d['test tuning half']:.2f} | {d['test quoted half']:.2f} "
                f"| {row['gap_after']:+.2f} | {row['gap_after_partitions']['mean']:+.2f} +- "
                f"{row['gap_after_partitions']['sd']:.2f} |"
            )
        lines += [
            "",
            f"Mean gap before {result['mean_gap_before']:+.2f} points (mean |gap| {result['mean_abs_gap_before']:.2f}); "
            f"after, over the {PARTITIONS} halvings, {result['mean_gap_after']:+.2f} (mean |gap| "
            f"{result['mean_abs_gap_after']:.2f}).",
            "",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models", type=choice_list(tuple(GRIDS), "model"), default=list(GRIDS), help=f"of {','.join(GRIDS)}"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    names = args.models
    began = time.monotonic()
    results = [measure(name, GRIDS[name], args.threads) for name in names]
    from exporter.runners import cpu_name

    setup = {
        "date": time.strftime("%Y-%m-%d"), "cpu": cpu_name(), "threads": args.threads,
        "torch": torch.__version__, "python": platform.python_version(), "seconds": time.monotonic() - began,
    }  # fmt: skip
    write_record(args.out, "split_gap", {"setup": setup, "results": results}, markdown(results, setup))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
