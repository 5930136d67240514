"""Latency statistics, the ORT profile split, and the latency harness on a small model."""

from __future__ import annotations

import pytest
import torch

from exporter.latency import summarize, time_interleaved


def test_summary_statistics():
    stats = summarize("x", 4, [10.0, 12.0, 11.0, 30.0, 10.5])
    assert stats.min_ms == 10.0 and stats.max_ms == 30.0 and stats.median_ms == 11.0
    assert stats.throughput == pytest.approx(4 / 0.011)
    assert stats.noisy  # one 30 ms outlier among ~11 ms runs
    assert not summarize("y", 1, [10.0, 10.1, 9.9, 10.0]).noisy


def test_interleaving_rotates_and_counts():
    calls: list[str] = []
    stats = time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 1, runs=4, warmup=1)
    assert stats["a"].runs == stats["b"].runs == 4
    assert calls[2:] == ["a", "b", "b", "a", "a", "b", "b", "a"]  # after warm-up, the first one alternates


def test_profile_splits_merge_from_model(deit_pitome_export):
    from exporter.profiling import profile_ort
    from exporter.signatures import signature_of

    model, path = deit_pitome_export.model(), deit_pitome_export.path  # small DeiT, PiToMe 0.9 (conftest)
    feeds = {k: v.numpy() for k, v in signature_of(model).example_inputs(2).items()}
    profile = profile_ort(path, feeds, runs=3)
    parts = profile["by_part_ms"]
    assert parts["assign"] > 0 and parts["combine"] > 0 and parts["model"] > 0
    assert 0 < profile["merge_share"] < 1
    assert sum(parts.values()) == pytest.approx(profile["kernel_ms_per_run"])
    assert "MatMul" in profile["by_op_ms"]


@pytest.mark.parametrize("family", ["deit", "bert"])
def test_merge_skipped_model_keeps_the_schedule_without_the_merge(family, tmp_path, request):
    """The end-to-end merge cost compares against a graph of the same shapes with no merge work."""
    import onnx

    from exporter.onnx_export import export_onnx
    from ops.merge import TokenMerge
    from ops.reduction import KeepFirst, without_reduction

    seq_len = 32 if family == "bert" else None
    # small DeiT at PiToMe 0.9 / small BERT at PiToMe 0.7, seq_len 32: exported once per session (conftest)
    shared = request.getfixturevalue("deit_pitome_export" if family == "deit" else "bert_pitome_export")
    merged = shared.model()
    skipped = without_reduction(merged)
    assert not any(isinstance(m, TokenMerge) for m in skipped.modules())
    assert any(isinstance(m, KeepFirst) for m in skipped.modules())
    assert any(isinstance(m, TokenMerge) for m in merged.modules())  # the original is untouched
    graphs = {"merged": shared.path, "skipped": export_onnx(skipped, None, tmp_path / "skipped.onnx", seq_len=seq_len)}
    ops_of = {name: {node.op_type for node in onnx.load(path).graph.node} for name, path in graphs.items()}
    shapes = {
        name: [d.dim_value for d in onnx.load(path).graph.output[0].type.tensor_type.shape.dim]
        for name, path in graphs.items()
    }
    assert shapes["merged"] == shapes["skipped"]
    assert "TopK" in ops_of["merged"] and "TopK" not in ops_of["skipped"]


