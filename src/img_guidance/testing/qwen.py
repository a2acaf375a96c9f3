"""Tiny Qwen2-VL and Qwen2.5-VL models written to disk, offline, with random weights.

``make_tiny_qwen(folder, family="qwen2_vl" | "qwen2_5_vl")`` writes a folder that loads the way the
real ones do without torchvision: the model (``Qwen2VLForConditionalGeneration`` or
``Qwen2_5_VLForConditionalGeneration``), a ``preprocessor_config.json`` for the Qwen2-VL image
processor, and a character-level tokenizer with Qwen's special tokens and a Qwen-style chat template
(a default system turn; ``<|vision_start|><|image_pad|><|vision_end|>`` for an image).

Sizes: language model hidden size ``hidden_size`` (default :data:`HIDDEN_SIZE` = 32), 2 layers;
vision tower 1-2 blocks on 14 px patches merged 2 x 2. The image processor's pixel budget is
56 x 56, so a square image becomes 4 x 4 patches = :data:`SQUARE_IMAGE_TOKENS` = 4 image tokens,
and other aspect ratios give other counts (a 60 x 40 image: 4 x 6 patches, 6 tokens).
"""

from __future__ import annotations

from pathlib import Path

import torch

from img_guidance.testing.tokenizers import llama_tokenizer

HIDDEN_SIZE = 32
PIXELS = 56 * 56
SQUARE_IMAGE_TOKENS = 4
SPECIAL_TOKENS = (
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _config(family: str, tokenizer, hidden_size: int):
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        # head_dim 8: the rotary half (4) splits into temporal/height/width sections
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]},
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        eos_token_id=ids["<|im_end|>"],
    )
    tokens = dict(
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    if family == "qwen2_vl":
        vision = dict(depth=1, embed_dim=16, hidden_size=hidden_size, num_heads=2, mlp_ratio=2, patch_size=14)
        return Qwen2VLConfig(text_config=text, vision_config=vision, **tokens)
    if family == "qwen2_5_vl":
        vision = dict(
            depth=2,
            hidden_size=16,
            intermediate_size=32,
            num_heads=2,
            out_hidden_size=hidden_size,
            patch_size=14,
            window_size=56,
            fullatt_block_indexes=[1],
        )
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **tokens)
    raise ValueError(f"unknown family {family!r}")


def make_tiny_qwen(
    folder: str | Path, *, family: str = "qwen2_vl", hidden_size: int = HIDDEN_SIZE, seed: int = 0
) -> Path:
    """Write a tiny Qwen2-VL (``family="qwen2_vl"``) or Qwen2.5-VL (``"qwen2_5_vl"``) folder."""
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    folder = Path(folder)
    tokenizer = llama_tokenizer(extra_special_tokens=SPECIAL_TOKENS)
    tokenizer.chat_template = CHAT_TEMPLATE
    config = _config(family, tokenizer, hidden_size)
    model_class = (
        Qwen2VLForConditionalGeneration if family == "qwen2_vl" else Qwen2_5_VLForConditionalGeneration
    )
    torch.manual_seed(seed)
    model = model_class(config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.2 + (1.0 if param.ndim == 1 else 0.0))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    Qwen2VLImageProcessorPil(min_pixels=PIXELS, max_pixels=PIXELS).save_pretrained(folder)
    return folder
