"""The interface every diffusion backend implements: what IMG needs from a text-to-image model.

A backend wraps one diffusers pipeline with an IP-Adapter. IMG needs three things from it: plain
generation from prompts and seeds; the IP-Adapter image tokens of an image, AFTER the adapter's
projection (those are what the Implicit Aligner edits); and generation conditioned on such tokens,
injected as they are (computed once per image, never re-projected at each denoising step).
"""

from __future__ import annotations

import math
import operator
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from img_guidance.offload import OFFLOAD_MODES, OffloadMode, check_offload  # noqa: F401 (re-exported)

if TYPE_CHECKING:
    import torch
    from PIL.Image import Image

MAX_SEED = 2**63 - 1  # torch generators take any 64-bit seed; metadata and numpy readers take int64
# image sides of each family, known before any weight loads: the VAE's downsampling (SDXL's pipeline
# demands 8), FLUX's also packs 2 x 2 latents; a loaded backend reads its own (see ``image_sides``)
SIDE_MULTIPLES = {"sdxl": 8, "flux": 16}


@dataclass(frozen=True)
class ImageSides:
    """The image sides a model makes: any positive multiple of ``multiple``, or, with ``only``, that
    one side."""

    multiple: int = 1
    only: int | None = None

    def check(self, family: str, name: str, value: int | None) -> None:
        """Raise ValueError naming ``name`` and ``value`` when a ``family`` model cannot make that side
        (None: unset, the model's default)."""
        if value is None:
            return
        if self.only is not None:
            if value != self.only:
                raise ValueError(
                    f"the {family} model makes {self.only} x {self.only} images only; got {name}={value}"
                )
        elif value <= 0 or value % self.multiple:
            raise ValueError(
                f"the {family} model makes images whose sides are positive multiples of {self.multiple}; "
                f"got {name}={value}"
            )


def check_scale(name: str, value: float | None) -> None:
    """A scale (IP-Adapter, classifier-free guidance) must be a finite number >= 0; None is unset."""
    if value is not None and not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")


def check_prompts(prompts: Sequence[str], *, family: str, can_draw: Callable[[str], object]) -> None:
    """Raise ValueError naming the first prompt ``can_draw`` refuses (by raising ValueError)."""
    for i, prompt in enumerate(prompts):
        try:
            can_draw(prompt)
        except ValueError as err:
            raise ValueError(
                f"prompt {i} ({prompt!r}) is not one the {family} model can draw: {err}"
            ) from None


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
    component. Their ``generate`` starts with :meth:`check_inputs`, written once here so that every
    backend refuses the same inputs with the same message; a family states its own rules through
    :attr:`image_sides` and :meth:`check_prompt`.
    """

    family: str
    defaults: GenerationDefaults

    @property
    def image_sides(self) -> ImageSides:
        """The image sides this model makes (default: any positive side); :meth:`check_inputs`
        refuses others."""
        return ImageSides()

    def check_prompt(self, prompt: str) -> None:  # noqa: B027
        """Raise ValueError saying why the model cannot draw ``prompt``; by default it draws any."""

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
        the result is plain generation. Unset sampling settings come from ``defaults``. Call
        :meth:`check_inputs` first.
        """

    def check_inputs(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        *,
        image_tokens: torch.Tensor | None,
        ip_scale: float,
        steps: int | None,
        height: int | None,
        width: int | None,
        guidance_scale: float | None = None,
    ) -> tuple[list[str], list[int]]:
        """The checks of :meth:`generate`'s arguments every backend shares, before any work: raises
        TypeError or ValueError naming the bad value; returns the prompts and seeds as lists (seeds
        as ints). Family rules come from :meth:`check_prompt` and :attr:`image_sides`."""
        if isinstance(prompts, str):
            raise TypeError(f"prompts must be a sequence of strings, got the string {prompts!r}")
        prompts, seeds = list(prompts), list(seeds)
        if not prompts:
            raise ValueError("generate needs at least one prompt, got none")
        not_strings = [p for p in prompts if not isinstance(p, str)]
        if not_strings:
            raise TypeError(f"prompts must be strings, got {not_strings[0]!r}")
        if len(prompts) != len(seeds):
            raise ValueError(f"one seed per prompt: got {len(prompts)} prompts and {len(seeds)} seeds")
        for i, seed in enumerate(seeds):
            if isinstance(seed, bool):  # an int to operator.index, but never meant as a seed
                raise TypeError(f"seed {i} must be an integer, got {seed!r}")
            try:
                seeds[i] = operator.index(seed)  # ints and numpy integers, not floats
            except TypeError:
                raise TypeError(f"seed {i} must be an integer, got {seed!r}") from None
            if not 0 <= seeds[i] <= MAX_SEED:
                raise ValueError(f"seed {i} must lie in [0, 2**63 - 1], got {seed}")
        check_prompts(prompts, family=self.family, can_draw=self.check_prompt)
        if image_tokens is not None:
            import torch

            if not isinstance(image_tokens, torch.Tensor):
                raise TypeError(f"image_tokens must be a tensor, got {type(image_tokens).__name__}")
            expected = (len(prompts), *self.token_shape)
            if tuple(image_tokens.shape) != expected:
                raise ValueError(
                    f"image_tokens must be [prompts, tokens, width] = {list(expected)} for the {self.family} "
                    f"backend, got {list(image_tokens.shape)}"
                )
        # also without tokens: a bad scale is a caller's mistake even where it goes unused
        check_scale("ip_scale", ip_scale)
        if steps is not None and steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        check_scale("guidance_scale", guidance_scale)
        self.image_sides.check(self.family, "height", height)
        self.image_sides.check(self.family, "width", width)
        return prompts, seeds

    def set_offload(self, mode: OffloadMode, device: str | torch.device) -> None:
        """Keep weights off ``device`` between uses ("model": whole sub-models move to ``device``
        when they run; "sequential": layer by layer). The default checks ``mode`` and does nothing."""
        check_offload(mode)

    @property
    def denoiser(self) -> torch.nn.Module:
        """The network every denoising step runs (a UNet or a transformer)."""
        raise NotImplementedError(f"the {self.family} backend does not name its denoiser")

    def compile(self, **kwargs) -> None:
        """``torch.compile`` the denoiser in place (``nn.Module.compile``; ``kwargs`` go to
        ``torch.compile``): the first call compiles, later calls of the same shapes run the compiled
        code. Images stay the same up to floating-point rounding."""
        self.denoiser.compile(**kwargs)

    def describe(self) -> dict[str, str]:
        """What this backend was built from, for metadata files: component names or paths."""
        return {"family": self.family}
