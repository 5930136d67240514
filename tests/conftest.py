"""Shared fixtures: small random-init models (no hub access), fixed threads for stable numbers,
exports made once per session, and a check that no test leaves process-wide state changed."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)


def heavy_enabled() -> bool:
    return os.environ.get("PITOME_HEAVY") == "1"


def pytest_collection_modifyitems(config, items):
    if heavy_enabled():
        return
    skip = pytest.mark.skip(reason="heavy (full-size model or full parity grid): set PITOME_HEAVY=1 / make test-heavy")
    for item in items:
        if "heavy" in item.keywords:
            item.add_marker(skip)


NOT_IMPORTED = "not imported"


def _process_state() -> dict:
    """What a job must leave as it found it: its caller may run the next one in the same process."""
    interrupts = sys.modules.get("pipelines.jobs.interrupts")
    hub = sys.modules.get("huggingface_hub.constants")
    return {
        "SIGINT handler": signal.getsignal(signal.SIGINT),
        "unraisable hook": sys.unraisablehook,
        "interrupt record": interrupts is not None and interrupts.INTERRUPTED.is_set(),
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE"),
        "huggingface_hub offline": hub.HF_HUB_OFFLINE if hub is not None else NOT_IMPORTED,
        "torch threads": torch.get_num_threads(),
    }


@pytest.fixture(autouse=True)
def _process_state_is_left_as_found():
    """Every test, in-process CLI calls included (tests.cli_helpers.cli), leaves the process state as
    it found it; a leak fails the test that caused it. (A module imported during the test counts
    from its import on.)"""
    before = _process_state()
    yield
    after = _process_state()
    leaked = {k: (before[k], after[k]) for k in after if before[k] != after[k] and before[k] is not NOT_IMPORTED}
    assert not leaked, f"process state changed: {leaked}"


@pytest.fixture(scope="session", autouse=True)
def _trace_cache(tmp_path_factory) -> Iterator:
    """Each distinct export is traced once per test run (tests/trace_cache.py says why it is safe)."""
    from exporter import onnx_export
    from tests.trace_cache import TraceCache

    run_folder = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # the workers' folders share this run's parent
        run_folder = run_folder.parent
    folder = run_folder / "traces"
    folder.mkdir(exist_ok=True)
    cache = TraceCache(folder, onnx_export._trace)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(onnx_export, "_trace", cache)
        yield cache


@pytest.fixture(autouse=True)
def _fresh_exports(request, _trace_cache) -> Iterator[None]:
    """A test marked `fresh_exports` traces every export it makes itself."""
    _trace_cache.fresh = request.node.get_closest_marker("fresh_exports") is not None
    yield
    _trace_cache.fresh = False


@dataclass(frozen=True)
class SharedExport:
    """An ONNX file exported once per session, and how to rebuild the model it was exported from.

    The file is shared by every test that asks for it: read it, or copy it before changing it.
    `model()` builds a fresh, identical patched model (seeded), so a test may mutate that freely.
    """

    path: Path
    model: Callable[[], torch.nn.Module]


def _deit_pitome() -> torch.nn.Module:
    from ops import patch_model
    from tests.models import small_vit

    return patch_model(small_vit("deit"), algo="pitome", ratio=0.9)


@pytest.fixture(scope="session")
def deit_pitome_export(tmp_path_factory) -> SharedExport:
    """The small DeiT with PiToMe at ratio 0.9, default export (opset 20, matmul, dynamic batch).

    The same graph used to be exported in test_export, test_quantize, test_benchmarks and the
    parity suite (twice); each now reads this one.
    """
    from exporter.onnx_export import export_onnx

    path = export_onnx(_deit_pitome(), None, tmp_path_factory.mktemp("deit_pitome") / "model.onnx")
    return SharedExport(path, _deit_pitome)


def _bert_pitome() -> torch.nn.Module:
    from ops import patch_model
    from tests.models import small_text

    return patch_model(small_text("bert"), algo="pitome", ratio=0.7, seq_len=32)


@pytest.fixture(scope="session")
def bert_pitome_export(tmp_path_factory) -> SharedExport:
    """The small BERT with PiToMe at ratio 0.7, sequence length 32, default export."""
    from exporter.onnx_export import export_onnx

    path = export_onnx(_bert_pitome(), None, tmp_path_factory.mktemp("bert_pitome") / "model.onnx", seq_len=32)
    return SharedExport(path, _bert_pitome)


@pytest.fixture
def text_model_folder(tmp_path):
    """A small BERT classifier with its own WordPiece tokenizer, saved like a Hugging Face folder."""
    from transformers import BertTokenizerFast

    from tests.models import small_text

    folder = tmp_path / "bert_small"
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "film", "a", "very", "plot", "the"]
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    small_text("bert").save_pretrained(folder)
    return folder
