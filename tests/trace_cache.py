"""One trace per distinct export in a test run: `exporter.onnx_export._trace` memoised on a
fingerprint of everything the trace reads.

Most of the suite's time is ONNX exports, and many jobs under test export the very same model
(the seeded test_vit at ratio 0.9 by four CLI tests in three files, its decision graph by two).
The export is deterministic (tests/test_export.py checks two traces are byte-identical), so a
second trace of the same inputs can only return the first one's graph. Everything around the
trace (metadata, checks, files, parity, conversion) still runs in every test.

The key (tests/test_trace_cache.py changes each part and checks that the key follows) covers:

- the traced module tree: each module's class (for classes of ops, exporter, timm, transformers
  and the tests: the code of every method down the MRO and the other class attributes by value),
  every instance attribute by value (configs with their private fields such as
  `_attn_implementation`, merge steps, plain tensors, hooks by code), and every parameter and
  buffer, persistent or not, by dtype, shape and bytes;
- the source files of `ops` and `exporter`, the code as written;
- every module-level name changed since its module was imported (monkeypatch.setattr, setitem,
  delattr; a name added counts too): in every module of `ops` and in each `exporter` module the
  trace can run (`exporter.onnx_export`, which runs it, the modules of the tree's classes, of its
  hooks and of the translation functions, and every project module these import, at module level
  or inside a function, or hold code of; code written in a test may call any), functions,
  constants, the attributes of the classes they define and their module-level dicts; in `torch`,
  `torch.nn.functional`, `torch.onnx`, `torch.Tensor` and the torch.nn classes of the tree; in the
  timm and transformers modules that define the tree's classes. A class's memo (copyreg's
  `__slotnames__`) is no change. A changed value enters by content (functions by code, defaults
  and closure; classes by their attributes; constants by value), so two processes that made the
  same change agree on the key;
- the example inputs (dtype, shape, bytes) and the export arguments (a translation table by the
  code of its functions).

Not covered: other modules' names (numpy, onnx, the rest of torch); an `exporter` module reached
only through a name built at run time (importlib, getattr on a package); a function whose code or
defaults are replaced on the function object itself; lists and sets changed in place, and dicts
inside other values; a module's `__dunder__` names and its submodule attributes (the import
system and `warnings` change those). A change made to a module before this file was imported,
or loaded without the import system, is part of that module's recorded state. A test marked
`fresh_exports` traces every export itself. Graphs are kept as files in a folder of this run
that the pytest-xdist workers share.
"""

from __future__ import annotations

import ast
import enum
import functools
import hashlib
import importlib.abc
import os
import re
import sys
import types
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnx
import torch

ROOT = Path(__file__).resolve().parents[1]
PROJECT_PACKAGES = ("ops", "exporter")  # all their modules' state enters the key
TRACED_PACKAGES = (*PROJECT_PACKAGES, "timm", "transformers")  # whose classes enter by code
TORCH_MODULES = ("torch", "torch.nn.functional", "torch.onnx")
TENSOR_UNIT = f"{torch.Tensor.__module__}.{torch.Tensor.__qualname__}"  # every trace calls its methods
TRACE_CALLER = "exporter.onnx_export"  # runs the trace: its wrappers and lowerings
_ADDRESS = re.compile(r" at 0x[0-9a-f]+")
_SKIPPED_ATTRIBUTES = ("_parameters", "_buffers", "_modules", "training")
_PLAIN = (type(None), bool, int, float, complex, str, bytes, enum.Enum, torch.dtype, torch.device)
_MISSING = object()
_CODE_DIGESTS: dict[int, tuple[types.CodeType, bytes]] = {}  # id -> (the code, its digest); code is immutable


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


def _code_bytes(code: types.CodeType) -> bytes:
    """The digest of `code`, computed once per code object (most are digested on every key)."""
    known = _CODE_DIGESTS.get(id(code))
    if known is None or known[0] is not code:
        digest = hashlib.sha256()
        _code_digest(code, digest)
        known = _CODE_DIGESTS[id(code)] = (code, digest.digest())
    return known[1]


