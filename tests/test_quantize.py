"""Reduced precision: INT8 (dynamic, static QDQ) and FP16 graphs keep the merge subgraph in FP32,
agreement is measured the way the report says, and bad precision flags fail before any work."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from tests.cli_helpers import cli, one_line_error


@pytest.fixture(scope="module")
def merged_graph(tmp_path_factory, deit_pitome_export):
    """The session's small DeiT PiToMe 0.9 export (conftest; read only) and its debug export."""
    from exporter.onnx_export import export_onnx

    folder = tmp_path_factory.mktemp("quant")
    model = deit_pitome_export.model()
    fp32 = deit_pitome_export.path
    debug = export_onnx(model, None, folder / "debug.onnx", decisions=True)
    return model, fp32, debug, folder


def _feeds(n: int = 3, batch: int = 4, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"pixel_values": rng.standard_normal((batch, 3, 64, 64)).astype(np.float32)} for _ in range(n)]


@pytest.mark.parametrize(("precision", "mode", "marker_ops"), [
    ("int8", "dynamic", {"DynamicQuantizeLinear", "MatMulInteger"}),
    ("int8", "static", {"QuantizeLinear", "DequantizeLinear"}),
    ("fp16", None, set()),
])  # fmt: skip
def test_conversion_keeps_every_merge_node_fp32(merged_graph, precision, mode, marker_ops):
    from exporter.merge_precision import reduced_merge_nodes
    from exporter.onnx_export import read_metadata
    from exporter.quantize import convert_precision, fp32_node_names
    from exporter.runners import ort_session

    _, fp32, _, folder = merged_graph
    out = convert_precision(fp32, folder / f"{precision}-{mode}.onnx", precision, mode or "dynamic", _feeds(), "test")
    proto = onnx.load(out)
    ops = {n.op_type for n in proto.graph.node}
    assert marker_ops <= ops  # the rest of the graph really is reduced
    if precision == "fp16":
        assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in proto.graph.initializer)
        assert [i.type.tensor_type.elem_type for i in proto.graph.input] == [onnx.TensorProto.FLOAT]  # FP32 IO
    assert len(fp32_node_names(proto)) == len(fp32_node_names(onnx.load(fp32))) > 100
    assert reduced_merge_nodes(proto) == []
    meta = read_metadata(proto)
    assert meta["precision"] == precision and meta["int8_mode"] == (mode or "none")
    assert meta["schedule"]["merges"]  # the export's own metadata survives the conversion
    logits = ort_session(out).run(None, _feeds(1)[0])[0]
    reference = ort_session(fp32).run(None, _feeds(1)[0])[0]
    assert logits.shape == reference.shape and 0.05 > np.abs(logits - reference).max() > 0


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_int8_ignores_shape_hints_the_quantizer_would_infer_differently(merged_graph, mode):
    """onnxruntime 1.30's quantizer rejected the exporter's shape hints on timm's head; a graph
    whose hint contradicts inference must still quantize (hints are optional, it infers its own)."""
    from exporter.quantize import convert_precision

    _, fp32, _, folder = merged_graph
    proto = onnx.load(fp32)
    head = proto.graph.node[-1]
    stale = onnx.helper.make_tensor_value_info(head.input[0], onnx.TensorProto.FLOAT, ["batch", 7])
    proto.graph.value_info.append(stale)
    hinted = folder / "stale-hint.onnx"
    onnx.save(proto, hinted)
    out = convert_precision(hinted, folder / f"stale-hint-{mode}.onnx", "int8", mode, _feeds(), "test")
    assert any(n.op_type in ("MatMulInteger", "QuantizeLinear") for n in onnx.load(out).graph.node)


