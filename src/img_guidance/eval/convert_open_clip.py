"""open_clip's CLIP state dicts (HPS v2 / v2.1 ship in that layout) as transformers ``CLIPModel`` folders.

Every dimension is read off the tensor shapes; the attention head width is 64 (open_clip's default),
except in the vision towers whose model configs set ``head_width`` (ViT-H-14, HPS v2's: 80; ViT-g-14:
88; ViT-bigG-14: 104), known by their widths; the activation GELU (open_clip's default; ``quick_gelu``
only for OpenAI's weights), layer-norm epsilon 1e-5; the text is pooled at the position of its highest
token id, as open_clip pools it (``eos_token_id=2`` selects that rule in transformers). Keys, open_clip
-> transformers:

- text: ``token_embedding.weight`` -> ``text_model.embeddings.token_embedding.weight``,
  ``positional_embedding`` -> ``...position_embedding.weight``, ``transformer.resblocks.{i}`` ->
  ``text_model.encoder.layers.{i}``, ``ln_final`` -> ``text_model.final_layer_norm``,
  ``text_projection`` [width, dim] -> ``text_projection.weight`` (transposed);
- vision: ``visual.conv1.weight`` -> ``vision_model.embeddings.patch_embedding.weight``,
  ``visual.class_embedding`` -> ``...class_embedding``, ``visual.positional_embedding`` ->
  ``...position_embedding.weight``, ``visual.ln_pre`` -> ``vision_model.pre_layrnorm``,
  ``visual.transformer.resblocks.{i}`` -> ``vision_model.encoder.layers.{i}``, ``visual.ln_post`` ->
  ``vision_model.post_layernorm``, ``visual.proj`` [width, dim] -> ``visual_projection.weight``
  (transposed);
- a block: ``ln_1`` / ``ln_2`` -> ``layer_norm1`` / ``layer_norm2``, ``attn.in_proj_{weight,bias}``
  split in three -> ``self_attn.{q,k,v}_proj``, ``attn.out_proj`` -> ``self_attn.out_proj``,
  ``mlp.c_fc`` / ``mlp.c_proj`` -> ``mlp.fc1`` / ``mlp.fc2``;
- ``logit_scale`` as it is.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

# 2: ViT-H-14's vision heads split as open_clip splits them (16 of 80; version 1 made 20 of 64)
VERSION = 2
HEAD_DIM = 64
# open_clip's model_configs/*.json: vision width -> head_width where it is not 64 (ViT-H-14, ViT-g-14,
# ViT-bigG-14); the heads cannot be read off the shapes, and a wrong split changes every attention
VISION_HEAD_DIM = {1280: 80, 1408: 88, 1664: 104}


def read_state_dict(path: str | os.PathLike, *, what: str) -> dict[str, torch.Tensor]:
    """A torch file's state dict (``weights_only=True``; a ``state_dict`` or ``model`` wrapper and a DDP
    ``module.`` prefix are removed); ``what`` names the weights in errors. Shared by the converters."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors surface as many exception types, some over many lines
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"{path} is not a torch weights file that can be read safely: {reason}") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def read_open_clip_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A torch file's open_clip state dict (see :func:`read_state_dict`)."""
    return read_state_dict(path, what="open_clip weights")


