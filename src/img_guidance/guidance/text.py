"""Text-embedding guidance: the ablation that guides the aligner with the prompt's text embedding
instead of the detector's reading of the image.

:class:`TextEmbeddingGuidance` implements the guidance interface with the ShapesWorld generator's
own text encoder: its hidden states of the prompt (no image, no question). Use it with the single
question template :data:`PROMPT_ONLY` (``"{prompt}"``), so the "question" it receives is the
prompt itself, in the feature stage and in the pipeline alike.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from img_guidance.guidance.base import GuidanceModel, GuidanceOutput

if TYPE_CHECKING:
    import torch
    from PIL.Image import Image

PROMPT_ONLY = ("{prompt}",)


class TextEmbeddingGuidance(GuidanceModel):
    """The generator's text encoder read as guidance: [B, T, width] hidden states of the prompt,
    with its padding mask; the images are ignored."""

    def __init__(self, *, tokenizer, text_encoder, location: str = ""):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.eval()
        self.location = location
        self.hidden_size = int(text_encoder.config.width)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> TextEmbeddingGuidance:
        """The text half of a ShapesWorld generator folder."""
        from img_guidance.shapes.models import TOKENIZER_FILE, ShapesTextEncoder, ShapesTokenizer

        tokenizer = ShapesTokenizer.from_file(os.path.join(folder, TOKENIZER_FILE))
        encoder = ShapesTextEncoder.from_pretrained(os.path.join(folder, "text_encoder"))
        return cls(tokenizer=tokenizer, text_encoder=encoder, location=os.fspath(folder))

    @property
    def device(self) -> torch.device:
        return next(self.text_encoder.parameters()).device

    def guide(self, images: Sequence[Image], questions: Sequence[str]) -> GuidanceOutput:
        import torch

        if len(images) != len(questions):
            raise ValueError(f"one question per image is needed: {len(images)} images, {len(questions)}")
        ids, mask = self.tokenizer(list(questions))
        with torch.no_grad():
            hidden = self.text_encoder(ids.to(self.device), mask.to(self.device))
        mask = mask.to(self.device).bool()
        return GuidanceOutput(
            hidden_states=hidden.masked_fill(~mask[..., None], 0), attention_mask=mask, texts=list(questions)
        )

    def describe(self) -> dict[str, str]:
        return {"family": "shapes-text-embedding", "model": self.location}
