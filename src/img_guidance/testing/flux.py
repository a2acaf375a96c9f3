"""A tiny, random-weight FLUX.1 pipeline with an XLabs-format IP-Adapter and a CLIP vision encoder.

Everything is built from configs on CPU in well under a second and written to a folder, so tests
load it exactly as they would load the real checkpoints (``from_pretrained`` on local paths,
``HF_HUB_OFFLINE=1``). Shapes mirror the real model where the code depends on them: guidance
embeddings on, 2x2-packed latents (transformer ``in_channels`` = 4 x VAE latent channels), a
transformer head dim equal to the sum of the RoPE axes, IP tokens as wide as the T5 states
(``joint_attention_dim``), and an image projection of 4 tokens, as in the XLabs adapter.
"""

from __future__ import annotations

import os
from pathlib import Path

from img_guidance.testing.tokenizers import clip_tokenizer, t5_tokenizer

# The real model: 4 IP tokens of 4096 (= joint_attention_dim), CLIP ViT-L/14 image_embeds of 768,
# transformer inner dim 3072. The tiny one keeps the relations between them.
NUM_IP_TOKENS = 4
JOINT_ATTENTION_DIM = 32
CLIP_PROJECTION_DIM = 16
HEADS, HEAD_DIM = 2, 16
NUM_DOUBLE_BLOCKS = 2
CLIP_IMAGE_SIZE = 32


def xlabs_ip_adapter_state_dict(
    *,
    num_double_blocks: int = NUM_DOUBLE_BLOCKS,
    clip_dim: int = CLIP_PROJECTION_DIM,
    token_dim: int = JOINT_ATTENTION_DIM,
    inner_dim: int = HEADS * HEAD_DIM,
    num_tokens: int = NUM_IP_TOKENS,
    scale: float = 0.3,
    dtype=None,
) -> dict:
    """Random, non-zero tensors with the XLabs flux-ip-adapter key layout and (tiny) shapes.

    ``ip_adapter_proj_model.*``: the image projection, Linear(clip_dim -> num_tokens*token_dim) and a
    LayerNorm(token_dim); ``double_blocks.{i}.processor.ip_adapter_double_stream_{k,v}_proj.*``:
    Linear(token_dim -> inner_dim) per double-stream block. Tensors are made on the default device,
    in ``dtype`` (default float32).
    """
    import torch

    def randn(*shape: int):
        return torch.randn(*shape, dtype=dtype or torch.float32)

    state = {
        "ip_adapter_proj_model.proj.weight": randn(num_tokens * token_dim, clip_dim) * scale,
        "ip_adapter_proj_model.proj.bias": randn(num_tokens * token_dim) * scale,
        "ip_adapter_proj_model.norm.weight": 1 + randn(token_dim) * scale,
        "ip_adapter_proj_model.norm.bias": randn(token_dim) * scale,
    }
    for i in range(num_double_blocks):
        for kind in ("k", "v"):
            prefix = f"double_blocks.{i}.processor.ip_adapter_double_stream_{kind}_proj"
            # large enough that the IP branch visibly moves the tiny model's output
            state[f"{prefix}.weight"] = randn(inner_dim, token_dim) * 3 * scale
            state[f"{prefix}.bias"] = randn(inner_dim) * scale
    return state


def pipeline_parts() -> dict:
    """The tiny ``FluxPipeline``'s components (random weights from torch's global generator), by the
    pipeline's argument names: transformer, tokenizers, text encoders, VAE, scheduler."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    vae_latent_channels = 4
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * vae_latent_channels,  # latents are packed in 2x2 patches
        num_layers=NUM_DOUBLE_BLOCKS,
        num_single_layers=1,
        attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS,
        joint_attention_dim=JOINT_ATTENTION_DIM,
        pooled_projection_dim=32,  # = CLIP text hidden size (its pooled output)
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),  # sums to HEAD_DIM
    )
    tokenizer = clip_tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=37,
            projection_dim=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    tokenizer_2 = t5_tokenizer()
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer_2),
            d_model=JOINT_ATTENTION_DIM,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=0,
            eos_token_id=1,
        )
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 8, 8),  # scale factor 4: 32 px -> 8x8 latents -> 4x4 packed tokens
        layers_per_block=1,
        latent_channels=vae_latent_channels,
        norm_num_groups=4,
        sample_size=32,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return {
        "scheduler": scheduler,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "text_encoder_2": text_encoder_2,
        "tokenizer_2": tokenizer_2,
        "transformer": transformer,
    }


def image_encoder():
    """The tiny ``CLIPVisionModelWithProjection`` (random weights)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    return CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=37,
            projection_dim=CLIP_PROJECTION_DIM,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=CLIP_IMAGE_SIZE,
            patch_size=8,
        )
    )


def make_tiny_flux(folder: str | os.PathLike) -> dict:
    """Write a tiny FLUX pipeline, IP-Adapter file and CLIP vision encoder under ``folder``.

    Returns ``{"model": pipeline folder, "ip_adapter": .safetensors file, "image_encoder": folder,
    "token_shape": (4, 32), "size": 32}`` (``size``: a valid, fast image side in pixels, a
    multiple of 2 x the VAE scale factor).
    """
    import torch
    from diffusers import FluxPipeline
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)
    try:
        pipe = FluxPipeline(**pipeline_parts())
        model = folder / "flux"
        pipe.save_pretrained(model)

        encoder_folder = folder / "image_encoder"
        image_encoder().save_pretrained(encoder_folder)

        ip_adapter = folder / "ip_adapter.safetensors"
        save_file({k: v.contiguous() for k, v in xlabs_ip_adapter_state_dict().items()}, ip_adapter)
    finally:
        torch.random.set_rng_state(generator_state)
    return {
        "model": model,
        "ip_adapter": ip_adapter,
        "image_encoder": encoder_folder,
        "token_shape": (NUM_IP_TOKENS, JOINT_ATTENTION_DIM),
        "size": 32,
    }
