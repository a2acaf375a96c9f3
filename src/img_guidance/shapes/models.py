"""The world's own text-to-image model and its image-prompt adapter, built from diffusers parts.

A tiny pixel-space diffusion model (32 x 32 RGB in [-1, 1]) that trains on two CPU cores, made of
the same pieces as the real models so that the IMG code paths are the ones users run on SDXL:

- :class:`ShapesTokenizer`: word level, over every word a prompt of the grammar can contain, plus
  ``<pad>``, ``<unk>`` and ``<eos>``; a fixed length of 12 (the longest prompt has 10 words).
- :class:`ShapesTextEncoder`: embeddings, learned positions and a small pre-norm transformer ->
  hidden states [B, T, 64] (with their attention mask), what the UNet cross-attends to.
- the UNet: a diffusers ``UNet2DConditionModel`` (3 -> 3 channels, 32 x 32; attention at 8 px)
  predicting v; a ``DDPMScheduler`` (cosine) for training and a ``DDIMScheduler`` built from
  the same config for sampling (20 steps, classifier-free guidance 1.5).
- the image-prompt adapter, in IP-Adapter form: :class:`ShapesImageEncoder` (a small CNN, image ->
  [B, 128], the stand-in for CLIP's image embedding), diffusers' ``ImageProjection`` ([B, 128] ->
  [B, 4, 64] image tokens) and diffusers' IP-Adapter attention processors (``to_k_ip`` / ``to_v_ip``)
  on every cross-attention layer. The adapter is stored in the h94 IP-Adapter file layout and
  installed by diffusers' own loader; then, as the SDXL backend does, the projection is taken out of
  the UNet and replaced by a pass-through, so the UNet takes post-projection tokens as they are.

:class:`ShapesWorldPipeline` bundles them: one folder (``save_pretrained`` / ``from_pretrained``),
prompt and image encoding, and sampling with classifier-free guidance. Folder layout::

    model_index.json          {"_class_name": "ShapesWorldPipeline", component: [library, class]}
    tokenizer.json
    text_encoder/             config.json, diffusion_pytorch_model.safetensors
    unet/                     the base UNet alone (no adapter weights): config.json, weights
    scheduler/                scheduler_config.json (the DDPM training schedule)
    image_encoder/            config.json, diffusion_pytorch_model.safetensors
    ip_adapter.safetensors    image_proj.{proj,norm}.*, ip_adapter.{1,3,5,...}.to_{k,v}_ip.weight

The last two are absent in a base model that has no adapter yet.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import ConfigMixin, DDIMScheduler, DDPMScheduler, ModelMixin, UNet2DConditionModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.attention_processor import IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0
from diffusers.models.embeddings import ImageProjection
from PIL import Image
from torch import nn

from img_guidance.precision import default_dtype
from img_guidance.shapes.grammar import all_scenes, describe
from img_guidance.shapes.render import BACKGROUND

PIPELINE_CLASS = "ShapesWorldPipeline"
IMAGE_SIZE = 32
TEXT_WIDTH = 64  # the text hidden size = the UNet's cross-attention width = the image-token width
NUM_IMAGE_TOKENS = 4  # fixed by the h94 layout of a plain IP-Adapter (diffusers reads 4 off "proj.weight")
IMAGE_EMBED_DIM = 128
MAX_PROMPT_TOKENS = 12
SAMPLING_STEPS = 20
GUIDANCE_SCALE = 1.5  # measured: 24% of validation prompts right at 1.5, 16% at 2.5, 6% at 4
IP_SCALE = 0.2  # without ip_scale.json (train-all writes one): the paper's value; the two-stage models' best
IP_SCALE_FILE = "ip_scale.json"  # in a model folder: the IP scale chosen on validation (train-all)
IP_ADAPTER_FILE = "ip_adapter.safetensors"
COORDINATE_CHANNELS = 2  # x and y, appended to the UNet's input where its config has 5 channels
TOKENIZER_FILE = "tokenizer.json"
SPECIAL_TOKENS = ("<pad>", "<unk>", "<eos>")
IP_PROCESSORS = (IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0)


# ---------------------------------------------------------------------------------------------
# text


def grammar_words() -> list[str]:
    """Every word a prompt of the grammar can contain, sorted: the canonical prompts' words and the
    other counts :func:`~img_guidance.shapes.grammar.parse` accepts ("an", "one")."""
    words = {w for spec in all_scenes() for w in describe(spec).split()}
    return sorted(words | {"an", "one"})


class ShapesTokenizer:
    """Word-level tokenizer: lower-cases, turns punctuation into spaces, splits on whitespace and
    appends ``<eos>``; pads to ``max_length`` with ``<pad>``. The empty prompt is ``[<eos>]``.

    Unknown words raise a ValueError that names them (``strict=True``, the default), or become
    ``<unk>``; a prompt longer than ``max_length - 1`` words raises.
    """

    def __init__(self, *, vocab: Sequence[str] | None = None, max_length: int = MAX_PROMPT_TOKENS) -> None:
        vocab = list(vocab) if vocab is not None else [*SPECIAL_TOKENS, *grammar_words()]
        if vocab[: len(SPECIAL_TOKENS)] != list(SPECIAL_TOKENS):
            raise ValueError(f"a vocabulary starts with {list(SPECIAL_TOKENS)}, got {vocab[:3]}")
        if len(set(vocab)) != len(vocab):
            raise ValueError(
                f"the vocabulary has repeated words: {sorted({w for w in vocab if vocab.count(w) > 1})}"
            )
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2 (a word and <eos>), got {max_length}")
        self.vocab = vocab
        self.max_length = max_length
        self._ids = {w: i for i, w in enumerate(vocab)}
        self.pad_token_id, self.unk_token_id, self.eos_token_id = range(len(SPECIAL_TOKENS))

    def __len__(self) -> int:
        return len(self.vocab)

    @staticmethod
    def words(prompt: str) -> list[str]:
        """A prompt's words: lower case, punctuation removed."""
        return re.sub(r"[^\w\s]", " ", prompt.lower()).split()

    def encode(self, prompt: str, *, strict: bool = True) -> list[int]:
        """Token ids of one prompt, ``<eos>`` included, without padding."""
        words = self.words(prompt)
        # punctuation is gone, so no word can spell a special token ("<pad>" is read as "pad")
        unknown = [w for w in words if w not in self._ids]
        if unknown and strict:
            raise ValueError(
                f"unknown words {unknown} in prompt {prompt!r}: the vocabulary is {self.vocab[3:]}"
            )
        if len(words) + 1 > self.max_length:
            raise ValueError(
                f"prompt {prompt!r} has {len(words)} words; at most {self.max_length - 1} fit (max_length "
                f"{self.max_length} with <eos>)"
            )
        return [self._ids.get(w, self.unk_token_id) for w in words] + [self.eos_token_id]

    def decode(self, ids: Sequence[int]) -> str:
        """The words of ``ids`` up to ``<eos>``, padding dropped."""
        words = []
        for i in ids:
            if int(i) == self.eos_token_id:
                break
            if int(i) != self.pad_token_id:
                words.append(self.vocab[int(i)])
        return " ".join(words)

    def __call__(self, prompts: Sequence[str], *, strict: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded ids [B, max_length] (long) and attention mask [B, max_length] (bool, True on words
        and ``<eos>``)."""
        ids = torch.full((len(prompts), self.max_length), self.pad_token_id, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            encoded = self.encode(prompt, strict=strict)
            ids[row, : len(encoded)] = torch.tensor(encoded)
        return ids, ids != self.pad_token_id

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps({"vocab": self.vocab, "max_length": self.max_length}, indent=1))

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> ShapesTokenizer:
        data = json.loads(Path(path).read_text())
        return cls(vocab=data["vocab"], max_length=data["max_length"])

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, ShapesTokenizer)
            and self.vocab == other.vocab
            and self.max_length == other.max_length
        )

    __hash__ = None  # type: ignore[assignment]


class ShapesTextEncoder(ModelMixin, ConfigMixin):
    """Token ids -> hidden states for cross-attention: embeddings plus learned positions, a pre-norm
    transformer encoder (padding masked out) and a final LayerNorm.

    Args:
        vocab_size, max_length: the tokenizer's.
        width: hidden size (= the UNet's ``cross_attention_dim``).
        layers, heads, ff_mult: the transformer's depth, heads and feed-forward width (x ``width``).
    """

    @register_to_config
    def __init__(
        self,
        *,
        vocab_size: int = 26,  # len(ShapesTokenizer())
        max_length: int = MAX_PROMPT_TOKENS,
        width: int = TEXT_WIDTH,
        layers: int = 2,
        heads: int = 4,
        ff_mult: int = 4,
    ) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.position_embedding = nn.Parameter(torch.randn(max_length, width) * 0.02)
        layer = nn.TransformerEncoderLayer(
            width, heads, ff_mult * width, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        # no nested tensors: padded positions are computed like any other (batch rows = single rows)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.final_norm = nn.LayerNorm(width)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids [B, T] (long), attention_mask [B, T] (bool, True = a real token) -> [B, T, width]."""
        x = self.token_embedding(input_ids) + self.position_embedding[: input_ids.shape[1]]  # [B, T, W]
        x = self.encoder(x, src_key_padding_mask=~attention_mask.bool())
        return self.final_norm(x)


# ---------------------------------------------------------------------------------------------
# images


class ShapesImageEncoder(ModelMixin, ConfigMixin):
    """A small CNN, RGB image [B, 3, 32, 32] in [-1, 1] -> embedding [B, embed_dim]: the world's
    stand-in for CLIP's image embedding, which the IP-Adapter projection turns into tokens.

    Three stride-2 convolutions (32 -> 4 px) and a linear layer over the flattened 4 x 4 map, so the
    embedding keeps where things are (relations), not just what they are.
    """

    @register_to_config
    def __init__(
        self,
        *,
        image_size: int = IMAGE_SIZE,
        channels: tuple[int, ...] = (32, 64, 128),
        embed_dim: int = IMAGE_EMBED_DIM,
        norm_groups: int = 8,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, channels[0], 3, padding=1), nn.SiLU()]
        previous = channels[0]
        for c in channels:
            layers += [
                nn.Conv2d(previous, c, 3, stride=2, padding=1),
                nn.GroupNorm(norm_groups, c),
                nn.SiLU(),
            ]
            previous = c
        self.features = nn.Sequential(*layers)
        side = image_size // 2 ** len(channels)
        self.proj = nn.Linear(channels[-1] * side * side, embed_dim)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, H, W] in [-1, 1] -> [B, embed_dim]."""
        features = self.features(pixels)  # [B, C, H / 8, W / 8]
        return self.proj(features.flatten(1))  # [B, C * H / 8 * W / 8] -> [B, embed_dim]

    def feature_map(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, H, W] in [-1, 1] -> the last feature map [B, C, H / 8, W / 8] (what a spatial
        adapter reads, as IP-Adapter-Plus reads CLIP's patch features)."""
        return self.features(pixels)