def test_latency_harness_rows(tmp_path):
    from benchmarks.latency import Case, markdown, run_case

    breakdowns: list[dict] = []
    rows = run_case(Case("test_vit", (0.9,), (2,)), 2, 2, tmp_path, lambda _: None, breakdowns, ("dynamic", "static"))
    candidates = {(r["backend"], r["candidate"], r["precision"]) for r in rows}
    assert candidates == {
        ("onnxruntime-cpu", "unmerged", "int8 static"),
        ("onnxruntime-cpu", "pitome@0.9", "int8 static"),
        ("onnxruntime-cpu", "unmerged", "fp32"),
        ("onnxruntime-cpu", "pitome@0.9", "fp32"),
        ("onnxruntime-cpu", "tome@0.9", "fp32"),
        ("onnxruntime-cpu", "unmerged", "int8"),
        ("onnxruntime-cpu", "pitome@0.9", "int8"),
        ("pytorch-eager", "unmerged", "fp32"),
        ("pytorch-eager", "pitome@0.9", "fp32"),
        ("onnxruntime-cpu", "pitome@0.9 (merge skipped)", "fp32"),
    }
    by_name = {(r["backend"], r["candidate"], r["precision"]): r for r in rows}
    assert by_name[("onnxruntime-cpu", "unmerged", "fp32")]["speedup"] == 1.0
    assert by_name[("onnxruntime-cpu", "pitome@0.9", "fp32")]["block_flop_ideal"] > 1.0
    assert by_name[("onnxruntime-cpu", "pitome@0.9", "int8")]["block_flop_ideal"] > 1.0
    merged, skipped = (
        by_name[("onnxruntime-cpu", "pitome@0.9", "fp32")],
        by_name[("onnxruntime-cpu", "pitome@0.9 (merge skipped)", "fp32")],
    )
    assert merged["merge_share"] is not None
    assert merged["merge_share_latency"] == pytest.approx(1 - skipped["median_ms"] / merged["median_ms"])
    table = markdown(rows, {"cpu": "test", "threads": 2}, "cmd", 1.0, breakdowns)
    assert table.count("\n| test_vit |") == 10 and "| pitome@0.9 | int8 |" in table
    assert "| pitome@0.9 | int8 static |" in table
    assert len(breakdowns) == 1 and breakdowns[0]["merge_by_op_ms"] and "## Merge breakdown" in table


def test_latency_harness_times_seeded_random_init_weights(tmp_path, monkeypatch):
    """Random-init weights drawn from the export job's default seed: a rerun times the same graphs."""
    from benchmarks.latency import Case, export_variants

    heads = []

    class Loaded(Exception):
        pass

    def stop_after_loading(model, *args, **kwargs):
        heads.append(model.head.weight.detach().clone())
        raise Loaded

    monkeypatch.setattr("exporter.variants.export_variant", stop_after_loading)
    for _ in range(2):
        torch.rand(1)  # whatever the global generator's state
        with pytest.raises(Loaded):
            export_variants(Case("test_vit", (0.9,), (2,)), tmp_path, lambda _: None)
    assert torch.equal(heads[0], heads[1])


def _point(algo, prop, ratio, top1):
    return {
        "algo": algo, "prop_attn": prop, "ratio": ratio, "top1": top1, "agreement": 0.9, "speedup": 1.5,
        "block_gflops_merged": ratio, "block_gflops_unmerged": 1.0, "block_flop_speedup": 1 / ratio,
    }  # fmt: skip


