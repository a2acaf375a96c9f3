"""ImageReward's released checkpoint (``THUDM/ImageReward`` ``ImageReward.pt``, BLIP's original key
layout) as an :class:`~img_guidance.eval.imagereward.ImageRewardModel` folder.

Every dimension is read off the tensor shapes; the attention head width is 64 (ViT-L/16: 16 heads of
64; BERT-base: 12 of 64), the activation GELU, LayerNorm eps 1e-6 in the ViT and 1e-12 in the text
encoder (BLIP's values). Keys, original -> converted:

- vision, ``blip.visual_encoder.`` -> ``vision_model.``: ``patch_embed.proj`` ->
  ``embeddings.patch_embedding``, ``cls_token`` -> ``embeddings.class_embedding``, ``pos_embed`` ->
  ``embeddings.position_embedding``, ``blocks.{i}`` -> ``encoder.layers.{i}`` (``norm1`` / ``norm2`` ->
  ``layer_norm1`` / ``layer_norm2``, ``attn.qkv`` -> ``self_attn.qkv``, ``attn.proj`` ->
  ``self_attn.projection``, ``mlp.fc1`` / ``mlp.fc2`` as they are), ``norm`` -> ``post_layernorm``;
- text, ``blip.text_encoder.`` -> ``text_encoder.``, the rest as it is (transformers' BLIP text model
  keeps med.py's names);
- head: ``mlp.layers.{0,2,4,6,7}`` (the linear layers between the dropouts) -> ``head.{0,...,4}``.

Keys the reward does not use are left out, as the reference's ``load_state_dict(strict=False)`` leaves
them: ``blip.vision_proj``, ``blip.text_proj`` (BLIP's contrastive projections),
``blip.text_encoder.embeddings.position_ids`` (a buffer) and anything else.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

VERSION = 1  # conversions in the cache are kept per version
HEAD_DIM = 64
VISION, TEXT, HEAD = "blip.visual_encoder.", "blip.text_encoder.", "mlp.layers."
REQUIRED = (
    VISION + "patch_embed.proj.weight",
    VISION + "pos_embed",
    TEXT + "embeddings.word_embeddings.weight",
    HEAD + "0.weight",
)
VISION_BLOCK = {
    "norm1": "layer_norm1",
    "attn.qkv": "self_attn.qkv",
    "attn.proj": "self_attn.projection",
    "norm2": "layer_norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}


def is_imagereward_state(state: Mapping[str, torch.Tensor]) -> bool:
    """Whether ``state`` is in ImageReward's original layout (its required keys are there)."""
    return all(k in state for k in REQUIRED)


def read_imagereward_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A torch file's ImageReward state dict, checked: ValueError naming ``path`` when it is not one."""
    from img_guidance.eval.convert_open_clip import read_state_dict

    state = read_state_dict(path, what="ImageReward weights")
    missing = [k for k in REQUIRED if k not in state]
    if missing:
        raise ValueError(f"{path} is not an ImageReward checkpoint: it has no {', '.join(missing)}")
    return state


