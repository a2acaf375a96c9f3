"""The IMG loop: generate, guide, encode, align, re-generate (and again, for several rounds).

``IMGPipeline`` composes three parts that know nothing of each other: a diffusion backend
(:class:`~img_guidance.backends.base.DiffusionBackend`), a guidance model
(:class:`~img_guidance.guidance.base.GuidanceModel`) and an :class:`~img_guidance.ImplicitAligner`.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from img_guidance.aligner import ImplicitAligner

if TYPE_CHECKING:
    from PIL.Image import Image

    from img_guidance.backends.base import DiffusionBackend, OffloadMode
    from img_guidance.guidance.base import GuidanceModel

STAGES = ("generate", "guide", "encode", "align", "regenerate")


@dataclass
class RoundOutput:
    """One round: the images that went in, the question asked of each, what came out."""

    inputs: list[Image]
    calibrated: list[Image]
    questions: list[str]
    seconds: dict[str, float]


@dataclass
class IMGOutput:
    """Everything a call made. ``initial`` are the base model's images, ``calibrated`` the last
    round's; ``rounds[r].calibrated`` are round r's. ``metadata`` has one dict per prompt."""

    prompts: list[str]
    seeds: list[int]
    initial: list[Image]
    rounds: list[RoundOutput]
    metadata: list[dict[str, Any]] = field(default_factory=list)

    @property
    def calibrated(self) -> list[Image]:
        return self.rounds[-1].calibrated if self.rounds else self.initial


def check_dimensions(backend: DiffusionBackend, guidance: GuidanceModel, aligner: ImplicitAligner) -> None:
    """Fail before any generation when the three parts do not fit together."""
    cfg = aligner.config
    num_tokens, image_dim = backend.token_shape
    if cfg.image_dim != image_dim:
        raise ValueError(
            f"aligner expects image tokens of width {cfg.image_dim} but the {backend.family} backend "
            f"makes {num_tokens} tokens of width {image_dim}"
        )
    if cfg.guidance_dim != guidance.hidden_size:
        raise ValueError(
            f"aligner expects guidance of width {cfg.guidance_dim} but the guidance model's hidden size "
            f"is {guidance.hidden_size}"
        )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(device: torch.device) -> dict[str, Any]:
    """Peak memory so far: CUDA allocated bytes on a GPU, else the process's peak resident set."""
    if device.type == "cuda":
        return {"peak_memory_bytes": torch.cuda.max_memory_allocated(device), "memory_kind": "cuda_allocated"}
    return {
        "peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "memory_kind": "cpu_peak_rss",
    }