class SpatialImageProjection(nn.Module):
    """A spatial adapter's projection: one token per cell of the image encoder's last feature map
    (4 x 4 at 32 px), each the cell's features mapped linearly to the token width plus a learned
    embedding of the cell's place, layer-normed: [B, C, s, s] -> [B, s * s, width]. IP-Adapter-Plus
    reads CLIP's patch features the same way (through a resampler, which a 4 x 4 map does not need).
    Its weights sit in the adapter file as ``image_proj.{proj.weight, proj.bias, position,
    norm.weight, norm.bias}``; ``position`` marks the kind."""

    def __init__(self, channels: int, cells: int, width: int = TEXT_WIDTH) -> None:
        super().__init__()
        self.proj = nn.Linear(channels, width)
        self.position = nn.Parameter(torch.randn(cells, width) * 0.5)
        self.norm = nn.LayerNorm(width)
        self.num_image_text_embeds = cells

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> SpatialImageProjection:
        cells, width = state["position"].shape
        projection = cls(state["proj.weight"].shape[1], cells, width)
        projection.load_state_dict(state)
        return projection

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features [B, C, s, s] -> tokens [B, s * s, width]."""
        cells = features.flatten(2).transpose(1, 2)  # [B, C, s, s] -> [B, s * s, C]
        return self.norm(self.proj(cells) + self.position)


def to_pixels(images: Sequence[Image.Image], *, size: int = IMAGE_SIZE) -> torch.Tensor:
    """PIL images -> [B, 3, size, size] float32 in [-1, 1] (resized bilinearly where their size differs)."""
    arrays = []
    for image in images:
        image = image.convert("RGB")
        if image.size != (size, size):
            image = image.resize((size, size), Image.BILINEAR)
        arrays.append(np.asarray(image, dtype=np.float32))
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # [B, H, W, 3] -> [B, 3, H, W]
    return pixels / 127.5 - 1.0


def to_images(pixels: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in [-1, 1] -> PIL RGB images (clipped, rounded to uint8)."""
    array = ((pixels.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).cpu().numpy(), mode="RGB") for a in array]


