"""What every diffusion backend promises, tested once (like diffusers' ``PipelineTesterMixin``).

A backend's test module defines the fixtures ``backend`` (its tiny backend, shared by the module),
``images`` (two different PIL images) and ``tokens`` (``backend.encode_image(images)``, [2, N, D]),
and a class that inherits :class:`BackendContractTests`, setting the class attributes below and, where
the backend supports offload, a ``fresh_backend`` fixture (a new backend, not the shared one).

The contract: the same seed gives the same image; no image tokens is plain generation, equal to
tokens at IP scale 0; tokens change images and each batch row follows its own row of tokens; bad
inputs fail before any work with an error naming the bad value and leave the backend as it was, as
does an error in the middle of a call; offload changes neither tokens nor images.
"""

from __future__ import annotations

import math
import re
from typing import Any, ClassVar

import numpy as np
import pytest
import torch

from img_guidance.backends.base import DiffusionBackend

SEED_RANGE = re.escape("must lie in [0, 2**63 - 1]")
IP_SCALE = "ip_scale must be a finite number >= 0, got"
GUIDANCE_SCALE = "guidance_scale must be a finite number >= 0, got"
BAD_INPUTS = (
    "no prompts",
    "a string for prompts",
    "fewer seeds",
    "negative seed",
    "seed past 2**63 - 1",
    "float seed",
    "token rows",
    "token width",
    "tokens not a tensor",
    "negative ip_scale",
    "infinite ip_scale",
    "nan ip_scale",
    "no steps",
    "negative guidance_scale",
    "nan guidance_scale",
    "bad height",
    "bad width",
)


def pixels(images) -> np.ndarray:
    """[B, H, W, 3] int16, so differences do not wrap around."""
    return np.stack([np.asarray(im, dtype=np.int16) for im in images])


class ForwardCounter:
    """Counts forward calls of modules while entered (hooks removed on exit)."""

    def __init__(self, modules: dict[str, torch.nn.Module]):
        self.modules = modules
        self.calls = dict.fromkeys(modules, 0)

    def __enter__(self) -> ForwardCounter:
        def counter(name):
            def hook(module, args):
                self.calls[name] += 1

            return hook

        self.handles = [m.register_forward_pre_hook(counter(n)) for n, m in self.modules.items()]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()


