"""Diffusion backends: one module per model family, all behind :class:`DiffusionBackend`."""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

from img_guidance.backends.base import (
    OFFLOAD_MODES,
    SIDE_MULTIPLES,
    DiffusionBackend,
    GenerationDefaults,
    ImageSides,
    OffloadMode,
    check_offload,
    check_prompts,
)

if TYPE_CHECKING:
    import torch

    from img_guidance.backends.flux import FluxImageEncoder
    from img_guidance.backends.sdxl import SDXLImageEncoder

__all__ = [
    "OFFLOAD_MODES",
    "DiffusionBackend",
    "GenerationDefaults",
    "ImageSides",
    "OffloadMode",
    "check_offload",
    "check_request",
    "family_of",
    "image_encoder_locations",
    "load_backend",
    "load_image_encoder",
]

# diffusers pipeline classes (model_index.json "_class_name") -> our family
PIPELINE_FAMILIES = {
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusionXLImg2ImgPipeline": "sdxl",
    "FluxPipeline": "flux",
    "ShapesWorldPipeline": "shapes",
}


def family_of(model: str | os.PathLike) -> str:
    """The family of a preset name or of a diffusers pipeline folder / hub repo (read from its
    ``model_index.json``)."""
    from img_guidance.hub import hub_file, is_local
    from img_guidance.presets import BACKEND_PRESETS

    name = os.fspath(model)
    if name in BACKEND_PRESETS and not is_local(name):
        return BACKEND_PRESETS[name].family
    index = os.path.join(name, "model_index.json") if is_local(name) else hub_file(f"{name}/model_index.json")
    if not os.path.isfile(index):
        raise FileNotFoundError(
            f"{name} is not a preset ({', '.join(BACKEND_PRESETS)}) nor a diffusers pipeline folder "
            "(no model_index.json)"
        )
    with open(index, encoding="utf-8") as f:
        class_name = json.load(f).get("_class_name")
    if class_name not in PIPELINE_FAMILIES:
        raise ValueError(
            f"{name} holds a {class_name} pipeline; supported: {', '.join(sorted(PIPELINE_FAMILIES))}"
        )
    return PIPELINE_FAMILIES[class_name]


def check_request(
    model: str | os.PathLike,
    prompts: list[str],
    *,
    height: int | None = None,
    width: int | None = None,
) -> str:
    """Check a generation request against the model's family before any weight loads (reading only
    ``model_index.json`` and configs): image sides the model can make, and, for ShapesWorld, prompts
    of its grammar. The rules and messages are the loaded backend's (:meth:`DiffusionBackend.check_inputs`)
    with the family's weights-free values. Raises ValueError naming the bad value; returns the family."""
    family = family_of(model)
    if family == "shapes":
        from img_guidance.shapes.grammar import parse

        check_prompts(prompts, family=family, can_draw=parse)
        sides = ImageSides(only=_shapes_image_size(model))
    else:
        sides = ImageSides(multiple=SIDE_MULTIPLES[family])
    sides.check(family, "--height", height)
    sides.check(family, "--width", width)
    return family


def _shapes_image_size(model: str | os.PathLike) -> int:
    from img_guidance.hub import is_local
    from img_guidance.presets import BACKEND_PRESETS

    name = os.fspath(model)
    location = BACKEND_PRESETS[name].model if name in BACKEND_PRESETS and not is_local(name) else name
    try:
        with open(os.path.join(location, "unet", "config.json"), encoding="utf-8") as f:
            return int(json.load(f)["sample_size"])
    except (OSError, ValueError, KeyError, TypeError):
        from img_guidance.shapes.models import IMAGE_SIZE

        return IMAGE_SIZE  # the loader reports a broken folder itself