def _layers(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    found = {int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    if not found:
        raise ValueError(f"not an ImageReward state dict: no {prefix}0.*")
    return max(found) + 1


def _head_layers(state: Mapping[str, torch.Tensor]) -> list[int]:
    """The indices of the head's linear layers in the original ``nn.Sequential`` (0, 2, 4, 6, 7)."""
    return sorted(
        int(m.group(1)) for k in state if (m := re.fullmatch(re.escape(HEAD) + r"(\d+)\.weight", k))
    )


def imagereward_config(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The :class:`ImageRewardModel` arguments of an original-layout state dict, read off its shapes."""
    width = state[VISION + "pos_embed"].shape[-1]
    positions = state[VISION + "pos_embed"].shape[1]
    patch = state[VISION + "patch_embed.proj.weight"].shape[-1]
    grid = round((positions - 1) ** 0.5)
    if grid * grid + 1 != positions:
        raise ValueError(f"{VISION}pos_embed has {positions} positions: not a square grid plus one")
    vocab, text_width = state[TEXT + "embeddings.word_embeddings.weight"].shape
    layer = TEXT + "encoder.layer.0."
    heads = _head_layers(state)
    return dict(
        vision_config=dict(
            hidden_size=width,
            intermediate_size=state[VISION + "blocks.0.mlp.fc1.weight"].shape[0],
            num_hidden_layers=_layers(state, VISION + "blocks."),
            num_attention_heads=max(1, width // HEAD_DIM),
            image_size=grid * patch,
            patch_size=patch,
            hidden_act="gelu",
            layer_norm_eps=1e-6,
        ),
        text_config=dict(
            vocab_size=vocab,
            hidden_size=text_width,
            intermediate_size=state[layer + "intermediate.dense.weight"].shape[0],
            num_hidden_layers=_layers(state, TEXT + "encoder.layer."),
            num_attention_heads=max(1, text_width // HEAD_DIM),
            max_position_embeddings=state[TEXT + "embeddings.position_embeddings.weight"].shape[0],
            encoder_hidden_size=state[layer + "crossattention.self.key.weight"].shape[1],
            hidden_act="gelu",
            layer_norm_eps=1e-12,
            pad_token_id=0,
            # ids of BLIP's [DEC] and BERT's [SEP]: the reward uses neither; unset, they fit any vocabulary
            bos_token_id=None,
            sep_token_id=None,
            is_decoder=True,
        ),
        head_sizes=[state[f"{HEAD}{i}.weight"].shape[0] for i in heads[:-1]],
    )


def convert_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An original-layout ImageReward state dict in :class:`ImageRewardModel` keys (see the module
    docstring)."""
    v = VISION
    out: dict[str, torch.Tensor] = {
        "vision_model.embeddings.patch_embedding.weight": state[v + "patch_embed.proj.weight"],
        "vision_model.embeddings.patch_embedding.bias": state[v + "patch_embed.proj.bias"],
        "vision_model.embeddings.class_embedding": state[v + "cls_token"],
        "vision_model.embeddings.position_embedding": state[v + "pos_embed"],
        "vision_model.post_layernorm.weight": state[v + "norm.weight"],
        "vision_model.post_layernorm.bias": state[v + "norm.bias"],
    }
    for i in range(_layers(state, v + "blocks.")):
        for source, target in VISION_BLOCK.items():
            for kind in ("weight", "bias"):
                out[f"vision_model.encoder.layers.{i}.{target}.{kind}"] = state[
                    f"{v}blocks.{i}.{source}.{kind}"
                ]
    for key, value in state.items():
        if key.startswith(TEXT) and not key.endswith("position_ids"):
            out["text_encoder." + key.removeprefix(TEXT)] = value
    for n, i in enumerate(_head_layers(state)):
        out[f"head.{n}.weight"] = state[f"{HEAD}{i}.weight"]
        out[f"head.{n}.bias"] = state[f"{HEAD}{i}.bias"]
    return {k: t.contiguous() for k, t in out.items()}


def convert_imagereward(state: Mapping[str, torch.Tensor], dest: str | os.PathLike) -> Path:
    """Write ``state`` (ImageReward's original layout) as an :class:`ImageRewardModel` folder at ``dest``
    (written beside it and moved into place); returns it."""
    import shutil
    import tempfile

    from img_guidance.eval.imagereward import ImageRewardModel

    dest = Path(dest)
    try:
        config, converted = imagereward_config(state), convert_state_dict(state)
    except KeyError as err:
        raise ValueError(f"an incomplete ImageReward state dict: it has no {err.args[0]}") from None
    with torch.device("meta"):  # no random initialisation: every weight comes from the checkpoint
        model = ImageRewardModel(**config)
    expected = model.state_dict()
    # keys the model has no place for are left out, as the reference's non-strict load leaves them
    converted = {k: v for k, v in converted.items() if k in expected}
    missing = sorted(set(expected) - set(converted))
    if missing:
        raise ValueError(f"the ImageReward checkpoint lacks weights for {missing[:5]}")
    wrong = [k for k in expected if expected[k].shape != converted[k].shape]
    if wrong:
        k = wrong[0]
        raise ValueError(
            f"{k}: the checkpoint's shape {tuple(converted[k].shape)} is not {tuple(expected[k].shape)}"
        )
    model.load_state_dict(converted, strict=True, assign=True)  # non-persistent buffers stay on meta, unsaved
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(staging, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest
