"""A tiny SDXL pipeline with an IP-Adapter-Plus, written to disk in the layouts the real files use.

``make_tiny_sdxl(folder)`` writes, all with random weights, in well under a second:

- ``sdxl/``: a complete ``StableDiffusionXLPipeline`` folder (``model_index.json``; a UNet with SDXL's
  ``text_time`` added conditioning; two CLIP text encoders, the second with a projection; two
  tokenizers; a VAE; an Euler scheduler). 32 x 32 images, 16 x 16 latents.
- ``ip-adapter-plus_tiny.safetensors``: IP-Adapter-Plus weights in the h94 key layout (``image_proj.``:
  the resampler; ``ip_adapter.{1,3,5,...}.to_{k,v}_ip.weight``: one pair per cross-attention layer of
  the UNet, in the UNet's processor order), non-zero so the adapter changes images.
- ``image_encoder/``: a ``CLIPVisionModelWithProjection`` (32 x 32 input, 2 layers: ``hidden_states[-2]``
  is the first layer's output, [B, 17, 32]).
- ``unet2/``: a second UNet of the same shape with other weights (for UNet-swap tests).

The resampler maps [B, 17, 32] CLIP states to [B, 4, 64] tokens (4 queries, width = the UNet's
cross-attention width), so the token shape is (4, 64).
"""

from __future__ import annotations

from pathlib import Path

import torch

from img_guidance.testing.tokenizers import clip_tokenizer

TEXT_WIDTH = 32  # each text encoder; the UNet attends to both, concatenated: 64
CROSS_ATTENTION_DIM = 2 * TEXT_WIDTH
ADDITION_TIME_EMBED_DIM = 8
NUM_QUERIES = 4
CLIP_WIDTH = 32
CLIP_IMAGE_SIZE = 32
RESAMPLER_HEADS = 1  # diffusers infers heads as to_q rows // 64
RESAMPLER_DEPTH = 4  # diffusers' converter builds IPAdapterPlusImageProjection with its default depth 4
TOKEN_SHAPE = (NUM_QUERIES, CROSS_ATTENTION_DIM)
IMAGE_SIZE = 32


def _unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        cross_attention_dim=CROSS_ATTENTION_DIM,
        addition_embed_type="text_time",
        addition_time_embed_dim=ADDITION_TIME_EMBED_DIM,
        # 6 time ids (original size, crop, target size) x 8 + the pooled text projection (32)
        projection_class_embeddings_input_dim=6 * ADDITION_TIME_EMBED_DIM + TEXT_WIDTH,
        norm_num_groups=8,
    )


def _text_encoders(vocab_size: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_WIDTH,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=TEXT_WIDTH,
        hidden_act="gelu",
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return CLIPTextModel(config), CLIPTextModelWithProjection(config)


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
    )


def _scheduler():
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )


