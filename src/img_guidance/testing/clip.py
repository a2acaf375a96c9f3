"""A tiny random CLIP model folder with its processor (a CLIPModel as PickScore and the CLIP score use)."""

from __future__ import annotations

from pathlib import Path

from img_guidance.testing.tokenizers import clip_tokenizer

IMAGE_SIZE = 30


def make_tiny_clip(folder: Path, *, seed: int = 0) -> Path:
    """Write a CLIPModel (width 32, projection 16, 30 px images, 6 px patches) and a CLIPProcessor to
    ``folder``; returns it."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = clip_tokenizer()
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=IMAGE_SIZE,
            patch_size=6,
        ),
        projection_dim=16,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config)
    model.save_pretrained(folder)
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
        ),
        tokenizer=tokenizer,
    )
    processor.save_pretrained(folder)
    return folder