def test_accuracy_experiment_compares_at_equal_flops(tmp_path):
    from benchmarks.accuracy import comparison, draw, markdown

    points = [
        _point("pitome", False, 0.9, 0.80), _point("tome", False, 0.9, 0.78),
        _point("pitome", True, 0.9, 0.75), _point("tome", True, 0.9, 0.76),
        _point("pitome", False, 0.8, 0.70), _point("tome", False, 0.8, 0.70),
    ]  # fmt: skip
    rows = comparison(points)
    assert [(r["prop_attn"], r["ratio"]) for r in rows] == [(False, 0.9), (False, 0.8), (True, 0.9)]
    assert [round(r["pitome_minus_tome"], 6) for r in rows] == [2.0, 0.0, -1.0]
    context = {"weights": "trained here", "cpu": "cpu", "threads": 2, "versions": {"torch": "x"}}
    result = {"model": "m", "unmerged": {"top1": 0.82, "samples": 100, "data": "d"}, "points": points,
              "context": context, "note": "a note"}  # fmt: skip
    text = markdown(result, "python -m benchmarks.accuracy", 1.0)
    assert "ahead at 1 of 3 equal-FLOP points, tied at 1, behind at 1" in text
    assert "| pitome | on | 0.9 |" in text and "a note" in text and "INT8" not in text
    draw(result, tmp_path / "m.png")
    result["int8"] = [
        {"mode": "static", "ffn_out": "fp32", "ratio": 0.9, "samples": 100, "top1_merged_int8": 0.77, "top1_merged_fp32": 0.80,
         "top1_unmerged_int8": 0.81, "top1_unmerged_fp32": 0.82, "top1_agreement_with_fp32_merged": 0.9,
         "decision_agreement_per_layer": {"blocks.0": 0.97, "blocks.1": 0.9}},
    ]  # fmt: skip
    text = markdown(result, "python -m benchmarks.accuracy", 1.0)
    assert "| static | fp32 | 77.00% | 80.00% | -3.00 | 81.00% | 82.00% | 90.0% | 97.0%, 90.0% |" in text
    assert "re-measured" not in text
    draw(result, tmp_path / "m.png")
    assert (tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG"


def test_accuracy_int8_only_keeps_the_recorded_sweep(tmp_path, monkeypatch, capsys):
    """`--int8-only` replaces the INT8 points and says so; the FP32 sweep and its command stay."""
    import json

    from benchmarks import accuracy

    missing = accuracy.main(["--models", "vit_fmnist", "--int8-only", "--out", str(tmp_path)])
    assert missing == 2 and "needs a recorded sweep" in capsys.readouterr().err
    points = [_point("pitome", False, 0.9, 0.80), _point("tome", False, 0.9, 0.78)]
    context = {"weights": "w", "cpu": "cpu", "threads": 2, "versions": {"torch": "x"}}
    recorded = {"command": "python -m benchmarks.accuracy --models vit_fmnist", "minutes": 37.0, "model": "vit_fmnist",
                "unmerged": {"top1": 0.9, "samples": 100, "data": "d"}, "points": points, "context": context,
                "note": "", "int8": []}  # fmt: skip
    (tmp_path / "vit_fmnist.json").write_text(json.dumps(recorded))
    measured = []

    def fake_point(model, exp, mode, ffn_out, scratch, limit, console):
        measured.append((mode, ffn_out, limit))
        return {"mode": mode, "ffn_out": ffn_out, "ratio": 0.9, "samples": 100, "top1_merged_int8": 0.8,
                "top1_merged_fp32": 0.8, "top1_unmerged_int8": 0.9, "top1_unmerged_fp32": 0.9,
                "top1_agreement_with_fp32_merged": 1.0, "decision_agreement_per_layer": {"slots_0": 0.9}}  # fmt: skip

    monkeypatch.setattr(accuracy, "int8_point", fake_point)
    wrong_limit = accuracy.main(["--models", "vit_fmnist", "--int8-only", "--limit", "50", "--out", str(tmp_path)])
    assert wrong_limit == 2 and "drop --limit 50" in capsys.readouterr().err and not measured
    assert accuracy.main(["--models", "vit_fmnist", "--int8-only", "--out", str(tmp_path)]) == 0
    assert measured == [(mode, ffn, None) for mode, ffn in accuracy.INT8_VARIANTS]
    result = json.loads((tmp_path / "vit_fmnist.json").read_text())
    assert result["points"] == points and result["minutes"] == 37.0 and len(result["int8"]) == 3
    assert result["int8_rerun"]["command"].endswith("--int8-only --out " + str(tmp_path))
    text = (tmp_path / "vit_fmnist.md").read_text()
    assert text.startswith(
        "# Accuracy vs FLOPs: vit_fmnist\n\n`python -m benchmarks.accuracy --models vit_fmnist` (37 min)"
    )
    assert "re-measured by `python -m benchmarks.accuracy --models vit_fmnist --int8-only" in text
    assert "| static | fp32 | 80.00% |" in text and "| dynamic | int8 | 80.00% |" in text
    assert (tmp_path / "vit_fmnist.png").read_bytes()[:4] == b"\x89PNG"


def test_cpu_name_carries_the_simd_features_that_decide_int8_speed():
    from pathlib import Path

    from exporter.runners import SIMD_FEATURES, cpu_name

    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("no /proc/cpuinfo on this platform")
    flags = next(
        (line.split(":", 1)[1].split() for line in cpuinfo.read_text().splitlines() if line.startswith("flags")), []
    )
    name = cpu_name()
    for feature in SIMD_FEATURES:
        assert (feature in name) == (feature in flags), (feature, name)


def test_latency_harness_rejects_models_outside_its_grid(capsys):
    from benchmarks.latency import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--models", "deit_small", "resnet50"])
    assert exit_info.value.code == 2
    assert "not in the grid: resnet50" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--runs", "0"], ["--threads", "-1"]])
def test_latency_harness_rejects_non_positive_counts_before_any_work(argv, capsys):
    from benchmarks.latency import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "expected a positive integer" in capsys.readouterr().err


@pytest.mark.parametrize("modes", ["int4", "", "dynamic,fp16"])
def test_latency_harness_rejects_unknown_int8_modes(modes, capsys):
    from benchmarks.latency import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--int8-modes", modes])
    assert exit_info.value.code == 2
    assert "expected dynamic, static or both" in capsys.readouterr().err


def test_gpu_harness_rows_and_table_on_cpu():
    from benchmarks.gpu_latency import markdown, run_model
    from benchmarks.latency import Case

    case = Case("test_vit", (0.95, 0.9), (2,))
    rows = run_model(case, (1, 2), [("fp32", "eager")], ("pitome",), 2, torch.device("cpu"), lambda _: None)
    assert {(r["candidate"], r["batch"]) for r in rows} == {
        (name, batch) for name in ("unmerged", "pitome@0.95", "pitome@0.9") for batch in (1, 2)
    }
    by_key = {(r["candidate"], r["batch"]): r for r in rows}
    assert by_key[("unmerged", 2)]["speedup"] == 1.0 and by_key[("unmerged", 2)]["block_flop_ideal"] == 1.0
    merged = by_key[("pitome@0.9", 2)]
    assert merged["speedup"] == pytest.approx(by_key[("unmerged", 2)]["median_ms"] / merged["median_ms"])
    assert merged["block_flop_ideal"] > by_key[("pitome@0.95", 2)]["block_flop_ideal"] > 1.0
    table = markdown(rows, {"device": "test"}, "cmd", 1.0)
    assert "| pitome@0.95 | pitome@0.9 |" in table and table.count("| fp32 | eager |") == 2
    assert f"| {by_key[('pitome@0.95', 1)]['block_flop_ideal']:.2f}x | {merged['block_flop_ideal']:.2f}x |" in table


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--device", "cpu", "--modes", "graph"], "fp32 eager only"),
        (["--device", "cpu", "--precisions", "fp16"], "fp32 eager only"),
        (["--models", "resnet50"], "not in the grid: resnet50"),
        (["--ratios", "1.5"], "--ratios must lie in (0, 1]"),
        (["--runs", "0"], "expected a positive integer"),
    ],
)
def test_gpu_harness_rejects_bad_arguments(argv, message, capsys):
    from benchmarks.gpu_latency import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="covers machines without CUDA")