def background_image(size: int = IMAGE_SIZE) -> Image.Image:
    """An empty scene: the world's background colour everywhere (the negative image of the adapter)."""
    return Image.new("RGB", (size, size), BACKGROUND)


class PostProjectionTokens(nn.Module):
    """Stands in for the UNet's IP image projection (``encoder_hid_proj``): the image embeddings it is
    given are already projected tokens, one list entry per IP-Adapter, [B, N, D]; they pass unchanged.
    (The same stand-in as the SDXL backend's, repeated so that the world does not import a backend.)"""

    def forward(self, image_embeds: list[torch.Tensor]) -> list[torch.Tensor]:
        return list(image_embeds)


# ---------------------------------------------------------------------------------------------
# the UNet, the schedulers and the adapter's weights


def unet_config(
    *,
    block_out_channels: tuple[int, ...] = (32, 64, 96),
    layers_per_block: int = 1,
    attention_levels: int = 1,
    head_dim: int = 32,
    pooling_heads: int = 4,
    norm_num_groups: int = 8,
    coordinates: bool = False,
) -> dict[str, Any]:
    """The config of the world's UNet: pixel space (3 -> 3 channels, 32 x 32); self- and
    cross-attention (and so the IP-Adapter) in the lowest ``attention_levels`` levels and the middle:
    at 8 x 8 px by default. Attention at 16 x 16 as well costs 1.7x the training time on a CPU (the
    self-attention over 256 positions) for little: objects are 8-12 px wide. ``coordinates``: two more
    input channels, x and y in [-1, 1], appended to the noisy image by :meth:`ShapesWorldPipeline.denoise`
    (``in_channels`` 5), so that attention queries know where they are (a spatial adapter's tokens say
    what lies where)."""
    levels = len(block_out_channels)
    if not 1 <= attention_levels <= levels:
        raise ValueError(f"attention_levels must lie in [1, {levels}], got {attention_levels}")
    plain = levels - attention_levels
    return dict(
        sample_size=IMAGE_SIZE,
        in_channels=3 + COORDINATE_CHANNELS * coordinates,
        out_channels=3,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        down_block_types=("DownBlock2D",) * plain + ("CrossAttnDownBlock2D",) * attention_levels,
        up_block_types=("CrossAttnUpBlock2D",) * attention_levels + ("UpBlock2D",) * plain,
        cross_attention_dim=TEXT_WIDTH,
        # diffusers' UNet reads attention_head_dim as the number of heads per level
        attention_head_dim=tuple(max(1, c // head_dim) for c in block_out_channels),
        use_linear_projection=True,
        norm_num_groups=norm_num_groups,
        # the prompt, attention-pooled, is added to the time embedding (DeepFloyd IF's "text"; SDXL adds
        # its pooled text embedding the same way): global conditioning of every ResNet block
        addition_embed_type="text",
        addition_embed_type_num_heads=pooling_heads,
    )


def training_scheduler() -> DDPMScheduler:
    """The training noise schedule: cosine (squaredcos_cap_v2), v-prediction, samples clipped to
    [-1, 1]; "trailing" spacing so that a few-step sampler starts from pure noise."""
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="v_prediction",
        clip_sample=True,
        clip_sample_range=1.0,
        timestep_spacing="trailing",
    )


def sampling_scheduler(config: Any) -> DDIMScheduler:
    """A deterministic DDIM sampler (eta 0) from the training scheduler's config."""
    return DDIMScheduler.from_config(config)


def cross_attention_names(unet: UNet2DConditionModel) -> list[str]:
    """The UNet's cross-attention processors, in ``attn_processors`` order (the order in which the
    h94 layout numbers them 1, 3, 5, ...)."""
    return [name for name in unet.attn_processors if not name.endswith("attn1.processor")]


ADAPTER_KINDS = ("global", "spatial")


def initial_ip_adapter_state(
    unet: UNet2DConditionModel,
    *,
    embed_dim: int = IMAGE_EMBED_DIM,
    kind: str = "global",
    channels: int = IMAGE_EMBED_DIM,
    cells: int = 16,
) -> dict:
    """A fresh adapter in the h94 layout, ``{"image_proj": ..., "ip_adapter": ...}``: a new projection
    (``kind`` "global": diffusers' ``ImageProjection`` of an ``embed_dim`` embedding into 4 tokens;
    "spatial": a :class:`SpatialImageProjection` of a ``channels``-deep map of ``cells`` cells) and,
    as the IP-Adapter paper initialises them, ``to_k_ip`` / ``to_v_ip`` copied from each
    cross-attention layer's text ``to_k`` / ``to_v``."""
    if kind not in ADAPTER_KINDS:
        raise ValueError(f"adapter kind must be one of {', '.join(ADAPTER_KINDS)}, got {kind!r}")
    if kind == "spatial":
        image_proj = dict(SpatialImageProjection(channels, cells).state_dict())
    else:
        projection = ImageProjection(
            image_embed_dim=embed_dim, cross_attention_dim=TEXT_WIDTH, num_image_text_embeds=NUM_IMAGE_TOKENS
        )
        image_proj = {k.replace("image_embeds", "proj"): v for k, v in projection.state_dict().items()}
    ip_adapter = {}
    for i, name in enumerate(cross_attention_names(unet)):
        attn = unet.get_submodule(name.removesuffix(".processor"))
        ip_adapter[f"{2 * i + 1}.to_k_ip.weight"] = attn.to_k.weight.detach().clone()
        ip_adapter[f"{2 * i + 1}.to_v_ip.weight"] = attn.to_v.weight.detach().clone()
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


def install_ip_adapter(unet: UNet2DConditionModel, state: dict) -> ImageProjection | SpatialImageProjection:
    """Install an adapter given in the h94 layout with diffusers' own loader (IP-Adapter attention
    processors on every cross-attention layer, the ``ImageProjection``), then take the projection
    out: the UNet's ``encoder_hid_proj`` becomes :class:`PostProjectionTokens`. Returns the projection.
    A spatial adapter (``image_proj.position`` present) gets the same processors from diffusers'
    converter, and its :class:`SpatialImageProjection` built here (diffusers knows no such layer)."""
    if "position" in state["image_proj"]:
        with _quiet_dtype_casts():
            unet.encoder_hid_proj = None
            unet.set_attn_processor(
                unet._convert_ip_adapter_attn_to_diffusers([state], low_cpu_mem_usage=False)
            )
            unet.encoder_hid_proj = PostProjectionTokens()
            unet.config.encoder_hid_dim_type = "ip_image_proj"
            unet.to(dtype=unet.dtype, device=unet.device)
        return SpatialImageProjection.from_state(state["image_proj"]).to(dtype=unet.dtype, device=unet.device)
    with _quiet_dtype_casts():
        unet._load_ip_adapter_weights([state], low_cpu_mem_usage=False)
    (projection,) = unet.encoder_hid_proj.image_projection_layers
    if not isinstance(projection, ImageProjection):
        raise ValueError(f"expected a plain IP-Adapter ImageProjection, got {type(projection).__name__}")
    unet.encoder_hid_proj = PostProjectionTokens()
    return projection


@contextlib.contextmanager
def _quiet_dtype_casts() -> Iterator[None]:
    """diffusers warns on every ``ModelMixin.to(dtype)`` about modules "that should be kept in float32"
    (here: none); silence it where we cast on purpose."""
    from diffusers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)


