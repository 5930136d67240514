"""The vit_fmnist training script: runs, checkpoints every epoch, resumes, writes weights and a card."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.data_helpers import write_idx


@pytest.fixture
def tiny_fmnist(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 48), ("t10k", 24)):
        write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return tmp_path


def test_trains_resumes_and_finishes(tmp_path, tiny_fmnist):
    from pipelines.models.vit_fmnist import build
    from pipelines.training.train_vit_fmnist import main

    out = tmp_path / "run"
    common = ["--data", str(tiny_fmnist), "--out", str(out), "--batch-size", "16", "--threads", "1"]
    assert main([*common, "--epochs", "1"]) == 0  # an interrupted run: one epoch done
    first = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in first] == [1] and (out / "last.pt").exists()
    assert main([*common, "--epochs", "2"]) == 0  # resumes at epoch 2, keeps epoch 1's record
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2] and history[0] == first[0]
    model = build(str(out / "model.safetensors"))  # the loader `vit_fmnist --checkpoint` uses
    assert model(torch.zeros(1, 1, 28, 28)).shape == (1, 10)
    card = (out / "card.md").read_text()
    assert "trained by pitome-export; not a published checkpoint" in card and "test accuracy (unmerged)" in card


def test_missing_data_is_exit_2(tmp_path, capsys):
    from pipelines.training.train_vit_fmnist import main

    assert main(["--data", str(tmp_path), "--out", str(tmp_path / "o"), "--epochs", "1"]) == 2
    assert "install dataset-fashion-mnist or pass --data DIR" in capsys.readouterr().err


def test_augment_keeps_shape_and_is_seeded():
    from pipelines.training.train_vit_fmnist import augment

    x = torch.randn(6, 1, 28, 28)
    a = augment(x, torch.Generator().manual_seed(1))
    b = augment(x, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.equal(a, b)
