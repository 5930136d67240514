"""The run's trace cache (tests/trace_cache.py) may only hand back a graph traced from the same
model, inputs, arguments and code: its key must change with each of them, and with nothing else
(it must agree between processes, or the workers would trace everything again)."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from collections.abc import Callable

import onnx
import pytest
import torch

from exporter.signatures import ExportWrapper, signature_of
from ops import patch_model
from tests.models import small_text, small_vit
from tests.trace_cache import TraceCache, fingerprint


def _key(model: torch.nn.Module, opset: int = 20) -> str:
    signature = signature_of(model)
    wrapper = ExportWrapper(model, signature)
    inputs = tuple(signature.example_inputs(2)[name] for name in signature.input_names)
    return fingerprint(wrapper, inputs, signature.input_names, list(signature.output_names), opset, True, {})


def _model(**merging) -> torch.nn.Module:
    return patch_model(small_vit("deit"), **{"algo": "pitome", "ratio": 0.9, **merging})


def _bert() -> torch.nn.Module:
    return patch_model(small_text("bert"), algo="pitome", ratio=0.7, seq_len=32)


def _math_attention(q, k, v, attn_mask=None, scale=None):
    """Attention as softmax(q k^T scale + mask) v: what a test might put in SDPA's place."""
    scores = q @ k.transpose(-2, -1) * (scale if scale is not None else q.shape[-1] ** -0.5)
    return (scores + (attn_mask if attn_mask is not None else 0)).softmax(-1) @ v


def _wrapped(original: Callable) -> Callable:
    return lambda *args, **kwargs: original(*args, **kwargs)


def _merge_helper(patch, model):  # by a function of no test and no lambda (a partial)
    from ops import merge

    patch.setattr(merge, "descending_order", functools.partial(torch.argsort, dim=-1, descending=True))


def _merge_constant(patch, model):
    from ops import merge

    patch.setattr(merge, "_PAD_ENERGY", 1.0e3)


def _deleted_constant(patch, model):
    from ops import merge

    patch.delattr(merge, "_PAD_REAL_SIM")


def _added_function(patch, model):  # a module's new function, found without a list of names
    from exporter import decisions

    patch.setattr(decisions, "rank_like_the_tape", lambda scores: scores.argsort(), raising=False)


def _module_dict_item(patch, model):
    from ops.patch import hf_vision

    patch.setitem(hf_vision.REFUSED_MODEL_TYPES, "vit", "refused for this test")


def _project_class_method(patch, model):  # a class outside the tree, read by its code
    from ops.schedule import TokenSchedule

    patch.setattr(TokenSchedule, "to_dict", _wrapped(TokenSchedule.to_dict))


def _sdpa(patch, model):
    patch.setattr(torch.nn.functional, "scaled_dot_product_attention", _math_attention)


def _torch_function(patch, model):
    patch.setattr(torch, "argsort", functools.partial(torch.argsort, stable=True))


def _torch_class_method(patch, model):
    patch.setattr(torch.nn.Linear, "forward", _wrapped(torch.nn.Linear.forward))


def _tensor_method(patch, model):
    patch.setattr(torch.Tensor, "softmax", _wrapped(torch.Tensor.softmax))


def _hf_attention_function(patch, model):
    from transformers.models.bert import modeling_bert

    patch.setattr(modeling_bert, "eager_attention_forward", _wrapped(modeling_bert.eager_attention_forward))


def _attn_implementation(patch, model):  # a config's private attribute
    patch.setattr(model.config, "_attn_implementation", "eager")


def _non_persistent_buffer(patch, model):
    embeddings = model.bert.embeddings
    assert "token_type_ids" in embeddings._non_persistent_buffers_set
    # setitem: monkeypatch.setattr would delete the buffer when undone (it is no instance attribute)
    patch.setitem(embeddings._buffers, "token_type_ids", torch.ones_like(embeddings.token_type_ids))


CHANGES = {  # what a test could change, on the model it would change the trace of
    f"{change.__name__.strip('_')}-{build.__name__.strip('_')}": (build, change)
    for build, change in [
        (_model, _merge_helper),
        (_bert, _merge_constant),
        (_model, _deleted_constant),
        (_model, _added_function),
        (_model, _module_dict_item),
        (_model, _project_class_method),
        (_model, _sdpa),
        (_bert, _sdpa),
        (_model, _torch_function),
        (_model, _torch_class_method),
        (_bert, _tensor_method),
        (_bert, _hf_attention_function),
        (_bert, _attn_implementation),
        (_bert, _non_persistent_buffer),
    ]
}


def _keys_around(name: str) -> tuple[str, str, str]:
    """The model's key before change `name`, with it, and once it is undone."""
    build, change = CHANGES[name]
    model = build()
    before = _key(model)
    with pytest.MonkeyPatch.context() as patch:
        change(patch, model)
        changed = _key(model)
    return before, changed, _key(model)


def test_the_same_model_rebuilt_has_the_same_key_whatever_else_was_imported_since():
    key = _key(_model())
    import exporter.decisions  # noqa: F401 - a job imports more of the project as it runs
    import exporter.quantize  # noqa: F401

    assert _key(_model()) == key


