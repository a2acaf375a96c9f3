"""One registry of the released checkpoints, so a preset name carries everything it needs.

Later parts of the toolkit (backends, guidance models) add their presets here too; nothing is
registered at import time elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# ShapesWorld's trained models ship inside the package (img-guidance shapes train-all reproduces them)
SHAPES_WEIGHTS = Path(__file__).resolve().parent / "shapes" / "weights"


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


@dataclass(frozen=True)
class BackendPreset:
    """A base model with its IP-Adapter, the way the paper runs it. Locations are hub ids, hub
    paths (``owner/repo/sub/path``) or local paths; each can be overridden when loading."""

    family: str
    model: str
    ip_adapter: str
    image_encoder: str
    aligner: str
    steps: int
    guidance_scale: float
    height: int = 1024
    width: int = 1024
    unet: str | None = None
    true_cfg_scale: float | None = None
    mllm: str | None = None  # the guidance model its aligner was trained with (None: the paper's detector)


BACKEND_PRESETS: dict[str, BackendPreset] = {
    "shapes": BackendPreset(
        family="shapes",
        model=str(SHAPES_WEIGHTS / "generator"),
        ip_adapter=str(SHAPES_WEIGHTS / "generator"),
        image_encoder=str(SHAPES_WEIGHTS / "generator"),
        aligner=str(SHAPES_WEIGHTS / "aligner"),
        mllm="shapes-detector",
        steps=20,
        guidance_scale=1.5,
        height=32,
        width=32,
    ),
    "sdxl": BackendPreset(
        family="sdxl",
        model="stabilityai/stable-diffusion-xl-base-1.0",
        ip_adapter="h94/IP-Adapter/sdxl_models/ip-adapter-plus_sdxl_vit-h.safetensors",
        image_encoder="h94/IP-Adapter/models/image_encoder",
        aligner="img-sdxl",
        steps=50,
        guidance_scale=7.5,
    ),
    "sdxl-dpo": BackendPreset(
        family="sdxl",
        model="stabilityai/stable-diffusion-xl-base-1.0",
        unet="mhdang/dpo-sdxl-text2image-v1/unet",
        ip_adapter="h94/IP-Adapter/sdxl_models/ip-adapter-plus_sdxl_vit-h.safetensors",
        image_encoder="h94/IP-Adapter/models/image_encoder",
        aligner="img-sdxl",
        steps=50,
        guidance_scale=7.5,
    ),
    "flux": BackendPreset(
        family="flux",
        model="black-forest-labs/FLUX.1-dev",
        ip_adapter="XLabs-AI/flux-ip-adapter/ip_adapter.safetensors",
        image_encoder="openai/clip-vit-large-patch14",
        aligner="img-flux",
        steps=30,
        guidance_scale=3.5,
        true_cfg_scale=3.5,
    ),
}


@dataclass(frozen=True)
class GuidancePreset:
    """A multimodal LLM used as the guidance model, with the prompt format it is read with."""

    family: str  # "llava", "qwen2_vl", "qwen2_5_vl"
    model: str
    prompt_format: str
    hidden_size: int
    description: str = ""


GUIDANCE_PRESETS: dict[str, GuidancePreset] = {
    "shapes-detector": GuidancePreset(
        family="llava",
        model=str(SHAPES_WEIGHTS / "detector"),
        prompt_format="llava_v0",
        hidden_size=96,
        description="ShapesWorld's tiny LLaVA, finetuned as its misalignment detector (ships in the package)",
    ),
    "img-llava-13b": GuidancePreset(
        family="llava",
        model="shi-labs/IMG/llava",
        prompt_format="llava_v0",
        hidden_size=5120,
        description="the IMG authors' misalignment detector (LLaVA-1.5-13B finetuned on InstructPix2Pix), "
        "in the original LLaVA layout: convert it once with `img-guidance convert-llava img-llava-13b DEST`",
    ),
    "llava-1.5-13b": GuidancePreset(
        family="llava",
        model="llava-hf/llava-1.5-13b-hf",
        prompt_format="llava_v0",
        hidden_size=5120,
        description="LLaVA-1.5-13B as released (the paper's 'original MLLM' ablation)",
    ),
    "llava-1.5-7b": GuidancePreset(
        family="llava", model="llava-hf/llava-1.5-7b-hf", prompt_format="llava_v0", hidden_size=4096
    ),
    "qwen2.5-vl-7b": GuidancePreset(
        family="qwen2_5_vl", model="Qwen/Qwen2.5-VL-7B-Instruct", prompt_format="chat", hidden_size=3584
    ),
    "qwen2-vl-7b": GuidancePreset(
        family="qwen2_vl", model="Qwen/Qwen2-VL-7B-Instruct", prompt_format="chat", hidden_size=3584
    ),
}