@pytest.mark.parametrize("opset", [18, 20])
def test_ffn_down_projections_are_found_with_gelu_decomposed_or_whole(tmp_path, opset):
    """Opset 20 exports GELU as one node, 18 as Erf arithmetic: either way, one MatMul per block."""
    from exporter.onnx_export import export_onnx
    from exporter.quantize import ffn_out_node_names
    from tests.models import small_vit

    model = small_vit()
    proto = onnx.load(export_onnx(model, None, tmp_path / f"opset{opset}.onnx", opset=opset))
    assert ("Gelu" in {n.op_type for n in proto.graph.node}) == (opset == 20)
    found = ffn_out_node_names(proto)
    assert len(found) == len(model.blocks)
    weights = {i.name: i for i in proto.graph.initializer}
    hidden = model.blocks[0].mlp.fc1.out_features
    for node in proto.graph.node:
        if node.name in found:  # the MatMul reading the FFN's hidden width: fc2
            assert onnx.numpy_helper.to_array(weights[node.input[1]]).shape[0] == hidden
    others = [n for n in proto.graph.node if n.op_type == "MatMul" and n.input[1] in weights and n.name not in found]
    assert len(others) == 3 * len(found)  # qkv, attention output, fc1 per block (the head is a Gemm)
    assert not any(onnx.numpy_helper.to_array(weights[n.input[1]]).shape[0] == hidden for n in others)


def test_report_says_when_no_ffn_down_projection_was_found():
    from pipelines.jobs.report import precision_markdown

    precision = {"precision": "int8", "int8_mode": "static", "calibration": "c", "int8_ffn_out": "fp32",
                 "int8_ffn_fp32_nodes": 0, "agreement": None}  # fmt: skip
    assert any("found no FFN down-projection" in line for line in precision_markdown(precision))
    precision["int8_ffn_fp32_nodes"] = 12
    assert any("the 12 FFN down-projections" in line for line in precision_markdown(precision))


def _quantized_inputs(proto: onnx.ModelProto, names: list[str]) -> list[bool]:
    """For each named node of a QDQ graph: whether its activation input comes out of a DequantizeLinear."""
    producers = {o: n for n in proto.graph.node for o in n.output}
    nodes = {n.name: n for n in proto.graph.node}
    return [producers[nodes[name].input[0]].op_type == "DequantizeLinear" for name in names]


@pytest.mark.parametrize(("ffn_out", "quantized"), [(None, False), ("fp32", False), ("int8", True)])
def test_static_int8_keeps_ffn_down_projections_fp32_unless_asked(merged_graph, ffn_out, quantized):
    from exporter.merge_precision import reduced_merge_nodes
    from exporter.onnx_export import read_metadata
    from exporter.quantize import convert_precision, ffn_out_node_names

    _, fp32, _, folder = merged_graph
    names = ffn_out_node_names(onnx.load(fp32))
    out = convert_precision(fp32, folder / f"static-ffn-{ffn_out}.onnx", "int8", "static", _feeds(), "test", ffn_out)
    proto = onnx.load(out)
    assert _quantized_inputs(proto, names) == [quantized] * len(names)
    fc1 = [n.name for n in proto.graph.node if n.op_type == "MatMul" and n.name not in names][:3]
    assert any(_quantized_inputs(proto, fc1))  # the rest of the model still is INT8
    assert reduced_merge_nodes(proto) == []
    assert read_metadata(proto)["int8_ffn_out"] == ("fp32" if ffn_out is None else ffn_out)


def test_dynamic_int8_quantizes_ffn_down_projections_by_default(merged_graph):
    from exporter.onnx_export import read_metadata
    from exporter.quantize import convert_precision, ffn_out_node_names

    _, fp32, _, folder = merged_graph
    names = set(ffn_out_node_names(onnx.load(fp32)))
    proto = onnx.load(convert_precision(fp32, folder / "dynamic-ffn.onnx", "int8", "dynamic"))
    assert names and not names & {n.name for n in proto.graph.node}  # each became a quantized node
    assert read_metadata(proto)["int8_ffn_out"] == "int8"
    with pytest.raises(ValueError, match="FFN-out precision"):
        convert_precision(fp32, folder / "x.onnx", "int8", "dynamic", ffn_out="int4")


