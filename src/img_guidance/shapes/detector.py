"""ShapesWorld's multimodal LLM: a tiny LLaVA (transformers ``LlavaForConditionalGeneration``) built
from a config, with a word-level tokenizer over the world's language.

:func:`make_detector_base` writes the untrained model (random weights) as a transformers LLaVA
folder with its processor; the detector recipe (:mod:`img_guidance.recipes.finetune_detector`)
finetunes it on the world's triplets into the misalignment detector, and :func:`load_guidance`
reads either as guidance, exactly as it reads LLaVA-1.5-13B.

The vocabulary holds every word of the grammar's prompts, of the project's question templates, of
the LLaVA prompt formats and of the edit instructions, so no text the world produces is unknown.
Words are split on whitespace and punctuation (``"###Human:"`` is ``###``, ``Human``, ``:``).
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import Any

IMAGE_SIZE = 32
PATCH_SIZE = 8
IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", IMAGE_TOKEN)
_WORDS = re.compile(r"\w+|[^\w\s]+")


@functools.cache
def vocabulary() -> tuple[str, ...]:
    """Every word (and punctuation run) the world's texts can contain, sorted, after the special
    tokens (computed once: it reads every scene's edits)."""
    from img_guidance.guidance.prompts import LLAVA_V0_SYSTEM, LLAVA_V1_SYSTEM
    from img_guidance.guidance.questions import QUESTIONS
    from img_guidance.shapes.grammar import (
        COLOURS,
        NO_CHANGE,
        RELATION_PHRASES,
        SHAPES,
        all_scenes,
        describe,
        edit_instruction,
        near_misses,
    )

    texts = [LLAVA_V0_SYSTEM, LLAVA_V1_SYSTEM, "###Human: ###Assistant: USER: ASSISTANT:", NO_CHANGE]
    texts += QUESTIONS
    texts += [" ".join(SHAPES), " ".join(s + "s" for s in SHAPES), " ".join(COLOURS)]
    texts += list(RELATION_PHRASES.values())
    texts += ["a an one two three more with into and add remove move replace make change the of"]
    for scene in all_scenes():
        texts.append(describe(scene))
        texts += [edit_instruction(miss, scene) for miss in near_misses(scene)]
    words = {word for text in texts for word in _WORDS.findall(text)}
    return (*SPECIAL_TOKENS, *sorted(words - set(SPECIAL_TOKENS)))


def world_tokenizer(model_max_length: int = 512) -> Any:
    """A ``PreTrainedTokenizerFast`` (word level) over :func:`vocabulary`, with ``<image>`` as a
    special token, ``<s>`` prepended to every text and ``</s>`` as the end of sequence."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(vocabulary())}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        model_max_length=model_max_length,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return tokenizer


def make_detector_base(
    folder: str | os.PathLike,
    *,
    hidden_size: int = 64,
    layers: int = 2,
    vision_width: int = 64,
    vision_layers: int = 2,
    patch_size: int = PATCH_SIZE,
    seed: int = 0,
) -> Path:
    """Write the untrained world MLLM (random weights, seeded) with its processor to ``folder``:
    CLIP vision tower (32 px, ``patch_size`` px patches: (32 / patch_size)^2 image tokens), MLP
    projector, Llama language model of width ``hidden_size`` (the guidance width)."""
    import torch
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    folder = Path(folder)
    tokenizer = world_tokenizer()
    vision = CLIPVisionConfig(
        hidden_size=vision_width,
        intermediate_size=2 * vision_width,
        num_hidden_layers=vision_layers,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=patch_size,
        projection_dim=vision_width,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=(IMAGE_SIZE // patch_size) ** 2,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.save_pretrained(folder)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
        ),
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    processor.save_pretrained(folder)
    return folder