def _traced(klass: type) -> bool:
    return klass.__module__.split(".")[0] in (*TRACED_PACKAGES, "tests")


class _Digest:
    """One key's hash, and the digests of the objects it has seen: a config that ten modules hold
    is walked once; an object met again inside itself stands for a fixed marker."""

    def __init__(self) -> None:
        self.hash = hashlib.sha256()
        self.seen: dict[int, bytes] = {}

    def update(self, data: bytes | str) -> None:
        self.hash.update(data.encode() if isinstance(data, str) else data)

    def once(self, value: object, walk: Callable[[object, _Digest], None]) -> None:
        """`walk(value)` into a digest of its own, kept by the value's id for the key's lifetime."""
        known = self.seen.get(id(value))
        if known is None:
            self.seen[id(value)] = b"(cycle)"
            inner = _Digest()
            inner.seen = self.seen
            walk(value, inner)
            known = self.seen[id(value)] = inner.hash.digest()
        self.update(known)


def _tensor_digest(tensor: torch.Tensor | np.ndarray, digest: _Digest) -> None:
    digest.update(f"{tensor.dtype}:{tuple(tensor.shape)}")
    if isinstance(tensor, torch.Tensor):
        tensor = tensor.detach().contiguous().cpu().numpy()
    digest.update(np.ascontiguousarray(tensor).tobytes())


def _cell_value(cell: types.CellType) -> object:
    try:
        return cell.cell_contents
    except ValueError:  # a closure variable not assigned yet
        return _MISSING


def _function_digest(value: object, digest: _Digest) -> None:
    """A function by its name, code, defaults and closure; a builtin by its name."""
    function = getattr(value, "__func__", value)  # staticmethod, classmethod, bound method
    name = getattr(function, "__qualname__", type(function).__qualname__)
    digest.update(f"{getattr(function, '__module__', None)}.{name}")
    code = getattr(function, "__code__", None)
    if code is None:
        return
    digest.update(_code_bytes(code))
    for part in (function.__defaults__, function.__kwdefaults__):
        _value_digest(part, digest)
    for cell in function.__closure__ or ():
        _value_digest(_cell_value(cell), digest)


def _memo(name: str) -> bool:
    """A class attribute a library sets to remember what it computed about the class
    (transformers' `_can_set_attn_implementation_cached_value`, written the first time a model
    of the class checks it; copyreg's `__slotnames__`, written on the first copy or pickle of an
    instance): present or not, the class computes the same."""
    return name.endswith("_cached_value") or name == "__slotnames__"


def _class_digest(cls: type, digest: _Digest) -> None:
    """Every attribute of the traced packages' classes down the MRO (memos aside): methods by
    code, the rest by value. Other classes (torch's) by name; their changes are the namespaces'
    to find."""
    for klass in cls.__mro__:
        digest.update(f"{klass.__module__}.{klass.__qualname__}")
        if _traced(klass):
            for name, value in sorted(vars(klass).items()):
                if _memo(name):
                    continue
                digest.update(name)
                _value_digest(value, digest)


def _object_digest(value: object, digest: _Digest) -> None:
    digest.update(f"{type(value).__module__}.{type(value).__qualname__}")
    for name, item in sorted(vars(value).items()):
        digest.update(name)
        _value_digest(item, digest)


def _container_digest(value: object, digest: _Digest) -> None:
    digest.update(f"{type(value).__qualname__}[{len(value)}]")
    if not value:  # most of a module's attributes: its empty hook dicts
        return
    if isinstance(value, (set, frozenset)):  # iteration order changes with the hash seed
        digest.update(repr(sorted(_ADDRESS.sub("", repr(item)) for item in value)))
        return
    for item in value.items() if isinstance(value, dict) else value:
        _value_digest(item, digest)


