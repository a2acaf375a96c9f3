"""Scorers: ``score(images, prompts) -> tensor [B]`` (float32, on the CPU), batched by the caller.

- ``shapes-judge``: ShapesWorld's oracle judge (:mod:`img_guidance.shapes.judge`), 1.0 where the image
  is fully right and 0.0 otherwise (undecidable counts as not right), so its mean is GenEval-style
  accuracy, as ``img-guidance shapes judge`` reports it. Offline, no weights.
- ``shapes-checks``: the same judge's fraction of the prompt's checks that hold (the score by which
  ``shapes judge`` counts IMG's wins, ties and losses).
- ``clip-score``: torchmetrics' CLIP score, ``100 * max(cos(text, image), 0)`` with
  ``openai/clip-vit-large-patch14`` by default (a transformers ``CLIPModel`` and its processor:
  shortest side resized to 224, centre crop, CLIP mean and std; text truncated to 77 tokens).
- ``pickscore``: PickScore (Kirstain et al.), ``logit_scale.exp() * cos(text, image)`` with
  ``yuvalkirstain/PickScore_v1`` and the ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` processor (the
  reference's pairing; its preprocessing as ``clip-score``'s).
- ``clip-b32``: T2I-CompBench's non-spatial score, ``cos(text, image)`` with
  ``openai/clip-vit-base-patch32`` (preprocessing as ``clip-score``'s).
- ``hpsv2`` / ``hpsv2.1``: HPS v2 (Wu et al.), ``100 * cos(text, image)`` (no logit scale) with
  ``xswu/HPSv2``'s ``HPS_v2_compressed.pt`` / ``HPS_v2.1_compressed.pt``, open_clip ViT-H-14 state
  dicts converted once into a transformers ``CLIPModel`` folder (:mod:`.convert_open_clip`; cached
  under ``$IMG_GUIDANCE_CACHE/converted``, default ``~/.cache/img-guidance``), the tokenizer of
  ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``. Preprocessing as the reference's: the longest side
  resized to 224 (bicubic), zero-padded to a centred square (not centre-cropped), CLIP mean and std.
- ``imagereward``: ImageReward (Xu et al.), ``(r - 0.16717362830052426) / 1.0333394966054072`` where r is
  an MLP on the [CLS] state of BLIP's BERT-base text encoder cross-attending to BLIP's ViT-L/16 image
  tokens (:mod:`.imagereward`), ``THUDM/ImageReward``'s ``ImageReward.pt`` (original BLIP layout)
  converted once into an :class:`~.imagereward.ImageRewardModel` folder (:mod:`.convert_imagereward`;
  cached as HPS's), the tokenizer of ``google-bert/bert-base-uncased`` with BLIP's ``[DEC]`` and
  ``[ENC]`` added, prompts padded and truncated to 35 tokens. Preprocessing as the reference's
  (torchvision's ``Resize(224, BICUBIC)``, ``CenterCrop(224)``): the shortest side resized to 224
  (bicubic; the other to ``int(224 * long / short)``), a centred 224 x 224 crop, CLIP mean and std.

Every scorer with weights loads them from a hub id or a local folder (``weights=``); nothing needs the
network when a local folder is given. transformers is imported inside the loaders.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

SCORERS: dict[str, str] = {
    "shapes-judge": "ShapesWorld's judge: 1 where the image is fully right, else 0 (mean: accuracy)",
    "shapes-checks": "ShapesWorld's judge: the fraction of the prompt's checks that hold",
    "clip-score": "100 x max(cos(text, image), 0), openai/clip-vit-large-patch14 (torchmetrics' CLIP score)",
    "pickscore": "logit_scale.exp() x cos(text, image), yuvalkirstain/PickScore_v1",
    "clip-b32": "cos(text, image), openai/clip-vit-base-patch32 (T2I-CompBench's non-spatial score)",
    "hpsv2": "100 x cos(text, image), HPS v2 (xswu/HPSv2 HPS_v2_compressed.pt, open_clip ViT-H-14)",
    "hpsv2.1": "100 x cos(text, image), HPS v2.1 (xswu/HPSv2 HPS_v2.1_compressed.pt)",
    "imagereward": "ImageReward: BLIP ViT-L/16 + BERT cross-attention + MLP, normalised (THUDM/ImageReward)",
}
DEFAULT_WEIGHTS = {
    "clip-score": ("openai/clip-vit-large-patch14", "openai/clip-vit-large-patch14"),
    "pickscore": ("yuvalkirstain/PickScore_v1", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"),
    "clip-b32": ("openai/clip-vit-base-patch32", "openai/clip-vit-base-patch32"),
    "hpsv2": ("xswu/HPSv2/HPS_v2_compressed.pt", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"),
    "hpsv2.1": ("xswu/HPSv2/HPS_v2.1_compressed.pt", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"),
    "imagereward": ("THUDM/ImageReward/ImageReward.pt", "google-bert/bert-base-uncased"),
}
# scorers whose weights are converted from another layout: their processor is never the weights' folder
CONVERTED = ("hpsv2", "hpsv2.1", "imagereward")
IMAGEREWARD_MAX_TOKENS = 35
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def check_scorer_names(names: Sequence[str]) -> list[str]:
    """The names, checked (ValueError naming an unknown one and listing the valid ones)."""
    names = list(names)
    if not names:
        raise ValueError(f"no scorers given; choose from {', '.join(SCORERS)}")
    unknown = [n for n in names if n not in SCORERS]
    if unknown:
        raise ValueError(f"unknown scorer {unknown[0]!r}; choose from {', '.join(SCORERS)}")
    return names


def load_scorer(
    name: str,
    *,
    weights: str | None = None,
    processor: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> Scorer:
    """The scorer ``name`` (see :data:`SCORERS`), its model from ``weights`` (hub id or local folder;
    default: the reference's) and its processor from ``processor`` (default: ``weights`` where given,
    else the reference's), on ``device`` in ``dtype`` (default float32)."""
    check_scorer_names([name])
    if name in ("shapes-judge", "shapes-checks"):
        return ShapesJudgeScorer(name)
    model_id, processor_id = DEFAULT_WEIGHTS[name]
    if weights is not None:
        model_id = weights
        processor_id = processor or (processor_id if name in CONVERTED else weights)
    elif processor is not None:
        processor_id = processor
    dtype = dtype or torch.float32
    if name == "imagereward":
        return ImageRewardScorer(name, model_id, processor_id, device=device, dtype=dtype)
    if name.startswith("hpsv2"):
        return HPSScorer(name, model_id, processor_id, device=device, dtype=dtype)
    return ClipScorer(name, model_id, processor_id, device=device, dtype=dtype)


class Scorer:
    """``score(images, prompts) -> [B] float32`` on the CPU; ``name``; ``describe()`` for reports."""

    name: str

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"name": self.name}