def load_backend(
    model: str | os.PathLike = "sdxl",
    *,
    unet: str | None = None,
    ip_adapter: str | None = None,
    image_encoder: str | None = None,
    torch_dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    offload: OffloadMode = "none",
) -> DiffusionBackend:
    """A backend from a preset name (``sdxl``, ``sdxl-dpo``, ``flux``, ``shapes``) or a pipeline
    folder / hub id,
    with any component overridden. ``unet`` swaps the SDXL UNet (for FLUX it swaps the transformer).
    With ``offload`` other than "none" the weights stay on the CPU and move to ``device`` as they run
    (see :meth:`DiffusionBackend.set_offload`)."""
    check_offload(offload)
    from img_guidance.hub import is_local
    from img_guidance.presets import BACKEND_PRESETS

    name = os.fspath(model)
    family = family_of(name)
    overrides = {
        k: v
        for k, v in dict(
            ip_adapter=ip_adapter, image_encoder=image_encoder, torch_dtype=torch_dtype, device=device
        ).items()
        if v is not None
    }
    if family == "sdxl":
        from img_guidance.backends.sdxl import SDXLBackend as backend_class

        if unet is not None:
            overrides["unet"] = unet
        if offload != "none":  # load on the CPU, then hand the weights to the offload hooks
            overrides["device"] = "cpu"
    elif family == "flux":
        from img_guidance.backends.flux import FluxBackend as backend_class

        if unet is not None:
            overrides["transformer"] = unet
        overrides["offload"] = offload  # FLUX applies it before any weight reaches the device
    elif family == "shapes":
        from img_guidance.backends.shapes import ShapesBackend

        if unet is not None or ip_adapter is not None or image_encoder is not None:
            raise ValueError(
                "a ShapesWorld model folder holds its UNet, adapter and image encoder together: "
                "swap the whole folder (--model FOLDER) instead of --unet/--ip-adapter/--image-encoder"
            )
        location = BACKEND_PRESETS[name].model if name in BACKEND_PRESETS and not is_local(name) else name
        _check_shapes_weights(location)
        return ShapesBackend.from_pretrained(location, torch_dtype=torch_dtype, device=device)
    else:  # pragma: no cover - family_of only returns known families
        raise ValueError(f"unknown backend family {family!r}")
    if name in BACKEND_PRESETS and not is_local(name):
        backend = backend_class.from_preset(name, **overrides)
    else:
        backend = backend_class.from_pretrained(name, **overrides)
    if family == "sdxl" and offload != "none":
        import torch

        backend.set_offload(offload, device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return backend


def _check_shapes_weights(location: str) -> None:
    if not os.path.isfile(os.path.join(location, "model_index.json")):
        raise FileNotFoundError(
            f"ShapesWorld's generator is missing at {location}: reinstall the package, or rebuild the "
            "models with `img-guidance shapes train-all OUT --install`"
        )


def image_encoder_locations(
    model: str | os.PathLike = "sdxl",
    *,
    ip_adapter: str | os.PathLike | None = None,
    image_encoder: str | os.PathLike | None = None,
) -> dict[str, str]:
    """``{"family", "ip_adapter", "image_encoder"}``: what makes the image tokens of ``model`` (a
    preset or a pipeline folder / hub id), with the preset's or the family's defaults filled in.
    Reads at most the pipeline's ``model_index.json``; loads no weights."""
    from img_guidance.hub import is_local
    from img_guidance.presets import BACKEND_PRESETS

    name = os.fspath(model)
    family = family_of(name)
    if name in BACKEND_PRESETS and not is_local(name):
        preset = BACKEND_PRESETS[name]
        defaults = {"ip_adapter": preset.ip_adapter, "image_encoder": preset.image_encoder}
    elif family == "shapes":
        defaults = {"ip_adapter": name, "image_encoder": name}
    elif family == "sdxl":
        from img_guidance.backends import sdxl

        defaults = {"ip_adapter": sdxl.DEFAULT_IP_ADAPTER, "image_encoder": sdxl.DEFAULT_IMAGE_ENCODER}
    else:
        from img_guidance.backends import flux

        defaults = {"ip_adapter": flux.DEFAULT_IP_ADAPTER, "image_encoder": flux.DEFAULT_IMAGE_ENCODER}
    given = {"ip_adapter": ip_adapter, "image_encoder": image_encoder}
    return {"family": family} | {k: os.fspath(v) if v is not None else defaults[k] for k, v in given.items()}


def load_image_encoder(
    model: str | os.PathLike = "sdxl",
    *,
    ip_adapter: str | os.PathLike | None = None,
    image_encoder: str | os.PathLike | None = None,
    torch_dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> SDXLImageEncoder | FluxImageEncoder:
    """The image-token half of :func:`load_backend`: only the CLIP vision model and the IP-Adapter's
    image projection of ``model`` (a preset or a pipeline folder / hub id), not the denoiser, text
    encoders or VAE. Returns an :class:`~img_guidance.backends.sdxl.SDXLImageEncoder` or
    :class:`~img_guidance.backends.flux.FluxImageEncoder`, whose ``encode_image`` gives the tokens
    ``load_backend`` with the same arguments would give (``token_shape``, ``device``, ``describe``
    as a backend's). A UNet or transformer swap does not change image tokens, so none is taken."""
    locations = image_encoder_locations(model, ip_adapter=ip_adapter, image_encoder=image_encoder)
    family = locations.pop("family")
    if family == "shapes":  # the world's whole model is a few MB: its backend encodes images
        return load_backend(model, torch_dtype=torch_dtype, device=device)
    if family == "sdxl":
        from img_guidance.backends.sdxl import SDXLImageEncoder as encoder_class
    else:
        from img_guidance.backends.flux import FluxImageEncoder as encoder_class
    return encoder_class.from_pretrained(**locations, torch_dtype=torch_dtype, device=device)