class BackendContractTests:
    """The contract tests; a subclass supplies only its family's parts."""

    prompts: tuple[str, str]  # two prompts the model draws
    sampling: ClassVar[dict[str, Any]]  # cheap sampling settings (few steps, small images)
    ip_scale: float  # an IP scale at which tokens visibly change the tiny model's images
    bad_side: int  # an image side the family refuses
    visible: int  # a larger largest pixel difference than this means "another image"
    row_tolerance: int  # largest pixel difference of a batch row from the same row generated alone
    # largest pixel difference that offload may make (float sums over weights allocated elsewhere
    # round differently); None: the backend does not offload
    offload_tolerance: int | None = 0

    def denoiser(self, backend: DiffusionBackend) -> torch.nn.Module:
        """The UNet or transformer: it runs at every step."""
        raise NotImplementedError

    def text_encoder(self, backend: DiffusionBackend) -> torch.nn.Module:
        """A text encoder: it runs first in a call."""
        raise NotImplementedError

    def side(self, backend: DiffusionBackend) -> int:
        return self.sampling.get("height", backend.defaults.height)

    @classmethod
    def generate(cls, backend: DiffusionBackend, prompts, seeds, **kwargs) -> np.ndarray:
        """Pixels of ``backend.generate`` with the class's cheap sampling settings."""
        return pixels(backend.generate(list(prompts), seeds, **{**cls.sampling, **kwargs}))

    def assert_other_image(self, a: np.ndarray, b: np.ndarray) -> None:
        assert np.abs(a - b).max() > self.visible

    @pytest.fixture(scope="class")
    @classmethod
    def reference(cls, backend, tokens) -> np.ndarray:
        """Prompt 0 on token row 0 at ``ip_scale``, from the untouched backend: the image that tests
        which might disturb the backend compare against afterwards."""
        return cls.generate(backend, cls.prompts[:1], [1], image_tokens=tokens[:1], ip_scale=cls.ip_scale)

    # ------------------------------------------------------------------------------------ seeds
    def test_same_seed_same_image(self, backend):
        same = [self.prompts[0]] * 2
        first = self.generate(backend, same, [3, 4])
        side = self.side(backend)
        assert first.shape == (2, side, side, 3)
        np.testing.assert_array_equal(self.generate(backend, same, [3, 4]), first)
        self.assert_other_image(first[0], first[1])  # the seed matters
        other = self.generate(backend, same, [5, 4])
        self.assert_other_image(other[0], first[0])
        np.testing.assert_array_equal(other[1], first[1])  # sample 1 kept its seed

    # ----------------------------------------------------------------------------- image tokens
    def test_without_tokens_equals_tokens_at_scale_zero(self, backend, tokens):
        plain = self.generate(backend, self.prompts, [7, 8])
        at_zero = self.generate(backend, self.prompts, [7, 8], image_tokens=tokens, ip_scale=0.0)
        np.testing.assert_array_equal(at_zero, plain)

    def test_tokens_change_images(self, backend, tokens):
        prompt = self.prompts[:1]
        plain = self.generate(backend, prompt, [1])
        with_a = self.generate(backend, prompt, [1], image_tokens=tokens[:1], ip_scale=self.ip_scale)
        with_b = self.generate(backend, prompt, [1], image_tokens=tokens[1:], ip_scale=self.ip_scale)
        stronger = self.generate(backend, prompt, [1], image_tokens=tokens[:1], ip_scale=3 * self.ip_scale)
        self.assert_other_image(with_a, plain)
        self.assert_other_image(with_a, with_b)
        self.assert_other_image(stronger, with_a)

    def test_each_row_uses_its_own_tokens(self, backend, tokens):
        scale = self.ip_scale
        batch = self.generate(backend, self.prompts, [1, 2], image_tokens=tokens, ip_scale=scale)
        alone = np.concatenate(
            [
                self.generate(backend, self.prompts[:1], [1], image_tokens=tokens[:1], ip_scale=scale),
                self.generate(backend, self.prompts[1:], [2], image_tokens=tokens[1:], ip_scale=scale),
            ]
        )
        assert np.abs(batch - alone).max() <= self.row_tolerance
        # the same prompt and seed in both rows: only the tokens tell them apart
        same = [self.prompts[0]] * 2
        forward = self.generate(backend, same, [9, 9], image_tokens=tokens, ip_scale=scale)
        swapped = self.generate(backend, same, [9, 9], image_tokens=tokens.flip(0), ip_scale=scale)
        self.assert_other_image(forward[0], forward[1])
        assert np.abs(forward - swapped[::-1]).max() <= self.row_tolerance

    # ---------------------------------------------------------------------------------- offload
    def test_offload_changes_neither_tokens_nor_images(self, request, images):
        if self.offload_tolerance is None:
            pytest.skip("this backend keeps its weights where they are: nothing to offload")
        backend = request.getfixturevalue("fresh_backend")
        tokens = backend.encode_image(images)
        negative = backend.negative_image_tokens()
        kwargs = dict(image_tokens=tokens, ip_scale=self.ip_scale)
        expected = self.generate(backend, self.prompts, [1, 2], **kwargs)
        expected_plain = self.generate(backend, self.prompts, [1, 2])
        backend.set_offload("model", "cpu")  # no accelerator here: the hooks still run, onto the CPU
        assert hasattr(self.denoiser(backend), "_hf_hook")
        torch.testing.assert_close(backend.encode_image(images), tokens)
        torch.testing.assert_close(backend.negative_image_tokens(), negative)
        for got, want in (
            (self.generate(backend, self.prompts, [1, 2], **kwargs), expected),
            (self.generate(backend, self.prompts, [1, 2]), expected_plain),
        ):
            difference = np.abs(got - want)
            assert difference.max() <= self.offload_tolerance and (difference > 0).mean() < 0.01
        backend.set_offload("none", "cpu")
        assert not hasattr(self.denoiser(backend), "_hf_hook")
        assert backend.device == torch.device("cpu")

    def test_a_bad_offload_mode_is_named(self, backend):
        with pytest.raises(
            ValueError, match="unknown offload mode 'disk'; valid modes: none, model, sequential"
        ):
            backend.set_offload("disk", "cpu")

    # ------------------------------------------------------------------------------- bad inputs
    def bad_input(self, case: str, family: str, tokens: torch.Tensor) -> tuple[Any, list, dict, type, str]:
        """(prompts, seeds, keyword arguments, error, pattern naming the bad value) of ``case``."""
        n, d = tokens.shape[1:]
        on_tokens = {"image_tokens": tokens, "ip_scale": self.ip_scale}  # what the token cases change

        def bad(pattern, *, error=ValueError, prompts=self.prompts, seeds=(1, 2), **kwargs):
            return prompts if isinstance(prompts, str) else list(prompts), list(seeds), kwargs, error, pattern

        def shape(*got: int) -> str:
            return re.escape(f"= {[2, n, d]} for the {family} backend, got {list(got)}")

        cases = {
            "no prompts": bad("at least one prompt, got none", prompts=[], seeds=[]),
            "a string for prompts": bad(
                re.escape(repr(self.prompts[0])), error=TypeError, prompts=self.prompts[0]
            ),
            "fewer seeds": bad("got 2 prompts and 1 seeds", seeds=[1]),
            "negative seed": bad(f"seed 1 {SEED_RANGE}, got -1$", seeds=[1, -1]),
            "seed past 2**63 - 1": bad(f"seed 0 {SEED_RANGE}, got {2**63}$", seeds=[2**63, 1]),
            "float seed": bad("seed 0 must be an integer, got 1.5", error=TypeError, seeds=[1.5, 2]),
            "token rows": bad(shape(1, n, d), **{**on_tokens, "image_tokens": tokens[:1]}),
            "token width": bad(shape(2, n, d // 2), **{**on_tokens, "image_tokens": tokens[..., : d // 2]}),
            "tokens not a tensor": bad(
                "image_tokens must be a tensor, got list",
                error=TypeError,
                **{**on_tokens, "image_tokens": tokens.tolist()},
            ),
            "negative ip_scale": bad(f"{IP_SCALE} -0.1$", **{**on_tokens, "ip_scale": -0.1}),
            "infinite ip_scale": bad(f"{IP_SCALE} inf$", **{**on_tokens, "ip_scale": math.inf}),
            "nan ip_scale": bad(f"{IP_SCALE} nan$", **{**on_tokens, "ip_scale": math.nan}),
            "no steps": bad("steps must be >= 1, got 0", steps=0),
            "negative guidance_scale": bad(f"{GUIDANCE_SCALE} -1.0$", guidance_scale=-1.0),
            "nan guidance_scale": bad(f"{GUIDANCE_SCALE} nan$", guidance_scale=math.nan),
            "bad height": bad(f"got height={self.bad_side}$", height=self.bad_side),
            "bad width": bad(f"got width={self.bad_side}$", width=self.bad_side),
        }
        assert tuple(cases) == BAD_INPUTS  # each one is tested
        return cases[case]

    @pytest.mark.parametrize("case", BAD_INPUTS)
    def test_a_bad_input_fails_before_any_work_and_changes_nothing(self, backend, tokens, reference, case):
        prompts, seeds, kwargs, error, pattern = self.bad_input(case, backend.family, tokens)
        work = {"denoiser": self.denoiser(backend), "text_encoder": self.text_encoder(backend)}
        with ForwardCounter(work) as counter, pytest.raises(error, match=pattern):
            backend.generate(prompts, seeds, **{**self.sampling, **kwargs})
        assert counter.calls == {"denoiser": 0, "text_encoder": 0}
        again = self.generate(backend, self.prompts[:1], [1], image_tokens=tokens[:1], ip_scale=self.ip_scale)
        np.testing.assert_array_equal(again, reference)

    def test_an_error_mid_call_leaves_the_backend_as_it_was(self, backend, tokens, reference):
        plain = self.generate(backend, self.prompts[:1], [1])

        def broken(module, args):
            raise RuntimeError("the denoiser failed")

        handle = self.denoiser(backend).register_forward_pre_hook(broken)
        try:
            for kwargs in ({"image_tokens": tokens[:1], "ip_scale": self.ip_scale}, {}):
                with pytest.raises(RuntimeError, match="the denoiser failed"):
                    self.generate(backend, self.prompts[:1], [1], **kwargs)
        finally:
            handle.remove()
        again = self.generate(backend, self.prompts[:1], [1], image_tokens=tokens[:1], ip_scale=self.ip_scale)
        np.testing.assert_array_equal(again, reference)
        np.testing.assert_array_equal(self.generate(backend, self.prompts[:1], [1]), plain)
