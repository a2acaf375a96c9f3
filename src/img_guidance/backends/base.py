"""The interface every diffusion backend implements: what IMG needs from a text-to-image model.

A backend wraps one diffusers pipeline with an IP-Adapter. IMG needs three things from it: plain
generation from prompts and seeds; the IP-Adapter image tokens of an image, AFTER the adapter's
projection (those are what the Implicit Aligner edits); and generation conditioned on such tokens,
injected as they are (computed once per image, never re-projected at each denoising step).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch
    from PIL.Image import Image

OffloadMode = Literal["none", "model", "sequential"]


@dataclass(frozen=True)
class GenerationDefaults:
    """Sampling settings a backend uses when a call does not give them (the paper's defaults)."""

    steps: int
    guidance_scale: float
    height: int
    width: int
    ip_scale: float = 0.2  # IP-Adapter scale of IMG's re-generation (the paper's, for SDXL and FLUX)


class DiffusionBackend(ABC):
    """A text-to-image model with an image-prompt adapter, as the IMG pipeline uses it.

    Subclasses set ``family`` (``"sdxl"``, ``"flux"``, ``"shapes"``) and ``defaults``, and build
    themselves in a ``from_pretrained`` classmethod that takes hub ids or local paths for each
    component.
    """

    family: str
    defaults: GenerationDefaults

    @property
    @abstractmethod
    def token_shape(self) -> tuple[int, int]:
        """(number of image tokens, token width) of the post-projection IP tokens, e.g. (16, 2048)."""

    @property
    @abstractmethod
    def device(self) -> torch.device:
        """The device generation runs on."""

    @abstractmethod
    def encode_image(self, images: Sequence[Image]) -> torch.Tensor:
        """IP-Adapter image tokens after the adapter's projection: [B, N, D] (float32 or the
        backend's dtype, on the backend's device)."""

    @abstractmethod
    def negative_image_tokens(self) -> torch.Tensor:
        """The unconditional image tokens the official code uses, [1, N, D] (SDXL: the projection of
        an all-zeros image; FLUX: of a black image)."""

    @abstractmethod
    def generate(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        *,
        image_tokens: torch.Tensor | None = None,
        ip_scale: float = 0.2,
        steps: int | None = None,
        guidance_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
    ) -> list[Image]:
        """Generate one image per prompt, sample i from ``torch.Generator().manual_seed(seeds[i])``.

        With ``image_tokens`` [B, N, D] (one row per prompt, post-projection), sample i is
        conditioned on row i at IP scale ``ip_scale``; without them the adapter is off (scale 0) and
        the result is plain generation. Unset sampling settings come from ``defaults``.
        """

    def set_offload(self, mode: OffloadMode, device: str | torch.device) -> None:  # noqa: B027
        """Keep weights off ``device`` between uses ("model": whole sub-models move to ``device``
        when they run; "sequential": layer by layer). The default does nothing."""

    def describe(self) -> dict[str, str]:
        """What this backend was built from, for metadata files: component names or paths."""
        return {"family": self.family}
