"""A tiny, untrained ShapesWorld model with its image-prompt adapter, written to disk.

``make_tiny_shapes(folder)`` writes a ``ShapesWorldPipeline`` folder (random weights, a UNet of 16 and
32 channels, a one-layer text encoder, a fresh adapter and image encoder) in about a second, in
float32 so that a loaded backend computes what the built one would. 32 x 32 images, token shape
(4, 64), as the shipped model.
"""

from __future__ import annotations

import os
from pathlib import Path

TINY_UNET = dict(block_out_channels=(16, 32), head_dim=16)


def make_tiny_shapes(folder: str | os.PathLike, *, seed: int = 0) -> Path:
    """Write the tiny model under ``folder``; return the folder (``ShapesBackend.from_pretrained``
    loads it)."""
    import torch

    from img_guidance.shapes.models import ShapesWorldPipeline

    pipe = ShapesWorldPipeline.build(seed=seed, unet=TINY_UNET, text_layers=1)
    pipe.add_ip_adapter(seed=seed + 1)
    pipe.save_pretrained(folder, dtype=torch.float32)
    return Path(folder)