def _value_digest(value: object, digest: _Digest) -> None:
    """`value` by content, the same in every process: plain values by repr, tensors and arrays by
    bytes, containers item by item, functions by code, the traced packages' classes and objects
    attribute by attribute; anything else by its repr without addresses."""
    if isinstance(value, _PLAIN):
        digest.update(f"{type(value).__qualname__}:{value!r}")
    elif isinstance(value, (torch.Tensor, np.ndarray)):
        _tensor_digest(value, digest)
    elif isinstance(value, (tuple, list, dict, set, frozenset)):
        _container_digest(value, digest)
    elif isinstance(value, (types.ModuleType, torch.nn.Module)):  # a submodule's content is the tree's
        digest.update(f"{type(value).__qualname__}:{getattr(value, '__name__', '')}")
    elif isinstance(value, type):  # by name: its changes are the namespaces' to find
        digest.update(f"class {value.__module__}.{value.__qualname__}")
    elif isinstance(value, functools.partial):
        _value_digest((value.func, value.args, value.keywords), digest)
    elif isinstance(value, property):
        _value_digest((value.fget, value.fset, value.fdel), digest)
    elif callable(value) or isinstance(value, (staticmethod, classmethod)):
        digest.once(value, _function_digest)
    elif _traced(type(value)) and hasattr(value, "__dict__"):
        digest.once(value, _object_digest)
    else:
        digest.update(_ADDRESS.sub("", repr(value)))


@functools.cache
def _source_digest() -> bytes:
    """The merge and export code as written: every source file of `ops` and `exporter`."""
    digest = hashlib.sha256()
    for package in PROJECT_PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            digest.update(str(path.relative_to(ROOT)).encode())
            digest.update(path.read_bytes())
    return digest.digest()


def _recorded_module(name: str) -> bool:
    return name.split(".")[0] in TRACED_PACKAGES or name in TORCH_MODULES


def _dunder(name: str) -> bool:
    return name.startswith("__") and name.endswith("__")


def _library_module(value: object) -> str:
    """The top-level package that defines `value`: "torch", "timm", "ops"."""
    return _library_module_name(value).split(".")[0]


class _Recorded(NamedTuple):
    label: str  # how a changed name is spelled in the key: "ops.merge._PAD_ENERGY"
    namespace: object  # a module, a class or a dict
    names: dict  # its names and values as recorded
    of_torch: bool

    def live(self) -> dict:
        return self.namespace if isinstance(self.namespace, dict) else vars(self.namespace)

    def counts(self, name: str, value: object, recorded: object) -> bool:
        """Whether `name`, bound to `value` where `recorded` was, can be a test's change: not the
        cache itself, not a module's dunder (`__warningregistry__`) or submodule, and in torch's
        namespaces only a value from outside torch, timm and transformers: they rebind some of
        torch's names themselves (importing torch._dynamo wraps `torch.manual_seed`,
        transformers' first model adds `torch.nn.Module.smart_apply`), nor a library module's name
        that its lazy import binds on first access (`transformers.BertConfig`, once some test
        has read it) to an object of the library itself."""
        if isinstance(value, TraceCache) or isinstance(recorded, TraceCache):
            return False
        if isinstance(self.namespace, type) and _memo(name):
            return False
        library = self.label.split(".")[0]
        if recorded is _MISSING and library not in PROJECT_PACKAGES and _library_module(value) == library:
            return False
        if isinstance(self.namespace, types.ModuleType):
            if _dunder(name) or isinstance(value, types.ModuleType) or isinstance(recorded, types.ModuleType):
                return False
        return not (self.of_torch and _library_module(value) in ("torch", "timm", "transformers"))


def _changed_names(recorded: dict, live: dict) -> list[str]:
    """The names of `live` not bound to the very object `recorded` holds, and those it lost."""
    changed = [name for name, value in live.items() if recorded.get(name, _MISSING) is not value]
    return sorted(changed + [name for name in recorded if name not in live])


