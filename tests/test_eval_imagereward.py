"""ImageReward from its original checkpoint: a tiny random state dict in BLIP's own key layout, converted to
transformers' BLIP classes, scored, and compared with the reference forward pass (BLIP's ViT, med.py's BERT
with cross-attention, the MLP head, the normalisation) and the reference preprocessing (torchvision's
Resize + CenterCrop) written out here in plain torch."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

from img_guidance.eval.scorers import load_scorer
from img_guidance.testing.imagereward import (
    GRID,
    HEAD_LAYERS,
    PATCH,
    TEXT_LAYERS,
    TEXT_WIDTH,
    VISION_LAYERS,
    VISION_WIDTH,
    imagereward_state_dict,
)
from img_guidance.testing.tokenizers import bert_tokenizer

HEAD_WIDTH = 64
IMAGE_SIZE = GRID * PATCH
MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)
REWARD_MEAN, REWARD_STD = 0.16717362830052426, 1.0333394966054072


def reference_pixels(image: Image.Image, size: int) -> torch.Tensor:
    """torchvision's Resize(size, BICUBIC) on a PIL image: the shorter side to size, the longer to
    int(size * long / short); CenterCrop(size) at int(round((side - size) / 2.0)); RGB; ToTensor;
    Normalize."""
    w, h = image.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    resized = image.resize((new_w, new_h), Image.BICUBIC) if (new_w, new_h) != (w, h) else image
    tensor = torch.from_numpy(np.array(resized.convert("RGB"))).permute(2, 0, 1)  # [3, new_h, new_w]
    top, left = round((new_h - size) / 2.0), round((new_w - size) / 2.0)
    crop = tensor[:, top : top + size, left : left + size]
    return (crop.float() / 255 - MEAN) / STD


def split_heads(x: torch.Tensor, width: int) -> torch.Tensor:
    b, n, _ = x.shape  # [B, N, heads*head_dim] -> [B, heads, N, head_dim]
    return x.view(b, n, width // HEAD_WIDTH, HEAD_WIDTH).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, heads, n, d = x.shape  # [B, heads, N, head_dim] -> [B, N, heads*head_dim]
    return x.transpose(1, 2).reshape(b, n, heads * d)


def linear(s: dict, prefix: str, x: torch.Tensor) -> torch.Tensor:
    return x @ s[prefix + ".weight"].T + s[prefix + ".bias"]


def vit(s: dict, pixels: torch.Tensor) -> torch.Tensor:
    """BLIP's VisionTransformer.forward: patches + class token + positions, pre-norm blocks (eps 1e-6,
    fused qkv, GELU), the final norm on every token -> [B, 1 + GRID^2, VISION_WIDTH]."""
    v, width = "blip.visual_encoder.", VISION_WIDTH
    x = F.conv2d(pixels, s[v + "patch_embed.proj.weight"], s[v + "patch_embed.proj.bias"], stride=PATCH)
    x = x.flatten(2).transpose(1, 2)  # [B, D, g, g] -> [B, g*g, D]
    x = torch.cat([s[v + "cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + s[v + "pos_embed"]
    for i in range(VISION_LAYERS):
        b = f"{v}blocks.{i}."
        h = F.layer_norm(x, (width,), s[b + "norm1.weight"], s[b + "norm1.bias"], eps=1e-6)
        q, k, val = linear(s, b + "attn.qkv", h).chunk(3, dim=-1)
        q, k, val = (split_heads(t, width) for t in (q, k, val))
        attended = ((q @ k.transpose(-1, -2)) * HEAD_WIDTH**-0.5).softmax(-1) @ val
        x = x + linear(s, b + "attn.proj", merge_heads(attended))
        h = F.layer_norm(x, (width,), s[b + "norm2.weight"], s[b + "norm2.bias"], eps=1e-6)
        x = x + linear(s, b + "mlp.fc2", F.gelu(linear(s, b + "mlp.fc1", h)))
    return F.layer_norm(x, (width,), s[v + "norm.weight"], s[v + "norm.bias"], eps=1e-6)


def bert_attention(s, prefix, x, source, additive_mask):
    """med.py's BertAttention: q from x, k and v from source, scores / sqrt(d) + mask, then
    LayerNorm(dense(context) + x), eps 1e-12."""
    q = split_heads(linear(s, prefix + ".self.query", x), TEXT_WIDTH)
    k = split_heads(linear(s, prefix + ".self.key", source), TEXT_WIDTH)
    val = split_heads(linear(s, prefix + ".self.value", source), TEXT_WIDTH)
    scores = q @ k.transpose(-1, -2) / math.sqrt(HEAD_WIDTH) + additive_mask
    context = merge_heads(scores.softmax(-1) @ val)
    out = linear(s, prefix + ".output.dense", context) + x
    return F.layer_norm(
        out,
        (TEXT_WIDTH,),
        s[prefix + ".output.LayerNorm.weight"],
        s[prefix + ".output.LayerNorm.bias"],
        eps=1e-12,
    )


def bert(s: dict, ids: torch.Tensor, mask: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """med.py's BertModel.forward in mode "multimodal" as ImageReward calls it: words + positions, then
    per layer self-attention (padding -> -10000), cross-attention to every image token (all-ones mask ->
    0), feed-forward -> [B, T, TEXT_WIDTH]."""
    t = "blip.text_encoder."
    x = (
        s[t + "embeddings.word_embeddings.weight"][ids]
        + s[t + "embeddings.position_embeddings.weight"][: ids.shape[1]]
    )
    x = F.layer_norm(
        x, (TEXT_WIDTH,), s[t + "embeddings.LayerNorm.weight"], s[t + "embeddings.LayerNorm.bias"], eps=1e-12
    )
    self_mask = (1.0 - mask[:, None, None, :].float()) * -10000.0
    cross_mask = (1.0 - torch.ones(ids.shape[0], 1, 1, image.shape[1])) * -10000.0
    for i in range(TEXT_LAYERS):
        b = f"{t}encoder.layer.{i}."
        x = bert_attention(s, b + "attention", x, x, self_mask)
        x = bert_attention(s, b + "crossattention", x, image, cross_mask)
        h = F.gelu(linear(s, b + "intermediate.dense", x))
        x = F.layer_norm(
            linear(s, b + "output.dense", h) + x,
            (TEXT_WIDTH,),
            s[b + "output.LayerNorm.weight"],
            s[b + "output.LayerNorm.bias"],
            eps=1e-12,
        )
    return x


def reference_reward(s: dict, ids: torch.Tensor, mask: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """ImageReward.score: the MLP (linear layers only; dropouts off) on the [CLS] state, normalised."""
    x = bert(s, ids, mask, vit(s, pixels))[:, 0]
    for index in HEAD_LAYERS:
        x = linear(s, f"mlp.layers.{index}", x)
    return (x.squeeze(-1) - REWARD_MEAN) / REWARD_STD


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The checkpoint file (as ImageReward.pt is: a flat state dict) and a tokenizer folder."""
    root = tmp_path_factory.mktemp("imagereward")
    tokenizer = bert_tokenizer()
    tokenizer.save_pretrained(root / "tokenizer")
    state = imagereward_state_dict(len(tokenizer) + 2)  # + BLIP's [DEC] and [ENC]
    torch.save(state, root / "ImageReward.pt")
    return root, state