def test_merge_check_sees_a_conversion_that_ignores_the_merge(merged_graph):
    """The check above can fail: converted without the block list, merge nodes show as touched,
    also once `value_info` is gone (graphs too large for shape inference have none)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from exporter.merge_precision import reduced_merge_nodes

    _, fp32, _, _ = merged_graph
    careless = convert_float_to_float16(onnx.load(fp32), keep_io_types=True)
    with_types = reduced_merge_nodes(careless)
    del careless.graph.value_info[:]
    assert reduced_merge_nodes(careless) == with_types and len(with_types) > 50


def _feed_merge_through(proto: onnx.ModelProto, *nodes: onnx.NodeProto) -> str:
    """Put `nodes` (a chain, first reads the tensor) between the first merge decision node and
    its input from outside the merge, keeping names and types; returns the merge node's name."""
    from exporter.onnx_export import merge_node_part

    producers = {out: n for n in proto.graph.node for out in n.output}
    node = next(
        n for n in proto.graph.node
        if merge_node_part(n.name) == "assign" and n.input and n.input[0] in producers
        and merge_node_part(producers[n.input[0]].name) is None
    )  # fmt: skip
    nodes[0].input[0] = node.input[0]
    node.input[0] = nodes[-1].output[0]
    position = list(proto.graph.node).index(node)
    for offset, extra in enumerate(nodes):
        proto.graph.node.insert(position + offset, extra)
    return node.name


@pytest.mark.parametrize("rounding", ["qdq", "fp16-cast"])
@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_merge_check_reads_what_feeds_each_merge_node(merged_graph, rounding, mode):
    """A merge node whose name and op are intact but whose input passes through a Q/DQ pair or
    a cast to float16 reads rounded values: the check names it (by graph structure, not names)."""
    from onnx import TensorProto, helper

    from exporter.merge_precision import reduced_merge_nodes
    from exporter.quantize import convert_precision

    _, fp32, _, folder = merged_graph
    proto = onnx.load(convert_precision(fp32, folder / f"feed-{mode}.onnx", "int8", mode, _feeds(), "test"))
    if rounding == "qdq":
        proto.graph.initializer.extend(
            [helper.make_tensor("inj_scale", TensorProto.FLOAT, [], [0.05]),
             helper.make_tensor("inj_zero", TensorProto.INT8, [], [0])]
        )  # fmt: skip
        chain = (
            helper.make_node("QuantizeLinear", ["t", "inj_scale", "inj_zero"], ["inj_q"], name="inj/Q"),
            helper.make_node("DequantizeLinear", ["inj_q", "inj_scale", "inj_zero"], ["inj_dq"], name="inj/DQ"),
            helper.make_node("Identity", ["inj_dq"], ["inj_out"], name="inj/Identity"),
        )
    else:
        chain = (helper.make_node("Cast", ["t"], ["inj_half"], name="inj/Cast", to=TensorProto.FLOAT16),)
    del proto.graph.value_info[:]
    victim = _feed_merge_through(proto, *chain)
    findings = reduced_merge_nodes(proto)
    assert [f for f in findings if f.startswith(victim + ":")], findings


def test_static_int8_needs_calibration(merged_graph):
    from exporter.quantize import convert_precision

    _, fp32, _, folder = merged_graph
    with pytest.raises(ValueError, match="calibration"):
        convert_precision(fp32, folder / "x.onnx", "int8", "static", None)


def test_group_agreement_ignores_slot_numbering_and_sees_moves():
    from exporter.agreement import same_groups, token_destinations

    layer0 = np.array([[0, 0, 1, 2, 3]])  # tokens 0 and 1 merge
    renumbered = np.array([[3, 3, 2, 1, 0]])  # the same groups under other slot numbers
    moved = np.array([[0, 1, 1, 2, 3]])  # token 1 merges with token 2 instead
    (a,), (b,), (c,) = (token_destinations([s]) for s in (layer0, renumbered, moved))
    assert same_groups(a, b).all()
    assert same_groups(a, c).tolist() == [[False, False, False, True, True]]
    # two layers: destinations compose (layer 1 merges slots 2 and 3 of layer 0)
    path = token_destinations([layer0, np.array([[0, 1, 2, 2]])])
    assert path[1].tolist() == [[0, 0, 1, 2, 2]]


