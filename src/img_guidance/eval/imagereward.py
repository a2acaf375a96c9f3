"""ImageReward (Xu et al., 2023) on transformers' BLIP classes: the model a converted ``ImageReward.pt``
loads into (:mod:`.convert_imagereward` writes it).

``reward = (head(text_encoder(prompt, image tokens)[CLS]) - mean) / std``, where

- ``vision_model``: BLIP's ViT-L/16 at 224 px as a ``BlipVisionModel`` (pre-norm blocks, LayerNorm eps
  1e-6, GELU); its output is every token (class token and 14 x 14 patches) after the final LayerNorm;
- ``text_encoder``: BLIP's "med" BERT-base as a ``BlipTextModel`` without pooler: embeddings of word and
  position (no token types), then per layer bidirectional self-attention over the prompt (padding
  masked), cross-attention from the prompt to all image tokens, and the feed-forward block, each
  post-norm (eps 1e-12);
- ``head``: the reference's MLP on the [CLS] state, five linear layers 768 -> 1024 -> 128 -> 64 -> 16 -> 1
  with nothing between them (its ReLUs are commented out, its dropouts do nothing at inference);
- ``mean`` / ``std``: the reference's normalisation of the raw output, 0.16717362830052426 and
  1.0333394966054072.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn
from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
HEAD_SIZES = (1024, 128, 64, 16)
# BLIP's create_vit("large", 224): ViT-L/16, width 1024, depth 24, 16 heads, MLP ratio 4, LayerNorm eps 1e-6
VISION_CONFIG: dict[str, Any] = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=224,
    patch_size=16,
    hidden_act="gelu",
    layer_norm_eps=1e-6,
)
# ImageReward's med_config.json (BERT-base with cross-attention), encoder_width set to the ViT's 1024
TEXT_CONFIG: dict[str, Any] = dict(
    vocab_size=30524,  # bert-base-uncased's 30522 + BLIP's [DEC] and [ENC]
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=512,
    hidden_act="gelu",
    layer_norm_eps=1e-12,
    encoder_hidden_size=1024,
    pad_token_id=0,
    # transformers builds the cross-attention layers for a "decoder" config only; forward runs the
    # encoder bidirectionally (is_decoder=False), as the reference's text encoder does
    is_decoder=True,
)


class ImageRewardModel(ModelMixin, ConfigMixin):
    """ImageReward's network (see the module docstring); defaults are the released model's.

    Args:
        vision_config: ``BlipVisionConfig`` values over :data:`VISION_CONFIG`.
        text_config: ``BlipTextConfig`` values over :data:`TEXT_CONFIG`.
        head_sizes: the head's hidden widths (its input is the text width, its output one number).
        reward_mean, reward_std: the normalisation of the head's output.
    """

    @register_to_config
    def __init__(
        self,
        *,
        vision_config: dict[str, Any] | None = None,
        text_config: dict[str, Any] | None = None,
        head_sizes: tuple[int, ...] = HEAD_SIZES,
        reward_mean: float = REWARD_MEAN,
        reward_std: float = REWARD_STD,
    ) -> None:
        super().__init__()
        vision = BlipVisionConfig(**{**VISION_CONFIG, **(vision_config or {})})
        text = BlipTextConfig(**{**TEXT_CONFIG, **(text_config or {})})
        if text.encoder_hidden_size != vision.hidden_size:
            raise ValueError(
                f"the text encoder cross-attends to tokens of width {text.encoder_hidden_size} but the "
                f"vision model makes {vision.hidden_size}"
            )
        self.vision_model = BlipVisionModel(vision)
        self.text_encoder = BlipTextModel(text, add_pooling_layer=False)
        widths = (text.hidden_size, *head_sizes, 1)
        self.head = nn.Sequential(*(nn.Linear(a, b) for a, b in itertools.pairwise(widths)))

    @property
    def image_size(self) -> int:
        return self.vision_model.config.image_size

    def forward(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """pixel_values [B, 3, S, S] (CLIP-normalised), input_ids and attention_mask [B, T] -> rewards [B]
        (normalised by ``reward_mean`` / ``reward_std``), in the head's dtype."""
        image = self.vision_model(pixel_values=pixel_values).last_hidden_state  # [B, 1 + (S/P)^2, Dv]
        text = self.text_encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image,  # every image token is attended to (the reference's all-ones mask)
            is_decoder=False,
            use_cache=False,
        ).last_hidden_state  # [B, T, Dt]
        cls = text[:, 0].to(self.head[0].weight.dtype)  # [B, Dt]; the head may be kept in float32
        raw = self.head(cls).squeeze(-1)  # [B, 1] -> [B]
        return (raw - self.config.reward_mean) / self.config.reward_std
