"""One trace per distinct export in a test run: `exporter.onnx_export._trace` memoised on a
fingerprint of everything the trace reads.

Most of the suite's time is ONNX exports, and many jobs under test export the very same model
(the seeded test_vit at ratio 0.9 by four CLI tests in three files, its decision graph by two).
The export is deterministic (tests/test_export.py checks two traces are byte-identical), so a
second trace of the same inputs can only return the first one's graph. Everything around the
trace (metadata, checks, files, parity, conversion) still runs in every test.

The fingerprint covers the traced module tree (classes, the code of their methods, plain
attributes, configs, parameters and buffers), the source of `ops` and `exporter` and any of
their functions a test replaced (so a monkeypatched merge function makes a new key), the example
inputs and the export arguments. A test marked `fresh_exports` traces every export itself.
Graphs are kept as files in a folder of this run that the pytest-xdist workers share.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import sys
import types
from pathlib import Path

import onnx
import torch

ROOT = Path(__file__).resolve().parents[1]
TRACED_PACKAGES = ("ops", "exporter", "timm", "transformers")  # whose classes' methods enter the key
_ADDRESS = re.compile(r" at 0x[0-9a-f]+")
_SKIPPED_ATTRIBUTES = ("_parameters", "_buffers", "_modules", "training")


def _code_digest(code: types.CodeType, digest) -> None:
    digest.update(code.co_code)
    digest.update(repr(code.co_names).encode())
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            _code_digest(const, digest)
        elif isinstance(const, frozenset):  # `x in {...}`: its order changes with the hash seed
            digest.update(repr(sorted(map(repr, const))).encode())
        else:
            digest.update(_ADDRESS.sub("", repr(const)).encode())


def _function_digest(value: object, digest) -> None:
    function = getattr(value, "__func__", value)
    code = getattr(function, "__code__", None)
    if code is not None:
        digest.update(getattr(function, "__qualname__", "").encode())
        _code_digest(code, digest)


def _class_digest(cls: type, digest) -> None:
    for klass in cls.__mro__:
        if klass.__module__.split(".")[0] in TRACED_PACKAGES or klass.__module__.startswith("tests"):
            digest.update(f"{klass.__module__}.{klass.__qualname__}".encode())
            for name, value in sorted(vars(klass).items()):
                digest.update(name.encode())
                _function_digest(value, digest)


@functools.cache
def _source_digest() -> bytes:
    """The merge and export code as written: every source file of `ops` and `exporter`."""
    digest = hashlib.sha256()
    for package in ("ops", "exporter"):
        for path in sorted((ROOT / package).rglob("*.py")):
            digest.update(str(path.relative_to(ROOT)).encode())
            digest.update(path.read_bytes())
    return digest.digest()


def _replaced_functions_digest(digest) -> None:
    """Functions of `ops` and `exporter` modules that a test replaced (monkeypatch): defined in a
    test, or a lambda or local function from elsewhere. Only these enter the key, so that it does
    not change as more of the project's modules are imported."""
    for name in sorted(sys.modules):
        module = sys.modules[name]
        if name.split(".")[0] not in ("ops", "exporter") or module is None:
            continue
        for attr, value in sorted(vars(module).items()):
            if isinstance(value, TraceCache) or not callable(value):
                continue
            owner, qualname = getattr(value, "__module__", "") or "", getattr(value, "__qualname__", "")
            local = "<locals>" in qualname or qualname == "<lambda>"
            if owner.startswith("tests") or (local and owner != name):
                digest.update(f"{name}.{attr}".encode())
                _function_digest(value, digest)


def _tree_digest(wrapper: torch.nn.Module, digest) -> None:
    for name, module in wrapper.named_modules():
        digest.update(name.encode())
        _class_digest(type(module), digest)
        digest.update(type(module).__qualname__.encode())
        for attr, value in sorted(vars(module).items()):
            if attr not in _SKIPPED_ATTRIBUTES and not callable(value):
                digest.update(f"{attr}={_ADDRESS.sub('', repr(value))}".encode())
    for name, tensor in wrapper.state_dict(keep_vars=True).items():
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())


def fingerprint(wrapper: torch.nn.Module, inputs: tuple[torch.Tensor, ...], *arguments: object) -> str:
    """A key that changes with anything the trace of `wrapper` on `inputs` depends on."""
    digest = hashlib.sha256()
    _tree_digest(wrapper, digest)
    digest.update(_source_digest())
    _replaced_functions_digest(digest)
    for tensor in inputs:
        digest.update(f"{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    for argument in arguments:
        if isinstance(argument, dict):  # a custom translation table: ops -> functions
            for op, function in sorted(argument.items(), key=lambda item: str(item[0])):
                digest.update(str(op).encode())
                _function_digest(function, digest)
        else:
            digest.update(_ADDRESS.sub("", repr(argument)).encode())
    return digest.hexdigest()[:32]


class TraceCache:
    """`_trace` replaced by a lookup in `folder` that traces (and stores) what it has not seen."""

    def __init__(self, folder: Path, trace) -> None:
        self.folder, self.trace, self.fresh = folder, trace, False

    def __call__(self, wrapper, inputs, sig, output_names, opset, dynamic_batch, translations=None):
        if self.fresh:
            return self.trace(wrapper, inputs, sig, output_names, opset, dynamic_batch, translations)
        arguments = (sig.input_names, output_names, opset, dynamic_batch, translations or {})
        path = self.folder / f"{fingerprint(wrapper, inputs, *arguments)}.onnx"
        if path.exists():
            return onnx.load_from_string(path.read_bytes())
        proto = self.trace(wrapper, inputs, sig, output_names, opset, dynamic_batch, translations)
        partial = path.with_suffix(f".{os.getpid()}.part")
        partial.write_bytes(proto.SerializeToString())
        partial.replace(path)  # atomic: another worker reads a whole graph or none
        return proto
