"""Shared fixtures: small random-init models (no hub access), fixed threads for stable numbers,
exports made once per session, and a reset of the process-wide state in-process CLI calls leave."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
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


@pytest.fixture(autouse=True)
def _reset_process_state():
    """Undo what an in-process `pipelines.cli.main` call (tests.cli_helpers.cli) leaves behind.

    The CLI was written for one job per process; run in-process it leaks: `interrupts.install()`
    replaces the SIGINT handler and the INTERRUPTED flag is never cleared; the job sets
    `torch.set_num_threads` and `torch.manual_seed`; `models.go_offline_if_hub_unreachable` writes
    `os.environ["HF_HUB_OFFLINE"]` and `huggingface_hub.constants.HF_HUB_OFFLINE`.
    """
    handler = signal.getsignal(signal.SIGINT)
    environ = dict(os.environ)
    threads = torch.get_num_threads()
    rng = torch.get_rng_state()
    hub = sys.modules.get("huggingface_hub.constants")
    hub_offline = getattr(hub, "HF_HUB_OFFLINE", None)
    yield
    signal.signal(signal.SIGINT, handler)
    interrupts = sys.modules.get("pipelines.interrupts")
    if interrupts is not None:
        interrupts.INTERRUPTED.clear()
    if dict(os.environ) != environ:
        os.environ.clear()
        os.environ.update(environ)
    torch.set_num_threads(threads)
    torch.set_rng_state(rng)
    hub = sys.modules.get("huggingface_hub.constants")
    if hub is not None:  # the value at the test's start, or (imported during the test) what the restored env says
        hub.HF_HUB_OFFLINE = hub_offline if hub_offline is not None else os.environ.get("HF_HUB_OFFLINE") == "1"


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
