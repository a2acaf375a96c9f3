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
- ``blip-vqa``: T2I-CompBench's BLIP-VQA (attribute binding: color, shape, texture), the product over
  the prompt's first 8 noun phrases of ``P(yes) / (P(yes) + P(no))`` for the question ``"{phrase}?"``,
  read off the first answer token of a transformers ``BlipForQuestionAnswering``,
  ``Salesforce/blip-vqa-capfilt-large`` by default (:class:`BlipVqaScorer` has the details and where
  they come from). Its processor squashes the image to 384 x 384 (the reference: 480 x 480).

Every scorer with weights loads them from a hub id or a local folder (``weights=``); nothing needs the
network when a local folder is given. transformers is imported inside the loaders.
"""

from __future__ import annotations

import math
import os
import re
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
    "blip-vqa": "prod over noun phrases of P(yes | 'phrase?'), Salesforce/blip-vqa-capfilt-large "
    "(T2I-CompBench's attribute binding)",
}
DEFAULT_WEIGHTS = {
    "clip-score": ("openai/clip-vit-large-patch14", "openai/clip-vit-large-patch14"),
    "pickscore": ("yuvalkirstain/PickScore_v1", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"),
    "clip-b32": ("openai/clip-vit-base-patch32", "openai/clip-vit-base-patch32"),
    "hpsv2": ("xswu/HPSv2/HPS_v2_compressed.pt", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"),
    "hpsv2.1": ("xswu/HPSv2/HPS_v2.1_compressed.pt", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"),
    "imagereward": ("THUDM/ImageReward/ImageReward.pt", "google-bert/bert-base-uncased"),
    "blip-vqa": ("Salesforce/blip-vqa-capfilt-large", "Salesforce/blip-vqa-capfilt-large"),
}
# scorers whose weights are converted from another layout: their processor is never the weights' folder
CONVERTED = ("hpsv2", "hpsv2.1", "imagereward")
IMAGEREWARD_MAX_TOKENS = 35
BLIP_VQA_MAX_PHRASES = 8  # the reference's --np_num: later noun phrases are not asked
BLIP_VQA_MAX_TOKENS = 35  # the reference's question length, [ENC] and [SEP] included
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
    if name == "blip-vqa":
        return BlipVqaScorer(name, model_id, processor_id, device=device, dtype=dtype)
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

        self.name = name
        self.model_id, self.processor_id = model_id, processor_id
        self.model, self.processor = _load_parts(
            name, CLIPModel, model_id, AutoProcessor, processor_id, "CLIP model", device=device, dtype=dtype
        )
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


def _load_parts(
    name: str,
    model_cls: Any,
    model_id: str,
    processor_cls: Any,
    processor_id: str,
    what: str,
    *,
    device: str | torch.device,
    dtype: torch.dtype,
    **processor_kwargs: Any,
) -> tuple[Any, Any]:
    """A scorer's transformers model (in eval mode, on ``device`` in ``dtype``) and processor, from hub
    ids or local folders; a missing one raises one ``FileNotFoundError`` line naming the scorer."""
    from img_guidance.hub import missing_message, pretrained_location

    try:
        location, subfolder = pretrained_location(model_id)
        model = model_cls.from_pretrained(location, subfolder=subfolder or "", dtype=dtype).to(device)
        where, sub = pretrained_location(processor_id)
        processor = processor_cls.from_pretrained(where, subfolder=sub or "", **processor_kwargs)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{name}: {err}") from None
    except OSError as err:
        raise FileNotFoundError(f"{name}: {missing_message(model_id, what)} ({err})") from None
    return model.eval(), processor


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


class BlipVqaScorer(Scorer):
    """T2I-CompBench's BLIP-VQA score (Huang et al. 2023, attribute binding) on a transformers
    ``BlipForQuestionAnswering``: the product over the prompt's noun phrases of the probability that
    BLIP answers "yes" to ``"{phrase}?"``.

    The reference (Karine-Huang/T2I-CompBench, ``BLIPvqa_eval/``), as read in its code:

    - ``BLIP_vqa.py``: the prompt (the image file's name before its first ``_``) is parsed by spaCy's
      ``en_core_web_sm``; its i-th ``noun_chunks`` entry becomes the question ``f"{chunk}?"`` for
      i < ``--np_num`` (default 8); an image whose prompt has no i-th chunk gets 1 for it; an image's
      score is the product over i, the benchmark's the mean over images.
    - ``data/utils.py`` ``pre_question``: the question lower-cased, ``.!"()*#:;~`` removed, trailing
      spaces stripped, cut to 50 words.
    - ``models/blip_vqa.py``: bert-base-uncased's tokenizer with ``[DEC]`` (30522) and ``[ENC]``
      (30523) added; questions padded to the batch's longest, truncated to 35 tokens, their first
      token ([CLS]) replaced by ``[ENC]``; the text encoder cross-attends to every image token; then
      ``vqa_prob``: the text decoder is started from ``[DEC]`` alone, cross-attending to the question
      states under the question's attention mask; its first-step logits go through a softmax over the
      whole vocabulary and the score is ``P(yes) / (P(yes) + P(no))`` ("yes" and "no" are
      bert-base-uncased's 2748 and 2053).
    - ``configs/vqa.yaml``, ``data/__init__.py``: BLIP's ``model_base_vqa_capfilt_large.pth`` (ViT
      "base"), images resized to 480 x 480 (torchvision's bicubic ``Resize`` on PIL images, aspect
      not kept, no crop), ``ToTensor``, CLIP mean and std.

    Here, batched (every question of a batch in one text-encoder and one decoder forward):

    1. noun phrases: spaCy's ``en_core_web_sm`` noun chunks where it is importable, else
       :func:`split_noun_phrases` (rule-based; ``describe()["noun_phrases"]`` says which ran); the
       first :data:`BLIP_VQA_MAX_PHRASES` asked, as ``pre_question(phrase + "?")``; a prompt with none
       scores 1, as in the reference;
    2. the image: the checkpoint's ``BlipProcessor`` with transformers' PIL backend: RGB, resized to
       the processor's height x width (384 x 384 for ``Salesforce/blip-vqa-capfilt-large``, where the
       reference uses 480; aspect not kept, no crop) by PIL's bicubic, as the reference's ``Resize``
       on a PIL image, scaled by 1/255, CLIP mean and std; the ViT runs once per image;
    3. the question: the processor's tokenizer (padding to the longest, truncation at 35 tokens),
       the first token replaced by ``[ENC]`` as the reference does (transformers' ``generate`` keeps
       [CLS]): the tokenizer's ``[ENC]`` where it has one, else the id after the decoder's start
       token, BLIP's layout (``Salesforce/blip-vqa-capfilt-large``'s tokenizer is plain
       bert-base-uncased; its model's vocabulary holds [DEC] at 30522 and [ENC] at 30523);
    4. the decoder's first step from ``decoder_start_token_id`` ([DEC], as
       ``BlipForQuestionAnswering.generate`` starts), under the question's attention mask as the
       reference's ``vqa_prob`` (and transformers' ``forward``) do, so padding is never attended
       (``generate`` passes an all-ones mask); ``P(yes) / (P(yes) + P(no))`` of the softmax over the
       vocabulary, computed as ``sigmoid(logit_yes - logit_no)`` in float32 (the same number,
       without the softmax's underflow), "yes" and "no" looked up in the tokenizer.
    """

    def __init__(
        self, name: str, model_id: str, processor_id: str, *, device: str | torch.device, dtype: torch.dtype
    ) -> None:
        from transformers import BlipForQuestionAnswering, BlipProcessor

        self.name = name
        self.model_id, self.processor_id = model_id, processor_id
        # backend="pil": PIL's bicubic resize, which the reference's torchvision Resize runs on PIL images
        self.model, self.processor = _load_parts(
            name,
            BlipForQuestionAnswering,
            model_id,
            BlipProcessor,
            processor_id,
            "BLIP VQA model",
            device=device,
            dtype=dtype,
            backend="pil",
        )
        # transformers 5.24's BlipTextAttention hands the cross-attention mask to its attention as
        # attention_mask, which cross-attention ignores: without the mask the decoder attends to the
        # padding of shorter questions, and a question's answer depends on its batch-mates
        for layer in self.model.text_decoder.bert.encoder.layer:
            layer.crossattention.self.register_forward_pre_hook(_pass_cross_attention_mask, with_kwargs=True)
        self.device = torch.device(device)
        self.dtype = dtype
        self._check_parts()
        self.noun_phrases, self.splitter = noun_phrase_splitter()

    def _check_parts(self) -> None:
        """The token ids and image size the score needs, read off the tokenizer and the model, with a
        one-line error where a part is missing or the two do not fit."""
        text, vision = self.model.config.text_config, self.model.config.vision_config
        vocab = self.processor.tokenizer.get_vocab()
        for word in ("yes", "no"):
            if word not in vocab:
                raise ValueError(
                    f"{self.name}: the tokenizer of {self.processor_id} has no token {word!r}: "
                    "not BLIP's BERT tokenizer"
                )
        self.yes_id, self.no_id = vocab["yes"], vocab["no"]
        self.start_id = self.model.decoder_start_token_id
        self.enc_id = vocab.get("[ENC]", self.start_id + 1)
        if max(self.yes_id, self.no_id, self.enc_id, self.start_id) >= text.vocab_size:
            raise ValueError(
                f"{self.name}: the tokenizer of {self.processor_id} has ids beyond the model's vocabulary "
                f"of {text.vocab_size} (yes {self.yes_id}, no {self.no_id}, [ENC] {self.enc_id}, "
                f"[DEC] {self.start_id}): not this model's tokenizer"
            )
        size = self.processor.image_processor.size
        if (size.height, size.width) != (vision.image_size, vision.image_size):
            raise ValueError(
                f"{self.name}: the processor of {self.processor_id} resizes to {size.height} x "
                f"{size.width} but the model takes {vision.image_size} x {vision.image_size} images"
            )

    def questions(self, prompts: Sequence[str]) -> tuple[list[str], list[int]]:
        """Every prompt's questions in order, and the index of the prompt each one comes from."""
        questions, owners = [], []
        for index, prompt in enumerate(prompts):
            for phrase in self.noun_phrases(prompt)[:BLIP_VQA_MAX_PHRASES]:
                questions.append(blip_question(phrase))
                owners.append(index)
        return questions, owners

    @torch.no_grad()
    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> torch.Tensor:
        # 1. Check inputs
        _check_batch(images, prompts)
        questions, owners = self.questions(prompts)
        scores = torch.ones(len(images), dtype=torch.float32)
        if not questions:
            return scores
        owner = torch.tensor(owners, dtype=torch.long)

        # 2. Encode images, once each: [N, 3, S, S] -> [N, 1 + patches, D]
        pixels = self.processor.image_processor(
            images=[im.convert("RGB") for im in images], return_tensors="pt"
        )["pixel_values"]
        image_states = self.model.vision_model(pixel_values=pixels.to(self.device, self.dtype))[0]
        image_states = image_states.index_select(0, owner.to(self.device))  # -> [Q, 1 + patches, D]
        image_mask = torch.ones(image_states.shape[:-1], dtype=torch.long, device=self.device)

        # 3. Encode questions: [Q, T] -> [Q, T, H]
        tokens = self.processor.tokenizer(
            questions, padding="longest", truncation=True, max_length=BLIP_VQA_MAX_TOKENS, return_tensors="pt"
        )
        input_ids = tokens["input_ids"].clone()
        input_ids[:, 0] = self.enc_id
        question_mask = tokens["attention_mask"].to(self.device)
        question_states = self.model.text_encoder(
            input_ids=input_ids.to(self.device),
            attention_mask=question_mask,
            encoder_hidden_states=image_states,
            encoder_attention_mask=image_mask,
        )[0]

        # 4. The answer's first token: one decoder step from [DEC] -> logits [Q, V]
        start = torch.full((len(questions), 1), self.start_id, dtype=torch.long, device=self.device)
        first = self.model.text_decoder(
            input_ids=start,
            encoder_hidden_states=question_states,
            encoder_attention_mask=question_mask,
            use_cache=False,
        )
        logits = first.logits[:, 0].float()
        # P(yes) / (P(yes) + P(no)) = e^yes / (e^yes + e^no) = sigmoid(yes - no)
        answers = torch.sigmoid(logits[:, self.yes_id] - logits[:, self.no_id]).cpu()

        # 5. Each image's score: the product over its questions
        return scores.scatter_reduce(0, owner, answers, reduce="prod")

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model": self.model_id,
            "processor": self.processor_id,
            "noun_phrases": self.splitter,
        }