def test_destination_agreement_counts_the_token_that_moved_not_its_hosts():
    """The issue's measure: a token agrees when the token it merges into (itself if it stays) is
    FP32's. Token 1 merging into token 2 instead of token 0 moves one token; 0 and 2 stay put."""
    from exporter.agreement import destinations, same_groups

    start = np.arange(5)[None]
    fp32 = destinations(np.array([[0, 0, 1, 2, 3]]), np.array([[0, 2, 3, 4]]), start)
    moved = destinations(np.array([[0, 1, 1, 2, 3]]), np.array([[0, 2, 3, 4]]), start)
    assert (fp32 == moved).all(-1).tolist() == [[True, False, True, True, True]]
    assert same_groups(np.array([[0, 0, 1, 2, 3]]), np.array([[0, 1, 1, 2, 3]])).sum() == 2  # the stricter figure
    renumbered = destinations(np.array([[3, 3, 2, 1, 0]]), np.array([[4, 3, 2, 0]]), start)
    assert (fp32 == renumbered).all()  # the same decisions under other slot numbers and owner order
    # a later layer names destinations by the input tokens in them: position 0 holds tokens 0 and
    # 1; token 2 (position 1) merges into it, token 3 (position 2) stays
    layer1 = destinations(np.array([[1, 1, 0, 2]]), np.array([[2, 0, 3]]), np.array([[0, 0, 1, 2, 3]]))
    assert layer1[0, 0].tolist() == layer1[0, 2].tolist() == [True, True, False, False, False]
    assert layer1[0, 3].tolist() == [False, False, False, True, False]


def test_layer_figures_name_destinations_by_content():
    """Layer 0: FP32 merges token 1 into 0, INT8 merges 0 into 1 (the same token: the mean is
    symmetric, but both tokens' own destinations differ). Layer 1, alike: token 3 joins that
    token, which is FP32's, so it agrees; the groups agree throughout."""
    from exporter.agreement import layer_figures

    layer1 = [np.array([[0, 1, 0, 2]]), np.array([[0, 1, 3]])]
    fp32 = ([np.array([[0, 0, 1, 2, 3]]), layer1[0]], [np.array([[0, 2, 3, 4]]), layer1[1]])
    int8 = ([np.array([[0, 0, 1, 2, 3]]), layer1[0]], [np.array([[1, 2, 3, 4]]), layer1[1]])
    (own0, groups0), (own1, groups1) = layer_figures(fp32, int8)
    assert own0.tolist() == [False, False, True, True, True] and groups0.all()
    assert own1.all() and groups1.all()
    # token 1 going to token 2 instead: layer 1 then puts token 3 with a different token ({0} not
    # {0, 1}): a different destination, counted; token 4 stays, and agrees
    int8 = ([np.array([[0, 1, 1, 2, 3]]), layer1[0]], [np.array([[0, 2, 3, 4]]), layer1[1]])
    (own0, groups0), (own1, groups1) = layer_figures(fp32, int8)
    assert own0.tolist() == [True, False, True, True, True]
    assert groups0.tolist() == [False, False, False, True, True]
    assert own1.tolist() == [False, True]
    assert groups1.tolist() == [False, False, False, False, True]


def test_agreement_of_a_graph_with_itself_is_total(merged_graph):
    from exporter.agreement import check_reduced_precision

    _, fp32, debug, folder = merged_graph
    report = check_reduced_precision(
        "fp32", fp32, fp32, _feeds(2), debug_export=lambda path: debug, convert=lambda src, dst: src
    )
    assert report.passed and report.top1_agreement == 1.0 and report.min_cosine > 0.999999
    assert set(report.layer_agreement.values()) == {1.0} and set(report.cumulative_agreement.values()) == {1.0}


