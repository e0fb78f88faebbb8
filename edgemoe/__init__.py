"""EdgeMoE: run Mixture-of-Experts language models on devices smaller than the model.

Importing this package does no work; ``load`` and the runtime are imported on use.
"""

from __future__ import annotations

from typing import Any

from edgemoe.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["SamplingParams", "__version__", "load"]


def load(path: str, **options: Any):
    """Load a model for generation. See ``edgemoe.runtime.model.load``."""
    from edgemoe.runtime.model import load as _load

    return _load(path, **options)
