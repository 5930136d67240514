"""The output folder of a text or vision export is a package optimum's ORTModel loads and runs as is."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.cli_helpers import cli

SITE = Path(__file__).resolve().parents[2] / ".optimum-site"


@pytest.mark.skipif(not SITE.is_dir(), reason="optimum side folder missing: run `make optimum-site`")
def test_optimum_loads_and_runs_the_merged_export(tmp_path, text_model_folder):
    out = tmp_path / "art"
    result = cli(str(text_model_folder), "--checkpoint", str(text_model_folder), "--seq-len", "32",
                 "--ratio", "0.7", "--no-bench", "-o", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    texts = ["a very good film", "the bad plot"]
    env = {**os.environ, "PYTHONPATH": str(SITE)}
    run = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("load_with_optimum.py")), str(out), "32", *texts],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    loaded = json.loads(run.stdout.strip().splitlines()[-1])
    assert loaded["class"] == "ORTModelForSequenceClassification"
    # the same numbers as the patched PyTorch model on the same tokens
    from transformers import AutoTokenizer

    from ops import patch_model
    from pipelines.models.registry import ModelSpec, load_model

    model, _ = load_model(ModelSpec("local", str(text_model_folder), "text"), str(text_model_folder))
    patch_model(model, ratio=0.7, seq_len=32)
    encoded = AutoTokenizer.from_pretrained(text_model_folder)(
        texts, padding="max_length", max_length=32, truncation=True, return_tensors="pt"
    )
    with torch.no_grad():
        expected = model(**encoded).logits
    torch.testing.assert_close(torch.tensor(loaded["logits"]), expected, atol=1e-4, rtol=1e-3)


@pytest.mark.skipif(not SITE.is_dir(), reason="optimum side folder missing: run `make optimum-site`")
@pytest.mark.parametrize(
    ("kind", "task", "output", "outputs"),
    [
        ("vit", "classification", "logits", ["logits"]),
        ("clip_projection", "features", "last_hidden_state", ["image_embeds", "last_hidden_state"]),
        ("dinov2_model", "features", "last_hidden_state", ["last_hidden_state", "pooler_output"]),
    ],
)
def test_optimum_loads_and_runs_a_merged_vision_export(tmp_path, kind, task, output, outputs):
    """ORTModelForImageClassification / ORTModelForFeatureExtraction load the folder as is and give
    the patched PyTorch model's outputs (hidden states with the merged token count)."""
    import numpy as np

    from exporter.signatures import ExportWrapper, as_outputs, signature_of
    from ops import patch_model
    from tests.models import small_hf_vision

    folder, out = tmp_path / kind, tmp_path / "art"
    small_hf_vision(kind, layers=2).save_pretrained(folder)
    result = cli(str(folder), "--checkpoint", str(folder), "--ratio", "0.9", "--no-bench", "-o", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    assert {"config.json", "preprocessor_config.json", "model.onnx"} <= {p.name for p in out.iterdir()}
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    np.save(tmp_path / "pixels.npy", pixels.numpy())
    env = {**os.environ, "PYTHONPATH": str(SITE)}
    script = Path(__file__).with_name("load_vision_with_optimum.py")
    run = subprocess.run(
        [sys.executable, str(script), str(out), task, str(tmp_path / "pixels.npy")],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    loaded = json.loads(run.stdout.strip().splitlines()[-1])
    assert loaded["outputs"] == outputs
    model = patch_model(small_hf_vision(kind, layers=2), ratio=0.9)
    signature = signature_of(model)
    with torch.no_grad():
        expected = dict(zip(signature.output_names, as_outputs(ExportWrapper(model, signature)(pixels))))[output]
    assert expected.shape[1] == (10 if task == "classification" else 65 - 11)  # 64 patches, r = 6, 5
    torch.testing.assert_close(torch.tensor(loaded["value"]), expected, atol=1e-4, rtol=1e-3)