def clip_config(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The transformers ``CLIPConfig`` arguments of an open_clip state dict, read off its shapes."""
    required = ("token_embedding.weight", "positional_embedding", "text_projection", "visual.conv1.weight")
    missing = [k for k in required if k not in state]
    if missing:
        raise ValueError(f"not an open_clip CLIP state dict: no {', '.join(missing)}")
    vocab, text_width = state["token_embedding.weight"].shape
    context = state["positional_embedding"].shape[0]
    vision_width, _, patch, _ = state["visual.conv1.weight"].shape
    positions = state["visual.positional_embedding"].shape[0]
    grid = round((positions - 1) ** 0.5)
    if grid * grid + 1 != positions:
        raise ValueError(f"visual.positional_embedding has {positions} positions: not a square grid plus one")
    return dict(
        text_config=dict(
            vocab_size=vocab,
            hidden_size=text_width,
            intermediate_size=state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
            num_hidden_layers=_layers(state, "transformer.resblocks."),
            num_attention_heads=max(1, text_width // HEAD_DIM),
            max_position_embeddings=context,
            hidden_act="gelu",
            layer_norm_eps=1e-5,
            # 2: transformers' legacy rule, which pools the text at argmax(input_ids): open_clip's rule
            # (its end-of-text token has the highest id)
            bos_token_id=0,
            eos_token_id=2,
            pad_token_id=0,
        ),
        vision_config=dict(
            hidden_size=vision_width,
            intermediate_size=state["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
            num_hidden_layers=_layers(state, "visual.transformer.resblocks."),
            num_attention_heads=max(1, vision_width // VISION_HEAD_DIM.get(vision_width, HEAD_DIM)),
            image_size=grid * patch,
            patch_size=patch,
            hidden_act="gelu",
            layer_norm_eps=1e-5,
        ),
        projection_dim=state["text_projection"].shape[1],
    )


def _layers(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    found = {int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(found) + 1


def convert_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An open_clip CLIP state dict in transformers ``CLIPModel`` keys (see the module docstring)."""
    out: dict[str, torch.Tensor] = {
        "text_model.embeddings.token_embedding.weight": state["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": state["positional_embedding"],
        "text_model.final_layer_norm.weight": state["ln_final.weight"],
        "text_model.final_layer_norm.bias": state["ln_final.bias"],
        "text_projection.weight": state["text_projection"].t(),
        "vision_model.embeddings.patch_embedding.weight": state["visual.conv1.weight"],
        "vision_model.embeddings.class_embedding": state["visual.class_embedding"],
        "vision_model.embeddings.position_embedding.weight": state["visual.positional_embedding"],
        "vision_model.pre_layrnorm.weight": state["visual.ln_pre.weight"],
        "vision_model.pre_layrnorm.bias": state["visual.ln_pre.bias"],
        "vision_model.post_layernorm.weight": state["visual.ln_post.weight"],
        "vision_model.post_layernorm.bias": state["visual.ln_post.bias"],
        "visual_projection.weight": state["visual.proj"].t(),
        "logit_scale": state["logit_scale"].reshape(()),
    }
    for source, target in (
        ("transformer.resblocks.", "text_model."),
        ("visual.transformer.resblocks.", "vision_model."),
    ):
        for i in range(_layers(state, source)):
            a, b = f"{source}{i}.", f"{target}encoder.layers.{i}."
            q, k, v = state[a + "attn.in_proj_weight"].chunk(3)
            qb, kb, vb = state[a + "attn.in_proj_bias"].chunk(3)
            out |= {
                b + "self_attn.q_proj.weight": q,
                b + "self_attn.k_proj.weight": k,
                b + "self_attn.v_proj.weight": v,
                b + "self_attn.q_proj.bias": qb,
                b + "self_attn.k_proj.bias": kb,
                b + "self_attn.v_proj.bias": vb,
                b + "self_attn.out_proj.weight": state[a + "attn.out_proj.weight"],
                b + "self_attn.out_proj.bias": state[a + "attn.out_proj.bias"],
                b + "layer_norm1.weight": state[a + "ln_1.weight"],
                b + "layer_norm1.bias": state[a + "ln_1.bias"],
                b + "layer_norm2.weight": state[a + "ln_2.weight"],
                b + "layer_norm2.bias": state[a + "ln_2.bias"],
                b + "mlp.fc1.weight": state[a + "mlp.c_fc.weight"],
                b + "mlp.fc1.bias": state[a + "mlp.c_fc.bias"],
                b + "mlp.fc2.weight": state[a + "mlp.c_proj.weight"],
                b + "mlp.fc2.bias": state[a + "mlp.c_proj.bias"],
            }
    return {k: v.contiguous() for k, v in out.items()}


def convert_open_clip(state: Mapping[str, torch.Tensor], dest: str | os.PathLike) -> Path:
    """Write ``state`` (open_clip layout) as a transformers ``CLIPModel`` folder at ``dest`` (written
    beside it and moved into place); returns it."""
    import shutil
    import tempfile

    from transformers import CLIPConfig, CLIPModel

    dest = Path(dest)
    config = CLIPConfig(**clip_config(state))
    model = CLIPModel(config)
    converted = convert_state_dict(state)
    expected = model.state_dict()
    missing = sorted(
        set(expected)
        - set(converted)
        - {"text_model.embeddings.position_ids", "vision_model.embeddings.position_ids"}
    )
    if missing:
        raise ValueError(f"the converted state dict lacks {missing[:5]}")
    model.load_state_dict(converted, strict=False)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        model.save_pretrained(staging)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(staging, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest
