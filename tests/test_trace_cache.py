"""The run's trace cache (tests/trace_cache.py) may only hand back a graph traced from the same
model, inputs, arguments and code: its key must change with each of them."""

from __future__ import annotations

import torch

from exporter.signatures import ExportWrapper, signature_of
from ops import patch_model
from tests.models import small_vit
from tests.trace_cache import fingerprint


def _key(model: torch.nn.Module, opset: int = 20) -> str:
    signature = signature_of(model)
    wrapper = ExportWrapper(model, signature)
    inputs = tuple(signature.example_inputs(2)[name] for name in signature.input_names)
    return fingerprint(wrapper, inputs, signature.input_names, list(signature.output_names), opset, True, {})


def _model(**merging) -> torch.nn.Module:
    return patch_model(small_vit("deit"), **{"algo": "pitome", "ratio": 0.9, **merging})


def test_the_same_model_rebuilt_has_the_same_key_whatever_else_was_imported_since():
    key = _key(_model())
    import exporter.decisions  # noqa: F401 - a job imports more of the project as it runs
    import exporter.quantize  # noqa: F401

    assert _key(_model()) == key


def test_the_key_changes_with_weights_schedule_algorithm_lowering_and_arguments():
    key = _key(_model())
    changed = _model()
    with torch.no_grad():
        changed.head.weight[0, 0] += 1e-6
    assert _key(changed) != key
    assert _key(_model(ratio=0.95)) != key
    assert _key(_model(algo="tome")) != key
    assert _key(_model(lowering="scatter")) != key
    assert _key(_model(prop_attn=True)) != key
    assert _key(_model(), opset=18) != key
    assert _key(patch_model(small_vit("deit", seed=1), algo="pitome", ratio=0.9)) != key


def test_the_key_changes_when_the_merge_code_is_replaced(monkeypatch):
    from ops import merge

    key = _key(_model())
    original = merge.size_weighted_merge
    monkeypatch.setattr(merge, "size_weighted_merge", lambda *args, **kwargs: original(*args, **kwargs))
    assert _key(_model()) != key


def test_the_key_is_the_same_in_another_process():
    """pytest-xdist workers and the tune tests' subprocesses share the cache: a key that differed
    between processes (string hashing is seeded per process) would trace everything again."""
    import os
    import subprocess
    import sys

    from tests.cli_helpers import ROOT

    code = "from tests.test_trace_cache import _key, _model; print(_key(_model()))"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONHASHSEED": "12345"}
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert other.stdout.strip() == _key(_model())
