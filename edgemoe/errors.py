"""Typed errors. Each names the file, tensor or value at fault and what was expected.

The CLI prints ``str(err)`` on one line and exits non-zero; nothing below this
layer may let a numpy or C-level failure escape for bad input.
"""

from __future__ import annotations


class EdgeMoEError(Exception):
    """Base class of every error EdgeMoE raises on purpose."""


class ModelFileError(EdgeMoEError):
    """A model file is missing, truncated, corrupt or not what its name says."""

    def __init__(self, path: object, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class ConfigError(EdgeMoEError):
    """A model config or option has a value EdgeMoE cannot use."""


class UnsupportedArchitectureError(EdgeMoEError, NotImplementedError):
    """The checkpoint's architecture has no registered family."""

    def __init__(self, arch: str, supported: list[str], source: str = ""):
        self.arch = arch
        self.supported = supported
        where = f" ({source})" if source else ""
        super().__init__(
            f"architecture {arch!r}{where} is not supported; "
            f"supported: {', '.join(supported)}"
        )


class ModelOutputError(EdgeMoEError):
    """The model computed something no token can be drawn from (NaN logits)."""


class ContextOverflowError(EdgeMoEError):
    """The prompt (plus what is asked to be generated) does not fit the context."""


class GGMLError(EdgeMoEError):
    """The ggml libraries are missing, mismatched, or refused an operation."""
