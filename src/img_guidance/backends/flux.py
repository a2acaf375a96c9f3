"""FLUX.1-dev with the XLabs IP-Adapter, the way the official IMG FLUX demo runs it.

The diffusers ``FluxPipeline`` does the sampling; diffusers' own ``FluxIPAdapterMixin.load_ip_adapter``
reads the XLabs file (``ip_adapter_proj_model.*``: CLIP ``image_embeds`` [B, 768] -> 4 tokens of
4096; ``double_blocks.{i}.processor.ip_adapter_double_stream_{k,v}_proj.*``: the IP key/value
projections of each double-stream block). This module adds what IMG needs on top:

- ``encode_image``: the tokens AFTER the adapter's projection, [B, 4, 4096], which the Implicit
  Aligner edits;
- generation conditioned on such tokens as they are: diffusers normally re-applies the projection
  (``transformer.encoder_hid_proj``) to CLIP embeddings inside every transformer forward, so during
  a call the projection is swapped for a pass-through and the given tokens reach the IP attention
  unchanged;
- one token row per prompt in a batch (the stock pipeline conditions the whole batch on one image);
- the official settings: 30 steps, distilled guidance 3.5, 1024x1024, true CFG 3.5 with an empty
  negative prompt whose IP branch sees the tokens of a black image, at the same IP scale.
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
    DiffusionBackend,
    GenerationDefaults,
    ImageSides,
    OffloadMode,
    check_offload,
)
from img_guidance.hub import hub_file, pretrained_location
from img_guidance.precision import default_dtype

if TYPE_CHECKING:
    from diffusers import FluxPipeline
    from PIL.Image import Image

# The official demo builds its negative image prompt from a black 1024x1024 image.
NEGATIVE_IMAGE_SIZE = 1024


def _preset_defaults() -> tuple[GenerationDefaults, float]:
    """Sampling defaults and the true-CFG scale of the ``flux`` preset (the paper's settings)."""
    from img_guidance.presets import BACKEND_PRESETS

    preset = BACKEND_PRESETS["flux"]
    defaults = GenerationDefaults(
        steps=preset.steps, guidance_scale=preset.guidance_scale, height=preset.height, width=preset.width
    )
    return defaults, preset.true_cfg_scale if preset.true_cfg_scale is not None else 1.0


class _GivenTokens(nn.Module):
    """Stands in for ``transformer.encoder_hid_proj`` during a call with post-projection tokens.

    ``FluxPipeline.prepare_ip_adapter_image_embeds`` tiles each adapter's embeds ``batch`` times
    along dim 0 (it assumes one image prompt for the whole batch), so what arrives here for a
    [batch, N, D] input is [batch * batch, N, D] whose first ``batch`` rows are the input itself.
    Those rows are returned with no projection: row i conditions sample i.
    """

    def __init__(self, batch: int, num_ip_adapters: int = 1):
        super().__init__()
        self.batch = batch
        self._num_ip_adapters = num_ip_adapters

    @property
    def num_ip_adapters(self) -> int:  # read by the pipeline and by set_ip_adapter_scale
        return self._num_ip_adapters

    def forward(self, image_embeds: list[torch.Tensor]) -> list[torch.Tensor]:
        """One tensor per adapter: [batch * batch, N, D] -> [batch, N, D] (the tokens as given)."""
        return [embeds[: self.batch] for embeds in image_embeds]


class FluxBackend(DiffusionBackend):
    """FLUX.1 + XLabs IP-Adapter + CLIP ViT-L/14 vision encoder, as IMG uses it.

    Args:
        pipe: a ``FluxPipeline`` with one XLabs IP-Adapter loaded (``load_ip_adapter``), its
            ``image_encoder`` (CLIPVisionModelWithProjection) and ``feature_extractor``
            (CLIPImageProcessor) registered.
        defaults: sampling settings used when a call leaves them unset (default: the paper's, 30
            steps, guidance 3.5, 1024x1024).
        true_cfg_scale: true classifier-free guidance with an empty negative prompt (official: 3.5;
            1 or less turns it off, halving the cost).
        sources: component locations, reported by :meth:`describe`.
    """

    family = "flux"

    def __init__(
        self,
        *,
        pipe: FluxPipeline,
        defaults: GenerationDefaults | None = None,
        true_cfg_scale: float | None = None,
        sources: dict[str, str] | None = None,
    ):
        from diffusers.models.embeddings import MultiIPAdapterImageProjection

        preset_defaults, preset_true_cfg = _preset_defaults()
        projection = getattr(pipe.transformer, "encoder_hid_proj", None)
        if not isinstance(projection, MultiIPAdapterImageProjection) or projection.num_ip_adapters != 1:
            raise ValueError(
                "the flux backend needs a FluxPipeline with exactly one IP-Adapter loaded; its "
                f"transformer's encoder_hid_proj is {type(projection).__name__}"
            )
        if getattr(pipe, "image_encoder", None) is None or getattr(pipe, "feature_extractor", None) is None:
            raise ValueError("the flux backend needs the pipeline's image_encoder and feature_extractor")
        self.pipe = pipe
        self.defaults = defaults or preset_defaults
        self.true_cfg_scale = float(true_cfg_scale if true_cfg_scale is not None else preset_true_cfg)
        self.sources = dict(sources or {})
        self._negative_tokens: torch.Tensor | None = None

    # ----------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike = "black-forest-labs/FLUX.1-dev",
        *,
        ip_adapter: str | os.PathLike = "XLabs-AI/flux-ip-adapter/ip_adapter.safetensors",
        image_encoder: str | os.PathLike = "openai/clip-vit-large-patch14",
        transformer: str | os.PathLike | None = None,
        torch_dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        defaults: GenerationDefaults | None = None,
        true_cfg_scale: float = 3.5,
        offload: OffloadMode = "none",
    ) -> FluxBackend:
        """Load every component from a local path or the hub.

        Args:
            model: a FluxPipeline folder or hub repo id (``owner/repo``).
            ip_adapter: the XLabs-format ``.safetensors`` file: a local file or ``owner/repo/file``.
            image_encoder: a CLIPVisionModelWithProjection folder, hub repo or ``owner/repo/sub/folder``.
            transformer: a FluxTransformer2DModel to use instead of the pipeline's own (folder, repo
                or ``owner/repo/sub/folder``).
            torch_dtype: weights' dtype (default: bfloat16 where native, float32 elsewhere).
            device: where generation runs (default: CUDA if available, else CPU).
            defaults, true_cfg_scale: see the class.
            offload: as in :meth:`set_offload`, applied before any weight reaches ``device`` (FLUX.1-dev
                with T5-XXL needs about 34 GB in bfloat16 without offload).
        """
        from diffusers import FluxPipeline, FluxTransformer2DModel
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        check_offload(offload)
        device = torch.device(device) if device is not None else _default_device()
        if torch_dtype is None:
            torch_dtype = default_dtype(device)
        # the small files first: a wrong adapter path fails before gigabytes are read
        adapter_file = hub_file(ip_adapter)
        _check_xlabs_file(adapter_file)
        pipe_path, pipe_subfolder = pretrained_location(model)
        if pipe_subfolder is not None:
            raise ValueError(
                f"FLUX pipeline location {os.fspath(model)!r} must be a local folder or a hub repo id "
                "(owner/repo), not a path inside a repo"
            )
        encoder_path, encoder_subfolder = pretrained_location(image_encoder)
        encoder = CLIPVisionModelWithProjection.from_pretrained(
            encoder_path, subfolder=encoder_subfolder or "", dtype=torch_dtype
        ).eval()
        # what diffusers' load_ip_adapter builds when the pipeline has none: CLIP's defaults at the
        # encoder's resolution (224 for ViT-L/14, the same as the XLabs code)
        size = encoder.config.image_size
        processor = CLIPImageProcessor(size=size, crop_size=size)
        components: dict[str, Any] = {"image_encoder": encoder, "feature_extractor": processor}
        if transformer is not None:
            path, subfolder = pretrained_location(transformer)
            components["transformer"] = FluxTransformer2DModel.from_pretrained(
                path, subfolder=subfolder, dtype=torch_dtype
            )
        pipe = FluxPipeline.from_pretrained(pipe_path, dtype=torch_dtype, **components)
        backend = cls.from_pipe(
            pipe,
            ip_adapter=adapter_file,
            defaults=defaults,
            true_cfg_scale=true_cfg_scale,
            sources={
                "model": os.fspath(model),
                "transformer": os.fspath(transformer) if transformer is not None else "",
                "ip_adapter": os.fspath(ip_adapter),
                "image_encoder": os.fspath(image_encoder),
            },
        )
        backend.set_offload(offload, device)
        return backend

    @classmethod
    def from_pipe(
        cls,
        pipe: FluxPipeline,
        *,
        ip_adapter: str | os.PathLike,
        defaults: GenerationDefaults | None = None,
        true_cfg_scale: float = 3.5,
        sources: dict[str, str] | None = None,
    ) -> FluxBackend:
        """A ``FluxPipeline`` already in memory, with the IP-Adapter added from ``ip_adapter`` (a local
        ``.safetensors`` file, XLabs layout). The pipeline's ``image_encoder`` must be registered; CLIP
        preprocessing at its resolution is added when missing. The adapter's weights go where the
        transformer is, in its dtype."""
        from transformers import CLIPImageProcessor

        num_adapter_blocks = _check_xlabs_file(ip_adapter)
        if getattr(pipe, "image_encoder", None) is None:
            raise ValueError("the pipeline needs an image_encoder (CLIPVisionModelWithProjection) registered")
        if getattr(pipe, "feature_extractor", None) is None:
            # what diffusers' load_ip_adapter builds when the pipeline has none: CLIP's defaults at
            # the encoder's resolution (224 for ViT-L/14, the same as the XLabs code)
            size = pipe.image_encoder.config.image_size
            pipe.register_modules(feature_extractor=CLIPImageProcessor(size=size, crop_size=size))
        if num_adapter_blocks != pipe.transformer.config.num_layers:
            raise ValueError(
                f"{ip_adapter} has IP weights for {num_adapter_blocks} double-stream blocks but the "
                f"transformer has {pipe.transformer.config.num_layers}"
            )
        adapter_file = Path(ip_adapter)
        # diffusers converts the XLabs keys (FluxIPAdapterMixin + FluxTransformer2DLoadersMixin)
        pipe.load_ip_adapter(
            os.fspath(adapter_file.parent),
            weight_name=adapter_file.name,
            image_encoder_pretrained_model_name_or_path=None,  # registered above
        )
        return cls(
            pipe=pipe,
            defaults=defaults,
            true_cfg_scale=true_cfg_scale,
            sources=sources or {"ip_adapter": os.fspath(ip_adapter)},
        )

    @classmethod
    def from_preset(cls, name: str = "flux", **overrides: Any) -> FluxBackend:
        """Load a preset of ``BACKEND_PRESETS`` (family ``flux``); keyword arguments of
        :meth:`from_pretrained` override its values."""
        from img_guidance.presets import BACKEND_PRESETS

        flux_presets = sorted(k for k, p in BACKEND_PRESETS.items() if p.family == "flux")
        if name not in flux_presets:
            raise ValueError(
                f"{name!r} is not a flux backend preset; flux presets: {', '.join(flux_presets)}"
            )
        preset = BACKEND_PRESETS[name]
        kwargs: dict[str, Any] = {
            "model": preset.model,
            "ip_adapter": preset.ip_adapter,
            "image_encoder": preset.image_encoder,
            "transformer": preset.unet,  # a preset's denoiser swap, if any
            "defaults": GenerationDefaults(
                steps=preset.steps,
                guidance_scale=preset.guidance_scale,
                height=preset.height,
                width=preset.width,
            ),
            "true_cfg_scale": preset.true_cfg_scale if preset.true_cfg_scale is not None else 1.0,
        }
        kwargs.update(overrides)
        return cls.from_pretrained(**kwargs)

    # ---------------------------------------------------------------------------------- properties
    @property
    def _projection(self) -> nn.Module:
        """The adapter's image projection (diffusers ``ImageProjection``): [B, 768] -> [B, 4, 4096]."""
        return self.pipe.transformer.encoder_hid_proj.image_projection_layers[0]

    @property
    def token_shape(self) -> tuple[int, int]:
        projection = self._projection
        return projection.num_image_text_embeds, projection.norm.normalized_shape[0]

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.pipe.transformer

    @property
    def device(self) -> torch.device:
        return self.pipe._execution_device

    @property
    def dtype(self) -> torch.dtype:
        return self.pipe.transformer.dtype

    @property
    def image_sides(self) -> ImageSides:
        # the VAE's downsampling x the 2 x 2 latent packing: 16 for FLUX.1's VAE
        return ImageSides(multiple=self.pipe.vae_scale_factor * 2)

    # ------------------------------------------------------------------------------- image tokens
    @torch.no_grad()
    def encode_image(self, images: Sequence[Image]) -> torch.Tensor:
        """Post-projection IP tokens: CLIP ``image_embeds`` [B, 768] -> projection -> [B, 4, 4096]
        (the backend's dtype, on its device)."""
        from diffusers.utils.torch_utils import get_module_execution_device

        images = list(images)
        if not images:
            raise ValueError("encode_image got no images")
        encoder = self.pipe.image_encoder
        pixels = self.pipe.feature_extractor(images=images, return_tensors="pt").pixel_values
        pixels = pixels.to(get_module_execution_device(encoder), dtype=encoder.dtype)  # [B, 3, 224, 224]
        embeds = encoder(pixel_values=pixels).image_embeds  # [B, 768]
        # Under model offload the projection sits on the CPU with its transformer (the offload hook
        # only wraps the transformer's own forward), so it runs where its weights are.
        projection = self._projection
        tokens = projection(embeds.to(get_module_execution_device(projection)))  # [B, 4, 4096]
        return tokens.to(self.device)

    def negative_image_tokens(self) -> torch.Tensor:
        """The tokens of a black 1024x1024 image, [1, 4, 4096]; computed once, then cached."""
        if self._negative_tokens is None:
            from PIL import Image as PILImage

            black = PILImage.new("RGB", (NEGATIVE_IMAGE_SIZE, NEGATIVE_IMAGE_SIZE), (0, 0, 0))
            self._negative_tokens = self.encode_image([black])
        return self._negative_tokens.to(self.device)

    # --------------------------------------------------------------------------------- generation
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

        Without ``image_tokens`` the IP attention is off (the official first pass, IP scale 0) and
        the result is exactly the plain ``FluxPipeline``'s. With ``image_tokens`` [B, N, D] (rows
        from :meth:`encode_image`, possibly edited), sample i's positive branch attends to row i and
        its true-CFG negative branch to the black-image tokens, both at ``ip_scale`` (official
        re-generation: 0.2). The tokens are used as given: no projection runs during the call.
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
        # 2. Sampling settings; true CFG with an empty negative prompt
        defaults = self.defaults
        kwargs: dict[str, Any] = {
            "prompt": prompts,
            "num_inference_steps": steps if steps is not None else defaults.steps,
            "guidance_scale": guidance_scale if guidance_scale is not None else defaults.guidance_scale,
            "height": height if height is not None else defaults.height,
            "width": width if width is not None else defaults.width,
            "generator": [torch.Generator().manual_seed(seed) for seed in seeds],
            "output_type": "pil",
        }
        if self.true_cfg_scale > 1:
            kwargs |= {"negative_prompt": [""] * len(prompts), "true_cfg_scale": self.true_cfg_scale}
        if image_tokens is None:  # 3a. Plain generation
            with self._adapter_off():
                return list(self.pipe(**kwargs).images)

        # 3b. Generation on the given tokens at ``ip_scale``
        batch = len(prompts)
        # [1, N, D] -> [B, N, D]; always given, or the pipeline would encode a black image itself
        negative = self.negative_image_tokens().expand(batch, -1, -1)
        self.pipe.set_ip_adapter_scale(float(ip_scale))
        with self._tokens_as_given(batch):
            images = self.pipe(
                **kwargs,
                ip_adapter_image_embeds=[image_tokens.to(self.dtype)],
                negative_ip_adapter_image_embeds=[negative.to(self.dtype)],
            ).images
        return list(images)

    @contextlib.contextmanager
    def _adapter_off(self) -> Iterator[None]:
        """Plain FLUX attention in the double blocks for the duration (IP-Adapter processors back
        afterwards): the same result as IP scale 0, without the unused IP attention."""
        from diffusers.models.transformers.transformer_flux import (
            FluxAttnProcessor,
            FluxIPAdapterAttnProcessor,
        )

        transformer = self.pipe.transformer
        processors = transformer.attn_processors  # {name: processor}
        plain = {
            name: FluxAttnProcessor() if isinstance(proc, FluxIPAdapterAttnProcessor) else proc
            for name, proc in processors.items()
        }
        transformer.set_attn_processor(plain)
        try:
            yield
        finally:
            transformer.set_attn_processor(dict(processors))

    @contextlib.contextmanager
    def _tokens_as_given(self, batch: int) -> Iterator[None]:
        """Swap the transformer's image projection for a pass-through for the duration."""
        transformer = self.pipe.transformer
        projection = transformer.encoder_hid_proj
        transformer.encoder_hid_proj = _GivenTokens(batch, projection.num_ip_adapters)
        try:
            yield
        finally:
            transformer.encoder_hid_proj = projection

    # ------------------------------------------------------------------------------------ devices
    def set_offload(self, mode: OffloadMode, device: str | torch.device) -> None:
        """ "none": every component on ``device``; "model": each component moves to ``device`` when
        it runs (diffusers ``enable_model_cpu_offload``); "sequential": layer by layer
        (``enable_sequential_cpu_offload``)."""
        check_offload(mode)
        if mode == "none":
            self.pipe.remove_all_hooks()
            self.pipe.to(device)
        elif mode == "model":
            self.pipe.enable_model_cpu_offload(device=device)
        else:
            self.pipe.enable_sequential_cpu_offload(device=device)

    def describe(self) -> dict[str, str]:
        return {
            "family": self.family,
            **self.sources,
            "dtype": str(self.dtype).removeprefix("torch."),
            "true_cfg_scale": str(self.true_cfg_scale),
        }


