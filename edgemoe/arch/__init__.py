"""Architecture registry, keyed by HF ``architectures[0]`` and GGUF
``general.architecture``.

Every module in this package but the helpers (``base``, ``validate``,
``yarn_config``) defines one family and registers it
with ``@register``; modules are discovered on first lookup, so adding a family is
adding a file.
"""

from __future__ import annotations

import importlib
import pkgutil

from edgemoe.arch.base import Family, GGUFMeta, ModelSpec, TensorMap
from edgemoe.errors import UnsupportedArchitectureError

__all__ = [
    "Family",
    "GGUFMeta",
    "ModelSpec",
    "TensorMap",
    "register",
    "family_for_hf",
    "family_for_gguf",
    "supported",
]

_HF: dict[str, type[Family]] = {}
_GGUF: dict[str, type[Family]] = {}
_loaded = False


def register(cls: type[Family]) -> type[Family]:
    """Class decorator: make a family findable by its source identifiers."""
    for key in cls.hf_architectures:
        _HF[key] = cls
    for key in cls.gguf_architectures:
        _GGUF[key] = cls
    return cls


def _discover() -> None:
    global _loaded
    if _loaded:
        return
    for mod in pkgutil.iter_modules(__path__):
        if mod.name not in ("base", "validate", "yarn_config"):  # helpers
            importlib.import_module(f"{__name__}.{mod.name}")
    _loaded = True


def supported() -> dict[str, list[str]]:
    """Registered identifiers: ``{"hf": [...], "gguf": [...]}``."""
    _discover()
    return {"hf": sorted(_HF), "gguf": sorted(_GGUF)}


def family_for_hf(arch: str, source: str = "") -> type[Family]:
    _discover()
    if arch not in _HF:
        raise UnsupportedArchitectureError(arch, sorted(_HF), source)
    return _HF[arch]


def family_for_gguf(arch: str, source: str = "") -> type[Family]:
    _discover()
    if arch not in _GGUF:
        raise UnsupportedArchitectureError(arch, sorted(_GGUF), source)
    return _GGUF[arch]
