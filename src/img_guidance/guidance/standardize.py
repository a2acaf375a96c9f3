"""Per-dimension standardization of a guidance model's hidden states (not in the paper).

A language model's residual stream can carry a few dimensions far larger than the rest ("massive
activations"). The paper reads the last layer, after the final norm; a layer inside the model (the
``hidden_layer`` option) is read before any norm. ShapesWorld's finetuned detector, read at layer 1,
gives its image tokens one dimension with a mean of -27 and a spread of 12 against about 1.4 for
the others: the hidden states have an effective rank of 1.4 (the untrained detector's: 31), and the
aligner, which projects them linearly and then layer-norms them, sees little else.

:func:`fit_standardization` measures each dimension's mean and standard deviation over the real
tokens of a set of (image, question) samples; a guidance model given them (``standardize``) returns
``(hidden - mean) / std``. A detector folder names its statistics in its record
(:data:`~img_guidance.guidance.DETECTOR_INFO`, key ``standardize``: a file of the folder), where
:func:`~img_guidance.guidance.load_guidance` reads them.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from PIL.Image import Image

    from img_guidance.guidance.base import GuidanceModel

STATS_FILE = "guidance_standardization.safetensors"
MIN_STD = 1e-6  # a dimension that never varies is centred, not blown up


def check_standardization(stats: dict[str, torch.Tensor], hidden_size: int, where: str = "") -> None:
    """Raise unless ``stats`` holds ``mean`` and ``std``, each [hidden_size], finite, std > 0."""
    import torch

    of = f" ({where})" if where else ""
    if set(stats) != {"mean", "std"}:
        raise ValueError(f"guidance standardization{of} needs exactly 'mean' and 'std', got {sorted(stats)}")
    for name, value in stats.items():
        if tuple(value.shape) != (hidden_size,):
            raise ValueError(
                f"guidance standardization{of}: {name} has shape {tuple(value.shape)}, the model's "
                f"hidden states have {hidden_size} dimensions"
            )
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"guidance standardization{of}: {name} is not finite")
    if not bool((stats["std"] > 0).all()):
        raise ValueError(f"guidance standardization{of}: std must be positive")


def fit_standardization(
    guidance: GuidanceModel,
    images: Sequence[Image],
    questions: Sequence[str],
    *,
    batch_size: int = 64,
) -> dict[str, torch.Tensor]:
    """Each hidden dimension's mean and standard deviation (float32, on the CPU) over the real
    tokens of ``guidance.guide`` on the samples (one image per filled question), read as the model
    reads them now (without any standardization it has)."""
    import torch

    if len(images) != len(questions) or not images:
        raise ValueError(
            f"one question per image, and at least one: got {len(images)} images, {len(questions)} questions"
        )
    standardize, guidance.standardize = getattr(guidance, "standardize", None), None
    total = torch.zeros(guidance.hidden_size, dtype=torch.float64)
    squares = torch.zeros_like(total)
    count = 0
    try:
        for start in range(0, len(images), batch_size):
            out = guidance.guide(images[start : start + batch_size], questions[start : start + batch_size])
            tokens = out.hidden_states[out.attention_mask].detach().to("cpu", torch.float64)
            total += tokens.sum(0)
            squares += tokens.square().sum(0)
            count += tokens.shape[0]
    finally:
        guidance.standardize = standardize
    mean = total / count
    std = ((squares / count - mean.square()).clamp_min(0) * count / max(count - 1, 1)).sqrt()
    return {"mean": mean.float(), "std": std.clamp_min(MIN_STD).float()}


def apply_standardization(hidden: torch.Tensor, stats: dict[str, torch.Tensor]) -> torch.Tensor:
    """``(hidden - mean) / std`` computed in float32, returned in ``hidden``'s dtype and device."""
    mean = stats["mean"].to(hidden.device)
    std = stats["std"].to(hidden.device)
    return ((hidden.float() - mean) / std).to(hidden.dtype)


def save_standardization(stats: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Write the statistics as safetensors, atomically (a temporary file renamed into place)."""
    from safetensors.torch import save_file

    tmp = f"{os.fspath(path)}.tmp"
    save_file({name: value.contiguous().float() for name, value in stats.items()}, tmp)
    os.replace(tmp, path)


def load_standardization(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.fspath(path))


def fingerprint(stats: dict[str, torch.Tensor]) -> str:
    """A short hash of the statistics: feature caches made with other statistics do not match."""
    digest = hashlib.sha256()
    for name in ("mean", "std"):
        digest.update(stats[name].float().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]
