"""Wrong exports fail, from the library and from the CLI: non-finite outputs, accuracy that cannot
tell, and merge decisions taken by another rule (the near-tie rescue itself: tests/parity/test_near_ties.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from exporter.agreement import AcceptanceRule, check_reduced_precision
from exporter.parity import TOLERANCES, check_parity, parity_feeds
from exporter.runners import TorchRunner, ort_runner
from exporter.signatures import signature_of
from tests.cli_helpers import cli, one_line_error
from tests.models import small_hf_vision
from tests.parity.test_near_ties import tome_matching, wrong_while_exporting


def scaled_first_output(src: Path, dst: Path, factor: float, where: slice = slice(None)) -> Path:
    """A copy of `src` whose first output is multiplied by `factor` at the positions `where` of
    its last axis (1 elsewhere): what a broken conversion would write."""
    model = onnx.load(str(src))
    out = model.graph.output[0]
    width = out.type.tensor_type.shape.dim[-1].dim_value
    scale = np.ones(width, dtype=np.float32)
    scale[where] = factor
    model.graph.initializer.append(numpy_helper.from_array(scale, "broken_scale"))
    raw = out.name + "_unbroken"
    for node in model.graph.node:
        node.output[:] = [raw if name == out.name else name for name in node.output]
    model.graph.node.append(helper.make_node("Mul", [raw, "broken_scale"], [out.name]))
    onnx.save(model, str(dst))
    return dst


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_outputs_fail_fp32_parity_and_report_it(tmp_path, deit_pitome_export, bad):
    model, path = deit_pitome_export.model(), deit_pitome_export.path
    broken = scaled_first_output(path, tmp_path / "broken.onnx", bad, slice(0, 1))
    feeds = parity_feeds(signature_of(model), batch_sizes=(2,), batches_per_size=1)
    report = check_parity(TorchRunner(model, signature_of(model), "cpu"), ort_runner(broken), feeds, TOLERANCES["fp32"])
    (logits,) = report.outputs
    assert not report.passed and not logits.passed
    assert np.isnan(logits.max_abs) or np.isinf(logits.max_abs)  # never reported as 0
    assert "FAILED" in report.verdict() and ("nan" in report.verdict() or "inf" in report.verdict())


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_reduced_graphs_fail_the_cosine_acceptance(tmp_path, deit_pitome_export, bad):
    """The review's case: 'PASSED ... mean nan (bound 0.99)'."""
    path = deit_pitome_export.path
    broken = scaled_first_output(path, tmp_path / "reduced.onnx", bad, slice(0, 1))
    feeds = parity_feeds(signature_of(deit_pitome_export.model()), batch_sizes=(2,), batches_per_size=1)
    report = check_reduced_precision("int8", path, broken, feeds)
    assert not report.passed and report.nonfinite == 2  # the first logit of both samples
    verdict = report.verdict()
    assert verdict.startswith("FAILED") and "Inf or NaN where FP32's are finite" in verdict, verdict


def test_accuracy_at_chance_does_not_decide(tmp_path, deit_pitome_export):
    """Random-init weights (or a model for other data) score at chance, merged or broken: the
    outputs must decide, or any broken graph keeps the budget."""
    path = deit_pitome_export.path
    broken = scaled_first_output(path, tmp_path / "reduced.onnx", -1.0)  # logits negated: cosine -1
    feeds = parity_feeds(signature_of(deit_pitome_export.model()), batch_sizes=(2,), batches_per_size=1)
    report = check_reduced_precision("int8", path, broken, feeds)
    at_chance = {"data": "images", "samples": 400, "top1": {"merged": 0.10, "merged fp32": 0.105}, "chance": 0.1}
    report.attach_accuracy(at_chance)
    assert report.decided_by == "outputs" and not report.passed
    assert "not deciding: FP32 merged scores 10.50%, at chance" in report.verdict()
    informative = {**at_chance, "top1": {"merged": 0.70, "merged fp32": 0.702}}
    report.attach_accuracy(informative)
    assert report.decided_by == "accuracy" and report.passed  # what accuracy decides, when it can
    report.attach_accuracy(informative, why_not="random-init weights: accuracy means nothing")
    assert report.decided_by == "outputs" and not report.passed


def test_rule_bounds_are_not_passed_by_nan():
    from exporter.agreement import AgreementReport

    report = AgreementReport("fp16", 4, AcceptanceRule(), 1.0, float("nan"), float("nan"), float("nan"), classes=10)
    assert not report.passed and "mean nan" in report.verdict()


# The CLI: exit 3 and one line for each of the review's false PASS cases.


def hf_folder(tmp_path: Path, kind: str) -> Path:
    folder = tmp_path / kind
    small_hf_vision(kind, layers=2).config.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("kind", ["vit", "clip"])
def test_cli_fails_a_graph_that_decides_like_tome(tmp_path, monkeypatch, kind):
    wrong_while_exporting(monkeypatch, tome_matching)
    out = tmp_path / "out"
    result = cli(hf_folder(tmp_path, kind), "--random-init", "--ratio", "0.9", "--no-bench", "-o", out)
    one_line_error(result, 3, "parity FAILED")
    assert "decides by another rule" in result.stderr
    parity = json.loads((out / "parity.json").read_text())  # artifacts kept for inspection
    assert parity["passed"] is False and parity["decisions"]["mismatch"]


def broken_conversion(monkeypatch, factor: float, where: slice = slice(None)) -> None:
    """The job's precision conversion writes a graph whose logits are scaled by `factor`."""
    import exporter.quantize as quantize

    real = quantize.convert_precision

    def convert(src, dst, *args, **kwargs):
        real(src, dst, *args, **kwargs)
        return scaled_first_output(Path(dst), Path(dst), factor, where)

    monkeypatch.setattr(quantize, "convert_precision", convert)


def test_cli_fails_a_reduced_graph_with_inf_outputs(tmp_path, monkeypatch):
    broken_conversion(monkeypatch, np.inf, slice(0, 1))
    result = cli("test_vit", "--random-init", "--ratio", "0.9", "--precision", "fp16", "--no-bench",
                 "-o", tmp_path / "out")  # fmt: skip
    one_line_error(result, 3, "fp16 parity FAILED")
    assert "Inf or NaN where FP32's are finite" in result.stderr


def test_cli_random_init_with_data_is_accepted_by_outputs_not_chance_accuracy(tmp_path, monkeypatch):
    from tests.test_hf_vision_cli import _image_folder

    broken_conversion(monkeypatch, -1.0)
    images = _image_folder(tmp_path / "images", size=160)  # test_vit's input size
    result = cli("test_vit", "--random-init", "--ratio", "0.9", "--precision", "int8", "--no-bench",
                 "--data", images, "-o", tmp_path / "out")  # fmt: skip
    one_line_error(result, 3, "int8 parity FAILED")
    assert "random-init weights: accuracy means nothing" in result.stderr


def test_cli_random_init_with_data_and_an_honest_conversion_passes(tmp_path):
    from tests.test_hf_vision_cli import _image_folder

    images = _image_folder(tmp_path / "images", size=160)
    result = cli("test_vit", "--random-init", "--ratio", "0.9", "--precision", "int8", "--no-bench",
                 "--data", images, "-o", tmp_path / "out")  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    agreement = json.loads((tmp_path / "out" / "parity.json").read_text())["precision"]["agreement"]
    assert agreement["passed"] and agreement["decided_by"] == "outputs"
    assert agreement["accuracy"]["uninformative"] == "random-init weights: accuracy means nothing"