@dataclass
class ShapesJudgeScorer(Scorer):
    """ShapesWorld's judge as a scorer (see the module docstring); offline, no model."""

    name: str

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        from img_guidance.shapes.grammar import parse
        from img_guidance.shapes.judge import judge

        _check_batch(images, prompts)
        values = []
        for image, prompt in zip(images, prompts, strict=True):
            try:
                spec = parse(prompt)
            except ValueError as err:
                raise ValueError(f"{self.name} judges ShapesWorld prompts only: {err}") from None
            verdict = judge(image.convert("RGB"), spec)
            values.append(float(verdict.correct is True) if self.name == "shapes-judge" else verdict.score)
        return torch.tensor(values, dtype=torch.float32)


class ClipScorer(Scorer):
    """A transformers ``CLIPModel`` scoring image-text pairs by the cosine of their projected
    features: ``clip-score`` = 100 x max(cos, 0); ``pickscore`` = logit_scale.exp() x cos;
    ``clip-b32`` = cos."""

    def __init__(
        self, name: str, model_id: str, processor_id: str, *, device: str | torch.device, dtype: torch.dtype
    ) -> None:
        from transformers import AutoProcessor, CLIPModel

        from img_guidance.hub import pretrained_location

        self.name = name
        self.model_id, self.processor_id = model_id, processor_id
        try:
            location, subfolder = pretrained_location(model_id)
            self.model = CLIPModel.from_pretrained(location, subfolder=subfolder or "", dtype=dtype).to(
                device
            )
            where, sub = pretrained_location(processor_id)
            self.processor = AutoProcessor.from_pretrained(where, subfolder=sub or "")
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{name}: {err}") from None
        except OSError as err:
            from img_guidance.hub import missing_message

            raise FileNotFoundError(f"{name}: {missing_message(model_id, 'CLIP model')} ({err})") from None
        self.model.eval()
        self.device = torch.device(device)
        self.dtype = dtype

    @torch.no_grad()
    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        _check_batch(images, prompts)
        inputs = self.processor(
            text=list(prompts),
            images=[im.convert("RGB") for im in images],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=self.model.config.text_config.max_position_embeddings,
        )
        pixels = inputs["pixel_values"].to(self.device, self.dtype)
        image = self.model.get_image_features(pixel_values=pixels)
        text = self.model.get_text_features(
            input_ids=inputs["input_ids"].to(self.device),
            attention_mask=inputs["attention_mask"].to(self.device),
        )
        image, text = _features(image), _features(text)
        cosine = torch.nn.functional.cosine_similarity(image.float(), text.float(), dim=-1)
        if self.name == "clip-score":
            return (100 * cosine.clamp(min=0)).cpu()
        if self.name == "clip-b32":
            return cosine.cpu()
        return (self.model.logit_scale.float().exp() * cosine).cpu()

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "model": self.model_id, "processor": self.processor_id}