def test_gpu_harness_without_cuda_says_so(capsys):
    from benchmarks.gpu_latency import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--models", "deit_tiny"])
    assert exit_info.value.code == 4
    assert "no CUDA device" in capsys.readouterr().err


@pytest.mark.parametrize("quick", [[], ["--quick"]])
def test_latency_harness_writes_one_model_of_the_grid(tmp_path, monkeypatch, quick):
    """`--models X` alone still leaves X's table and JSON behind (not only the console)."""
    import json

    from benchmarks import latency

    row = {"model": "deit_tiny", "backend": "onnxruntime-cpu", "candidate": "unmerged", "precision": "fp32",
           "batch": 1, "median_ms": 2.0, "p90_ms": 2.1, "min_ms": 1.9, "cv": 0.01, "speedup": 1.0,
           "speedup_min": 1.0, "block_flop_ideal": 1.0}  # fmt: skip
    monkeypatch.setattr(latency, "run_case", lambda case, *args: [row])
    model = "deit_small" if quick else "deit_tiny"
    row = {**row, "model": model}
    assert latency.main([*quick, "--models", model, "--runs", "2", "--out", str(tmp_path)]) == 0
    assert json.loads((tmp_path / f"{model}.json").read_text())["rows"] == [row]
    assert f"| {model} | onnxruntime-cpu | unmerged |" in (tmp_path / f"{model}.md").read_text()
    assert not (tmp_path / "latency.md").exists()  # the combined table belongs to a whole-grid run


