"""The interface every guidance model implements: MLLM hidden states of (image, question)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from PIL.Image import Image


@dataclass
class GuidanceOutput:
    """The guidance for a batch.

    hidden_states: [B, L, hidden_size], the last hidden layer for every token of the input (system
        text, image tokens, question, assistant tag), right-padded to the longest sample.
    attention_mask: [B, L] bool, True for real tokens.
    texts: the exact text given to the model for each sample (with its image placeholder).
    """

    hidden_states: torch.Tensor
    attention_mask: torch.Tensor
    texts: list[str]


class GuidanceModel(ABC):
    """A multimodal LLM read the way IMG reads it: one forward pass, no text generation."""

    hidden_size: int

    @property
    @abstractmethod
    def device(self) -> torch.device: ...

    @abstractmethod
    def guide(self, images: Sequence[Image], questions: Sequence[str]) -> GuidanceOutput:
        """Hidden states of each image with its question (already filled with the prompt)."""

    def set_offload(self, mode: str, device: str | torch.device) -> None:  # noqa: B027
        """Keep weights off ``device`` between uses; the default does nothing."""

    def describe(self) -> dict[str, str]:
        """What this model was built from, for metadata files."""
        return {}