def _check_xlabs_file(path: os.PathLike) -> int:
    """The number of double-stream blocks with IP weights in a flux IP-Adapter ``.safetensors`` file
    (XLabs layout, or the ``image_proj.*`` / ``ip_adapter.{i}.*`` layout diffusers also reads); an
    error naming the file when it is neither."""
    from safetensors import safe_open

    if not os.fspath(path).endswith(".safetensors"):
        raise ValueError(f"{path}: the flux IP-Adapter is read from a .safetensors file")
    with safe_open(os.fspath(path), framework="pt") as f:
        keys = list(f.keys())
    has_projection = any(key.startswith(("ip_adapter_proj_model.", "image_proj.")) for key in keys)
    blocks = {key.split(".")[1] for key in keys if key.startswith(("double_blocks.", "ip_adapter."))}
    if not has_projection or not blocks:
        raise ValueError(
            f"{path} is not a flux IP-Adapter file (expected the XLabs keys ip_adapter_proj_model.* and "
            f"double_blocks.{{i}}.processor.ip_adapter_double_stream_{{k,v}}_proj.*; "
            f"found e.g. {sorted(keys)[:3]})"
        )
    return len(blocks)


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# FluxBackend.from_pretrained's defaults, for the encoder-only path
DEFAULT_IP_ADAPTER = "XLabs-AI/flux-ip-adapter/ip_adapter.safetensors"
DEFAULT_IMAGE_ENCODER = "openai/clip-vit-large-patch14"