def test_gpu_harness_records_the_merge_share_on_cpu():
    """The merge-skipped twin of a merged variant gives the merge's share of its time."""
    from benchmarks.gpu_latency import markdown, run_model
    from benchmarks.latency import SKIPPED, Case

    case = Case("test_vit", (0.9,), (2,))
    rows = run_model(
        case, (2,), [("fp32", "eager")], ("pitome",), 2, torch.device("cpu"), lambda _: None, ("decomposed",), True
    )
    by_name = {r["candidate"]: r for r in rows}
    assert set(by_name) == {"unmerged", "pitome@0.9", f"pitome@0.9 {SKIPPED}"}
    merged, skipped = by_name["pitome@0.9"], by_name[f"pitome@0.9 {SKIPPED}"]
    assert merged["merge_share"] == pytest.approx(1 - skipped["median_ms"] / merged["median_ms"])
    assert merged["merge_impl"] == "decomposed" and skipped["merge_share"] is None
    assert by_name["unmerged"]["merge_impl"] is None
    assert "- batch 2 fp32 eager: pitome@0.9 " in markdown(rows, {"device": "test"}, "cmd", 1.0)


def test_gpu_harness_fused_needs_cuda(capsys):
    from benchmarks.gpu_latency import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--device", "cpu", "--merge-impls", "fused"])
    assert exit_info.value.code == 2
    assert "runs the Triton kernels on CUDA" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="covers machines without CUDA")
def test_device_check_without_cuda_exits_4_with_one_line(capsys, tmp_path):
    from benchmarks.device_check import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(tmp_path / "out")])
    assert exit_info.value.code == 4
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: no CUDA device visible to PyTorch: the device check runs the fused kernels on a GPU"
    ]
    assert not (tmp_path / "out").exists()


def test_device_check_judges_the_targets_on_the_fused_graph_rows():
    from benchmarks.device_check import judge_targets

    def row(impl, speedup, share, mode="graph"):
        return {"model": "deit_small", "precision": "fp16", "batch": 64, "mode": mode, "merge_impl": impl,
                "speedup": speedup, "merge_share": share}  # fmt: skip

    verdicts = judge_targets([row("fused", 1.7, 0.08), row("decomposed", 0.8, 0.5), row("fused", 0.1, 0.9, "eager")])
    first = verdicts[0]
    assert first["target"] == "deit_small fp16 batch 64 >= 1.6x"
    assert (first["fused_speedup"], first["decomposed_speedup"], first["met"]) == (1.7, 0.8, True)
    assert first["merge_share_met"] is False  # 8% > 5%
    assert all(v["met"] is None for v in verdicts[1:])  # not measured: no verdict


def test_device_check_rejects_bad_arguments(capsys):
    from benchmarks.device_check import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--runs", "0"])
    assert exit_info.value.code == 2
    assert "--runs must be >= 1" in capsys.readouterr().err


