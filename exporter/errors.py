"""Errors of the export stage that users act on (the CLI maps them to exit codes)."""

from ops.errors import PitomeError


class MissingBackendError(PitomeError):
    """A runtime the command needs (TensorRT, CUDA, an ORT provider) is not available: exit 4."""


class ParityError(PitomeError):
    """The export does not compute what the PyTorch reference computes: exit 3."""