def _load_tokenizer(name: str, tokenizer_id: str):
    """The scorer ``name``'s tokenizer from a folder or hub id; a missing one is a FileNotFoundError
    that names the scorer and says whether the hub was reachable."""
    from transformers import AutoTokenizer

    from img_guidance.hub import missing_message, pretrained_location

    try:
        where, sub = pretrained_location(tokenizer_id)
        return AutoTokenizer.from_pretrained(where, subfolder=sub or "")
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{name}: {err}") from None
    except OSError as err:
        raise FileNotFoundError(f"{name}: {missing_message(tokenizer_id, 'tokenizer')} ({err})") from None


class HPSScorer(ClipScorer):
    """HPS v2 / v2.1: a ``CLIPModel`` converted from open_clip weights (on first use), scored as
    100 x cos with the reference's pad-to-square preprocessing (see the module docstring)."""

    def __init__(
        self, name: str, model_id: str, tokenizer_id: str, *, device: str | torch.device, dtype: torch.dtype
    ) -> None:
        from transformers import CLIPModel

        self.name = name
        self.model_id, self.processor_id = model_id, tokenizer_id
        try:
            folder = converted_open_clip(model_id)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{name}: {err}") from None
        self.model = CLIPModel.from_pretrained(folder, dtype=dtype).to(device)
        self.tokenizer = _load_tokenizer(name, tokenizer_id)
        self.model.eval()
        self.device = torch.device(device)
        self.dtype = dtype

    def pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """The reference's preprocessing: [B, 3, S, S] (S: the model's image size)."""
        size = self.model.config.vision_config.image_size
        return torch.stack([pad_to_square(im, size) for im in images])

    @torch.no_grad()
    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        _check_batch(images, prompts)
        tokens = self.tokenizer(
            list(prompts),
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=self.model.config.text_config.max_position_embeddings,
        )
        image = _features(
            self.model.get_image_features(pixel_values=self.pixels(images).to(self.device, self.dtype))
        )
        text = _features(
            self.model.get_text_features(
                input_ids=tokens["input_ids"].to(self.device),
                attention_mask=tokens["attention_mask"].to(self.device),
            )
        )
        return (100 * torch.nn.functional.cosine_similarity(image.float(), text.float(), dim=-1)).cpu()


