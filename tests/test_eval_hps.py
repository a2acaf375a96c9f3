"""HPS v2 from open_clip weights: a tiny state dict in open_clip's own layout, converted to transformers,
scored, and compared with open_clip's forward pass and HPS's preprocessing written out here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from img_guidance.eval.scorers import load_scorer
from img_guidance.testing.tokenizers import clip_tokenizer

WIDTH, HEADS, LAYERS, DIM, PATCH, GRID, CONTEXT = 128, 2, 2, 32, 8, 4, 77
MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)


def open_clip_state(vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random ViT CLIP in open_clip's key layout (text and vision width 128, 2 layers, 32 px images)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.05):
        return torch.randn(*shape, generator=g) * scale

    def block(prefix: str) -> dict[str, torch.Tensor]:
        return {
            f"{prefix}ln_1.weight": 1 + r(WIDTH),
            f"{prefix}ln_1.bias": r(WIDTH),
            f"{prefix}attn.in_proj_weight": r(3 * WIDTH, WIDTH),
            f"{prefix}attn.in_proj_bias": r(3 * WIDTH),
            f"{prefix}attn.out_proj.weight": r(WIDTH, WIDTH),
            f"{prefix}attn.out_proj.bias": r(WIDTH),
            f"{prefix}ln_2.weight": 1 + r(WIDTH),
            f"{prefix}ln_2.bias": r(WIDTH),
            f"{prefix}mlp.c_fc.weight": r(4 * WIDTH, WIDTH),
            f"{prefix}mlp.c_fc.bias": r(4 * WIDTH),
            f"{prefix}mlp.c_proj.weight": r(WIDTH, 4 * WIDTH),
            f"{prefix}mlp.c_proj.bias": r(WIDTH),
        }

    state = {
        "token_embedding.weight": r(vocab, WIDTH, scale=0.5),
        "positional_embedding": r(CONTEXT, WIDTH, scale=0.1),
        "ln_final.weight": 1 + r(WIDTH),
        "ln_final.bias": r(WIDTH),
        "text_projection": r(WIDTH, DIM, scale=0.2),
        "logit_scale": torch.tensor(math.log(100.0)),
        "visual.conv1.weight": r(WIDTH, 3, PATCH, PATCH, scale=0.1),
        "visual.class_embedding": r(WIDTH, scale=0.5),
        "visual.positional_embedding": r(GRID * GRID + 1, WIDTH, scale=0.1),
        "visual.ln_pre.weight": 1 + r(WIDTH),
        "visual.ln_pre.bias": r(WIDTH),
        "visual.ln_post.weight": 1 + r(WIDTH),
        "visual.ln_post.bias": r(WIDTH),
        "visual.proj": r(WIDTH, DIM, scale=0.2),
    }
    for i in range(LAYERS):
        state |= block(f"transformer.resblocks.{i}.")
        state |= block(f"visual.transformer.resblocks.{i}.")
    return state


def residual_block(x: torch.Tensor, s: dict, prefix: str, mask: torch.Tensor | None) -> torch.Tensor:
    """open_clip's ResidualAttentionBlock: x + attn(ln_1(x)), then x + mlp(ln_2(x)), GELU."""
    h = F.layer_norm(x, (WIDTH,), s[prefix + "ln_1.weight"], s[prefix + "ln_1.bias"], eps=1e-5)
    q, k, v = (h @ s[prefix + "attn.in_proj_weight"].T + s[prefix + "attn.in_proj_bias"]).chunk(3, dim=-1)
    b, n, _ = h.shape
    q, k, v = (t.view(b, n, HEADS, WIDTH // HEADS).transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(WIDTH // HEADS)
    if mask is not None:
        scores = scores + mask
    attended = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, WIDTH)
    x = x + attended @ s[prefix + "attn.out_proj.weight"].T + s[prefix + "attn.out_proj.bias"]
    h = F.layer_norm(x, (WIDTH,), s[prefix + "ln_2.weight"], s[prefix + "ln_2.bias"], eps=1e-5)
    h = F.gelu(h @ s[prefix + "mlp.c_fc.weight"].T + s[prefix + "mlp.c_fc.bias"])
    return x + h @ s[prefix + "mlp.c_proj.weight"].T + s[prefix + "mlp.c_proj.bias"]


def open_clip_text(s: dict, ids: torch.Tensor) -> torch.Tensor:
    x = s["token_embedding.weight"][ids] + s["positional_embedding"][: ids.shape[1]]
    causal = torch.full((ids.shape[1], ids.shape[1]), float("-inf")).triu(1)
    for i in range(LAYERS):
        x = residual_block(x, s, f"transformer.resblocks.{i}.", causal)
    x = F.layer_norm(x, (WIDTH,), s["ln_final.weight"], s["ln_final.bias"], eps=1e-5)
    return x[torch.arange(ids.shape[0]), ids.argmax(-1)] @ s["text_projection"]  # pooled at the highest id


def open_clip_image(s: dict, pixels: torch.Tensor) -> torch.Tensor:
    x = F.conv2d(pixels, s["visual.conv1.weight"], stride=PATCH).flatten(2).transpose(1, 2)
    x = (
        torch.cat([s["visual.class_embedding"].expand(x.shape[0], 1, -1), x], 1)
        + s["visual.positional_embedding"]
    )
    x = F.layer_norm(x, (WIDTH,), s["visual.ln_pre.weight"], s["visual.ln_pre.bias"], eps=1e-5)
    for i in range(LAYERS):
        x = residual_block(x, s, f"visual.transformer.resblocks.{i}.", None)
    x = F.layer_norm(x[:, 0], (WIDTH,), s["visual.ln_post.weight"], s["visual.ln_post.bias"], eps=1e-5)
    return x @ s["visual.proj"]


def hps_pixels(image: Image.Image, size: int) -> torch.Tensor:
    """HPS's preprocessing: longest side to size (bicubic), centred zero padding, CLIP normalisation."""
    w, h = image.size
    scale = size / max(w, h)
    new_w, new_h = round(w * scale), round(h * scale)
    tensor = torch.from_numpy(np.asarray(image.convert("RGB").resize((new_w, new_h), Image.BICUBIC))).permute(
        2, 0, 1
    )
    pad_w, pad_h = size - new_w, size - new_h
    padded = F.pad(tensor, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2], value=0)
    return (padded.float() / 255 - MEAN) / STD


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("hps")
    tokenizer = clip_tokenizer()
    tokenizer.save_pretrained(root / "tokenizer")
    state = open_clip_state(len(tokenizer))
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, root / "HPS_tiny.pt")
    return root, state, tokenizer


