"""One registry of the released checkpoints, so a preset name carries everything it needs.

Later parts of the toolkit (backends, guidance models) add their presets here too; nothing is
registered at import time elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AlignerPreset:
    """A released Implicit Aligner: where it lives and what it plugs into."""

    repo_id: str
    filename: str
    guidance_dim: int
    image_dim: int
    base_models: tuple[str, ...]
    description: str


ALIGNER_PRESETS: dict[str, AlignerPreset] = {
    "img-sdxl": AlignerPreset(
        repo_id="shi-labs/IMG",
        filename="aligner_sdxl.pth",
        guidance_dim=5120,
        image_dim=2048,
        base_models=("sdxl", "sdxl-dpo"),
        description="official aligner for SDXL and SDXL-DPO with IP-Adapter-Plus ViT-H, "
        "guided by the finetuned LLaVA-1.5-13B",
    ),
    "img-flux": AlignerPreset(
        repo_id="shi-labs/IMG",
        filename="aligner_flux.pth",
        guidance_dim=5120,
        image_dim=4096,
        base_models=("flux",),
        description="official aligner for FLUX.1-dev with the XLabs IP-Adapter, "
        "guided by the finetuned LLaVA-1.5-13B",
    ),
}
