"""TensorRT engines from the exported graph: build (`build`), run and time (`runner`), and the
fused-merge plugin (`plugin`).

TensorRT and CUDA are optional: `require_tensorrt` / `require_cuda` turn their absence into one
clear line and exit code 4 before any work. The GPU-free parts (profiles, sidecars, the
compatibility refusal) live in `build` and import neither.
"""

from __future__ import annotations

import importlib.util

from exporter.errors import MissingBackendError

INSTALL_HINT = "TensorRT not installed (pip install pitome-export[trt])"


def tensorrt_available() -> bool:
    return importlib.util.find_spec("tensorrt") is not None


def require_tensorrt():
    """The `tensorrt` module, or MissingBackendError with the install hint."""
    if not tensorrt_available():
        raise MissingBackendError(INSTALL_HINT)
    import tensorrt

    return tensorrt


def require_cuda() -> None:
    """MissingBackendError unless PyTorch sees a CUDA device (engines build and run on one)."""
    import torch

    if not torch.cuda.is_available():
        raise MissingBackendError("no CUDA device found: TensorRT engines build and run on an NVIDIA GPU")
