"""The CLI on Hugging Face vision models: folders read by their config.json, refusals, outputs."""

from __future__ import annotations

import json

import pytest

from pipelines.models.registry import REGISTRY, resolve
from tests.cli_helpers import cli, one_line_error
from tests.models import small_hf_vision


def test_short_names_are_hf_vision_models():
    sources = {name: REGISTRY[name].source for name in ("vit_base_hf", "clip_b16", "dinov2_small")}
    assert sources == {"vit_base_hf": "google/vit-base-patch16-224", "clip_b16": "openai/clip-vit-base-patch16",
                       "dinov2_small": "facebook/dinov2-small"}  # fmt: skip
    assert {REGISTRY[name].kind for name in sources} == {"hf_vision"}


def test_random_init_short_names_build_the_published_architectures_offline():
    from pipelines.models.registry import load_model

    built = {}
    for name in ("vit_base_hf", "clip_b16", "dinov2_small"):
        model, origin = load_model(REGISTRY[name], random_init=True)
        assert origin == "random-init"
        built[name] = (type(model).__name__, model.config.hidden_size, model.config.num_hidden_layers)
    assert built == {"vit_base_hf": ("ViTForImageClassification", 768, 12),
                     "clip_b16": ("CLIPVisionModelWithProjection", 768, 12), "dinov2_small": ("Dinov2Model", 384, 12)}  # fmt: skip


def test_clip_random_init_from_a_full_clip_config_builds_the_image_tower(tmp_path):
    from transformers import CLIPConfig

    from pipelines.models.registry import load_model

    vision = small_hf_vision("clip", layers=1).config.to_dict()
    CLIPConfig(text_config={"num_hidden_layers": 1}, vision_config=vision).save_pretrained(tmp_path)
    model, _ = load_model(resolve(str(tmp_path)), random_init=True)
    assert type(model).__name__ == "CLIPVisionModelWithProjection" and model.config.image_size == 64


def test_a_folders_kind_is_read_from_its_config(tmp_path):
    small_hf_vision("dinov2", layers=1).config.save_pretrained(tmp_path / "vision")
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert resolve(str(tmp_path / "vision")).kind == "hf_vision"
    assert resolve(str(tmp_path / "text")).kind == "text"


@pytest.mark.parametrize(
    ("model_type", "reason"),
    [("swin", "windowed"), ("beit", "relative position biases"), ("siglip_vision_model", "attention-pooling"),
     ("dinov3_vit", "rotary position embeddings"), ("resnet", "model_type 'resnet' is not supported")],
)  # fmt: skip
def test_unsupported_families_exit_2_with_the_reason(tmp_path, model_type, reason):
    folder = tmp_path / model_type
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
    result = cli(str(folder), "--checkpoint", str(folder), "-o", str(tmp_path / "out"))
    one_line_error(result, 2, reason)
    assert not (tmp_path / "out").exists()


def test_random_init_from_a_config_folder_writes_a_folder_optimum_loads(tmp_path):
    """Config only, no weights: the job builds the model, and the output folder holds config.json and
    the family's default preprocessor_config.json beside model.onnx."""
    folder, out = tmp_path / "vit", tmp_path / "art"
    small_hf_vision("vit", layers=1).config.save_pretrained(folder)
    result = cli(str(folder), "--random-init", "--ratio", "0.9", "--no-bench", "-o", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    processor = json.loads((out / "preprocessor_config.json").read_text())
    assert processor["image_processor_type"] == "ViTImageProcessor" and processor["size"]["height"] == 64
    assert json.loads((out / "config.json").read_text())["model_type"] == "vit"
    assert "RANDOM-INIT" in (out / "report.md").read_text()


def _image_folder(root, size: int = 64):
    from PIL import Image

    for label in range(2):
        (root / str(label)).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (size + 8, size), (120 * label, 40 * i, 90)).save(root / str(label) / f"{i}.png")
    return root


def test_accuracy_on_an_image_folder_for_a_classifier_and_none_for_features(tmp_path):
    data = _image_folder(tmp_path / "images")
    for kind in ("dinov2", "dinov2_model"):
        folder = tmp_path / kind
        small_hf_vision(kind, layers=1).save_pretrained(folder)
        result = cli(str(folder), "--checkpoint", str(folder), "--data", str(data), "--no-bench",
                     "-o", str(tmp_path / f"out_{kind}"))  # fmt: skip
        assert result.returncode == 0, result.stderr[-2000:]
        scored = (tmp_path / f"out_{kind}" / "accuracy.json").exists()
        assert scored == (kind == "dinov2")
        assert ("no accuracy stage" in result.stdout) == (kind == "dinov2_model")


def test_dinov2_runs_at_its_processors_crop_merged_and_unmerged(tmp_path):
    """The published DINOv2 config says 518 but its processor crops 224: the export, the unmerged
    baseline and the latency stage all run at the crop."""
    from pipelines.models.image_processor import default_config

    folder, out = tmp_path / "dinov2", tmp_path / "art"
    small_hf_vision("dinov2", layers=1).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(default_config("dinov2", 48)))
    result = cli(str(folder), "--checkpoint", str(folder), "--ratio", "0.9", "--batch", "1", "--runs", "1",
                 "-o", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((out / "schedule.json").read_text())["tokens_in"][0] == 1 + 36
    assert json.loads((out / "bench.json").read_text())["batch"] == 1