def test_a_librarys_memo_on_a_class_is_no_change():
    """transformers remembers on a model class whether it can switch attention implementation
    (`_can_set_attn_implementation_cached_value`) the first time a model of it is asked: a
    process where some test asked keys like one where none did (found: an attention test made
    its xdist worker's keys differ from the tune tests' subprocesses)."""
    model = _bert()
    key = _key(model)
    classes = [klass for klass in type(model).__mro__ if "_can_set_attn_implementation_cached_value" in vars(klass)]
    for klass in classes:
        delattr(klass, "_can_set_attn_implementation_cached_value")
    assert _key(model) == key
    type(model)._can_set_attn_implementation()  # what `set_attn_implementation` asks first
    assert any("_can_set_attn_implementation_cached_value" in vars(klass) for klass in type(model).__mro__)
    assert _key(model) == key


def test_a_copy_memo_on_a_class_is_no_change():
    """copyreg writes `__slotnames__` on a class the first time one of its objects is copied (a
    job copies its model to export a variant): a worker where some test copied a model keys like
    one where none did (found: five traces of one test_vit graph in one run, under four keys)."""
    import copy

    from ops.merge import MergeStep
    from ops.schedule import TokenSchedule

    for klass in (MergeStep, TokenSchedule):
        if "__slotnames__" in vars(klass):
            delattr(klass, "__slotnames__")
    model = _model()
    key = _key(model)
    copy.deepcopy(model)
    assert "__slotnames__" in vars(MergeStep) or "__slotnames__" in vars(TokenSchedule)
    assert _key(model) == key


def test_a_change_the_trace_cannot_reach_is_no_change(monkeypatch):
    """The precision conversion and the parity tolerances run on the graph after the trace: a
    test that breaks them shares the honest trace."""
    from exporter import parity, quantize

    key = _key(_model())
    monkeypatch.setattr(quantize, "convert_precision", lambda *args, **kwargs: None)
    monkeypatch.setitem(parity.TOLERANCES, "fp32", None)
    assert _key(_model()) == key


def _quantize_function():
    from exporter import quantize

    return quantize.default_ffn_out


BINDINGS = {  # what a test could bind in a module the trace runs, that runs code of exporter.quantize
    "function": _quantize_function,
    "partial": lambda: functools.partial(_quantize_function(), "dynamic"),
    "test lambda": lambda: lambda mode: _quantize_function()(mode),
}


@pytest.mark.parametrize("binding", BINDINGS)
def test_a_name_the_trace_runs_brings_the_module_its_code_calls_into_the_key(monkeypatch, binding):
    from exporter import decisions, quantize

    key = _key(_model())
    monkeypatch.setattr(decisions, "rank_like_the_tape", BINDINGS[binding](), raising=False)
    bound = _key(_model())
    monkeypatch.setattr(quantize, "QUANTIZED_OPS", ["MatMul"])
    assert len({key, bound, _key(_model())}) == 3


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


@pytest.mark.parametrize("name", CHANGES)
def test_the_key_follows_what_a_test_changes_and_comes_back_when_it_is_undone(name):
    before, changed, after = _keys_around(name)
    assert changed != before
    assert after == before


def test_the_keys_are_the_same_in_another_process():
    """pytest-xdist workers and the tune tests' subprocesses share the cache: a key that differed
    between processes (string hashing is seeded per process) would trace everything again. Two
    fresh processes with other hash seeds, one importing the project after the recorder and one
    before it, make every change of CHANGES and must agree key for key. (Fresh processes: this
    worker's state is whatever the tests before this one left, which can only cost a re-trace.)"""
    from tests.cli_helpers import ROOT

    keys = (
        "from tests.test_trace_cache import CHANGES, _bert, _key, _keys_around, _model\n"
        "keys = {name: _keys_around(name) for name in CHANGES}\n"
        "print(json.dumps({'deit': _key(_model()), 'bert': _key(_bert()), **keys}))"
    )
    orders = {
        "recorder first": "import json, tests.trace_cache\n",
        "project first": "import json, ops, exporter.parity, tests.trace_cache\n",
    }
    outputs = []
    for seed, prelude in zip(("12345", "54321"), orders.values()):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONHASHSEED": seed}
        run = subprocess.run(
            [sys.executable, "-c", prelude + keys], capture_output=True, text=True, env=env, check=True
        )
        outputs.append(json.loads(run.stdout))
    assert outputs[0] == outputs[1]
    assert len({len(v) for v in outputs[0].values() if isinstance(v, list)}) == 1  # [before, changed, after] each


def _graph(label: str) -> onnx.ModelProto:
    return onnx.helper.make_model(onnx.helper.make_graph([], label, [], []))


def test_the_cache_traces_a_key_once_and_again_after_a_change(tmp_path, monkeypatch):
    """What TraceCache does with the key: a second identical export is read back, not traced."""
    traced = []
    cache = TraceCache(tmp_path, lambda wrapper, *rest: traced.append(wrapper) or _graph(f"g{len(traced)}"))
    model = _model()
    signature = signature_of(model)
    inputs = tuple(signature.example_inputs(2)[name] for name in signature.input_names)

    def export() -> onnx.ModelProto:
        return cache(ExportWrapper(model, signature), inputs, signature, ["logits"], 20, True)

    assert export().graph.name == "g1" and export().graph.name == "g1" and len(traced) == 1
    _sdpa(monkeypatch, model)
    assert export().graph.name == "g2" and len(traced) == 2
