"""exporter.variants: variants of one loaded model exported from copies and timed together."""

from __future__ import annotations

import pytest
import torch

from exporter.onnx_export import read_metadata
from exporter.variants import Conversion, Variant, convert_variant, eager_call, export_variant, time_graphs
from ops import patch_model
from tests.models import small_vit

VARIANTS = (
    Variant("unmerged"),
    Variant("tome@0.8", "tome", 0.8),
    Variant("explicit", "pitome", schedule=(2, 1), lowering="scatter"),
)


def _state(model: torch.nn.Module) -> dict:
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A patched model, its state before, and every VARIANTS export of it: (graph, module) by name."""
    model = patch_model(small_vit(depth=2), algo="pitome", ratio=0.9)
    before = (tuple(model.token_schedule.merges), dict(model.merge_config), _state(model))
    folder = tmp_path_factory.mktemp("variants")
    return model, before, {v.name: export_variant(model, v, folder) for v in VARIANTS}


def test_export_variant_leaves_the_callers_model_unchanged(exported):
    model, (schedule, config, state), variants = exported
    assert tuple(model.token_schedule.merges) == schedule and model.merge_config == config
    assert all(torch.equal(state[k], v) for k, v in _state(model).items())
    assert not hasattr(variants["unmerged"][1], "token_schedule")
    assert variants["tome@0.8"][1].merge_config["algo"] == "tome"
    assert tuple(variants["explicit"][1].token_schedule.merges) == (2, 1)
    assert all(path.exists() for path, _ in variants.values())


def test_reduced_variant_is_converted_from_its_fp32_export(exported, tmp_path):
    import onnx

    fp32 = exported[2]["unmerged"][0]
    int8 = convert_variant(fp32, Variant("unmerged int8", precision="int8"), tmp_path / "int8.onnx", Conversion())
    assert read_metadata(onnx.load(str(int8), load_external_data=False))["precision"] == "int8"


def test_graphs_and_eager_calls_are_timed_in_one_run(exported):
    from exporter.signatures import signature_of

    model, _, variants = exported
    signature = signature_of(model)
    feeds = signature.example_inputs(2, seed=0)
    arrays = {name: feeds[name].numpy() for name in signature.input_names}
    graphs = {name: variants[name][0] for name in ("unmerged", "tome@0.8")}
    stats = time_graphs(graphs, arrays, 2, runs=2, threads=1, extra={"eager": eager_call(model, signature, feeds)})
    assert list(stats) == ["unmerged", "tome@0.8", "eager"] and all(s.runs == 2 for s in stats.values())