def test_imagereward_from_the_original_checkpoint_equals_the_reference(checkpoint, tmp_path, monkeypatch):
    root, state = checkpoint
    monkeypatch.setenv("IMG_GUIDANCE_CACHE", str(tmp_path / "cache"))
    scorer = load_scorer(
        "imagereward", weights=str(root / "ImageReward.pt"), processor=str(root / "tokenizer")
    )
    rng = np.random.default_rng(0)
    images = [
        Image.new("RGB", (37, 32), (200, 30, 30)),  # no resize; crop left round(2.5) = 2 (half to even)
        Image.new("RGB", (32, 35), (20, 90, 200)),  # no resize; crop top round(1.5) = 2
        Image.fromarray(rng.integers(0, 256, (31, 45, 3), dtype=np.uint8)),  # 45 x 31 -> int(46.45) = 46 x 32
        Image.fromarray(rng.integers(0, 256, (64, 40, 3), dtype=np.uint8)),  # 40 x 64 -> 32 x int(51.2) = 51
    ]
    images[0].paste((10, 200, 10), (0, 5, 4, 15))  # a stripe the crop cuts into: the offset shows
    prompts = [
        "a red thing",
        "blue",
        "a long prompt that the tokenizer cuts at thirty five tokens, letter by letter",
        "two [ENC] cats",
    ]
    got = scorer.score(images, prompts)

    pixels = torch.stack([reference_pixels(im, IMAGE_SIZE) for im in images])
    torch.testing.assert_close(scorer.pixels(images), pixels, atol=1e-6, rtol=0)
    # the stripe's columns 2-3 (of 0-3) are in the crop: it starts at 2, not at 3 (rounding half up)
    green = (pixels[0, :, 10, :3] * STD[:, 0] + MEAN[:, 0]).T * 255  # [3 columns, RGB]
    torch.testing.assert_close(
        green, torch.tensor([[10.0, 200, 10], [10, 200, 10], [200, 30, 30]]), atol=0.5, rtol=0
    )
    tokenizer = bert_tokenizer()
    tokenizer.add_tokens(["[DEC]", "[ENC]"], special_tokens=True)  # BLIP's init_tokenizer
    tokens = tokenizer(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    assert tokens["attention_mask"][2].sum() == 35 and tokens["attention_mask"][1].sum() < 35
    assert (tokens["input_ids"][3] == len(tokenizer) - 1).sum() == 1  # [ENC] read as one token
    with torch.no_grad():
        expected = reference_reward(state, tokens["input_ids"], tokens["attention_mask"], pixels)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert got.dtype == torch.float32 and got.unique().numel() == 4

    # converted once, into the cache; the next load reads the converted folder
    assert len(list((tmp_path / "cache" / "converted").iterdir())) == 1
    again = load_scorer(
        "imagereward", weights=str(root / "ImageReward.pt"), processor=str(root / "tokenizer")
    )
    torch.testing.assert_close(again.score(images, prompts), got)
    # bfloat16 weights and activations, the head in float32: near the float32 rewards
    half = load_scorer(
        "imagereward",
        weights=str(root / "ImageReward.pt"),
        processor=str(root / "tokenizer"),
        dtype=torch.bfloat16,
    )
    assert half.model.vision_model.embeddings.patch_embedding.weight.dtype == torch.bfloat16
    torch.testing.assert_close(half.score(images, prompts), got, atol=0.05 * got.abs().max().item(), rtol=0)


def test_bad_imagereward_weights_are_named_in_one_line(checkpoint, tmp_path, monkeypatch):
    from img_guidance.testing.clip import make_tiny_clip

    root, _ = checkpoint
    monkeypatch.setenv("IMG_GUIDANCE_CACHE", str(tmp_path / "cache"))
    tokenizer = str(root / "tokenizer")
    torch.save({"weight": torch.zeros(2)}, tmp_path / "other.pt")
    (tmp_path / "text.pt").write_text("not a torch file\n")
    _, state = checkpoint
    torch.save({k: v for k, v in state.items() if k != "blip.visual_encoder.norm.bias"}, tmp_path / "cut.pt")
    cases = [
        (
            tmp_path / "other.pt",
            r"other\.pt is not an ImageReward checkpoint: it has no blip\.visual_encoder\.",
        ),
        (tmp_path / "text.pt", r"text\.pt is not a torch weights file that can be read safely"),
        (
            tmp_path / "cut.pt",
            r"cut\.pt: an incomplete ImageReward state dict: it has no blip\.visual_encoder\.norm\.bias",
        ),
        (make_tiny_clip(tmp_path / "clip"), r"clip holds CLIPModel, not a converted ImageReward model"),
    ]
    for path, message in cases:
        with pytest.raises(ValueError, match=message) as raised:
            load_scorer("imagereward", weights=str(path), processor=tokenizer)
        assert "\n" not in str(raised.value)
    with pytest.raises(FileNotFoundError, match=r"imagereward: .*missing\.pt"):
        load_scorer("imagereward", weights=str(tmp_path / "missing.pt"), processor=tokenizer)
    # a tokenizer with more tokens than the model's vocabulary (CLIP's) fails before any scoring
    with pytest.raises(ValueError, match=r"more than the model's \d+: not BLIP's BERT tokenizer"):
        load_scorer("imagereward", weights=str(root / "ImageReward.pt"), processor=str(tmp_path / "clip"))
    # failed conversions leave nothing behind: only the good checkpoint's folder is in the cache
    assert [p.name.split("-")[0] for p in (tmp_path / "cache" / "converted").iterdir()] == ["ImageReward"]


def test_convert_scorer_writes_an_imagereward_folder_that_scores_the_same(checkpoint, tmp_path, monkeypatch):
    from img_guidance.cli import app

    root, _ = checkpoint
    monkeypatch.setenv("IMG_GUIDANCE_CACHE", str(tmp_path / "cache"))
    dest = tmp_path / "imagereward-converted"
    result = CliRunner().invoke(app, ["convert-scorer", str(root / "ImageReward.pt"), str(dest)])
    assert result.exit_code == 0, result.output
    assert f"--scorer-weights imagereward={dest}" in " ".join(result.output.split())
    images, prompts = [Image.new("RGB", (40, 30), (10, 200, 30))], ["green"]
    from_folder = load_scorer("imagereward", weights=str(dest), processor=str(root / "tokenizer"))
    assert not (tmp_path / "cache").exists()  # the folder is read as it is, not converted again
    from_file = load_scorer(
        "imagereward", weights=str(root / "ImageReward.pt"), processor=str(root / "tokenizer")
    )
    torch.testing.assert_close(from_folder.score(images, prompts), from_file.score(images, prompts))

    torch.save({"weight": torch.zeros(2)}, tmp_path / "other.pt")
    bad = CliRunner().invoke(app, ["convert-scorer", str(tmp_path / "other.pt"), str(tmp_path / "out")])
    assert bad.exit_code == 1
    assert "other.pt is neither an open_clip CLIP state dict" in " ".join(bad.stderr.split())
    assert not (tmp_path / "out").exists()


def test_eval_score_takes_imagereward_weights_from_the_command_line(checkpoint, tmp_path, monkeypatch):
    from img_guidance.cli import app
    from img_guidance.eval import scorers

    root, _ = checkpoint
    monkeypatch.setenv("IMG_GUIDANCE_CACHE", str(tmp_path / "cache"))
    # the default tokenizer (bert-base-uncased) is on the hub; the tiny one stands in for it
    monkeypatch.setitem(
        scorers.DEFAULT_WEIGHTS, "imagereward", ("THUDM/ImageReward/ImageReward.pt", str(root / "tokenizer"))
    )
    folder = tmp_path / "images"
    folder.mkdir()
    lines = []
    for i, (color, prompt) in enumerate([((200, 20, 20), "a red square"), ((20, 20, 200), "a blue circle")]):
        Image.new("RGB", (48, 40), color).save(folder / f"{i}.png")
        lines.append(json.dumps({"file": f"{i}.png", "prompt": prompt, "system": "base"}) + "\n")
    (folder / "images.jsonl").write_text("".join(lines))
    args = ["eval", "score", str(folder), "--scorers", "imagereward", "--device", "cpu"]
    result = CliRunner().invoke(app, [*args, "--scorer-weights", f"imagereward={root / 'ImageReward.pt'}"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (folder / "eval" / "scores.jsonl").read_text().splitlines()]
    scorer = load_scorer("imagereward", weights=str(root / "ImageReward.pt"))
    with Image.open(folder / "0.png") as a, Image.open(folder / "1.png") as b:
        expected = scorer.score([a.convert("RGB"), b.convert("RGB")], ["a red square", "a blue circle"])
    assert [row["imagereward"] for row in rows] == pytest.approx(expected.tolist(), abs=1e-6)
    summary = json.loads((folder / "eval" / "summary.json").read_text())
    assert summary["systems"]["base"]["imagereward"]["mean"] == pytest.approx(
        expected.mean().item(), abs=1e-6
    )