def ip_adapter_state(unet: UNet2DConditionModel, projection: ImageProjection) -> dict[str, torch.Tensor]:
    """The installed adapter's weights as one flat h94-layout dict (``image_proj.proj.weight``, ...,
    ``ip_adapter.1.to_k_ip.weight``, ...), ready for safetensors."""
    flat = {f"image_proj.{k.replace('image_embeds', 'proj')}": v for k, v in projection.state_dict().items()}
    processors = unet.attn_processors
    for i, name in enumerate(cross_attention_names(unet)):
        processor = processors[name]
        flat[f"ip_adapter.{2 * i + 1}.to_k_ip.weight"] = processor.to_k_ip[0].weight
        flat[f"ip_adapter.{2 * i + 1}.to_v_ip.weight"] = processor.to_v_ip[0].weight
    return {k: v.detach().float().contiguous().cpu() for k, v in flat.items()}


def ip_processors(unet: UNet2DConditionModel) -> list[nn.Module]:
    """The UNet's IP-Adapter attention processors (empty without an adapter)."""
    return [p for p in unet.attn_processors.values() if isinstance(p, IP_PROCESSORS)]


# ---------------------------------------------------------------------------------------------
# the pipeline


def with_coordinates(sample: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, C + 2, H, W]: x and y in [-1, 1] appended (see :func:`unet_config`)."""
    b, _, h, w = sample.shape
    ys = torch.linspace(-1, 1, h, dtype=sample.dtype, device=sample.device).view(1, 1, h, 1)
    xs = torch.linspace(-1, 1, w, dtype=sample.dtype, device=sample.device).view(1, 1, 1, w)
    return torch.cat([sample, xs.expand(b, 1, h, w), ys.expand(b, 1, h, w)], 1)


class ShapesWorldPipeline:
    """The world's text-to-image model with its image-prompt adapter (see the module docstring).

    Build a fresh one with :meth:`build`, add a fresh adapter with :meth:`add_ip_adapter`, load one
    with :meth:`from_pretrained`. Generation is :meth:`__call__`; image tokens come from
    :meth:`encode_images`.
    """

    def __init__(
        self,
        *,
        tokenizer: ShapesTokenizer,
        text_encoder: ShapesTextEncoder,
        unet: UNet2DConditionModel,
        scheduler: DDPMScheduler,
        image_encoder: ShapesImageEncoder | None = None,
        image_projection: ImageProjection | SpatialImageProjection | None = None,
        compute_dtype: torch.dtype | str | None = "auto",
    ) -> None:
        if (image_encoder is None) != (image_projection is None):
            raise ValueError("an adapter needs both an image encoder and an image projection, or neither")
        if image_projection is not None and not isinstance(unet.encoder_hid_proj, PostProjectionTokens):
            raise ValueError(
                "with an adapter the UNet must take post-projection tokens (PostProjectionTokens)"
            )
        if unet.config.cross_attention_dim != text_encoder.config.width:
            raise ValueError(
                f"the UNet cross-attends to width {unet.config.cross_attention_dim} but the text encoder "
                f"makes width {text_encoder.config.width}"
            )
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.unet = unet
        self.scheduler = scheduler
        self.image_encoder = image_encoder
        self.image_projection = image_projection
        # sampling runs the UNet under autocast to this dtype (None: the weights' dtype; "auto":
        # bfloat16 where the device has it natively, else none; see img_guidance.precision)
        if not (compute_dtype is None or compute_dtype == "auto" or isinstance(compute_dtype, torch.dtype)):
            raise ValueError(f"compute_dtype must be a torch dtype, 'auto' or None, got {compute_dtype!r}")
        self.compute_dtype = compute_dtype

    # ---------------------------------------------------------------- building, saving, loading

    @classmethod
    def build(
        cls, *, seed: int = 0, unet: dict[str, Any] | None = None, text_layers: int = 2
    ) -> ShapesWorldPipeline:
        """A fresh, untrained base model (no adapter), its weights drawn from ``seed``; ``unet``
        overrides keys of :func:`unet_config`. The global torch RNG is left as it was."""
        tokenizer = ShapesTokenizer()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            text_encoder = ShapesTextEncoder(
                vocab_size=len(tokenizer), max_length=tokenizer.max_length, layers=text_layers
            )
            model = UNet2DConditionModel(**unet_config(**(unet or {})))
        return cls(tokenizer=tokenizer, text_encoder=text_encoder, unet=model, scheduler=training_scheduler())

    def add_ip_adapter(
        self,
        *,
        seed: int = 0,
        state: dict | None = None,
        embed_dim: int = IMAGE_EMBED_DIM,
        kind: str = "global",
    ) -> None:
        """Install an adapter: ``state`` in the h94 layout, or a fresh one of ``kind`` ("global" or
        "spatial") drawn from ``seed`` (:func:`initial_ip_adapter_state`) with a fresh
        :class:`ShapesImageEncoder`."""
        if self.has_adapter:
            raise ValueError("this pipeline already has an adapter")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if state is None:
                encoder = self.image_encoder.config if self.image_encoder is not None else None
                channels = encoder.channels[-1] if encoder is not None else IMAGE_EMBED_DIM
                side = (
                    IMAGE_SIZE // 8 if encoder is None else encoder.image_size // 2 ** len(encoder.channels)
                )
                state = initial_ip_adapter_state(
                    self.unet, embed_dim=embed_dim, kind=kind, channels=channels, cells=side * side
                )
            if self.image_encoder is None:
                embed = state["image_proj"]["proj.weight"].shape[1]
                self.image_encoder = ShapesImageEncoder(embed_dim=embed)
        self.image_projection = install_ip_adapter(self.unet, state)
        self.set_ip_scale(0.0)

    @property
    def has_adapter(self) -> bool:
        return self.image_projection is not None

    @property
    def spatial_adapter(self) -> bool:
        """Whether the adapter reads the image encoder's feature map (one token per cell)."""
        return isinstance(self.image_projection, SpatialImageProjection)

    def save_pretrained(self, folder: str | os.PathLike, *, dtype: torch.dtype = torch.float16) -> None:
        """Write the folder described in the module docstring, weights stored in ``dtype`` (float16 by
        default: half the size, ~6 MB; :meth:`from_pretrained` loads them as float32). The file
        ``model_index.json`` is written last: a folder without it is incomplete."""
        import diffusers
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        module = __name__
        index: dict[str, Any] = {
            "_class_name": PIPELINE_CLASS,
            "_diffusers_version": diffusers.__version__,
            "tokenizer": [module, "ShapesTokenizer"],
            "text_encoder": [module, "ShapesTextEncoder"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "scheduler": ["diffusers", type(self.scheduler).__name__],
            "image_encoder": [None, None],
        }
        self.tokenizer.save(folder / TOKENIZER_FILE)
        self.scheduler.save_pretrained(folder / "scheduler")
        # the base UNet alone: its own config, without the adapter's processors
        unet = UNet2DConditionModel.from_config({**self.unet.config, "encoder_hid_dim_type": None})
        unet.load_state_dict({k: v for k, v in self.unet.state_dict().items() if ".processor." not in k})
        models = {"text_encoder": copy.deepcopy(self.text_encoder), "unet": unet}
        if self.has_adapter:
            models["image_encoder"] = copy.deepcopy(self.image_encoder)
            index["image_encoder"] = [module, "ShapesImageEncoder"]
            tmp = folder / (IP_ADAPTER_FILE + ".tmp")
            state = ip_adapter_state(self.unet, self.image_projection)
            save_file({k: v.to(dtype) for k, v in state.items()}, tmp)
            os.replace(tmp, folder / IP_ADAPTER_FILE)
        with _quiet_dtype_casts():
            for name, model in models.items():
                model.to(dtype).save_pretrained(folder / name)
        (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, *, adapter: bool = True) -> ShapesWorldPipeline:
        """Load a folder written by :meth:`save_pretrained`, in float32 on the CPU; with
        ``adapter=False`` only the base model (text encoder and UNet), even where the folder has more."""
        folder = Path(folder)
        index_file = folder / "model_index.json"
        if not index_file.is_file():
            raise FileNotFoundError(f"{folder} is not a ShapesWorld model folder: no model_index.json")
        class_name = json.loads(index_file.read_text()).get("_class_name")
        if class_name != PIPELINE_CLASS:
            raise ValueError(f"{folder} holds a {class_name}, not a {PIPELINE_CLASS}")
        dtype = torch.float32
        pipe = cls(
            tokenizer=ShapesTokenizer.from_file(folder / TOKENIZER_FILE),
            text_encoder=ShapesTextEncoder.from_pretrained(folder / "text_encoder", dtype=dtype),
            unet=UNet2DConditionModel.from_pretrained(folder / "unet", dtype=dtype),
            scheduler=DDPMScheduler.from_pretrained(folder / "scheduler"),
        )
        if adapter and (folder / IP_ADAPTER_FILE).is_file():
            from safetensors.torch import load_file

            flat = load_file(folder / IP_ADAPTER_FILE)
            state: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
            for key, value in flat.items():
                part, _, rest = key.partition(".")
                state[part][rest] = value.to(dtype)
            pipe.image_encoder = ShapesImageEncoder.from_pretrained(folder / "image_encoder", dtype=dtype)
            pipe.add_ip_adapter(state=state)
        return pipe.eval()

    def modules(self) -> dict[str, nn.Module]:
        """The pipeline's torch modules by name (the image encoder and projection with an adapter)."""
        named = {"text_encoder": self.text_encoder, "unet": self.unet}
        if self.has_adapter:
            named |= {"image_encoder": self.image_encoder, "image_projection": self.image_projection}
        return named

    def to(
        self, device: str | torch.device | None = None, dtype: torch.dtype | None = None
    ) -> ShapesWorldPipeline:
        if device is None and dtype is None:
            return self
        with _quiet_dtype_casts():
            for module in self.modules().values():
                module.to(device=device, dtype=dtype)
        return self

    def eval(self) -> ShapesWorldPipeline:
        for module in self.modules().values():
            module.eval().requires_grad_(False)
        return self

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def token_shape(self) -> tuple[int, int]:
        """(tokens, width) of the post-projection image tokens: (4, 64)."""
        if self.image_projection is None:
            raise ValueError("this ShapesWorld model has no image-prompt adapter (a base model)")
        return (self.image_projection.num_image_text_embeds, self.image_projection.norm.normalized_shape[0])

    # ---------------------------------------------------------------- conditioning

    def encode_prompts(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Text hidden states [B, T, 64] and their mask [B, T] (bool), on the pipeline's device."""
        ids, mask = self.tokenizer(list(prompts))
        ids, mask = ids.to(self.device), mask.to(self.device)
        return self.text_encoder(ids, mask).to(self.dtype), mask

    def image_tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, 32, 32] in [-1, 1] -> post-projection image tokens [B, N, 64] (with gradients
        where the adapter's weights have them)."""
        if not self.has_adapter:
            raise ValueError("this ShapesWorld model has no image-prompt adapter (a base model)")
        pixels = pixels.to(device=self.device, dtype=self.dtype)
        if self.spatial_adapter:
            return self.image_projection(self.image_encoder.feature_map(pixels))  # [B, cells, 64]
        embeds = self.image_encoder(pixels)  # [B, embed_dim]
        return self.image_projection(embeds)  # [B, N, 64]

    @torch.no_grad()
    def encode_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Post-projection image tokens [B, N, 64] of PIL images (resized to 32 x 32 if needed)."""
        return self.image_tokens(to_pixels(images))

    def negative_image_tokens(self) -> torch.Tensor:
        """The unconditional image tokens [1, N, 64], what the adapter was trained with where the image
        was dropped: zero tokens for a spatial adapter (trained jointly, they add exactly nothing),
        else those of the empty background image (the world's "no image")."""
        if self.spatial_adapter:
            return torch.zeros(1, *self.token_shape, device=self.device, dtype=self.dtype)
        return self.encode_images([background_image()])

    def set_ip_scale(self, scale: float) -> None:
        """The IP-Adapter scale of every IP attention processor (0: the adapter's branch is skipped
        and the UNet is the base model)."""
        for processor in ip_processors(self.unet):
            processor.scale = [float(scale)]

    def denoise(
        self,
        sample: torch.Tensor,
        timesteps: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor,
        image_tokens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One UNet pass: noisy sample [B, 3, 32, 32], timesteps [B], text [B, T, 64] with mask [B, T],
        image tokens [B, N, 64] (required with an adapter; read only at IP scale > 0) -> v [B, 3, 32, 32]."""
        if self.unet.config.in_channels == 3 + COORDINATE_CHANNELS:
            sample = with_coordinates(sample)
        added = None
        if self.has_adapter:
            if image_tokens is None:
                raise ValueError("a UNet with an adapter needs image tokens (any, at IP scale 0)")
            added = {"image_embeds": [image_tokens.to(self.dtype)]}
        return self.unet(
            sample,
            timesteps,
            encoder_hidden_states=text,
            encoder_attention_mask=text_mask,
            added_cond_kwargs=added,
        ).sample

    # ---------------------------------------------------------------- sampling

    @torch.no_grad()
    def __call__(
        self,
        prompts: Sequence[str],
        generators: Sequence[torch.Generator],
        *,
        image_tokens: torch.Tensor | None = None,
        negative_image_tokens: torch.Tensor | None = None,
        ip_scale: float = 0.0,
        steps: int = SAMPLING_STEPS,
        guidance_scale: float = GUIDANCE_SCALE,
    ) -> list[Image.Image]:
        """Sample one image per prompt, row i from noise drawn with ``generators[i]`` (CPU generators).

        With classifier-free guidance (``guidance_scale`` > 1) the unconditional branch has the empty
        prompt and ``negative_image_tokens`` [1, N, 64]; the conditional branch has row i of
        ``image_tokens`` [B, N, 64]. Both branches see the tokens at ``ip_scale``; without tokens the
        scale is 0 and the result is the base model's. DDIM (eta 0): nothing random after the noise.
        The UNet runs under autocast to :attr:`compute_dtype` ("auto" by default: bfloat16 where the
        device computes it natively, the weights' dtype elsewhere).
        """
        prompts = list(prompts)
        batch = len(prompts)
        if len(generators) != batch:
            raise ValueError(
                f"one generator per prompt: got {batch} prompts and {len(generators)} generators"
            )
        text, mask = self.encode_prompts(prompts)
        tokens = None
        if self.has_adapter:
            if image_tokens is None:
                ip_scale = 0.0
                image_tokens = torch.zeros(batch, *self.token_shape)
            if negative_image_tokens is None:
                negative_image_tokens = torch.zeros(1, *self.token_shape)
            tokens = image_tokens.to(device=self.device, dtype=self.dtype)
        elif image_tokens is not None:
            raise ValueError("image tokens given, but this ShapesWorld model has no image-prompt adapter")
        cfg = guidance_scale > 1
        if cfg:
            empty, empty_mask = self.encode_prompts([""])
            # [B, ...] -> [2B, ...]: unconditional rows first
            text = torch.cat([empty.expand_as(text), text])
            mask = torch.cat([empty_mask.expand_as(mask), mask])
            if tokens is not None:
                negative = negative_image_tokens.to(tokens).expand_as(tokens)
                tokens = torch.cat([negative, tokens])

        sampler = sampling_scheduler(self.scheduler.config)
        sampler.set_timesteps(steps, device=self.device)
        shape = (3, self.unet.config.sample_size, self.unet.config.sample_size)
        noise = torch.stack([torch.randn(shape, generator=g) for g in generators])  # [B, 3, H, W]
        sample = noise.to(device=self.device, dtype=self.dtype) * sampler.init_noise_sigma
        compute = self.compute_dtype
        if compute == "auto":
            compute = default_dtype(self.device) if self.dtype == torch.float32 else None
        autocast = torch.autocast(
            self.device.type, dtype=compute or self.dtype, enabled=compute not in (None, self.dtype)
        )
        with self._ip_scale(ip_scale):
            for t in sampler.timesteps:
                model_input = torch.cat([sample, sample]) if cfg else sample
                timesteps = t.expand(model_input.shape[0])
                with autocast:
                    prediction = self.denoise(model_input, timesteps, text, mask, tokens)
                prediction = prediction.to(sample.dtype)
                if cfg:
                    unconditional, conditional = prediction.chunk(2)
                    prediction = unconditional + guidance_scale * (conditional - unconditional)
                sample = sampler.step(prediction, t, sample).prev_sample
        return to_images(sample)

    @contextlib.contextmanager
    def _ip_scale(self, scale: float) -> Iterator[None]:
        self.set_ip_scale(scale)
        try:
            yield
        finally:
            self.set_ip_scale(0.0)  # adapter off between calls