class _Namespaces:
    """The module-level state a trace can read, as it was when each module was imported, so that
    a key can name what a test changed since. A unit is a module (with, for a project module, its
    classes and module-level dicts) or one of torch's classes."""

    def __init__(self) -> None:
        self.units: dict[str, list[_Recorded]] = {}

    def record_module(self, module: types.ModuleType) -> None:
        name = module.__name__
        entries = [_Recorded(name, module, dict(vars(module)), name.split(".")[0] == "torch")]
        if name.split(".")[0] in PROJECT_PACKAGES:
            for attr, value in vars(module).items():
                if isinstance(value, type) and value.__module__ == name:
                    entries.append(_Recorded(f"{name}.{attr}", value, dict(vars(value)), False))
                elif isinstance(value, dict) and not _dunder(attr):
                    entries.append(_Recorded(f"{name}.{attr}", value, dict(value), False))
        self.units[name] = entries

    def record_class(self, cls: type) -> None:
        label = f"{cls.__module__}.{cls.__qualname__}"
        self.units[label] = [_Recorded(label, cls, dict(vars(cls)), True)]

    def project_units(self) -> list[str]:
        return [name for name in self.units if name.split(".")[0] in PROJECT_PACKAGES]

    def changes_digest(self, units: Iterable[str], digest: _Digest) -> None:
        """Every name of `units` whose value is not the recorded one (by identity), by content."""
        for unit in sorted(set(units)):
            for recorded in self.units.get(unit, ()):
                live = recorded.live()
                for name in _changed_names(recorded.names, live):
                    value = live.get(name, _MISSING)
                    if not recorded.counts(name, value, recorded.names.get(name, _MISSING)):
                        continue
                    digest.update(f"{recorded.label}.{name}=")
                    if value is _MISSING:
                        digest.update("(deleted)")
                    elif isinstance(value, type):
                        digest.once(value, _class_digest)
                    else:
                        _value_digest(value, digest)


