"""Tiny LLaVA models written to disk, offline, with random weights.

``make_tiny_llava(folder)`` writes a complete transformers LLaVA folder (``LlavaForConditionalGeneration``
+ ``LlavaProcessor`` with a ``CLIPImageProcessor`` and a character-level Llama tokenizer):

- language model: Llama, hidden size ``hidden_size`` (default :data:`HIDDEN_SIZE` = 32), 2 layers;
  that is the width of the guidance (``GuidanceModel.hidden_size``);
- vision tower: CLIP, 28 x 28 input, 14 px patches, 2 layers; LLaVA reads layer -2 without CLS, so each
  image becomes :data:`IMAGE_TOKENS` = 4 tokens;
- processor: 28 px resize and crop, OpenAI CLIP mean/std, ``<image>`` as the image token.

``make_original_llava(folder, clip_folder=...)`` writes the same kind of model in the ORIGINAL LLaVA
repository layout (``LlavaLlamaForCausalLM``, ``model.mm_projector.*`` keys, ``mm_*`` config fields,
no ``<image>`` token), the way the IMG authors ship their finetuned detector; ``make_tiny_clip_vision``
writes the CLIP vision folder its ``mm_vision_tower`` points to.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from img_guidance.testing.tokenizers import llama_tokenizer

HIDDEN_SIZE = 32
IMAGE_SIZE = 28
PATCH_SIZE = 14
CLIP_WIDTH = 16
IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2


def clip_vision_config(*, image_size: int = IMAGE_SIZE, width: int = CLIP_WIDTH):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=PATCH_SIZE,
        projection_dim=width,
    )


def llama_config(*, vocab_size: int, hidden_size: int = HIDDEN_SIZE, pad_token_id: int = 0):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=pad_token_id,
        bos_token_id=1,
        eos_token_id=2,
    )


def clip_image_processor(image_size: int = IMAGE_SIZE):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )


def _randomize(model: torch.nn.Module, seed: int, std: float = 0.2) -> None:
    # The default init leaves biases at zero and norms at one; random values everywhere make
    # every tensor matter to the outputs the tests compare.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * std + (1.0 if param.ndim == 1 else 0.0))


def make_tiny_llava(
    folder: str | Path, *, hidden_size: int = HIDDEN_SIZE, image_size: int = IMAGE_SIZE, seed: int = 0
) -> Path:
    """Write a tiny transformers LLaVA folder (model, tokenizer, processor) and return its path.

    The guidance width is ``hidden_size``; each image gives ``(image_size // 14) ** 2`` image tokens.
    """
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    folder = Path(folder)
    tokenizer = llama_tokenizer()
    config = LlavaConfig(
        vision_config=clip_vision_config(image_size=image_size),
        text_config=llama_config(
            vocab_size=len(tokenizer), hidden_size=hidden_size, pad_token_id=tokenizer.pad_token_id
        ),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=(image_size // PATCH_SIZE) ** 2,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    _randomize(model, seed)
    model.save_pretrained(folder)
    processor = LlavaProcessor(
        image_processor=clip_image_processor(image_size),
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    processor.save_pretrained(folder)
    return folder


def make_tiny_clip_vision(folder: str | Path, *, seed: int = 1) -> Path:
    """Write a tiny ``CLIPVisionModel`` folder (config + weights) and return its path."""
    from transformers import CLIPVisionModel

    folder = Path(folder)
    model = CLIPVisionModel(clip_vision_config()).eval()
    _randomize(model, seed)
    model.save_pretrained(folder)
    return folder


def _clip_state_dict(seed: int) -> dict[str, torch.Tensor]:
    """CLIP vision weights with ``vision_model.`` prefixed names, whatever the installed
    transformers calls them in memory (the original LLaVA checkpoints were written with it)."""
    from transformers import CLIPVisionModel

    model = CLIPVisionModel(clip_vision_config())
    _randomize(model, seed)
    return {"vision_model." + k.removeprefix("vision_model."): v for k, v in model.state_dict().items()}


def original_config(*, clip_folder: str | Path, vocab_size: int, hidden_size: int = HIDDEN_SIZE) -> dict:
    """A config.json of the original LLaVA repository, as the LLaVA-1.5 checkpoints carry it."""
    return {
        "_name_or_path": "./checkpoints/llava-tiny",
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "hidden_act": "silu",
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "initializer_range": 0.02,
        "max_position_embeddings": 256,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "num_key_value_heads": 2,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "transformers_version": "4.31.0",
        "use_cache": True,
        "vocab_size": vocab_size,
        "freeze_mm_mlp_adapter": False,
        "image_aspect_ratio": "pad",
        "mm_hidden_size": CLIP_WIDTH,
        "mm_projector_type": "mlp2x_gelu",
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2,
        "mm_vision_tower": str(clip_folder),
        "tune_mm_mlp_adapter": False,
        "use_mm_proj": True,
    }


def original_state_dict(*, vocab_size: int, hidden_size: int = HIDDEN_SIZE, seed: int = 0) -> dict:
    """Weights under the original LLaVA names: ``model.*`` / ``lm_head.weight`` (Llama),
    ``model.mm_projector.{0,2}.*`` (mlp2x_gelu) and ``model.vision_tower.vision_tower.vision_model.*``."""
    from transformers import LlamaForCausalLM

    llama = LlamaForCausalLM(llama_config(vocab_size=vocab_size, hidden_size=hidden_size))
    _randomize(llama, seed)
    state = dict(llama.state_dict())
    gen = torch.Generator().manual_seed(seed + 100)
    state |= {
        "model.mm_projector.0.weight": torch.randn(hidden_size, CLIP_WIDTH, generator=gen) * 0.2,
        "model.mm_projector.0.bias": torch.randn(hidden_size, generator=gen) * 0.2,
        "model.mm_projector.2.weight": torch.randn(hidden_size, hidden_size, generator=gen) * 0.2,
        "model.mm_projector.2.bias": torch.randn(hidden_size, generator=gen) * 0.2,
    }
    for key, value in _clip_state_dict(seed + 200).items():
        state["model.vision_tower.vision_tower." + key] = value
    return {k: v.clone().contiguous() for k, v in state.items()}


def write_shards(folder: Path, state: dict[str, torch.Tensor], *, weights: str, shards: int) -> None:
    """Write ``state`` as ``shards`` files in the Hugging Face layout (with an index json when
    sharded): ``weights`` is "safetensors" or "bin"."""
    from safetensors.torch import save_file

    keys = sorted(state)
    groups = [keys[i::shards] for i in range(shards)]
    suffix = "safetensors" if weights == "safetensors" else "bin"
    stem = "model" if weights == "safetensors" else "pytorch_model"
    weight_map = {}
    for i, group in enumerate(groups, start=1):
        name = f"{stem}-{i:05d}-of-{shards:05d}.{suffix}" if shards > 1 else f"{stem}.{suffix}"
        part = {k: state[k] for k in group}
        if weights == "safetensors":
            save_file(part, folder / name, metadata={"format": "pt"})
        else:
            torch.save(part, folder / name)
        weight_map |= dict.fromkeys(group, name)
    if shards > 1:
        index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
        (folder / f"{stem}.{suffix}.index.json").write_text(json.dumps(index, indent=2))


def make_original_llava(
    folder: str | Path,
    *,
    clip_folder: str | Path,
    weights: str = "safetensors",
    shards: int = 2,
    with_vision_tower: bool = True,
    seed: int = 0,
) -> Path:
    """Write a tiny checkpoint in the original LLaVA layout and return its path.

    ``clip_folder`` becomes the config's ``mm_vision_tower``; ``with_vision_tower=False`` leaves the
    tower's weights out of the checkpoint (as LLaVA does when the tower was frozen).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = llama_tokenizer(extra_special_tokens=())
    vocab_size = len(tokenizer)
    tokenizer.save_pretrained(folder)
    config = original_config(clip_folder=clip_folder, vocab_size=vocab_size)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    state = original_state_dict(vocab_size=vocab_size, seed=seed)
    if not with_vision_tower:
        state = {k: v for k, v in state.items() if not k.startswith("model.vision_tower.")}
    write_shards(folder, state, weights=weights, shards=shards)
    return folder