def test_int8_quantization_moves_some_decisions_and_the_report_says_so(merged_graph):
    """Dynamic INT8 perturbs the keys the merge reads: the report must measure, not assume,
    agreement; gated only when asked, and then by the lowest layer."""
    import dataclasses

    from exporter.agreement import AcceptanceRule, check_reduced_precision
    from exporter.quantize import convert_precision

    _, fp32, debug, folder = merged_graph

    def convert(src, dst):
        return convert_precision(src, dst, "int8", "dynamic")

    reduced = convert(fp32, folder / "int8.onnx")
    report = check_reduced_precision(
        "int8",
        fp32,
        reduced,
        _feeds(3),
        lambda path: debug,
        convert,
        AcceptanceRule(min_cosine=0.0, min_mean_cosine=0.0),
    )
    layers = list(report.cumulative_agreement.values())
    assert all(0.0 <= v <= 1.0 for v in report.layer_agreement.values())
    assert layers == sorted(layers, reverse=True)  # a group once different stays different
    assert report.passed and report.debug_graph["reproduces"]  # decisions reported, not gated
    report.rule = dataclasses.replace(report.rule, min_decisions=1.0, min_top1=1.0)
    lowest = min(report.layer_agreement.values())
    assert report.passed == (report.top1_agreement == 1.0 and lowest == 1.0)
    report.rule = dataclasses.replace(report.rule, min_decisions=lowest, min_top1=None)
    assert report.passed


@pytest.mark.parametrize(
    ("args", "code", "fragment"),
    [
        (["--precision", "int4"], 2, "invalid choice: 'int4'"),
        (["--precision", "fp16", "--calibration", "8"], 2, "--calibration applies to --precision int8"),
        (["--precision", "int8", "--int8-mode", "dynamic", "--calibration", "8"], 2, "with static quantization"),
        (["--int8-mode", "static"], 2, "--int8-mode applies to --precision int8"),
        (["--precision", "fp16", "--int8-ffn-out", "fp32"], 2, "--int8-ffn-out applies to --precision int8"),
        (["--precision", "int8", "--int8-ffn-out", "int4"], 2, "invalid choice: 'int4'"),
        (["--precision", "int8", "--calibration", "/no/such/folder"], 2, "calibration data not found"),
        (["--precision", "int8", "--calibration", "0"], 2, "needs N >= 1"),
        (["--precision", "int8", "--min-top1-agreement", "1.5"], 2, "expected a fraction in [0, 1]"),
        (["--precision", "int8", "--max-accuracy-drop", "-1"], 2, "expected a number of points >= 0"),
        (["--precision", "int8", "--max-accuracy-drop", "half"], 2, "expected a number of points >= 0, got 'half'"),
        (["--precision", "int8", "--min-cosine", "2"], 2, "expected a fraction in [0, 1]"),
        (["--max-accuracy-drop", "1"], 2, "--max-accuracy-drop judges a converted graph"),
        (["--min-decision-agreement", "0.9"], 2, "--min-decision-agreement judges a converted graph"),
        (["--precision", "int8", "--target", "trt"], 4, "TensorRT not installed"),
    ],
)
def test_bad_precision_flags(tmp_path, args, code, fragment):
    result = cli("test_vit", "--random-init", "--no-bench", "-o", str(tmp_path / "out"), *args, timeout=60)
    one_line_error(result, code, fragment)
    assert not (tmp_path / "out").exists()


