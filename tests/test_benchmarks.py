"""Latency statistics, the ORT profile split, and the latency harness on a small model."""

from __future__ import annotations

import pytest

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


def test_profile_splits_merge_from_model(tmp_path):
    from exporter.onnx_export import export_onnx
    from exporter.profiling import profile_ort
    from exporter.signatures import signature_of
    from ops import patch_model
    from tests.models import small_vit

    model = patch_model(small_vit("deit"), ratio=0.9)
    path = export_onnx(model, None, tmp_path / "m.onnx")
    feeds = {k: v.numpy() for k, v in signature_of(model).example_inputs(2).items()}
    profile = profile_ort(path, feeds, runs=3)
    parts = profile["by_part_ms"]
    assert parts["assign"] > 0 and parts["combine"] > 0 and parts["model"] > 0
    assert 0 < profile["merge_share"] < 1
    assert sum(parts.values()) == pytest.approx(profile["kernel_ms_per_run"])
    assert "MatMul" in profile["by_op_ms"]


def test_latency_harness_rows(tmp_path):
    from benchmarks.latency import Case, markdown, run_case

    rows = run_case(Case("test_vit", (0.9,), (2,)), runs=2, threads=2, scratch=tmp_path, log=lambda _: None)
    candidates = {(r["backend"], r["candidate"]) for r in rows}
    assert candidates == {
        ("onnxruntime-cpu", "unmerged"),
        ("onnxruntime-cpu", "pitome@0.9"),
        ("onnxruntime-cpu", "tome@0.9"),
        ("pytorch-eager", "unmerged"),
        ("pytorch-eager", "pitome@0.9"),
    }
    by_name = {(r["backend"], r["candidate"]): r for r in rows}
    assert by_name[("onnxruntime-cpu", "unmerged")]["speedup"] == 1.0
    assert by_name[("onnxruntime-cpu", "pitome@0.9")]["block_flop_ideal"] > 1.0
    assert by_name[("onnxruntime-cpu", "pitome@0.9")]["merge_share"] is not None
    table = markdown(rows, {"cpu": "test", "threads": 2}, "cmd", 1.0)
    assert table.count("\n| test_vit |") == 5
