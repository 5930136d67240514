"""Where the time goes in an ONNX graph: ONNX Runtime's profiler, summed by op type and by merge part.

Merge nodes are found by the scope prefix the exporter writes (`...token_merge.assign/`,
`...token_merge.combine/`), so the merge's share of the latency is measured, not estimated.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter

import numpy as np

from exporter.onnx_export import merge_node_part


def profile_ort(path: str | os.PathLike, feeds: dict[str, np.ndarray], runs: int = 10, threads: int = 2) -> dict:
    """Kernel time per run (ms) by op type and by part: merge `assign`, `combine` (or `fused`), `model`."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="pitome-profile-") as scratch:
        options = ort.SessionOptions()
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(scratch, "ort")
        options.intra_op_num_threads = threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        for _ in range(2):  # warm-up, profiled too: dropped below by counting only the last `runs`
            session.run(None, feeds)
        for _ in range(runs):
            session.run(None, feeds)
        with open(session.end_profiling()) as handle:
            events = json.load(handle)
    kernels = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    per_run = len(kernels) // (runs + 2)
    kernels = kernels[-per_run * runs :]
    by_op: Counter = Counter()
    by_part: Counter = Counter()
    merge_by_op: Counter = Counter()
    merge_nodes = 0
    for event in kernels:
        micros = event["dur"] / runs / 1000.0
        op, part = event["args"]["op_name"], merge_node_part(event["name"].removesuffix("_kernel_time"))
        by_op[op] += micros
        by_part[part or "model"] += micros
        if part:
            merge_by_op[f"{part} {op}"] += micros
            merge_nodes += 1
    total = sum(by_part.values())
    merge = total - by_part["model"]
    return {
        "kernel_ms_per_run": total,
        "by_op_ms": dict(by_op.most_common()),
        "by_part_ms": {part: by_part[part] for part in ("model", "assign", "combine", "fused") if part in by_part},
        "merge_share": merge / total if total else 0.0,
        "merge_by_op_ms": dict(merge_by_op.most_common()),
        "merge_nodes_per_run": merge_nodes // runs,
    }