class IMGPipeline:
    """Implicit Multimodal Guidance around a text-to-image backend.

    Args:
        backend: the diffusion model with its IP-Adapter.
        guidance: the MLLM whose hidden states guide the aligner.
        aligner: the Implicit Aligner; its dims must match the other two (checked here).
        questions: question templates (each with ``{prompt}``); the project's 100 by default.

    Offloading is a property of the parts (``backend.set_offload``, ``guidance.set_offload``);
    :meth:`from_pretrained` sets it up for all of them.
    """

    def __init__(
        self,
        *,
        backend: DiffusionBackend,
        guidance: GuidanceModel,
        aligner: ImplicitAligner,
        questions: Sequence[str] | None = None,
    ):
        from img_guidance.guidance.questions import QUESTIONS

        check_dimensions(backend, guidance, aligner)
        self.backend = backend
        self.guidance = guidance
        self.aligner = aligner.eval()
        self.questions = tuple(questions) if questions is not None else QUESTIONS
        if not self.questions:
            raise ValueError("the question list is empty")

    @classmethod
    def from_pretrained(
        cls,
        model: str = "sdxl",
        *,
        mllm: str | None = None,
        aligner: str | None = None,
        unet: str | None = None,
        ip_adapter: str | None = None,
        image_encoder: str | None = None,
        prompt_format: str | None = None,
        questions: str | Sequence[str] | None = None,
        torch_dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        offload: OffloadMode = "none",
        mllm_quantization: str | None = None,
    ) -> IMGPipeline:
        """Build the pipeline from locations: ``model`` is a preset (``sdxl``, ``sdxl-dpo``,
        ``flux``) or a diffusers pipeline folder / hub id; every component can be overridden.

        ``aligner`` defaults to the preset's released aligner; ``mllm`` to the preset's guidance
        model, else the authors' finetuned detector (see :func:`img_guidance.guidance.load_guidance`).
        ``questions`` is a JSON file of templates or a list. The aligner is loaded first, so a
        dimension mismatch that the presets already reveal is reported before the large models load.
        """
        from img_guidance.aligner import load_aligner
        from img_guidance.backends import check_offload, load_backend
        from img_guidance.guidance import default_mllm, load_guidance
        from img_guidance.guidance.questions import load_questions
        from img_guidance.hub import is_local
        from img_guidance.presets import BACKEND_PRESETS, GUIDANCE_PRESETS

        check_offload(offload)
        if aligner is None:
            if model not in BACKEND_PRESETS or is_local(model):
                raise ValueError(
                    f"no released aligner is known for {model!r}: pass one (a file, folder or hub id); "
                    f"presets with aligners: {', '.join(BACKEND_PRESETS)}"
                )
            aligner = BACKEND_PRESETS[model].aligner
        if isinstance(questions, str | os.PathLike):
            questions = load_questions(questions)
        mllm = mllm or default_mllm(model)
        aligner_model = load_aligner(aligner, torch_dtype=torch_dtype, device=device)
        guidance_preset = GUIDANCE_PRESETS.get(os.fspath(mllm))
        if guidance_preset and guidance_preset.hidden_size != aligner_model.config.guidance_dim:
            raise ValueError(
                f"aligner expects guidance of width {aligner_model.config.guidance_dim} but the guidance "
                f"model {mllm!r} has hidden size {guidance_preset.hidden_size}"
            )
        backend = load_backend(
            model,
            unet=unet,
            ip_adapter=ip_adapter,
            image_encoder=image_encoder,
            torch_dtype=torch_dtype,
            device=device,
            offload=offload,
        )
        # A quantized MLLM cannot move between devices: it stays where it was loaded.
        offload_mllm = offload != "none" and mllm_quantization is None
        guidance = load_guidance(
            mllm,
            prompt_format=prompt_format,
            torch_dtype=torch_dtype,
            device="cpu" if offload_mllm else device,
            quantization=mllm_quantization,
        )
        if offload_mllm:
            guidance.set_offload(offload, backend.device)
        return cls(backend=backend, guidance=guidance, aligner=aligner_model, questions=questions)

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.backend.describe(),
            "guidance": self.guidance.describe(),
            "aligner": self.aligner.config.to_dict(),
        }

    def _timed(self, seconds: dict[str, float], stage: str, fn, *args, **kwargs):
        device = self.backend.device
        _sync(device)
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        _sync(device)
        seconds[stage] = seconds.get(stage, 0.0) + time.perf_counter() - start
        return result

    @torch.no_grad()
    def __call__(
        self,
        prompts: str | Sequence[str],
        seeds: int | Sequence[int] = 0,
        *,
        rounds: int = 1,
        passes: int = 3,
        ip_scale: float | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        initial_images: Sequence[Image] | None = None,
    ) -> IMGOutput:
        """Run IMG on a batch of prompts.

        Args:
            prompts: one prompt or a list (one image each).
            seeds: one seed per prompt, or one int for every prompt. The same prompt and seed give
                the same initial image, question and calibrated image.
            rounds: how many times to calibrate; round r>0 starts from round r-1's calibrated image.
            passes: recurrent aligner passes (the paper: 3).
            ip_scale: IP-Adapter scale of the re-generation (default: the backend's; the paper: 0.2).
            steps, guidance_scale, height, width: sampling settings (the backend's defaults if None).
            initial_images: start from these images instead of generating them (one per prompt).
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("no prompts given")
        bad = [p for p in prompts if not isinstance(p, str) or not p.strip()]
        if bad:
            raise ValueError(f"every prompt must be a non-empty string, got {bad[:3]!r}")
        if isinstance(seeds, int) and not isinstance(seeds, bool):
            seeds = [seeds] * len(prompts)
        seeds = list(seeds)
        if len(seeds) != len(prompts) or not all(
            isinstance(s, int) and not isinstance(s, bool) for s in seeds
        ):
            raise ValueError(f"need one integer seed per prompt: {len(prompts)} prompts, seeds {seeds!r}")
        if not isinstance(rounds, int) or rounds < 1:
            raise ValueError(f"rounds must be a positive integer, got {rounds!r}")
        if not isinstance(passes, int) or passes < 0:
            raise ValueError(f"passes must be a non-negative integer, got {passes!r}")
        if ip_scale is None:
            ip_scale = self.backend.defaults.ip_scale
        if not ip_scale >= 0:
            raise ValueError(f"ip_scale must be >= 0, got {ip_scale!r}")
        if initial_images is not None and len(initial_images) != len(prompts):
            raise ValueError(f"{len(initial_images)} initial images for {len(prompts)} prompts")
        from img_guidance.guidance.questions import choose_question, fill

        sampling = dict(steps=steps, guidance_scale=guidance_scale, height=height, width=width)
        device = self.backend.device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

        first_seconds: dict[str, float] = {}
        if initial_images is None:
            images = self._timed(first_seconds, "generate", self.backend.generate, prompts, seeds, **sampling)
        else:
            images = list(initial_images)
        initial = images
        aligner_param = next(self.aligner.parameters())
        round_outputs = []
        for r in range(rounds):
            inputs = images
            seconds = first_seconds if r == 0 else {}
            questions = [
                fill(choose_question(seed, index=r, questions=self.questions), prompt)
                for prompt, seed in zip(prompts, seeds, strict=True)
            ]
            guided = self._timed(seconds, "guide", self.guidance.guide, images, questions)
            tokens = self._timed(seconds, "encode", self.backend.encode_image, images)
            aligned = self._timed(
                seconds,
                "align",
                self.aligner.align,
                guided.hidden_states.to(aligner_param.device),
                tokens.to(aligner_param.device),
                passes,
                guided.attention_mask.to(aligner_param.device),
            )
            images = self._timed(
                seconds,
                "regenerate",
                self.backend.generate,
                prompts,
                seeds,
                image_tokens=aligned.to(device=tokens.device, dtype=tokens.dtype),
                ip_scale=ip_scale,
                **sampling,
            )
            round_outputs.append(
                RoundOutput(inputs=inputs, calibrated=images, questions=questions, seconds=seconds)
            )

        memory = peak_memory(device)
        models = self.describe()
        metadata = []
        for i, (prompt, seed) in enumerate(zip(prompts, seeds, strict=True)):
            metadata.append(
                {
                    "prompt": prompt,
                    "seed": seed,
                    "questions": [out.questions[i] for out in round_outputs],
                    "rounds": rounds,
                    "passes": passes,
                    "ip_scale": ip_scale,
                    "sampling": {k: v for k, v in sampling.items() if v is not None},
                    "seconds_per_round": [out.seconds for out in round_outputs],
                    "batch_size": len(prompts),
                    "models": models,
                    **memory,
                }
            )
        return IMGOutput(
            prompts=prompts, seeds=seeds, initial=initial, rounds=round_outputs, metadata=metadata
        )
