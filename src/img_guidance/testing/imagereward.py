"""A tiny random ImageReward checkpoint in its ORIGINAL layout: the keys of THUDM/ImageReward's
``ImageReward.pt`` (``blip.visual_encoder.*``, a timm-style ViT; ``blip.text_encoder.*``, BLIP's med.py
BERT with cross-attention; ``mlp.layers.*``, the reward head between dropouts), scaled down."""

from __future__ import annotations

import itertools

import torch

# widths differ so that a converter mixing them up fails; 64-wide heads, as the released model's
VISION_WIDTH, VISION_MLP, VISION_LAYERS, PATCH, GRID = 192, 256, 2, 8, 4  # 32 px images, 3 heads
TEXT_WIDTH, TEXT_MLP, TEXT_LAYERS, POSITIONS = 128, 192, 2, 40  # 2 heads
HEAD_SIZES = (64, 32, 16, 8)  # the released head: 1024, 128, 64, 16
EMBED_DIM = 32  # BLIP's contrastive projections, in the file but unused by the reward
HEAD_LAYERS = (0, 2, 4, 6, 7)  # the linear layers of nn.Sequential(Linear, Dropout, ..., Linear, Linear)


def imagereward_state_dict(vocab_size: int, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random ImageReward state dict in the original key layout (with the keys the reward does not
    use: BLIP's ``vision_proj`` / ``text_proj`` and the text encoder's ``position_ids`` buffer)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.05):
        return torch.randn(*shape, generator=g) * scale

    def linear(prefix: str, out_features: int, in_features: int, scale: float = 0.05) -> dict:
        return {
            f"{prefix}.weight": r(out_features, in_features, scale=scale),
            f"{prefix}.bias": r(out_features),
        }

    def norm(prefix: str, width: int) -> dict:
        return {f"{prefix}.weight": 1 + r(width), f"{prefix}.bias": r(width)}

    v, t = "blip.visual_encoder.", "blip.text_encoder."
    state = {
        f"{v}cls_token": r(1, 1, VISION_WIDTH, scale=0.5),
        f"{v}pos_embed": r(1, GRID * GRID + 1, VISION_WIDTH, scale=0.1),
        f"{v}patch_embed.proj.weight": r(VISION_WIDTH, 3, PATCH, PATCH, scale=0.1),
        f"{v}patch_embed.proj.bias": r(VISION_WIDTH),
        **norm(f"{v}norm", VISION_WIDTH),
    }
    for i in range(VISION_LAYERS):
        b = f"{v}blocks.{i}."
        state |= norm(b + "norm1", VISION_WIDTH) | norm(b + "norm2", VISION_WIDTH)
        state |= linear(b + "attn.qkv", 3 * VISION_WIDTH, VISION_WIDTH)
        state |= linear(b + "attn.proj", VISION_WIDTH, VISION_WIDTH)
        state |= linear(b + "mlp.fc1", VISION_MLP, VISION_WIDTH) | linear(
            b + "mlp.fc2", VISION_WIDTH, VISION_MLP
        )
    state |= {
        f"{t}embeddings.word_embeddings.weight": r(vocab_size, TEXT_WIDTH, scale=0.5),
        f"{t}embeddings.position_embeddings.weight": r(POSITIONS, TEXT_WIDTH, scale=0.1),
        f"{t}embeddings.position_ids": torch.arange(POSITIONS).unsqueeze(0),
        **norm(f"{t}embeddings.LayerNorm", TEXT_WIDTH),
    }
    for i in range(TEXT_LAYERS):
        b = f"{t}encoder.layer.{i}."
        for attention, source_width in (("attention", TEXT_WIDTH), ("crossattention", VISION_WIDTH)):
            state |= linear(f"{b}{attention}.self.query", TEXT_WIDTH, TEXT_WIDTH)
            state |= linear(f"{b}{attention}.self.key", TEXT_WIDTH, source_width)
            state |= linear(f"{b}{attention}.self.value", TEXT_WIDTH, source_width)
            state |= linear(f"{b}{attention}.output.dense", TEXT_WIDTH, TEXT_WIDTH)
            state |= norm(f"{b}{attention}.output.LayerNorm", TEXT_WIDTH)
        state |= linear(b + "intermediate.dense", TEXT_MLP, TEXT_WIDTH)
        state |= linear(b + "output.dense", TEXT_WIDTH, TEXT_MLP) | norm(b + "output.LayerNorm", TEXT_WIDTH)
    state |= linear("blip.vision_proj", EMBED_DIM, VISION_WIDTH) | linear(
        "blip.text_proj", EMBED_DIM, TEXT_WIDTH
    )
    widths = (TEXT_WIDTH, *HEAD_SIZES, 1)
    for index, (a, b) in zip(HEAD_LAYERS, itertools.pairwise(widths), strict=True):
        state |= linear(f"mlp.layers.{index}", b, a, scale=0.3)
    return state