def _pass_cross_attention_mask(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """A forward pre-hook on a BLIP text layer's cross-attention: the mask it is given as
    ``attention_mask`` passed on as ``encoder_attention_mask``, the one cross-attention applies (a no-op
    where that is already given)."""
    if kwargs.get("encoder_attention_mask") is None and kwargs.get("encoder_hidden_states") is not None:
        kwargs["encoder_attention_mask"] = kwargs.get("attention_mask")
    return args, kwargs


def blip_question(phrase: str) -> str:
    """The question for a noun phrase, as the reference writes it: ``f"{phrase}?"`` through BLIP's
    ``pre_question`` (lower case; ``.!"()*#:;~`` removed; trailing spaces stripped; at most 50 words)."""
    question = re.sub(r"[.!\"()*#:;~]", "", f"{phrase}?".lower()).rstrip(" ")
    return " ".join(question.split(" ")[:50])


# Where split_noun_phrases cuts a prompt: commas and semicolons, and these words (whole words, any case)
PHRASE_BREAKS = (
    "next to", "and", "with", "of", "in", "on", "at", "near", "by", "for", "from", "under", "over",
    "above", "below", "behind", "beside", "between", "into", "onto", "to",
)  # fmt: skip
_PHRASE_BREAK = re.compile(r"\s*[,;]\s*|(?<!\S)(?:" + "|".join(PHRASE_BREAKS) + r")(?!\S)", re.IGNORECASE)


def split_noun_phrases(prompt: str) -> list[str]:
    """A rule-based stand-in for spaCy's noun chunks on T2I-CompBench's prompt forms: the prompt without
    its final ``.``, ``!`` or ``?``, cut at commas, semicolons and the words of :data:`PHRASE_BREAKS`
    (coordination and prepositions), the non-empty pieces kept as written. It gives what spaCy gives for
    "a green bench and a red car" (-> "a green bench", "a red car"), lists ("two white sheep, a black
    goat and a white goat in a field" -> four phrases) and with/of phrases ("a bathroom with white tile
    and a beige toilet" -> three; "a cylindrical container of hand cream" -> two). It does not parse:
    coordinated adjectives are cut ("a black and white cat" -> "a black", "white cat", where spaCy
    keeps one chunk), and verbs stay in their piece ("the metallic whisk and wooden bowl mix the
    fluffy batter" -> "the metallic whisk", "wooden bowl mix the fluffy batter")."""
    text = prompt.strip().rstrip(".!?").strip()
    return [piece.strip() for piece in _PHRASE_BREAK.split(text) if piece and piece.strip()]


def noun_phrase_splitter() -> tuple[Callable[[str], list[str]], str]:
    """(prompt -> noun phrases, which splitter it is): spaCy's ``en_core_web_sm`` noun chunks, as the
    reference, where spaCy and that model are importable; else :func:`split_noun_phrases`."""
    try:
        import spacy

        nlp = spacy.load("en_core_web_sm")
    except (ImportError, OSError):  # no spacy; or spacy without the model
        return split_noun_phrases, "rule-based (spaCy's en_core_web_sm is not importable)"

    def chunks(prompt: str) -> list[str]:
        return [chunk.text for chunk in nlp(prompt).noun_chunks]

    version = nlp.meta.get("version", "unknown")
    return chunks, f"spaCy {spacy.__version__} en_core_web_sm {version} noun_chunks"


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