def pad_to_square(image: Image.Image, size: int) -> torch.Tensor:
    """open_clip's ResizeMaxSize then CLIP normalisation: the longest side resized to ``size``
    (bicubic), zero-padded to a centred square (left / top get the smaller half), [0, 1], CLIP mean
    and std -> [3, size, size]."""
    import numpy as np

    image = image.convert("RGB")
    scale = size / max(image.size)
    width, height = (round(d * scale) for d in image.size)
    resized = image.resize((width, height), Image.BICUBIC)
    canvas = Image.new("RGB", (size, size), (0, 0, 0))
    canvas.paste(resized, ((size - width) // 2, (size - height) // 2))
    array = np.asarray(canvas, dtype=np.float32) / 255.0
    array = (array - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
    return torch.from_numpy(array.transpose(2, 0, 1).copy())


class ImageRewardScorer(Scorer):
    """ImageReward: an :class:`~.imagereward.ImageRewardModel` converted from the original checkpoint
    (on first use), scored with the reference's tokenizer settings and centre-crop preprocessing (see
    the module docstring)."""

    def __init__(
        self, name: str, model_id: str, tokenizer_id: str, *, device: str | torch.device, dtype: torch.dtype
    ) -> None:
        from img_guidance.eval.imagereward import ImageRewardModel

        self.name = name
        self.model_id, self.processor_id = model_id, tokenizer_id
        try:
            folder = converted_imagereward(model_id)
            self.model = ImageRewardModel.from_pretrained(folder, dtype=dtype).to(device)
        except OSError as err:  # a missing file, or a folder without weights
            raise FileNotFoundError(f"{name}: {err}") from None
        self.model.head.float()  # the reference runs its head on float32 features in any precision
        self.tokenizer = _load_tokenizer(name, tokenizer_id)
        # BLIP's tokenizer adds these two to bert-base-uncased (ids 30522, 30523): a prompt that spells
        # one reads it as that token, as the reference does
        self.tokenizer.add_tokens(["[DEC]", "[ENC]"], special_tokens=True)
        vocab = self.model.text_encoder.config.vocab_size
        if len(self.tokenizer) > vocab:
            raise ValueError(
                f"{name}: the tokenizer {tokenizer_id} has {len(self.tokenizer)} tokens with [DEC] and "
                f"[ENC], more than the model's {vocab}: not BLIP's BERT tokenizer"
            )
        self.model.eval()
        self.device = torch.device(device)
        self.dtype = dtype

    def pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """The reference's preprocessing: [B, 3, S, S] (S: the model's image size)."""
        return torch.stack([resize_center_crop(im, self.model.image_size) for im in images])

    @torch.no_grad()
    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        _check_batch(images, prompts)
        tokens = self.tokenizer(
            list(prompts),
            padding="max_length",
            truncation=True,
            max_length=IMAGEREWARD_MAX_TOKENS,
            return_tensors="pt",
        )
        rewards = self.model(
            pixel_values=self.pixels(images).to(self.device, self.dtype),
            input_ids=tokens["input_ids"].to(self.device),
            attention_mask=tokens["attention_mask"].to(self.device),
        )
        return rewards.float().cpu()

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "model": self.model_id, "processor": self.processor_id}


def resize_center_crop(image: Image.Image, size: int) -> torch.Tensor:
    """torchvision's ``Resize(size, BICUBIC)``, ``CenterCrop(size)`` on a PIL image, then RGB and CLIP
    normalisation (ImageReward's and OpenAI CLIP's transform): the shortest side resized to ``size``
    and the other to ``int(size * long / short)`` (truncated, as torchvision computes it), bicubic; the
    crop's left / top at ``round((side - size) / 2)`` (Python's round: halves to even); [0, 1], CLIP
    mean and std -> [3, size, size]."""
    import numpy as np

    width, height = image.size
    short, long = min(width, height), max(width, height)
    other = int(size * long / short)
    new_width, new_height = (size, other) if width <= height else (other, size)
    if (new_width, new_height) != image.size:
        image = image.resize((new_width, new_height), Image.BICUBIC)
    left, top = round((new_width - size) / 2), round((new_height - size) / 2)  # halves to even
    cropped = image.crop((left, top, left + size, top + size)).convert("RGB")
    array = np.asarray(cropped, dtype=np.float32) / 255.0
    array = (array - np.array(CLIP_MEAN, dtype=np.float32)) / np.array(CLIP_STD, dtype=np.float32)
    return torch.from_numpy(array.transpose(2, 0, 1).copy())


def converted_open_clip(location: str) -> str:
    """A transformers ``CLIPModel`` folder for ``location``: itself where it already is one, else the
    open_clip torch file (local, or ``owner/repo/file`` on the hub) converted once into the conversion
    cache."""
    from img_guidance.eval.convert_open_clip import VERSION, convert_open_clip, read_open_clip_state_dict

    return _converted(
        location,
        lambda path, dest: convert_open_clip(read_open_clip_state_dict(path), dest),
        class_name="CLIPModel",
        what="a converted CLIP model",
        version=VERSION,
    )


def converted_imagereward(location: str) -> str:
    """An :class:`~.imagereward.ImageRewardModel` folder for ``location``: itself where it already is
    one, else ImageReward's original torch file (local, or ``owner/repo/file`` on the hub) converted
    once into the conversion cache."""
    from img_guidance.eval.convert_imagereward import (
        VERSION,
        convert_imagereward,
        read_imagereward_state_dict,
    )

    def convert(path: Path, dest: Path) -> Path:
        state = read_imagereward_state_dict(path)  # its errors name the file
        try:
            return convert_imagereward(state, dest)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None

    return _converted(
        location,
        convert,
        class_name="ImageRewardModel",
        what="a converted ImageReward model",
        version=VERSION,
    )


def _converted(
    location: str, convert: Callable[[Path, Path], Path], *, class_name: str, what: str, version: int
) -> str:
    """``location`` where it is a folder holding ``class_name`` (its config.json says so), else the
    torch file at ``location`` converted by ``convert(file, dest)`` into the conversion cache, once per
    converter ``version`` (a fixed converter does not reuse what an older one wrote)."""
    import hashlib
    import json

    from img_guidance.hub import hub_file

    if os.path.isdir(location):
        config = Path(location) / "config.json"
        if not config.is_file():
            raise FileNotFoundError(f"{location} is a folder without config.json: not {what}")
        saved = json.loads(config.read_text())
        held = [saved.get("_class_name"), *(saved.get("architectures") or [])]
        if class_name not in held:
            found = next((c for c in held if c), "an unknown model")
            raise ValueError(f"{location} holds {found}, not {what} ({class_name})")
        return location
    source = os.path.abspath(location) if os.path.exists(location) else location
    key = hashlib.sha256(f"{source}\nconverter {version}".encode()).hexdigest()[:12]
    dest = conversion_cache() / f"{Path(source).stem}-{key}"
    if not (dest / "config.json").is_file():
        convert(hub_file(location), dest)
    return str(dest)


def convert_scorer_file(location: str, dest: str | os.PathLike) -> tuple[str, Path]:
    """Convert a scorer's released torch file (local, or ``owner/repo/file`` on the hub) into the folder
    its scorer loads: an open_clip CLIP state dict (HPS v2 / v2.1) into a transformers ``CLIPModel``,
    ImageReward's ``ImageReward.pt`` into an ``ImageRewardModel``. Returns (the scorer's name for
    ``--scorer-weights``, the folder)."""
    from img_guidance.eval.convert_imagereward import REQUIRED, convert_imagereward, is_imagereward_state
    from img_guidance.eval.convert_open_clip import convert_open_clip, read_state_dict
    from img_guidance.hub import hub_file

    path = hub_file(location)
    state = read_state_dict(path, what="scorer weights")
    try:
        if is_imagereward_state(state):
            return "imagereward", convert_imagereward(state, dest)
        if "visual.conv1.weight" in state:
            return "hpsv2", convert_open_clip(state, dest)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    raise ValueError(
        f"{path} is neither an open_clip CLIP state dict (HPS v2; it has no visual.conv1.weight) nor an "
        f"ImageReward checkpoint (no {REQUIRED[0]})"
    )


def conversion_cache() -> Path:
    """Where weights in another layout are converted to on first use."""
    root = os.environ.get("IMG_GUIDANCE_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "img-guidance"
    )
    return Path(root) / "converted"


def _features(output: Any) -> torch.Tensor:
    """transformers 5 returns model outputs from get_*_features; older versions a tensor."""
    if isinstance(output, torch.Tensor):
        return output
    return output.pooler_output


def _check_batch(images: Sequence[Image.Image], prompts: Sequence[str]) -> None:
    if len(images) != len(prompts):
        raise ValueError(f"one prompt per image: got {len(images)} images and {len(prompts)} prompts")


def finite_mean(values: Sequence[float]) -> float:
    """The mean of ``values`` (NaN for none)."""
    return math.fsum(values) / len(values) if values else math.nan
