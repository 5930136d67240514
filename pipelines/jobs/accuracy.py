"""Top-1 accuracy of the merged and unmerged ONNX graphs on the same labelled samples, compared
sample by sample, and the per-sample predictions kept for comparisons across exports."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from exporter.atomic import atomic_write
from exporter.runners import ort_session
from pipelines.data.labelled import LabelledData

PREDICTIONS = "predictions.npz"  # beside accuracy.json in an export folder (`save_predictions`)


def _run_padded(session, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """Run a session; a static-batch graph gets its batch filled up with copies of the last row."""
    n = next(iter(feeds.values())).shape[0]
    fixed = session.get_inputs()[0].shape[0]
    if not isinstance(fixed, int) or fixed == n:
        return session.run(None, feeds)[0]
    outputs = []
    for start in range(0, n, fixed):
        chunk = {k: v[start : start + fixed] for k, v in feeds.items()}
        short = fixed - next(iter(chunk.values())).shape[0]
        if short:
            chunk = {k: np.concatenate([v, np.repeat(v[-1:], short, axis=0)]) for k, v in chunk.items()}
        outputs.append(session.run(None, chunk)[0][: fixed - short])
    return np.concatenate(outputs)


def binomial_tail_half(k: int, n: int) -> float:
    """P(X <= k) for X ~ Binomial(n, 1/2), summed in log space: exact to float precision and fast
    for any n (tens of thousands of discordant samples on a large test set)."""
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2) for i in range(k + 1)]
    top = max(logs)
    return math.exp(top) * math.fsum(math.exp(value - top) for value in logs)


def paired_comparison(first: np.ndarray, second: np.ndarray, labels: np.ndarray) -> dict:
    """How two graphs' top-1 differ on the same samples, paired sample by sample.

    The samples both get right or both get wrong cancel, so where the graphs agree on most samples
    the paired interval is far narrower than either accuracy's own: on 10,000 samples at 90%, each
    accuracy's 95% interval is +-0.6 points, while two graphs that disagree on 4% of the samples
    have their difference's at about +-0.4. Returns the samples only `first` gets right and only
    `second` gets right, the 95% confidence interval of `first - second` in points (Agresti and
    Min's adjusted interval for matched pairs: half a sample added to each cell, so that few
    disagreements still give an honest width), and McNemar's exact p-value: the chance of a split
    of the disagreeing samples at least this uneven if both graphs were equally accurate. Below
    about 20 disagreements the interval is approximate; the exact p is not.
    """
    if not first.shape == second.shape == labels.shape or labels.ndim != 1 or len(labels) == 0:
        raise ValueError(f"paired predictions of one shape needed, got {first.shape}, {second.shape}, {labels.shape}")
    first_right, second_right = first == labels, second == labels
    only_first, only_second = int((first_right & ~second_right).sum()), int((second_right & ~first_right).sum())
    adjusted = len(labels) + 2
    difference = (only_first - only_second) / adjusted
    spread = only_first + only_second + 1 - (only_first - only_second) ** 2 / adjusted
    half_width = 1.96 * math.sqrt(spread) / adjusted
    tail = binomial_tail_half(min(only_first, only_second), only_first + only_second)
    return {
        "only_first_right": only_first,
        "only_second_right": only_second,
        "delta_points_ci95": [100.0 * (difference - half_width), 100.0 * (difference + half_width)],
        "mcnemar_p": min(1.0, 2 * tail),
    }


def predict(
    graphs: dict[str, Path], data: LabelledData, batch_size: int = 32, threads: int | None = None, progress=None
) -> dict[str, np.ndarray]:
    """Top-1 class of every sample by every graph, all graphs fed the same batches in one pass."""
    sessions = {name: ort_session(path, threads=threads) for name, path in graphs.items()}
    predictions: dict[str, list[np.ndarray]] = {name: [] for name in sessions}
    for feeds, _ in data.batches(batch_size):
        for name, session in sessions.items():
            logits = _run_padded(session, feeds)
            predictions[name].append(logits.reshape(logits.shape[0], -1).argmax(-1))
        if progress is not None:
            progress()
    return {name: np.concatenate(p) for name, p in predictions.items()}


def accuracy_figures(predicted: dict[str, np.ndarray], data: LabelledData) -> dict:
    """Accuracy of the "merged" and "unmerged" graphs' predictions, their agreement, and the change in
    points with its paired confidence interval (`paired`: merged first, unmerged second; see
    `paired_comparison`). `top1` and `agreement_with_unmerged` list every graph predicted."""
    top1 = {name: float((p == data.labels).mean()) for name, p in predicted.items()}
    merged_pred, unmerged_pred = predicted["merged"], predicted["unmerged"]
    top1_merged, top1_unmerged = top1["merged"], top1["unmerged"]
    return {
        "data": data.description,
        "samples": len(data),
        "top1_merged": top1_merged,
        "top1_unmerged": top1_unmerged,
        "delta_points": 100.0 * (top1_merged - top1_unmerged),
        "agreement": float((merged_pred == unmerged_pred).mean()),
        "paired": paired_comparison(merged_pred, unmerged_pred, data.labels),
        "top1": top1,
        "chance": float(np.bincount(data.labels).max() / len(data)),  # always guessing the most frequent label
        "agreement_with_unmerged": {name: float((p == unmerged_pred).mean()) for name, p in predicted.items()},
    }


def measure_accuracy(
    merged: Path,
    unmerged: Path,
    data: LabelledData,
    batch_size: int = 32,
    threads: int | None = None,
    progress=None,
    extra: dict[str, Path] | None = None,
) -> dict:
    """`accuracy_figures` of the merged and unmerged graphs, and of `extra` graphs (other precisions,
    other ratios) measured on the same samples in the same pass."""
    graphs = {"merged": merged, "unmerged": unmerged, **(extra or {})}
    return accuracy_figures(predict(graphs, data, batch_size, threads, progress), data)


def save_predictions(path: Path, predicted: dict[str, np.ndarray], data: LabelledData) -> None:
    """Every graph's per-sample top-1 with the labels and the data's description, so that two exports
    scored on the same samples (a fine-tuned merged model and the unmerged one fine-tuned alike) can
    later be compared sample by sample (`paired_comparison`)."""
    arrays = {f"graph {name}": p.astype(np.int32) for name, p in predicted.items()}
    arrays.update(labels=np.asarray(data.labels, dtype=np.int32), data=np.array(data.description))

    def write(tmp: str) -> None:
        with open(tmp, "wb") as file:
            np.savez_compressed(file, **arrays)

    atomic_write(path, write)


def load_predictions(path: Path) -> tuple[str, np.ndarray, dict[str, np.ndarray]]:
    """(data description, labels, predictions by graph name) of a `save_predictions` file."""
    with np.load(path) as stored:
        graphs = {key.removeprefix("graph "): stored[key] for key in stored.files if key.startswith("graph ")}
        return str(stored["data"]), stored["labels"], graphs