def test_finetune_table_refuses_runs_it_cannot_read(tmp_path, capsys):
    """A folder that is no finetune output, or an untrained export of another schedule: one line,
    exit 2 (argparse) or a message naming both folders, before any timing."""
    import json

    from benchmarks import finetune_table

    tuned, shelf = tmp_path / "ft", tmp_path / "shelf"
    for folder in (tuned, shelf):
        folder.mkdir()
        for name in ("accuracy.json", "model.onnx"):
            (folder / name).write_text("{}")
    with pytest.raises(SystemExit) as exit_info:
        finetune_table.main(["--run", f"vit_fmnist={tuned},{shelf}"])
    assert exit_info.value.code == 2 and "lacks finetune.json" in capsys.readouterr().err
    (tuned / "finetune.json").write_text("{}")
    with pytest.raises(SystemExit) as exit_info:
        finetune_table.main(["--run", f"vit_fmnist={tuned},{shelf}"])
    assert exit_info.value.code == 2 and "lacks schedule.json, bench.json" in capsys.readouterr().err
    (tuned / "bench.json").write_text("{}")
    for folder, merges in ((tuned, [4, 4]), (shelf, [4, 3])):
        (folder / "schedule.json").write_text(json.dumps({"algo": "pitome", "merges": merges, "prop_attn": False}))
    with pytest.raises(SystemExit) as exit_info:
        finetune_table.main(["--run", f"vit_fmnist={tuned},{shelf}"])
    assert exit_info.value.code == 2 and "exported with another schedule" in capsys.readouterr().err


_SETUP = {"date": "2026-01-01", "cpu": "cpu", "batch": 8, "threads": 2, "runs": 60, "seconds": 60.0, "command": "c"}


def _table_row(run, model, timing=None):
    row = {
        "run": run, "model": model, "algo": "pitome", "merges": [4, 4], "command": f"finetune {run}",
        "block_flop_speedup": 1.5, "speedup_untrained": 1.2, "speedup_finetuned": 1.2, "off_the_shelf": 0.8,
        "finetuned": 0.85, "original": 0.86, "epochs": 2, "published_epoch": 2, "train_minutes": 9.0,
        "samples_per_second": 40.0, "test_samples": 100, "unmerged_finetuned": None,
    }  # fmt: skip
    return row if timing is None else dict(row, timing=timing)


def _finetune_folders(tmp_path, name):
    """The two folders `--run` reads, with just enough in them to pass its checks."""
    import json

    tuned, shelf = tmp_path / name, tmp_path / f"shelf-{name}"
    for folder in (tuned, shelf):
        folder.mkdir()
        for file in ("finetune.json", "accuracy.json", "model.onnx", "bench.json"):
            (folder / file).write_text("{}")
        (folder / "schedule.json").write_text(json.dumps({"algo": "pitome", "merges": [4, 4], "prop_attn": False}))
    return f"vit_fmnist={tuned},{shelf}"


