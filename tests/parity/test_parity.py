"""Parity suite: every model family x algo x schedule x lowering, exported and run on ONNX Runtime.

Each case exports once (dynamic batch) and compares ONNX Runtime with the PyTorch reference at
batch sizes 1 and 4 with the FP32 defaults (atol 1e-4 / rtol 1e-3, top-1 100%). CI runs the
cases in CI_CASES (every model and algo, both lowerings, a ratio and an explicit schedule);
`make test-heavy` runs the whole grid and the full-size DeiT.
"""

from __future__ import annotations

import itertools

import pytest

from exporter.onnx_export import export_onnx
from exporter.parity import TOLERANCES, check_parity, parity_feeds
from exporter.runners import TorchRunner, ort_runner
from exporter.signatures import signature_of
from ops import patch_model
from tests.models import small_text, small_vit

MODELS = ("deit", "distilled", "layerscale", "mae", "bert", "distilbert")
ALGOS = ("pitome", "tome")
SCHEDULES = ("r0.9", "r0.95", "explicit")
LOWERINGS = ("matmul", "scatter")
EXPLICIT = {"vision": [8, 4, 0, 6], "text": [5, 0, 3, 0]}
CI_CASES = {
    *((m, a, "r0.9", "matmul") for m in MODELS for a in ALGOS),
    ("deit", "pitome", "explicit", "scatter"),
    ("deit", "tome", "r0.95", "scatter"),
    ("distilled", "pitome", "r0.95", "scatter"),
    ("bert", "pitome", "explicit", "scatter"),
    ("distilbert", "tome", "r0.95", "scatter"),
}


def build(model_name: str, algo: str, schedule: str, lowering: str):
    is_text = model_name in ("bert", "distilbert")
    model = small_text(model_name) if is_text else small_vit(model_name)
    kwargs = {"seq_len": 32} if is_text else {}
    if schedule == "explicit":
        kwargs["schedule"] = EXPLICIT["text" if is_text else "vision"]
    else:
        kwargs["ratio"] = float(schedule[1:])
    return patch_model(model, algo=algo, lowering=lowering, **kwargs)


def run_parity(model, path):
    export_onnx(model, None, path)
    signature = signature_of(model)
    feeds = parity_feeds(signature, batch_sizes=(1, 4), batches_per_size=2)
    return check_parity(TorchRunner(model, signature, "cpu"), ort_runner(path, threads=2), feeds, TOLERANCES["fp32"])


GRID = list(itertools.product(MODELS, ALGOS, SCHEDULES, LOWERINGS))


@pytest.mark.parametrize(
    ("model_name", "algo", "schedule", "lowering"),
    [pytest.param(*case, marks=() if case in CI_CASES else pytest.mark.heavy) for case in GRID],
)
def test_onnx_matches_pytorch(tmp_path, model_name, algo, schedule, lowering):
    model = build(model_name, algo, schedule, lowering)
    report = run_parity(model, tmp_path / "model.onnx")
    assert report.samples == 10 and report.batch_sizes == [1, 4]
    (logits,) = report.outputs
    assert report.passed, report.verdict()
    assert logits.top1_agreement == 1.0 and logits.min_cosine > 0.99999


@pytest.mark.heavy
@pytest.mark.parametrize("algo", ALGOS)
def test_full_size_deit_tiny(tmp_path, algo):
    import timm

    model = patch_model(timm.create_model("deit_tiny_patch16_224").eval(), algo=algo, ratio=0.9)
    report = run_parity(model, tmp_path / "model.onnx")
    assert report.passed, report.verdict()
