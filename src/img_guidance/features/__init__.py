"""The feature stage: MLLM guidance and IP tokens of preference pairs, and the sharded cache.

Names are imported lazily, so importing this package does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from img_guidance.features.cache import (
        CorruptShardError,
        FeatureCache,
        FeatureCacheWriter,
        collate_features,
    )
    from img_guidance.features.extract import OnlineFeatures, extract_features, pair_features, run_features

_EXPORTS = {
    "CorruptShardError": "img_guidance.features.cache",
    "FeatureCache": "img_guidance.features.cache",
    "FeatureCacheWriter": "img_guidance.features.cache",
    "collate_features": "img_guidance.features.cache",
    "OnlineFeatures": "img_guidance.features.extract",
    "extract_features": "img_guidance.features.extract",
    "pair_features": "img_guidance.features.extract",
    "run_features": "img_guidance.features.extract",
}

__all__ = [
    "CorruptShardError",
    "FeatureCache",
    "FeatureCacheWriter",
    "OnlineFeatures",
    "collate_features",
    "extract_features",
    "pair_features",
    "run_features",
]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'img_guidance.features' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