class _RecordingLoader(importlib.abc.Loader):
    """A module's own loader, then its state recorded before anything else can change it."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        self.loader.exec_module(module)
        NAMESPACES.record_module(module)

    def __getattr__(self, name: str):  # get_source, is_package, get_resource_reader...
        return getattr(self.loader, name)


class _RecordOnImport(importlib.abc.MetaPathFinder):
    """Finds a module of the traced packages with the finders after it and records it on import."""

    def find_spec(self, fullname, path, target=None):
        if not _recorded_module(fullname):
            return None
        for finder in sys.meta_path[sys.meta_path.index(self) + 1 :]:
            spec = finder.find_spec(fullname, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _RecordingLoader(spec.loader)
                return spec
        return None


def _start_recording() -> _Namespaces:
    """The namespaces as they are now (before any test ran), and every later import as it lands."""
    namespaces = _Namespaces()
    for name, module in list(sys.modules.items()):
        if module is not None and _recorded_module(name):
            namespaces.record_module(module)
    for cls in (torch.Tensor, *(value for value in vars(torch.nn).values() if isinstance(value, type))):
        namespaces.record_class(cls)
    sys.meta_path.insert(0, _RecordOnImport())
    return namespaces


def _imported_names(module_name: str) -> set[str]:
    """The project modules that `module_name`'s source imports, at module level or inside a
    function (`from exporter import decisions`, `import ops.merge`), by the names they import."""
    module = sys.modules.get(module_name)
    source = getattr(module, "__file__", None)
    if source is None or not source.endswith(".py"):
        return set()
    return _imports_in(source, getattr(module, "__package__", None) or "")


@functools.cache
def _imports_in(source: str, package: str) -> frozenset[str]:
    """The project names `source` imports (read once per file; relative imports made absolute)."""
    names = set()
    for node in ast.walk(ast.parse(Path(source).read_bytes())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], base]).strip(".")
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return frozenset(name for name in names if name.split(".")[0] in PROJECT_PACKAGES)


def _referenced_modules(module_name: str) -> set[str]:
    """The project modules `module_name` can run code of: those its source imports, and those
    whose code the values its namespace holds now run (a test may have bound another module's
    function there). A package's submodules count only if its source imports them: its namespace
    holds every submodule imported so far."""
    module = sys.modules.get(module_name)
    if module is None:
        return set()
    found = set(_imported_names(module_name))
    package = hasattr(module, "__path__")
    for name, value in vars(module).items():
        if _dunder(name):  # the import system's (`__loader__`, `__spec__`)
            continue
        if isinstance(value, type) and value.__module__ == module_name:  # its methods, as a test left them
            for attribute in vars(value).values():
                found |= _code_modules(attribute)
        elif not (package and isinstance(value, types.ModuleType)):
            found |= _code_modules(value)
    return {name for name in found if name.split(".")[0] in PROJECT_PACKAGES and name in sys.modules}


def _code_modules(value: object) -> set[str]:
    """The modules whose code `value` runs when called (or, a module, the module): its own; a
    partial's or a bound method's function and the method's class; for code written in the tests
    (a lambda, a wrapper), every project module, since it may call any of them."""
    if isinstance(value, TraceCache):  # the cache in `_trace`'s place
        return set()
    if isinstance(value, functools.partial):
        return _code_modules(value.func)
    if isinstance(value, types.MethodType):
        return _code_modules(value.__func__) | _code_modules(type(value.__self__))
    name = getattr(value, "__name__", "") if isinstance(value, types.ModuleType) else _library_module_name(value)
    if not isinstance(name, str):
        return set()
    if name.split(".")[0] in ("tests", "__main__"):
        return set(NAMESPACES.project_units())
    return {name}


def _closure(starts: Iterable[str]) -> set[str]:
    """The project modules a trace started from `starts` (the trace's caller, the modules of the
    tree's classes, hooks and translation functions) can run code of, with their packages: every
    `ops` module can (the model's forward runs the merge), an `exporter` module only if reached
    by import or by a name held (`exporter.quantize` and `exporter.parity` run after the trace,
    on its graph, so a test's change there cannot change it)."""
    seen, todo = set(), [name for name in starts if name.split(".")[0] in PROJECT_PACKAGES]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(_referenced_modules(name))
    return seen | {name.rsplit(".", depth)[0] for name in seen for depth in range(1, name.count(".") + 1)}


def _hooks(wrapper: torch.nn.Module) -> list:
    """The forward hooks of the traced tree: they run inside the trace."""
    return [hook for module in wrapper.modules() for hooks in (module._forward_pre_hooks, module._forward_hooks)
            for hook in hooks.values()]  # fmt: skip


def _library_module_name(value: object) -> str:
    return str(getattr(value, "__module__", "") or "")


def _tree_digest(wrapper: torch.nn.Module, digest: _Digest) -> set[str]:
    """The module tree, and the namespaces its classes read: their modules, torch's classes."""
    units = set()
    for name, module in wrapper.named_modules():
        digest.update(name)
        digest.once(type(module), _class_digest)
        for klass in type(module).__mro__:
            units.add(klass.__module__ if _traced(klass) else f"{klass.__module__}.{klass.__qualname__}")
        for attr, value in sorted(vars(module).items()):
            if attr not in _SKIPPED_ATTRIBUTES:
                digest.update(attr)
                _value_digest(value, digest)
    for name, tensor in (*wrapper.named_parameters(), *wrapper.named_buffers()):
        digest.update(name)
        _tensor_digest(tensor, digest)
    return units


def fingerprint(wrapper: torch.nn.Module, inputs: tuple[torch.Tensor, ...], *arguments: object) -> str:
    """A key that changes with anything the trace of `wrapper` on `inputs` depends on."""
    digest = _Digest()
    units = _tree_digest(wrapper, digest)
    digest.update(_source_digest())
    translations = arguments[-1] if arguments and isinstance(arguments[-1], dict) else {}
    callables = [*translations.values(), *_hooks(wrapper)]
    reachable = _closure({*units, TRACE_CALLER, *(name for value in callables for name in _code_modules(value))})
    project = [unit for unit in NAMESPACES.project_units() if unit.split(".")[0] != "exporter" or unit in reachable]
    NAMESPACES.changes_digest([*units, *project, *TORCH_MODULES, TENSOR_UNIT], digest)
    for value in (*inputs, *arguments):
        _value_digest(value, digest)
    return digest.hash.hexdigest()[:32]


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


NAMESPACES = _start_recording()