def image_encoder():
    """The tiny ``CLIPVisionModelWithProjection`` (random weights)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(
        hidden_size=CLIP_WIDTH,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=CLIP_IMAGE_SIZE,
        patch_size=8,
        projection_dim=CLIP_WIDTH,
        hidden_act="gelu",
    )
    return CLIPVisionModelWithProjection(config)


def ip_adapter_plus_state_dict(
    unet,
    *,
    scale: float = 0.2,
    ip_scale: float = 0.5,
    clip_width: int = CLIP_WIDTH,
    queries: int = NUM_QUERIES,
    heads: int = RESAMPLER_HEADS,
    depth: int = RESAMPLER_DEPTH,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Random IP-Adapter-Plus weights in the h94 layout for ``unet``.

    ``image_proj.*``: the resampler (CLIP width -> ``queries`` tokens of the UNet's cross-attention
    width; ``heads`` of 64 and ``depth`` layers, as diffusers reads them back), entries of standard
    deviation ``scale``; ``ip_adapter.{k}.to_{k,v}_ip.weight``: k = 1, 3, 5, ... over the
    cross-attention layers in ``unet.attn_processors`` order (the original numbering counts self- and
    cross-attention layers alike), of standard deviation ``ip_scale``. The defaults are the tiny test
    model's; ``benchmarks/gpu_realsize.py`` passes ip-adapter-plus_sdxl_vit-h's sizes. Tensors are made
    on the default device, in ``dtype``.
    """
    hidden, inner, out = clip_width, heads * 64, unet.config.cross_attention_dim
    shapes = {
        "latents": (1, queries, hidden),
        "proj_in.weight": (hidden, clip_width),
        "proj_in.bias": (hidden,),
        "proj_out.weight": (out, hidden),
        "proj_out.bias": (out,),
        "norm_out.weight": (out,),
        "norm_out.bias": (out,),
    }
    for i in range(depth):
        shapes |= {
            f"layers.{i}.0.norm1.weight": (hidden,),
            f"layers.{i}.0.norm1.bias": (hidden,),
            f"layers.{i}.0.norm2.weight": (hidden,),
            f"layers.{i}.0.norm2.bias": (hidden,),
            f"layers.{i}.0.to_q.weight": (inner, hidden),
            f"layers.{i}.0.to_kv.weight": (2 * inner, hidden),
            f"layers.{i}.0.to_out.weight": (hidden, inner),
            f"layers.{i}.1.0.weight": (hidden,),
            f"layers.{i}.1.0.bias": (hidden,),
            f"layers.{i}.1.1.weight": (4 * hidden, hidden),
            f"layers.{i}.1.3.weight": (hidden, 4 * hidden),
        }
    state = {}
    for key, shape in shapes.items():
        t = torch.randn(shape, dtype=dtype) * scale
        if ("norm" in key and key.endswith("weight")) or key.endswith(".1.0.weight"):
            t = 1 + t  # LayerNorm gains near 1
        state[f"image_proj.{key}"] = t

    cross = [name for name in unet.attn_processors if name.endswith("attn2.processor")]
    for i, name in enumerate(cross):
        attn = unet.get_submodule(name.removesuffix(".processor"))
        width = attn.to_k.out_features
        for proj in ("to_k_ip", "to_v_ip"):
            # the default 0.5: strong enough that a 0.2-0.5 IP scale visibly changes a 2-step tiny image
            state[f"ip_adapter.{2 * i + 1}.{proj}.weight"] = torch.randn(width, out, dtype=dtype) * ip_scale
    return state


def pipeline_parts() -> dict:
    """The tiny ``StableDiffusionXLPipeline``'s components (random weights from torch's global
    generator), by the pipeline's argument names: tokenizers, text encoders, UNet, VAE, scheduler."""
    tokenizer = clip_tokenizer()
    text_encoder, text_encoder_2 = _text_encoders(len(tokenizer))
    unet = _unet()
    return {
        "vae": _vae(),
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "tokenizer": tokenizer,
        "tokenizer_2": clip_tokenizer(),
        "unet": unet,
        "scheduler": _scheduler(),
    }


def make_tiny_sdxl(folder: str | Path, *, seed: int = 0) -> dict:
    """Write the tiny SDXL pipeline, IP-Adapter-Plus file, image encoder and second UNet under
    ``folder``; return their paths (``model``, ``ip_adapter``, ``image_encoder``, ``unet2``, as
    strings) and ``token_shape`` (4, 64)."""
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import save_file

    folder = Path(folder)
    torch.manual_seed(seed)
    parts = pipeline_parts()
    unet = parts["unet"]
    pipe = StableDiffusionXLPipeline(**parts)
    paths = {
        "model": folder / "sdxl",
        "ip_adapter": folder / "ip-adapter-plus_tiny.safetensors",
        "image_encoder": folder / "image_encoder",
        "unet2": folder / "unet2",
    }
    pipe.save_pretrained(paths["model"])
    save_file(ip_adapter_plus_state_dict(unet), paths["ip_adapter"])
    image_encoder().save_pretrained(paths["image_encoder"])
    _unet().save_pretrained(paths["unet2"])
    return {name: str(path) for name, path in paths.items()} | {"token_shape": TOKEN_SHAPE}