def test_hps_from_open_clip_weights_equals_the_reference(weights, tmp_path, monkeypatch):
    root, state, tokenizer = weights
    monkeypatch.setenv("IMG_GUIDANCE_CACHE", str(tmp_path / "cache"))
    scorer = load_scorer("hpsv2", weights=str(root / "HPS_tiny.pt"), processor=str(root / "tokenizer"))
    images = [Image.new("RGB", (40, 24), (200, 30, 30)), Image.new("RGB", (20, 36), (20, 90, 200))]
    images[0].paste((10, 200, 10), (5, 5, 20, 15))
    prompts = ["a red thing", "blue"]
    got = scorer.score(images, prompts)
    pixels = torch.stack([hps_pixels(im, GRID * PATCH) for im in images])
    torch.testing.assert_close(scorer.pixels(images), pixels, atol=1e-6, rtol=0)
    ids = torch.nn.utils.rnn.pad_sequence(
        [torch.tensor(tokenizer(p)["input_ids"]) for p in prompts], batch_first=True, padding_value=0
    )
    with torch.no_grad():
        text, image = open_clip_text(state, ids), open_clip_image(state, pixels)
    expected = 100 * F.cosine_similarity(image, text, dim=-1)
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)
    # converted once, into the cache; the next load reads the converted folder
    assert len(list((tmp_path / "cache" / "converted").iterdir())) == 1
    again = load_scorer("hpsv2", weights=str(root / "HPS_tiny.pt"), processor=str(root / "tokenizer"))
    torch.testing.assert_close(again.score(images, prompts), got)


def test_bad_open_clip_files_are_named(tmp_path, monkeypatch):
    monkeypatch.setenv("IMG_GUIDANCE_CACHE", str(tmp_path / "cache"))
    torch.save({"weight": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"not an open_clip CLIP state dict: no token_embedding\.weight"):
        load_scorer("hpsv2", weights=str(tmp_path / "other.pt"))
    with pytest.raises(FileNotFoundError, match=r"hpsv2.1: .*missing\.pt"):
        load_scorer("hpsv2.1", weights=str(tmp_path / "missing.pt"))


def test_convert_scorer_writes_a_folder_that_scores_the_same(weights, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from img_guidance.cli import app

    root, _, _ = weights
    monkeypatch.setenv("IMG_GUIDANCE_CACHE", str(tmp_path / "cache"))
    dest = tmp_path / "hps-converted"
    result = CliRunner().invoke(app, ["convert-scorer", str(root / "HPS_tiny.pt"), str(dest)])
    assert result.exit_code == 0, result.output
    images, prompts = [Image.new("RGB", (30, 30), (10, 200, 30))], ["green"]
    from_folder = load_scorer("hpsv2", weights=str(dest), processor=str(root / "tokenizer"))
    from_file = load_scorer("hpsv2", weights=str(root / "HPS_tiny.pt"), processor=str(root / "tokenizer"))
    torch.testing.assert_close(from_folder.score(images, prompts), from_file.score(images, prompts))
    again = CliRunner().invoke(app, ["convert-scorer", str(root / "HPS_tiny.pt"), str(dest)])
    assert again.exit_code == 1 and "--overwrite" in again.stderr


def test_vit_h_14_towers_get_open_clips_head_widths():
    """HPS v2 is open_clip's ViT-H-14: its vision width 1280 is split into 16 heads of 80 (``head_width``
    in open_clip's model config; the heads cannot be read off the shapes), its text width 1024 into 16
    heads of 64, as laion/CLIP-ViT-H-14-laion2B-s32B-b79K's transformers config has them."""
    from img_guidance.eval.convert_open_clip import clip_config

    def meta(*shape):
        return torch.empty(*shape, device="meta")

    state = {
        "token_embedding.weight": meta(49408, 1024),
        "positional_embedding": meta(77, 1024),
        "text_projection": meta(1024, 1024),
        "visual.conv1.weight": meta(1280, 3, 14, 14),
        "visual.positional_embedding": meta(257, 1280),
    }
    state |= {f"transformer.resblocks.{i}.mlp.c_fc.weight": meta(4096, 1024) for i in range(24)}
    state |= {f"visual.transformer.resblocks.{i}.mlp.c_fc.weight": meta(5120, 1280) for i in range(32)}
    config = clip_config(state)
    vision, text = config["vision_config"], config["text_config"]
    assert (vision["num_attention_heads"], vision["num_hidden_layers"], vision["image_size"]) == (16, 32, 224)
    assert (text["num_attention_heads"], text["num_hidden_layers"], config["projection_dim"]) == (
        16,
        24,
        1024,
    )
