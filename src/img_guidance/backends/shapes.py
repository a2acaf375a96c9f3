"""ShapesWorld's own text-to-image model with its image-prompt adapter, the way IMG uses it.

The model (:mod:`img_guidance.shapes.models`) is built like the real ones: a diffusers
``UNet2DConditionModel`` with diffusers' IP-Adapter attention processors, installed from an h94-layout
adapter file by diffusers' own loader; then, as in the SDXL backend, the image projection is taken out
of the UNet (replaced by a pass-through) so that the UNet takes post-projection tokens as they are.
Image tokens are the projection's output, [B, 4, 64]; :meth:`ShapesBackend.encode_image` runs the
image encoder and the projection once per image, never during denoising.

Everything runs on a CPU in seconds: 32 x 32 images, 20 DDIM steps, classifier-free guidance 1.5 (the
best of 1.5, 2.5 and 4 for this small model: more guidance adds stray objects); IMG's re-generation
defaults to the IP scale chosen for the model on the validation split (``ip_scale.json`` in its folder,
written by ``shapes train-all``; ``defaults.ip_scale``), else to 0.2 (the paper's value).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from img_guidance.backends.base import DiffusionBackend, GenerationDefaults, ImageSides

if TYPE_CHECKING:
    from PIL.Image import Image

    from img_guidance.shapes.models import ShapesWorldPipeline


def _defaults() -> GenerationDefaults:
    from img_guidance.shapes.models import GUIDANCE_SCALE, IMAGE_SIZE, IP_SCALE, SAMPLING_STEPS

    return GenerationDefaults(
        steps=SAMPLING_STEPS,
        guidance_scale=GUIDANCE_SCALE,
        height=IMAGE_SIZE,
        width=IMAGE_SIZE,
        ip_scale=IP_SCALE,
    )


class ShapesBackend(DiffusionBackend):
    """The ShapesWorld model: plain generation, image -> post-projection tokens [B, 4, 64], and
    generation conditioned on such tokens (one row per prompt).

    Build it with :meth:`from_pretrained` from a folder that
    :func:`~img_guidance.recipes.train_shapes_generator.train_generator` wrote. Prompts must be
    prompts of the world's grammar.
    """

    family = "shapes"

    def __init__(
        self, *, pipe: ShapesWorldPipeline, defaults: GenerationDefaults | None = None, source: str = ""
    ) -> None:
        """``pipe`` must have its image-prompt adapter. Use :meth:`from_pretrained` rather than this."""
        if not pipe.has_adapter:
            raise ValueError(
                "the shapes backend needs a model with its image-prompt adapter (image_encoder/ and "
                "ip_adapter.safetensors); this one is a base model"
            )
        self.pipe = pipe.eval()
        self.defaults = defaults or _defaults()
        self._source = source
        self._negative: torch.Tensor | None = None

    @classmethod
    def from_pretrained(
        cls,
        folder: str | os.PathLike,
        *,
        device: str | torch.device | None = None,
        torch_dtype: torch.dtype | None = None,
        defaults: GenerationDefaults | None = None,
    ) -> ShapesBackend:
        """Load a ShapesWorld model folder (``model_index.json`` with ``_class_name``
        "ShapesWorldPipeline"), in ``torch_dtype`` (default float32) on ``device`` (default CPU).
        Without ``defaults``, the IP scale is the one in the folder's ``ip_scale.json`` if it has one."""
        import json
        from dataclasses import replace
        from pathlib import Path

        from img_guidance.shapes.models import IP_SCALE_FILE, ShapesWorldPipeline

        pipe = ShapesWorldPipeline.from_pretrained(folder)
        pipe.to(device=device, dtype=torch_dtype)
        chosen = Path(folder) / IP_SCALE_FILE
        if defaults is None and chosen.is_file():
            try:
                scale = float(json.loads(chosen.read_text())["ip_scale"])
            except (ValueError, KeyError, TypeError) as error:
                message = f"{chosen} is not an IP-scale choice ({error!r}); delete it or retrain"
                raise ValueError(message) from None
            defaults = replace(_defaults(), ip_scale=scale)
        return cls(pipe=pipe, defaults=defaults, source=os.fspath(folder))

    # ---------------------------------------------------------------- properties

    @property
    def token_shape(self) -> tuple[int, int]:
        """(tokens, width) of the post-projection image tokens: (4, 64)."""
        return self.pipe.token_shape

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.pipe.unet

    @property
    def device(self) -> torch.device:
        return self.pipe.device

    @property
    def dtype(self) -> torch.dtype:
        return self.pipe.dtype

    @property
    def image_sides(self) -> ImageSides:
        """The UNet's one size: it denoises pixels, so its ``sample_size`` is the image's side (32)."""
        return ImageSides(only=self.pipe.unet.config.sample_size)

    def check_prompt(self, prompt: str) -> None:
        """Only prompts of the world's grammar (:func:`~img_guidance.shapes.grammar.parse`): the model
        was trained on nothing else."""
        from img_guidance.shapes.grammar import parse

        parse(prompt)

    def describe(self) -> dict[str, str]:
        return {"family": self.family, "model": self._source, "dtype": str(self.dtype).removeprefix("torch.")}

    # ---------------------------------------------------------------- image tokens

    def encode_image(self, images: Sequence[Image]) -> torch.Tensor:
        """Post-projection tokens [B, 4, 64] of PIL images (resized to 32 x 32 if they are not):
        image encoder -> ``ImageProjection``, in the backend's dtype, on its device."""
        images = list(images)
        if not images:
            raise ValueError("encode_image needs at least one image, got none")
        return self.pipe.encode_images(images)

    def negative_image_tokens(self) -> torch.Tensor:
        """The tokens of the empty scene (every pixel the world's background colour), [1, 4, 64]: what
        the adapter was trained with where the image was dropped, and the unconditional branch of
        guidance. (SDXL uses an all-zeros image; here the empty scene is the world's "no image".)
        Computed once and cached."""
        if self._negative is None:
            self._negative = self.pipe.negative_image_tokens()
        return self._negative.clone()

    # ---------------------------------------------------------------- generation

    def generate(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        *,
        image_tokens: torch.Tensor | None = None,
        ip_scale: float = 0.2,
        steps: int | None = None,
        guidance_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
    ) -> list[Image]:
        """One image per prompt; sample i starts from ``torch.Generator().manual_seed(seeds[i])``.

        ``image_tokens`` [B, 4, 64] (post-projection, one row per prompt): sample i is conditioned on
        row i at IP scale ``ip_scale``, and its unconditional branch on :meth:`negative_image_tokens`.
        Without them (or at ``ip_scale`` 0) the adapter is off and the images are the base model's.
        Unset sampling settings come from ``defaults``; the model makes 32 x 32 images only.
        """
        # 1. Check inputs
        prompts, seeds = self.check_inputs(
            prompts,
            seeds,
            image_tokens=image_tokens,
            ip_scale=ip_scale,
            steps=steps,
            height=height,
            width=width,
            guidance_scale=guidance_scale,
        )
        # 2. Sample
        generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        negative = None
        if image_tokens is not None:
            negative = self.negative_image_tokens()
            image_tokens = image_tokens.to(device=self.device, dtype=self.dtype)
        return self.pipe(
            prompts,
            generators,
            image_tokens=image_tokens,
            negative_image_tokens=negative,
            ip_scale=float(ip_scale),
            steps=self.defaults.steps if steps is None else int(steps),
            guidance_scale=self.defaults.guidance_scale if guidance_scale is None else float(guidance_scale),
        )
