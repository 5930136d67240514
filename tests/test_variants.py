"""exporter.variants: variants of one loaded model exported from copies and timed together."""

from __future__ import annotations

import torch

from exporter.onnx_export import read_metadata
from exporter.variants import Conversion, Variant, convert_variant, eager_call, export_variant, time_graphs
from ops import patch_model
from tests.models import small_vit


def _state(model: torch.nn.Module) -> dict:
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def test_export_variant_leaves_the_callers_model_unchanged(tmp_path):
    model = patch_model(small_vit(), algo="pitome", ratio=0.9)
    schedule, config, before = model.token_schedule.merges, dict(model.merge_config), _state(model)
    variants = (
        Variant("unmerged"),
        Variant("tome@0.8", "tome", 0.8),
        Variant("explicit", "pitome", schedule=(2, 2, 1, 1), lowering="scatter"),
    )
    exported = {v.name: export_variant(model, v, tmp_path) for v in variants}
    assert model.token_schedule.merges == schedule and model.merge_config == config
    assert all(torch.equal(before[k], v) for k, v in _state(model).items())
    assert not hasattr(exported["unmerged"][1], "token_schedule")
    assert exported["tome@0.8"][1].merge_config["algo"] == "tome"
    assert exported["explicit"][1].token_schedule.merges == [2, 2, 1, 1]
    assert all(path.exists() for path, _ in exported.values())


def test_reduced_variant_is_converted_from_its_fp32_export(tmp_path):
    import onnx

    model = small_vit()
    fp32, _ = export_variant(model, Variant("unmerged"), tmp_path)
    int8 = convert_variant(fp32, Variant("unmerged int8", precision="int8"), tmp_path / "int8.onnx", Conversion())
    assert read_metadata(onnx.load(str(int8), load_external_data=False))["precision"] == "int8"


def test_graphs_and_eager_calls_are_timed_in_one_run(tmp_path):
    from exporter.signatures import signature_of

    model = small_vit()
    signature = signature_of(model)
    graphs = {v.name: export_variant(model, v, tmp_path)[0] for v in (Variant("unmerged"), Variant("p", "pitome"))}
    feeds = signature.example_inputs(2, seed=0)
    arrays = {name: feeds[name].numpy() for name in signature.input_names}
    stats = time_graphs(graphs, arrays, 2, runs=2, threads=1, extra={"eager": eager_call(model, signature, feeds)})
    assert list(stats) == ["unmerged", "p", "eager"] and all(s.runs == 2 for s in stats.values())