def test_finetune_table_keep_rows_adds_a_run_beside_the_earlier_timing(tmp_path, monkeypatch):
    """`--keep-rows` keeps the earlier rows and their timing, puts the new run after its model's rows,
    re-times only it, and the footer names which rows each interleaved run timed."""
    import json

    from benchmarks import finetune_table

    out = tmp_path / "results"
    out.mkdir()
    earlier_setup = {"date": "2026-01-01", "cpu": "old cpu", "batch": 8, "threads": 2, "runs": 60, "seconds": 60.0,
                     "command": "python -m benchmarks.finetune_table --run old"}  # fmt: skip
    earlier_rows = [_table_row("vit-a", "vit_fmnist", 0), _table_row("minilm-b", "minilm_sentiment", 0)]
    (out / "table.json").write_text(json.dumps({"timings": [earlier_setup], "rows": earlier_rows}))
    timed: list[str] = []

    def fake_time_runs(runs, batch, repeats, threads):
        timed.extend(run.name for run in runs)
        return [_table_row(run.name, run.model) for run in runs]

    monkeypatch.setattr(finetune_table, "time_runs", fake_time_runs)
    assert finetune_table.main(["--run", _finetune_folders(tmp_path, "vit-c"), "--out", str(out), "--keep-rows"]) == 0
    record = json.loads((out / "table.json").read_text())
    assert timed == ["vit-c"]
    assert [(r["run"], r["timing"]) for r in record["rows"]] == [("vit-a", 0), ("vit-c", 1), ("minilm-b", 0)]
    assert record["timings"][0] == earlier_setup and "--keep-rows" in record["timings"][1]["command"]
    footer = (out / "table.md").read_text()
    assert "rows 1, 3: batch 8, 2 threads, median of 60 on old cpu, measured 2026-01-01" in footer
    assert "row 2: batch 8, 2 threads, median of 50 on" in footer

    # Without --keep-rows the table is rebuilt from the runs named, under one timing.
    assert (
        finetune_table.main(["--run", f"vit_fmnist={tmp_path / 'vit-c'},{tmp_path / 'shelf-vit-c'}", "--out", str(out)])
        == 0
    )
    record = json.loads((out / "table.json").read_text())
    assert [(r["run"], r["timing"]) for r in record["rows"]] == [("vit-c", 0)] and len(record["timings"]) == 1
    assert "timed in one interleaved run, batch 8" in (out / "table.md").read_text()


def test_finetune_table_keep_rows_replaces_a_re_timed_run_and_drops_its_old_timing():
    from benchmarks.finetune_table import keep_timings_in_use, merged_rows

    earlier = [_table_row("vit-a", "vit_fmnist", 0), _table_row("vit-b", "vit_fmnist", 1)]
    rows = merged_rows(earlier, [_table_row("vit-a", "vit_fmnist", 2)])
    rows, timings = keep_timings_in_use(rows, [{"t": 0}, {"t": 1}, {"t": 2}])
    assert [(r["run"], r["timing"]) for r in rows] == [("vit-a", 1), ("vit-b", 0)]
    assert timings == [{"t": 1}, {"t": 2}]
    rows = merged_rows(earlier, [_table_row("bert-c", "bert_tiny")])
    assert [r["run"] for r in rows] == ["vit-a", "vit-b", "bert-c"]
    other_schedule = {**_table_row("vit-d", "vit_fmnist", 0), "merges": [6, 6]}
    rows = merged_rows(
        [earlier[0], other_schedule, earlier[1]], [_table_row("vit-e", "vit_fmnist"), _table_row("x", "m")]
    )
    assert [r["run"] for r in rows] == ["vit-a", "vit-d", "vit-b", "vit-e", "x"]  # beside its own schedule
    rows = merged_rows([earlier[0], other_schedule], [_table_row("vit-e", "vit_fmnist")])
    assert [r["run"] for r in rows] == ["vit-a", "vit-e", "vit-d"]


def test_finetune_table_keep_rows_without_a_table_says_so_and_writes_nothing(tmp_path, capsys):
    import json

    from benchmarks import finetune_table

    out = tmp_path / "results"
    with pytest.raises(SystemExit) as exit_info:
        finetune_table.main(["--run", _finetune_folders(tmp_path, "vit-c"), "--out", str(out), "--keep-rows"])
    assert exit_info.value.code == 2 and "--keep-rows: no table to keep in" in capsys.readouterr().err
    assert not out.exists()
    out.mkdir()
    run = _finetune_folders(tmp_path, "vit-d")
    row = _table_row("vit-a", "vit_fmnist", 0)
    for table, message in (
        ({"setup": {}, "rows": []}, "predates per-row timings"),  # a table from before timings were kept per row
        ({"timings": [_SETUP], "rows": [{**row, "timing": 1}]}, "row 'vit-a' names no recorded timing"),
        ({"timings": [_SETUP], "rows": [{k: v for k, v in row.items() if k != "test_samples"}]}, "a row lacks one of"),
        ({"timings": [{"date": "x"}], "rows": []}, "timing 0 lacks one of"),
    ):
        (out / "table.json").write_text(json.dumps(table))
        with pytest.raises(SystemExit) as exit_info:
            finetune_table.main(["--run", run, "--out", str(out), "--keep-rows"])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
        assert sorted(p.name for p in out.iterdir()) == ["table.json"]  # nothing copied, no table written


