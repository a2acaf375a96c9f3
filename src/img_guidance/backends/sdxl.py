"""SDXL (and UNet swaps such as SDXL-DPO) with IP-Adapter-Plus, the way IMG uses them.

Image tokens are the IP-Adapter-Plus resampler's output: CLIP ViT-H ``hidden_states[-2]``
[B, 257, 1280] -> resampler -> [B, 16, 2048]. IMG edits those tokens, so the backend keeps the
resampler to itself: after diffusers' ``load_ip_adapter`` has converted the h94 weights and installed
its IP attention processors, the UNet's image projection (``unet.encoder_hid_proj``) is replaced by a
pass-through, and the UNet takes post-projection tokens as they are. CLIP and the resampler then run
once per image in :meth:`SDXLBackend.encode_image`, never during denoising.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from img_guidance.backends.base import (
    SIDE_MULTIPLES,
    DiffusionBackend,
    GenerationDefaults,
    ImageSides,
    OffloadMode,
    check_offload,
)
from img_guidance.hub import hub_file, pretrained_location

if TYPE_CHECKING:
    from diffusers import StableDiffusionXLPipeline
    from PIL.Image import Image

DEFAULT_MODEL = "stabilityai/stable-diffusion-xl-base-1.0"
DEFAULT_IP_ADAPTER = "h94/IP-Adapter/sdxl_models/ip-adapter-plus_sdxl_vit-h.safetensors"
DEFAULT_IMAGE_ENCODER = "h94/IP-Adapter/models/image_encoder"
# the paper's SDXL settings (Sec. 4): 50 steps, CFG 7.5, 1024 x 1024
PAPER_DEFAULTS = GenerationDefaults(steps=50, guidance_scale=7.5, height=1024, width=1024)


class PostProjectionTokens(nn.Module):
    """Stands in for the UNet's IP image projection: the image embeddings it is given are already
    projected tokens, one list entry per IP-Adapter, each [rows, images, N, D]; they pass unchanged."""

    def forward(self, image_embeds: list[torch.Tensor]) -> list[torch.Tensor]:
        return list(image_embeds)


class SDXLBackend(DiffusionBackend):
    """An SDXL pipeline with IP-Adapter-Plus: plain generation, image -> post-projection tokens, and
    generation conditioned on such tokens (one row per prompt).

    Build it with :meth:`from_pretrained` or :meth:`from_preset`. ``pipe`` is the diffusers pipeline;
    its UNet expects post-projection tokens as ``image_embeds`` (see the module docstring).
    """

    family = "sdxl"

    def __init__(
        self,
        *,
        pipe: StableDiffusionXLPipeline,
        image_projection: nn.Module,
        defaults: GenerationDefaults = PAPER_DEFAULTS,
        sources: dict[str, str] | None = None,
    ) -> None:
        """``pipe`` has its IP-Adapter attention processors and image encoder loaded and its UNet's
        image projection replaced by :class:`PostProjectionTokens`; ``image_projection`` is the
        resampler that was taken out of it. Use :meth:`from_pretrained` rather than this."""
        if not isinstance(pipe.unet.encoder_hid_proj, PostProjectionTokens):
            raise ValueError(
                "the pipeline's UNet must take post-projection tokens (encoder_hid_proj = "
                f"PostProjectionTokens), not {type(pipe.unet.encoder_hid_proj).__name__}"
            )
        if pipe.image_encoder is None or pipe.feature_extractor is None:
            raise ValueError("the pipeline needs an image_encoder and a feature_extractor")
        self.pipe = pipe
        self.image_projection = image_projection.eval().requires_grad_(False)
        self.defaults = defaults
        self._sources = dict(sources or {})
        self._negative: torch.Tensor | None = None

    # ---------------------------------------------------------------- loading

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike = DEFAULT_MODEL,
        *,
        unet: str | os.PathLike | None = None,
        ip_adapter: str | os.PathLike = DEFAULT_IP_ADAPTER,
        image_encoder: str | os.PathLike = DEFAULT_IMAGE_ENCODER,
        torch_dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        variant: str | None = None,
        defaults: GenerationDefaults | None = None,
    ) -> SDXLBackend:
        """Load an SDXL pipeline, optionally swap its UNet, and add IP-Adapter-Plus.

        Each location is a local folder/file, a hub repo id, or ``owner/repo/sub/path``:
        ``model`` a pipeline folder or repo; ``unet`` a UNet folder (``mhdang/dpo-sdxl-text2image-v1/unet``
        for SDXL-DPO); ``ip_adapter`` a weights file (.safetensors or .bin, h94 layout); ``image_encoder``
        a ``CLIPVisionModelWithProjection`` folder. ``variant`` (e.g. "fp16") applies to the pipeline's
        own weights, not to a swapped UNet. Works offline for local paths and cached hub files.
        """
        from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
        from transformers import CLIPVisionModelWithProjection

        # resolve every location before loading anything, so a typo fails in seconds
        ip_adapter_file = hub_file(ip_adapter)
        model_path, model_subfolder = pretrained_location(model)
        if model_subfolder is not None:
            raise ValueError(
                f"model {os.fspath(model)!r} names a folder inside a hub repo; a pipeline is a whole "
                "repo (owner/repo) or a local folder"
            )
        encoder_path, encoder_subfolder = pretrained_location(image_encoder)
        unet_location = pretrained_location(unet) if unet is not None else None

        # diffusers loads float32 unless told; transformers 5 would otherwise take the config's dtype
        dtype = torch_dtype or torch.float32
        components: dict[str, Any] = {}
        if unet_location is not None:
            unet_path, unet_subfolder = unet_location
            components["unet"] = UNet2DConditionModel.from_pretrained(
                unet_path, subfolder=unet_subfolder, dtype=dtype
            )
        encoder = CLIPVisionModelWithProjection.from_pretrained(
            encoder_path, subfolder=encoder_subfolder or "", dtype=dtype
        )
        pipe = StableDiffusionXLPipeline.from_pretrained(
            model_path, image_encoder=encoder, dtype=dtype, variant=variant, **components
        )
        # registered after loading: from_pretrained warns when the processor class is not the one
        # its signature names (CLIPImageProcessor resolves to the torchvision one when installed)
        pipe.register_modules(feature_extractor=_clip_image_processor(encoder.config.image_size))
        backend = cls.from_pipe(
            pipe,
            ip_adapter=ip_adapter_file,
            defaults=defaults,
            sources={
                "model": os.fspath(model),
                # a location that loads the same UNet again (owner/repo/unet or a local folder)
                "unet": os.fspath(unet) if unet is not None else f"{os.fspath(model).rstrip('/')}/unet",
                "ip_adapter": os.fspath(ip_adapter),
                "image_encoder": os.fspath(image_encoder),
            },
        )
        if device is not None:
            backend.set_offload("none", device)
        return backend

    @classmethod
    def from_pipe(
        cls,
        pipe: StableDiffusionXLPipeline,
        *,
        ip_adapter: str | os.PathLike,
        defaults: GenerationDefaults | None = None,
        sources: dict[str, str] | None = None,
    ) -> SDXLBackend:
        """An SDXL pipeline already in memory, with IP-Adapter-Plus added from ``ip_adapter`` (a local
        .safetensors or .bin file in the h94 layout). The pipeline's ``image_encoder`` (a
        ``CLIPVisionModelWithProjection``) must be registered; its CLIP preprocessing is added when
        missing. The adapter's weights go where the UNet is, in its dtype."""
        from diffusers.models.embeddings import IPAdapterPlusImageProjection

        if pipe.image_encoder is None:
            raise ValueError("the pipeline needs an image_encoder (CLIPVisionModelWithProjection) registered")
        if getattr(pipe, "feature_extractor", None) is None:
            pipe.register_modules(
                feature_extractor=_clip_image_processor(pipe.image_encoder.config.image_size)
            )
        ip_adapter_file = Path(ip_adapter)
        # diffusers converts the h94 layout (resampler + to_k_ip/to_v_ip per cross-attention layer)
        # and installs its IP-Adapter attention processors; the image encoder is already registered
        pipe.load_ip_adapter(
            os.fspath(ip_adapter_file.parent),
            subfolder=None,
            weight_name=ip_adapter_file.name,
            image_encoder_folder=None,
        )
        (projection,) = pipe.unet.encoder_hid_proj.image_projection_layers
        if not isinstance(projection, IPAdapterPlusImageProjection):
            raise ValueError(
                f"{ip_adapter_file} is not an IP-Adapter-Plus file: its image projection is a "
                f"{type(projection).__name__}, the SDXL backend needs IPAdapterPlusImageProjection "
                "(a resampler over CLIP hidden_states[-2])"
            )
        pipe.unet.encoder_hid_proj = PostProjectionTokens()
        return cls(
            pipe=pipe,
            image_projection=projection,
            defaults=defaults or PAPER_DEFAULTS,
            sources=sources or {"ip_adapter": os.fspath(ip_adapter)},
        )

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> SDXLBackend:
        """Load a preset of :data:`img_guidance.presets.BACKEND_PRESETS` ("sdxl", "sdxl-dpo"); keyword
        arguments override :meth:`from_pretrained`'s (``model``, ``unet``, ``torch_dtype``, ...)."""
        from img_guidance.presets import BACKEND_PRESETS

        preset = BACKEND_PRESETS.get(name)
        if preset is None or preset.family != cls.family:
            known = sorted(k for k, p in BACKEND_PRESETS.items() if p.family == cls.family)
            what = "unknown" if preset is None else f"a {preset.family} preset, not an {cls.family} one"
            raise ValueError(f"backend preset {name!r} is {what}; SDXL presets: {known}")
        kwargs: dict[str, Any] = {
            "model": preset.model,
            "unet": preset.unet,
            "ip_adapter": preset.ip_adapter,
            "image_encoder": preset.image_encoder,
            "defaults": GenerationDefaults(
                steps=preset.steps,
                guidance_scale=preset.guidance_scale,
                height=preset.height,
                width=preset.width,
            ),
        }
        return cls.from_pretrained(**(kwargs | overrides))

    # ---------------------------------------------------------------- properties

    @property
    def token_shape(self) -> tuple[int, int]:
        """(queries, width) of the resampler's output: (16, 2048) for ip-adapter-plus_sdxl_vit-h."""
        return (self.image_projection.latents.shape[1], self.image_projection.proj_out.out_features)

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.pipe.unet

    @property
    def device(self) -> torch.device:
        return self.pipe._execution_device

    @property
    def dtype(self) -> torch.dtype:
        return self.pipe.unet.dtype

    @property
    def image_sides(self) -> ImageSides:
        # what StableDiffusionXLPipeline.check_inputs demands, whatever the VAE's downsampling
        return ImageSides(multiple=SIDE_MULTIPLES[self.family])

    def describe(self) -> dict[str, str]:
        return {"family": self.family, **self._sources, "dtype": str(self.dtype).removeprefix("torch.")}

    def set_offload(self, mode: OffloadMode, device: str | torch.device) -> None:
        """Where the weights live: with "none" all on ``device``; with "model" on the CPU, each
        sub-model moving to ``device`` when it runs (diffusers' ``enable_model_cpu_offload``); with
        "sequential" layer by layer (``enable_sequential_cpu_offload``). The resampler (~80M parameters
        for ViT-H Plus) is not a pipeline component and stays on ``device`` in every mode."""
        check_offload(mode)
        device = torch.device(device)
        self.pipe.remove_all_hooks()
        if mode == "none":
            self.pipe.to(device)
        elif mode == "model":
            self.pipe.enable_model_cpu_offload(device=device)
        else:
            self.pipe.enable_sequential_cpu_offload(device=device)
        self.image_projection.to(device)

    # ---------------------------------------------------------------- image tokens

    def encode_image(self, images: Sequence[Image]) -> torch.Tensor:
        """IP-Adapter-Plus tokens of ``images``: CLIP (224 crop) ``hidden_states[-2]`` [B, 257, 1280]
        -> resampler -> [B, 16, 2048] (sizes of the real model), in the backend's dtype, on its device."""
        images = list(images)
        if not images:
            raise ValueError("encode_image needs at least one image, got none")
        pixel_values = self.pipe.feature_extractor(images=images, return_tensors="pt").pixel_values
        return self._project(pixel_values)

    def negative_image_tokens(self) -> torch.Tensor:
        """The resampler's tokens for an all-zeros pixel tensor (zeros after CLIP preprocessing), as
        the official IP-Adapter code and diffusers use for the unconditional branch: [1, N, D].
        Computed once and cached."""
        if self._negative is None:
            crop = self.pipe.feature_extractor.crop_size
            self._negative = self._project(torch.zeros(1, 3, crop["height"], crop["width"]))
        return self._negative.to(self.device).clone()

    @torch.no_grad()
    def _project(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] preprocessed pixels -> [B, N, D] post-projection tokens."""
        encoder = self.pipe.image_encoder
        hidden = encoder(
            pixel_values.to(device=self.device, dtype=encoder.dtype), output_hidden_states=True
        ).hidden_states[-2]  # [B, 1 + patches, clip_width]: the penultimate layer, as IP-Adapter-Plus reads
        param = next(self.image_projection.parameters())
        tokens = self.image_projection(hidden.to(device=param.device, dtype=param.dtype))
        return tokens.to(device=self.device, dtype=self.dtype)

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

        ``image_tokens`` [B, N, D] (post-projection, one row per prompt): sample i is conditioned on
        row i at IP scale ``ip_scale``, and its unconditional (CFG) branch on :meth:`negative_image_tokens`.
        Without them the adapter is off (scale 0: its attention branch is skipped) and the images equal
        plain SDXL generation. Unset sampling settings come from ``defaults``.
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
        # 2. Image tokens for the conditional and unconditional branches
        batch = len(prompts)
        if image_tokens is None:
            # the UNet always expects image tokens; at scale 0 the IP processors never read them
            cond = torch.zeros(batch, *self.token_shape)
            uncond = torch.zeros(1, *self.token_shape)
            ip_scale = 0.0
        else:
            cond, uncond = image_tokens, self.negative_image_tokens()

        # 3. Sample, the adapter at ``ip_scale`` for this call only
        generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        with self._row_wise_image_tokens(uncond), self._ip_scale(ip_scale):
            return self.pipe(
                prompt=prompts,
                num_inference_steps=self.defaults.steps if steps is None else steps,
                guidance_scale=self.defaults.guidance_scale if guidance_scale is None else guidance_scale,
                height=self.defaults.height if height is None else height,
                width=self.defaults.width if width is None else width,
                generator=generators,
                ip_adapter_image_embeds=[cond[:, None]],  # [B, 1 image, N, D] for the one IP-Adapter
                output_type="pil",
            ).images

    @contextlib.contextmanager
    def _ip_scale(self, scale: float) -> Iterator[None]:
        self.pipe.set_ip_adapter_scale(scale)
        try:
            yield
        finally:
            self.pipe.set_ip_adapter_scale(0.0)  # adapter off between calls

    @contextlib.contextmanager
    def _row_wise_image_tokens(self, uncond: torch.Tensor) -> Iterator[None]:
        """Let the pipeline use one image-token row per prompt during the call.

        diffusers' ``prepare_ip_adapter_image_embeds`` applies ONE image prompt to the whole batch (it
        repeats the given embeddings batch-size times). Here row i belongs to prompt i, so the
        pipeline's method is shadowed, for this call only, by one that keeps the rows and puts the
        negative tokens ``uncond`` [1, N, D] first when the pipeline runs classifier-free guidance.
        """
        dtype = self.dtype

        def prepare_ip_adapter_image_embeds(
            ip_adapter_image,
            ip_adapter_image_embeds,
            device,
            num_images_per_prompt,
            do_classifier_free_guidance,
        ):
            (cond,) = ip_adapter_image_embeds  # [B, 1, N, D]
            if do_classifier_free_guidance:
                # [B, 1, N, D] -> [2B, 1, N, D]: unconditional rows first, as the pipeline orders its batch
                negative = uncond[:, None].to(cond).expand_as(cond)
                cond = torch.cat([negative, cond])
            return [cond.to(device=device, dtype=dtype)]

        self.pipe.prepare_ip_adapter_image_embeds = prepare_ip_adapter_image_embeds
        try:
            yield
        finally:
            del self.pipe.prepare_ip_adapter_image_embeds


def _clip_image_processor(image_size: int):
    """CLIP preprocessing at the encoder's resolution (224 for ViT-H), as diffusers builds it for
    IP-Adapters; the PIL implementation when transformers has one (the official code's numerics)."""
    try:
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:  # transformers < 5
        from transformers import CLIPImageProcessor as Processor
    return Processor(size=image_size, crop_size=image_size)


class SDXLImageEncoder:
    """Only what :meth:`SDXLBackend.encode_image` needs: the CLIP vision model and the IP-Adapter-Plus
    resampler, without the UNet, VAE and text encoders (for the feature stage, which encodes images
    but never generates). Its tokens equal those of an :class:`SDXLBackend` loaded with the same
    ``ip_adapter``, ``image_encoder`` and dtype.

    Build it with :meth:`from_pretrained` (or :func:`img_guidance.backends.load_image_encoder`).
    """

    family = "sdxl"

    def __init__(
        self,
        *,
        image_encoder: nn.Module,
        feature_extractor: Any,
        image_projection: nn.Module,
        sources: dict[str, str] | None = None,
    ) -> None:
        self.image_encoder = image_encoder.eval().requires_grad_(False)
        self.feature_extractor = feature_extractor
        self.image_projection = image_projection.eval().requires_grad_(False)
        self._sources = dict(sources or {})

    @classmethod
    def from_pretrained(
        cls,
        *,
        ip_adapter: str | os.PathLike = DEFAULT_IP_ADAPTER,
        image_encoder: str | os.PathLike = DEFAULT_IMAGE_ENCODER,
        torch_dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
    ) -> SDXLImageEncoder:
        """Load the CLIP vision model (``image_encoder``: a folder, repo or ``owner/repo/sub``) and the
        resampler of an IP-Adapter-Plus file (``ip_adapter``: .safetensors or .bin, h94 layout), in
        ``torch_dtype`` (default float32, as :meth:`SDXLBackend.from_pretrained`), on ``device``
        (default: the CPU)."""
        from diffusers.loaders.unet import UNet2DConditionLoadersMixin
        from diffusers.models.embeddings import IPAdapterPlusImageProjection
        from transformers import CLIPVisionModelWithProjection

        ip_adapter_file = hub_file(ip_adapter)
        encoder_path, encoder_subfolder = pretrained_location(image_encoder)
        dtype = torch_dtype or torch.float32
        state = _ip_adapter_image_proj_state(ip_adapter_file)
        # diffusers' own h94 -> diffusers conversion (what SDXLBackend gets through load_ip_adapter);
        # it reads nothing from the UNet unless loading onto the meta device, so no UNet is needed
        projection = UNet2DConditionLoadersMixin._convert_ip_adapter_image_proj_to_diffusers(
            None, state, low_cpu_mem_usage=False
        )
        if not isinstance(projection, IPAdapterPlusImageProjection):
            raise ValueError(
                f"{ip_adapter_file} is not an IP-Adapter-Plus file: its image projection is a "
                f"{type(projection).__name__}, the SDXL backend needs IPAdapterPlusImageProjection "
                "(a resampler over CLIP hidden_states[-2])"
            )
        encoder = CLIPVisionModelWithProjection.from_pretrained(
            encoder_path, subfolder=encoder_subfolder or "", dtype=dtype
        )
        encoder_only = cls(
            image_encoder=encoder,
            feature_extractor=_clip_image_processor(encoder.config.image_size),
            image_projection=projection.to(dtype),
            sources={"ip_adapter": os.fspath(ip_adapter), "image_encoder": os.fspath(image_encoder)},
        )
        if device is not None:
            encoder_only.to(device)
        return encoder_only

    def to(self, device: str | torch.device) -> SDXLImageEncoder:
        self.image_encoder.to(device)
        self.image_projection.to(device)
        return self

    @property
    def token_shape(self) -> tuple[int, int]:
        """(queries, width) of the resampler's output: (16, 2048) for ip-adapter-plus_sdxl_vit-h."""
        return (self.image_projection.latents.shape[1], self.image_projection.proj_out.out_features)

    @property
    def device(self) -> torch.device:
        return self.image_encoder.device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.image_projection.parameters()).dtype

    def describe(self) -> dict[str, str]:
        return {"family": self.family, **self._sources, "dtype": str(self.dtype).removeprefix("torch.")}

    @torch.no_grad()
    def encode_image(self, images: Sequence[Image]) -> torch.Tensor:
        """IP-Adapter-Plus tokens of ``images`` as :meth:`SDXLBackend.encode_image` makes them: CLIP
        (224 crop) ``hidden_states[-2]`` -> resampler -> [B, N, D], in this encoder's dtype and device."""
        images = list(images)
        if not images:
            raise ValueError("encode_image needs at least one image, got none")
        pixel_values = self.feature_extractor(images=images, return_tensors="pt").pixel_values
        hidden = self.image_encoder(
            pixel_values.to(device=self.device, dtype=self.image_encoder.dtype), output_hidden_states=True
        ).hidden_states[-2]  # [B, 1 + patches, clip_width]
        return self.image_projection(hidden.to(self.dtype))  # [B, N, D]


def _ip_adapter_image_proj_state(path: os.PathLike) -> dict[str, torch.Tensor]:
    """The ``image_proj.*`` tensors of an h94 IP-Adapter file (prefix removed), read the way diffusers'
    ``load_ip_adapter`` reads them; the per-layer ``ip_adapter.*`` weights are not loaded."""
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt", device="cpu") as f:
            state = {
                k.removeprefix("image_proj."): f.get_tensor(k)
                for k in f.keys()  # noqa: SIM118 (a safetensors handle, not a dict)
                if k.startswith("image_proj.")
            }
    else:
        from diffusers.models.model_loading_utils import load_state_dict

        state = dict(load_state_dict(path).get("image_proj", {}))  # torch.load(weights_only=True)
    if not state:
        raise ValueError(f"{path} has no image_proj weights; it is not an IP-Adapter file in the h94 layout")
    return state