class FluxImageEncoder:
    """Only what :meth:`FluxBackend.encode_image` needs: the CLIP vision model and the XLabs adapter's
    image projection, without the transformer, T5, CLIP text encoder and VAE (about 34 GB that the
    feature stage never uses). Its tokens equal those of a :class:`FluxBackend` loaded with the same
    ``ip_adapter``, ``image_encoder``, dtype and device.

    Build it with :meth:`from_pretrained` (or :func:`img_guidance.backends.load_image_encoder`).
    """

    family = "flux"

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
        self.sources = dict(sources or {})

    @classmethod
    def from_pretrained(
        cls,
        *,
        ip_adapter: str | os.PathLike = DEFAULT_IP_ADAPTER,
        image_encoder: str | os.PathLike = DEFAULT_IMAGE_ENCODER,
        torch_dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
    ) -> FluxImageEncoder:
        """Load the CLIP vision model (a CLIPVisionModelWithProjection folder, repo or
        ``owner/repo/sub``) and the image projection of an XLabs-format ``.safetensors`` adapter.
        Defaults as :meth:`FluxBackend.from_pretrained`: CUDA if available, bfloat16 where native
        (:func:`~img_guidance.precision.default_dtype`), float32 elsewhere."""
        from diffusers.loaders.transformer_flux import FluxTransformer2DLoadersMixin
        from safetensors import safe_open
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        device = torch.device(device) if device is not None else _default_device()
        if torch_dtype is None:
            torch_dtype = default_dtype(device)
        adapter_file = hub_file(ip_adapter)
        _check_xlabs_file(adapter_file)
        encoder_path, encoder_subfolder = pretrained_location(image_encoder)
        # the projection keys as diffusers' FluxIPAdapterMixin.load_ip_adapter reads them
        # (ip_adapter_proj_model.proj.weight -> proj.weight)
        with safe_open(os.fspath(adapter_file), framework="pt", device="cpu") as f:
            state = {
                key.split(".", 1)[1]: f.get_tensor(key)
                for key in f.keys()  # noqa: SIM118 (a safetensors handle, not a dict)
                if key.startswith(("ip_adapter_proj_model.", "image_proj."))
            }
        # diffusers' conversion reads nothing from the transformer unless loading onto the meta device
        projection = FluxTransformer2DLoadersMixin._convert_ip_adapter_image_proj_to_diffusers(
            None, state, low_cpu_mem_usage=False
        )
        encoder = CLIPVisionModelWithProjection.from_pretrained(
            encoder_path, subfolder=encoder_subfolder or "", dtype=torch_dtype
        )
        size = encoder.config.image_size
        encoder_only = cls(
            image_encoder=encoder,
            feature_extractor=CLIPImageProcessor(size=size, crop_size=size),  # as FluxBackend's
            image_projection=projection.to(torch_dtype),
            sources={"ip_adapter": os.fspath(ip_adapter), "image_encoder": os.fspath(image_encoder)},
        )
        return encoder_only.to(device)

    def to(self, device: str | torch.device) -> FluxImageEncoder:
        self.image_encoder.to(device)
        self.image_projection.to(device)
        return self

    @property
    def token_shape(self) -> tuple[int, int]:
        return self.image_projection.num_image_text_embeds, self.image_projection.norm.normalized_shape[0]

    @property
    def device(self) -> torch.device:
        return self.image_encoder.device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.image_projection.parameters()).dtype

    def describe(self) -> dict[str, str]:
        return {"family": self.family, **self.sources, "dtype": str(self.dtype).removeprefix("torch.")}

    @torch.no_grad()
    def encode_image(self, images: Sequence[Image]) -> torch.Tensor:
        """Post-projection IP tokens as :meth:`FluxBackend.encode_image` makes them: CLIP
        ``image_embeds`` [B, 768] -> projection -> [B, 4, 4096] (this encoder's dtype and device)."""
        images = list(images)
        if not images:
            raise ValueError("encode_image got no images")
        pixels = self.feature_extractor(images=images, return_tensors="pt").pixel_values
        pixels = pixels.to(self.device, dtype=self.image_encoder.dtype)  # [B, 3, 224, 224]
        embeds = self.image_encoder(pixel_values=pixels).image_embeds  # [B, 768]
        return self.image_projection(embeds)  # [B, 4, 4096]