def _save_predictions(folder, labels, merged, description="test split"):
    from pipelines.data.labelled import LabelledData
    from pipelines.jobs.accuracy import PREDICTIONS, save_predictions

    data = LabelledData(description, labels, lambda idx: {})
    save_predictions(folder / PREDICTIONS, {"merged": merged, "unmerged": labels}, data)


def test_finetune_table_pairs_the_fine_tuned_graph_with_the_unmerged_fine_tuned_alike(tmp_path):
    """Where both exports kept their predictions, the row carries the paired interval against the
    unmerged model fine-tuned alike, and the table prints its half-width; other samples are refused."""
    import argparse

    import numpy as np

    from benchmarks import finetune_table

    labels = np.arange(200) % 10
    merged, alike = labels.copy(), labels.copy()
    merged[:12] = (labels[:12] + 1) % 10  # the merged model misses 12, the unmerged one fine-tuned alike 4 of them
    alike[:4] = merged[:4]
    tuned, other = tmp_path / "ft", tmp_path / "alike"
    for folder, predicted in ((tuned, merged), (other, alike)):
        folder.mkdir()
        _save_predictions(folder, labels, predicted)
    paired = finetune_table.paired_predictions(tuned, other)
    assert (paired["only_first_right"], paired["only_second_right"]) == (0, 8)
    assert paired["delta_points_ci95"][0] < -4.0 < paired["delta_points_ci95"][1] < 0
    assert finetune_table.paired_predictions(tuned, tmp_path) is None  # an export from before: no interval
    row = {**_table_row("ft", "minilm_sentiment", 0), "unmerged_finetuned": 0.9, "finetuned": 0.86}
    row["paired_vs_unmerged_finetuned"] = paired
    half = (paired["delta_points_ci95"][1] - paired["delta_points_ci95"][0]) / 2
    table = finetune_table.markdown([row], [_SETUP])
    assert f"(-4.00 ± {half:.2f} vs it)" in table and "`± x`: the half-width" in table
    row["paired_shelf_vs_original"] = {"delta_points_ci95": [-3.0, -1.0]}
    assert "80.00% (-6.00 ± 1.00)" in finetune_table.markdown([row], [_SETUP])
    assert "`± x`" not in finetune_table.markdown([_table_row("old", "vit_fmnist", 0)], [_SETUP])
    _save_predictions(other, labels[::-1].copy(), alike)
    with pytest.raises(argparse.ArgumentTypeError, match="scored on other samples"):
        finetune_table.paired_predictions(tuned, other)


def test_finetune_table_refuses_two_runs_of_one_name_and_unreadable_predictions(tmp_path, capsys):
    """Two folders of one name would overwrite each other's row and files; a predictions file that is
    not one is named in one line. Both before any timing (exit 2, argparse)."""
    from benchmarks import finetune_table

    first = _finetune_folders(tmp_path, "vit-c")
    (tmp_path / "elsewhere").mkdir()
    second = _finetune_folders(tmp_path / "elsewhere", "vit-c")
    for argv, message in (
        (["--run", first, "--run", second], "two --run folders share a name (vit-c)"),
        (["--run", first, "--runs", "0"], "--runs"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            finetune_table.main([*argv, "--out", str(tmp_path / "out")])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    alike = tmp_path / "alike"
    alike.mkdir()
    for name in ("finetune.json", "accuracy.json"):
        (alike / name).write_text("{}")
    for folder in (tmp_path / "vit-c", alike):
        (folder / "predictions.npz").write_bytes(b"not a zip")
    with pytest.raises(SystemExit) as exit_info:
        finetune_table.main(["--run", f"{first},{alike}", "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and "not a predictions file" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
