"""Shared fixtures: small random-init models (no hub access), fixed threads for stable numbers."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(2)


def heavy_enabled() -> bool:
    return os.environ.get("PITOME_HEAVY") == "1"


def pytest_collection_modifyitems(config, items):
    if heavy_enabled():
        return
    skip = pytest.mark.skip(reason="heavy (full-size model or full parity grid): set PITOME_HEAVY=1 / make test-heavy")
    for item in items:
        if "heavy" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def text_model_folder(tmp_path):
    """A small BERT classifier with its own WordPiece tokenizer, saved like a Hugging Face folder."""
    from transformers import BertTokenizerFast

    from tests.models import small_text

    folder = tmp_path / "bert_small"
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "film", "a", "very", "plot", "the"]
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    small_text("bert").save_pretrained(folder)
    return folder
