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

Every scorer with weights loads them from a hub id or a local folder (``weights=``); nothing needs the
network when a local folder is given. transformers is imported inside the loaders.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

SCORERS: dict[str, str] = {
    "shapes-judge": "ShapesWorld's judge: 1 where the image is fully right, else 0 (mean: accuracy)",
    "shapes-checks": "ShapesWorld's judge: the fraction of the prompt's checks that hold",
    "clip-score": "100 x max(cos(text, image), 0), openai/clip-vit-large-patch14 (torchmetrics' CLIP score)",
    "pickscore": "logit_scale.exp() x cos(text, image), yuvalkirstain/PickScore_v1",
}
DEFAULT_WEIGHTS = {
    "clip-score": ("openai/clip-vit-large-patch14", "openai/clip-vit-large-patch14"),
    "pickscore": ("yuvalkirstain/PickScore_v1", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"),
}


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
        processor_id = processor or weights
    elif processor is not None:
        processor_id = processor
    return ClipScorer(name, model_id, processor_id, device=device, dtype=dtype or torch.float32)


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
    features: ``clip-score`` = 100 x max(cos, 0); ``pickscore`` = logit_scale.exp() x cos."""

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
        return (self.model.logit_scale.float().exp() * cosine).cpu()

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "model": self.model_id, "processor": self.processor_id}


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