def test_calibration_data_problems_fail_before_export(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = cli(
        "test_vit", "--random-init", "--precision", "int8", "--calibration", str(empty), "-o", str(tmp_path / "o")
    )
    one_line_error(result, 2, "holds no class folders")
    assert "export ONNX" not in result.stdout
    # N samples of "the model's own data" only exist for the models that ship with their data
    result = cli("test_vit", "--checkpoint", str(_test_vit_checkpoint(tmp_path)), "--precision", "int8",
                 "--int8-mode", "static", "-o", str(tmp_path / "o"))  # fmt: skip
    one_line_error(result, 2, "no packaged training data to calibrate on")


def _test_vit_checkpoint(tmp_path):
    import timm
    from safetensors.torch import save_file

    path = tmp_path / "test_vit.safetensors"
    save_file(timm.create_model("test_vit").state_dict(), str(path))
    return path


def test_int8_static_end_to_end(tmp_path):
    out = tmp_path / "int8"
    result = cli("test_vit", "--random-init", "--ratio", "0.9", "--precision", "int8", "--calibration", "16",
                 "--min-cosine", "0", "--min-mean-cosine", "0", "--runs", "3", "-o", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in out.glob("*.onnx")) == ["model.onnx"]  # no FP32 copy beside it
    from exporter.merge_precision import reduced_merge_nodes
    from exporter.onnx_export import read_metadata

    proto = onnx.load(out / "model.onnx")
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in proto.graph.node}
    assert reduced_merge_nodes(proto) == []
    meta = read_metadata(proto)
    assert meta["precision"] == "int8" and meta["int8_mode"] == "static" and meta["int8_ffn_out"] == "fp32"
    assert meta["calibration"].startswith("16 seeded synthetic inputs")
    parity = json.loads((out / "parity.json").read_text())
    agreement = parity["precision"]["agreement"]
    assert agreement["samples"] == 10 and set(agreement["layer_agreement"]) == {
        f"slots_{i}" for i, r in enumerate(meta["schedule"]["merges"]) if r
    }
    bench = json.loads((out / "bench.json").read_text())
    assert set(bench["speedup_vs_fp32_unmerged"]) == {"merged", "merged fp32", "unmerged int8"}
    report = (out / "report.md").read_text()
    assert "## Precision: int8" in report and "seeded synthetic inputs" in report
    assert f"the {meta['int8_ffn_fp32_nodes']} FFN down-projections (MatMuls after GELU) are kept in FP32" in report
    assert meta["int8_ffn_fp32_nodes"] == parity["precision"]["int8_ffn_fp32_nodes"] > 0


def _damaged(fp32, path):
    """`fp32` with noise on the classifier head's weights: a graph that computes something else."""
    proto = onnx.load(fp32)
    rng = np.random.default_rng(1)
    head = next(n for n in reversed(proto.graph.node) if n.op_type in ("Gemm", "MatMul"))
    weights = next(i for i in proto.graph.initializer if i.name in head.input and len(i.dims) == 2)
    array = onnx.numpy_helper.to_array(weights)
    weights.CopyFrom(
        onnx.numpy_helper.from_array(array + rng.standard_normal(array.shape).astype(np.float32), weights.name)
    )
    onnx.save(proto, path)
    return path


def test_no_label_rule_accepts_int8_and_refuses_a_damaged_graph(merged_graph):
    """Without labels a reduced graph passes on logit cosine (mean and worst sample); the verdict
    names the rule, the sample count, and by how much a failure missed."""
    from exporter.agreement import check_reduced_precision
    from exporter.quantize import convert_precision

    _, fp32, _, folder = merged_graph
    good = convert_precision(fp32, folder / "accept-int8.onnx", "int8", "dynamic")
    report = check_reduced_precision("int8", fp32, good, _feeds(3))
    assert report.passed and report.decided_by == "outputs" and report.samples == 12
    assert report.mean_cosine >= 0.99 and report.min_cosine >= 0.98
    assert report.verdict().startswith("PASSED | int8 vs fp32 merged graph by outputs: logit cosine on 12 parity")
    bad = convert_precision(_damaged(fp32, folder / "damaged.onnx"), folder / "damaged-int8.onnx", "int8", "dynamic")
    report = check_reduced_precision("int8", fp32, bad, _feeds(3))
    assert not report.passed and report.mean_cosine < 0.99
    assert report.verdict().startswith("FAILED") and f"mean {0.99 - report.mean_cosine:.5f} short" in report.verdict()


