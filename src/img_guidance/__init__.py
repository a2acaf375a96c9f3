"""img-guidance: Implicit Multimodal Guidance (IMG) for text-to-image diffusion models.

The public API is re-exported here and imported lazily, so ``import img_guidance`` (and the CLI's
``--help``) stays fast: torch and friends load on first use of a name that needs them.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

try:
    __version__ = version("img-guidance")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

_EXPORTS = {
    "ImplicitAligner": "img_guidance.aligner",
    "AlignerConfig": "img_guidance.aligner",
    "load_aligner": "img_guidance.aligner",
    "iupo_loss": "img_guidance.objective",
    "ReferenceTracker": "img_guidance.objective",
    "ALIGNER_PRESETS": "img_guidance.presets",
}

__all__ = [
    "ALIGNER_PRESETS",
    "AlignerConfig",
    "ImplicitAligner",
    "ReferenceTracker",
    "__version__",
    "iupo_loss",
    "load_aligner",
]

if TYPE_CHECKING:
    from img_guidance.aligner import AlignerConfig, ImplicitAligner, load_aligner
    from img_guidance.objective import ReferenceTracker, iupo_loss
    from img_guidance.presets import ALIGNER_PRESETS


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'img_guidance' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
