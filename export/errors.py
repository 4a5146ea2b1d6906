"""Errors raised by apl-export, each naming the problem and the fix (all are :class:`APLAdapterError`)."""

from apl_adapter.errors import APLAdapterError


class ExportError(APLAdapterError, RuntimeError):
    """Bad input to the exporter, or an export that failed its validation."""


class ValidationError(ExportError):
    """An exported model disagrees with its PyTorch reference (names, shapes or values)."""


class TensorRTUnavailableError(ExportError):
    """No TensorRT builder is installed (neither ``tensorrt`` nor the TensorRT-RTX wheels)."""


class InsufficientMemoryError(ExportError):
    """A stage would need more memory than the machine has (checked before the stage starts, see ``memory``)."""