def _decided_images(session, count: int, per_class: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """`count` images and FP32's predictions for them, at most `per_class` of a class, each
    predicted by a clear logit margin. Noise images all fall in one class of the random-init
    model, and labels of one class leave accuracy at chance (it then no longer decides); varied
    brightness and colour spread the predictions."""
    rng = np.random.default_rng(5)
    pool = rng.standard_normal((256, 3, 64, 64)) * rng.uniform(0.5, 5, (256, 1, 1, 1)) + rng.uniform(
        -5, 5, (256, 3, 1, 1)
    )
    pool = pool.astype(np.float32)
    logits = session.run(None, {"pixel_values": pool})[0]
    top2 = np.sort(logits, axis=-1)[:, -2:]
    order = np.argsort(top2[:, 0] - top2[:, 1])  # widest margin first
    chosen, taken = [], {}
    for i in order:
        label = int(logits[i].argmax())
        if taken.get(label, 0) < per_class:
            chosen.append(i)
            taken[label] = taken.get(label, 0) + 1
    chosen = sorted(chosen[:count])
    assert len(chosen) == count and max(taken.values()) < count
    return pool[chosen], logits[chosen].argmax(-1)


def test_labelled_rule_judges_accuracy_against_fp32_merged(merged_graph):
    """With labels, accuracy decides: here the labels are FP32 merged's own predictions, so FP32
    scores 100%; INT8 stays within 0.5 points, the damaged graph does not, and cosine no longer
    decides (it is reported)."""
    from exporter.agreement import check_reduced_precision
    from exporter.quantize import convert_precision
    from exporter.runners import ort_session
    from pipelines.data.labelled import LabelledData
    from pipelines.jobs.accuracy import measure_accuracy

    _, fp32, _, folder = merged_graph
    images, labels = _decided_images(ort_session(fp32), 32)
    data = LabelledData("FP32 merged's predictions", labels, lambda idx: {"pixel_values": images[idx]})
    damaged = _damaged(fp32, folder / "damaged-labelled.onnx")
    for graph, passes in (
        (convert_precision(fp32, folder / "lab-int8.onnx", "int8", "dynamic"), True),
        (damaged, False),
    ):
        report = check_reduced_precision("int8", fp32, graph, _feeds(1))
        report.attach_accuracy(measure_accuracy(graph, fp32, data, extra={"merged fp32": fp32}))
        drop = 100.0 * (1.0 - report.accuracy["top1_reduced"])
        assert report.decided_by == "accuracy" and report.accuracy["samples"] == 32
        assert report.passed == passes == (drop <= 0.5), report.verdict()
        assert "by accuracy: accuracy on 32 labelled samples (FP32 merged's predictions)" in report.verdict()
        if not passes:
            assert f"{drop - 0.5:.2f} points more than allowed" in report.verdict()


def test_decisions_come_from_a_debug_graph_that_reproduces_the_shipped_one(merged_graph):
    """Static INT8 calibrated on other data is another graph: its decisions are not the shipped
    graph's, the report says so, and a decision gate then fails instead of trusting them."""
    import dataclasses

    from exporter.agreement import AcceptanceRule, check_reduced_precision
    from exporter.quantize import convert_precision

    _, fp32, debug, folder = merged_graph
    shipped = convert_precision(fp32, folder / "ship-static.onnx", "int8", "static", _feeds(2, seed=3))

    def same_calibration(src, dst):
        return convert_precision(src, dst, "int8", "static", _feeds(2, seed=3))

    def other_calibration(src, dst):
        return convert_precision(src, dst, "int8", "static", 3 * _feeds(1, seed=9, batch=1))

    rule = AcceptanceRule(min_mean_cosine=0.0, min_cosine=0.0, min_decisions=0.0)
    for convert, reproduces in ((same_calibration, True), (other_calibration, False)):
        report = check_reduced_precision("int8", fp32, shipped, _feeds(2), lambda path: debug, convert, rule)
        assert report.debug_graph["reproduces"] is reproduces and report.passed is reproduces
        assert report.debug_graph["opset"] == 20 and report.debug_graph["dynamic_batch"]
    assert "does not reproduce the shipped graph" in report.verdict()
    report.rule = dataclasses.replace(rule, min_decisions=None)
    assert report.passed  # reported, not gated: the figure is flagged, acceptance stands on outputs


@pytest.mark.parametrize(("opset", "static_batch"), [(18, True), (20, False)])
def test_debug_graphs_take_the_shipped_graphs_opset_and_batch_mode(tmp_path, opset, static_batch):
    from exporter.decisions import export_decisions_like
    from exporter.onnx_export import export_onnx, export_settings
    from ops import patch_model
    from tests.models import small_vit

    model = patch_model(small_vit(depth=2), algo="pitome", ratio=0.9)
    shipped = export_onnx(model, None, tmp_path / "shipped.onnx", opset=opset, dynamic_batch=not static_batch)
    debug = export_decisions_like(model, shipped, tmp_path / "debug.onnx")
    assert export_settings(debug) == export_settings(shipped) == {
        "opset": opset, "dynamic_batch": not static_batch, "batch": 2 if static_batch else None
    }  # fmt: skip
    names = [o.name for o in onnx.load(debug).graph.output]
    assert names[1:5] == ["slots_0", "slots_1", "owners_0", "owners_1"]
    assert names[5:7] == ["order_0_0", "order_scores_0_0"]  # then every choice of the merge, with its scores


def test_forced_decision_explanation_runs_on_the_failing_provider(monkeypatch, merged_graph):
    """A parity failure on ONNX Runtime's CUDA provider is explained with that provider's own
    decisions: every session of the explanation asks for it (CPU stands in for it here)."""
    from exporter import runners
    from exporter.parity import Tolerances, verify_export
    from exporter.signatures import signature_of

    model, fp32, _, _ = merged_graph
    asked: list[str] = []
    real_session = runners.ort_session

    def session(path, providers="cpu", threads=None, spinning=False):
        asked.append(providers)
        return real_session(path, "cpu", threads, spinning)

    monkeypatch.setattr(runners, "ort_session", session)
    exact = Tolerances(atol=0.0, rtol=0.0)  # float noise fails it: the explanation must run
    report = verify_export(model, signature_of(model), fp32, _feeds(1), exact, "cpu", providers="cuda")
    assert report.decisions is not None and report.decisions.debug_graph["opset"] == 20
    assert len(asked) >= 3 and set(asked) == {"cuda"}


def test_a_reduced_graph_that_misses_its_bound_exits_3_and_keeps_its_artifacts(tmp_path):
    """A failure says by how much it missed, in one line; the folder stays for inspection, and
    its debug graph was exported like the shipped one (opset 18, static batch)."""
    out = tmp_path / "int8-miss"
    result = cli("test_vit", "--random-init", "--precision", "int8", "--opset", "18", "--static-batch",
                 "--min-mean-cosine", "1", "--no-bench", "-o", str(out))  # fmt: skip
    one_line_error(result, 3, "int8 parity FAILED")
    assert "mean 0.0" in result.stderr and "short" in result.stderr and str(out) in result.stderr
    agreement = json.loads((out / "parity.json").read_text())["precision"]["agreement"]
    assert not agreement["passed"] and agreement["decided_by"] == "outputs"
    assert agreement["debug_graph"] == {**agreement["debug_graph"], "opset": 18, "dynamic_batch": False}
    assert (out / "model.onnx").is_file() and "FAILED" in (out / "report.md").read_text()
