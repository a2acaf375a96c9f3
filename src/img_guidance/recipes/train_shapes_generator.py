"""Training the world's text-to-image model and its image-prompt adapter, on a CPU.

Two methods, seeded and deterministic on the CPU (:func:`train_generator`). "joint"
(:func:`train_joint`): a spatial adapter (one token per cell of the image encoder's 4 x 4 map) and
coordinate channels; after the encoder's pretraining (2a below), everything trains together from
step 1 on plain v-MSE, each row text only, text + image, image only or neither; the image a row
encodes is its own target, jittered and degraded. It is the shipped models' method (through
``shapes train-all``, 5000 steps), because the two-stage method's adapter does not steer
(docs/shapes-adapter.md). "two-stage", the method of the models shipped before 2026-12-05, in two
flat stages:

1. **Base generator.** The text encoder and the UNet learn v-prediction (cosine schedule, Min-SNR-5
   weighting) on fresh renders of scenes drawn from the training split, a category uniformly and then
   a scene, with 10% of prompts dropped to "" for classifier-free guidance. EMA weights are kept.
2. **Image-prompt adapter.** (a) The image encoder is pretrained, as IP-Adapter starts from a
   pretrained CLIP: a linear head on its embedding learns which colour-shape kind lies in which cell
   of a 4 x 4 grid, on degraded renders (:func:`pretrain_image_encoder`; without it, 600 adapter
   steps left the tokens nearly uninformative and re-generation from them worse than none). (b) The
   UNet, the text encoder and the image encoder are frozen; the ``ImageProjection`` and the IP
   processors' ``to_k_ip`` / ``to_v_ip`` learn denoising with image tokens added (IP scale 1),
   IP-Adapter style. The encoded image is never the target's pixels: half
   the time the target's objects each moved by up to 1.5 px, else another render of its scene (another
   layout); then blurred and noised like a generated image. 50% of prompts and 30% of images are
   dropped (a dropped image: the tokens of the empty background image, the negative tokens of
   guidance). Where the prompt is dropped and the image kept, the frozen base model's prediction
   GIVEN the prompt is a second target (:func:`adapter_loss`): a noise-free signal for what the tokens
   must say. With the denoising loss alone (IP-Adapter's recipe, which needs ~1M steps on CLIP
   features), 600 steps left the tokens of all images nearly equal and the adapter without effect.

The base model is meant to follow prompts imperfectly, as real models do. Its difficulty is shaped by
the split (:func:`split_scenes`): two colour-shape kinds never appear in two-group scenes during
training (they do appear alone and in single-group counts), so attribute binding, counting and
relations with them are unseen combinations; of the other combinations 10% are held out for
validation and 10% for test. And by the budget: a 2.5M-parameter UNet, 3000 base steps of batch 32
(AdamW at 1e-3 with warm-up and cosine decay; bfloat16 autocast where the CPU computes it
natively, AVX512-BF16 / AMX, where it is 1.7x faster, float32 elsewhere: see
:mod:`img_guidance.precision`), 1000 encoder steps of batch 64 and 1000 adapter steps of batch 32:
about 35 minutes on two free cores of an AMX machine in bf16. The adapter's images span the
whole world by default (``adapter_scenes="all"``): like a real IP-Adapter it has seen images of
everything, and the held-out split tests the text pathway.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from img_guidance.precision import resolve_mixed_precision
from img_guidance.shapes.grammar import (
    COLOURS,
    SHAPES,
    SceneSpec,
    all_scenes,
    describe,
)
from img_guidance.shapes.judge import judge_many
from img_guidance.shapes.models import (
    GUIDANCE_SCALE,
    IMAGE_SIZE,
    SAMPLING_STEPS,
    ShapesWorldPipeline,
    background_image,
    ip_processors,
    to_pixels,
)
from img_guidance.shapes.render import PlacedObject, degrade, draw, render, render_with_layout
from img_guidance.shapes.splits import by_category, held_out_kinds, sample_scenes, split_scenes

DEFAULT_STEPS_BASE = 3000
DEFAULT_STEPS_ENCODER = 1000
DEFAULT_STEPS_ADAPTER = 1000
DEFAULT_BATCH_SIZE = 32
TEXT_DROPOUT = 0.1  # stage 1: the unconditional model for classifier-free guidance
ADAPTER_TEXT_DROPOUT = 0.5  # stage 2: the tokens alone must often say what the scene is
IMAGE_DROPOUT = 0.3
SNR_GAMMA = 5.0  # stage 1: Min-SNR-5; with plain v-MSE, 600 steps gave smeared colours
# stage 2: plain v-MSE. What the tokens add (which objects) is decided at high noise, where Min-SNR
# weighs the loss by ~SNR
ADAPTER_SNR_GAMMA = None
# the joint method: each row is text only, text + image, image only or neither, with these chances
JOINT_CONDITIONS = (0.4, 0.3, 0.2, 0.1)
# plain v-MSE: Min-SNR gives the high-noise steps, where a scene's layout is decided, almost no weight
# (docs/shapes-adapter.md, section 5)
JOINT_SNR_GAMMA = None
METHODS = ("two-stage", "joint")


# ---------------------------------------------------------------------------------------------
# scenes


def render_scenes(
    scenes: Sequence[SceneSpec], rng: np.random.Generator
) -> tuple[list[Image.Image], list[list[PlacedObject]]]:
    """A fresh render of each scene (layouts drawn from ``rng``), and where its objects went."""
    images, layouts = [], []
    for spec in scenes:
        image, objects = render_with_layout(spec, seed=rng)
        images.append(image)
        layouts.append(objects)
    return images, layouts


def like_generated(
    image: Image.Image, rng: np.random.Generator, *, noise: float = 12.0, blur: float = 0.8
) -> Image.Image:
    """``image`` blurred and noised by up to ``blur`` px and ``noise``, as generated images are: what
    the adapter's image encoder sees in training."""
    return degrade(image, rng=rng, noise=float(rng.uniform(0, noise)), blur=float(rng.uniform(0, blur)))


def oracle_render(spec: SceneSpec, seed: int) -> Image.Image:
    """A correct render of ``spec`` for generation ``seed`` whose layout is not the generation's own
    (render seed ``10_000 + seed``): the source of the oracle tokens that test the adapter."""
    return render(spec, seed=10_000 + int(seed))


def reference_images(
    scenes: Sequence[SceneSpec],
    layouts: Sequence[list[PlacedObject]],
    rng: np.random.Generator,
    *,
    same_layout: float = 0.5,
    jitter: float = 1.5,
    noise: float = 12.0,
    blur: float = 0.8,
) -> list[Image.Image]:
    """The images the adapter encodes in stage 2, one per target: with probability ``same_layout`` the
    target's own objects each moved by up to ``jitter`` px, else a fresh render of its scene (another
    layout); then blurred and noised by up to ``blur`` px and ``noise`` (as generated images are)."""
    images = []
    for spec, objects in zip(scenes, layouts, strict=True):
        if rng.random() < same_layout:
            shifts = rng.uniform(-jitter, jitter, size=(len(objects), 2))
            moved = [
                replace(o, cx=o.cx + dx, cy=o.cy + dy) for o, (dx, dy) in zip(objects, shifts, strict=True)
            ]
            image = draw(moved)
        else:
            image = render(spec, seed=rng)
        images.append(like_generated(image, rng, noise=noise, blur=blur))
    return images


# ---------------------------------------------------------------------------------------------
# the objective


def diffusion_inputs(
    scheduler: Any, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(noisy sample, v target, SNR per sample [B]) of clean samples [B, C, H, W] at ``timesteps`` [B]."""
    alphas = scheduler.alphas_cumprod.to(clean.device)[timesteps]  # [B]
    noisy = scheduler.add_noise(clean, noise, timesteps)
    target = scheduler.get_velocity(clean, noise, timesteps)
    return noisy, target, alphas / (1 - alphas)


def diffusion_loss(
    prediction: torch.Tensor, target: torch.Tensor, snr: torch.Tensor, *, snr_gamma: float | None
) -> torch.Tensor:
    """Min-SNR-gamma weighted MSE of a v-prediction: the mean over samples of
    ``mean((prediction - target)^2) * min(snr, gamma) / (snr + 1)`` (Hang et al., 2023; for v the
    weight is divided by snr + 1); plain MSE with ``snr_gamma=None``. prediction, target [B, ...],
    snr [B] -> a scalar."""
    per_sample = (prediction.float() - target.float()).pow(2).flatten(1).mean(1)  # [B]
    if snr_gamma is None:
        return per_sample.mean()
    weight = snr.clamp(max=snr_gamma) / (snr + 1)
    return (weight * per_sample).mean()


def denoising_loss(
    pipe: ShapesWorldPipeline,
    pixels: torch.Tensor,
    prompts: Sequence[str],
    generator: torch.Generator,
    *,
    image_tokens: torch.Tensor | None = None,
    snr_gamma: float | None = SNR_GAMMA,
) -> torch.Tensor:
    """The training loss on clean images [B, 3, 32, 32] with their prompts (and image tokens for the
    adapter stage): noise and timesteps drawn from ``generator``, one UNet pass."""
    batch = pixels.shape[0]
    noise = torch.randn(pixels.shape, generator=generator)
    timesteps = torch.randint(0, pipe.scheduler.config.num_train_timesteps, (batch,), generator=generator)
    noisy, target, snr = diffusion_inputs(pipe.scheduler, pixels, noise, timesteps)
    text, mask = pipe.encode_prompts(prompts)
    prediction = pipe.denoise(noisy, timesteps, text, mask, image_tokens)
    return diffusion_loss(prediction, target, snr, snr_gamma=snr_gamma)


def adapter_loss(
    pipe: ShapesWorldPipeline,
    pixels: torch.Tensor,
    prompts: Sequence[str],
    full_prompts: Sequence[str],
    image_tokens: torch.Tensor,
    keep: torch.Tensor,
    generator: torch.Generator,
) -> torch.Tensor:
    """Stage 2's loss: plain v-MSE to the truth, plus, where the prompt was dropped and the image kept,
    v-MSE to the base model's own prediction given the full prompt (no adapter): a noise-free target
    for what the tokens must say, so that the adapter learns in hundreds of steps, not 100k. Inputs as
    :func:`denoising_loss`; ``full_prompts`` the prompts before dropping, ``keep`` [B] bool."""
    batch = pixels.shape[0]
    noise = torch.randn(pixels.shape, generator=generator)
    timesteps = torch.randint(0, pipe.scheduler.config.num_train_timesteps, (batch,), generator=generator)
    noisy, target, snr = diffusion_inputs(pipe.scheduler, pixels, noise, timesteps)
    text, mask = pipe.encode_prompts(prompts)
    prediction = pipe.denoise(noisy, timesteps, text, mask, image_tokens)
    loss = diffusion_loss(prediction, target, snr, snr_gamma=ADAPTER_SNR_GAMMA)
    taught = keep & torch.tensor([p == "" for p in prompts])
    if taught.any():
        rows = taught.nonzero()[:, 0]
        scales = [p.scale for p in ip_processors(pipe.unet)]
        pipe.set_ip_scale(0.0)  # the teacher is the base model
        with torch.no_grad():
            teacher_text, teacher_mask = pipe.encode_prompts([full_prompts[i] for i in rows.tolist()])
            teacher = pipe.denoise(
                noisy[rows], timesteps[rows], teacher_text, teacher_mask, image_tokens[rows]
            )
        for processor, scale in zip(ip_processors(pipe.unet), scales, strict=True):
            processor.scale = scale
        loss = loss + diffusion_loss(prediction[rows], teacher, snr[rows], snr_gamma=ADAPTER_SNR_GAMMA)
    return loss


def adapter_tokens(pipe: ShapesWorldPipeline, references: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Image tokens for the adapter stage: those of ``references`` [B, 3, 32, 32] where ``keep`` [B]
    is True, else the negative tokens (of the empty background image) -> [B, N, 64]."""
    tokens = pipe.image_tokens(references)  # [B, N, D]
    negative = pipe.image_tokens(to_pixels([background_image()]))  # [1, N, D]
    return torch.where(keep[:, None, None], tokens, negative)


def _drop(prompts: Sequence[SceneSpec], rng: np.random.Generator, p: float) -> list[str]:
    return [describe(s) if rng.random() >= p else "" for s in prompts]


# ---------------------------------------------------------------------------------------------
# the image encoder's pretraining (the world's stand-in for CLIP)

ENCODER_GRID = 4  # the encoder learns which colour-shape kind lies in which cell of a 4 x 4 grid


def scene_targets(layouts: Sequence[Sequence[PlacedObject]], *, grid: int = ENCODER_GRID) -> torch.Tensor:
    """What the image encoder learns to tell, per image: for every (colour, shape) kind and every cell
    of a ``grid`` x ``grid`` grid, 1 where an object of that kind has its centre in that cell ->
    [B, kinds * grid * grid] float (kinds in ``COLOURS`` x ``SHAPES`` order)."""
    kinds = {(c, s): i for i, (c, s) in enumerate((c, s) for c in COLOURS for s in SHAPES)}
    target = torch.zeros(len(layouts), len(kinds), grid, grid)
    for row, objects in enumerate(layouts):
        for o in objects:
            x = min(grid - 1, max(0, int(o.cx * grid / IMAGE_SIZE)))
            y = min(grid - 1, max(0, int(o.cy * grid / IMAGE_SIZE)))
            target[row, kinds[(o.colour, o.shape)], y, x] = 1.0
    return target.flatten(1)


def pretrain_image_encoder(
    pipe: ShapesWorldPipeline,
    scenes: Sequence[SceneSpec],
    *,
    steps: int,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    log: Callable[[str], None] = print,
    log_every: int = 100,
) -> dict[str, Any]:
    """Stage 2a: pretrain the adapter's image encoder, as IP-Adapter starts from a pretrained CLIP image
    encoder: a linear head on its embedding learns :func:`scene_targets` (which kind lies where) of
    renders of ``scenes``, blurred and noised like generated images (binary cross-entropy). The head
    is discarded. Returns {"seconds", "loss" (mean of the last tenth of steps), "losses", "cell_accuracy"
    (of the last tenth: the fraction of (kind, cell) entries predicted right)}."""
    if not pipe.has_adapter:
        raise ValueError("pretraining the image encoder needs the adapter's encoder; add one first")
    encoder = pipe.image_encoder
    outputs = len(COLOURS) * len(SHAPES) * ENCODER_GRID**2
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = torch.nn.Linear(encoder.config.embed_dim, outputs)
    encoder.train().requires_grad_(True)
    params = [*encoder.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng = np.random.default_rng([seed, 0xE1C])
    pool = by_category(scenes)
    losses: list[float] = []
    accuracies: list[float] = []
    start = time.perf_counter()
    for step in range(1, steps + 1):
        specs = sample_scenes(pool, rng, batch_size)
        images, layouts = render_scenes(specs, rng)
        images = [like_generated(im, rng) for im in images]
        target = scene_targets(layouts)
        logits = head(encoder(to_pixels(images)))
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        accuracies.append(((logits.detach() > 0).float() == target).float().mean().item())
        if step % log_every == 0 or step == steps:
            recent = losses[-log_every:]
            log(
                f"[encoder] step {step}/{steps}  loss {sum(recent) / len(recent):.4f}  "
                f"{time.perf_counter() - start:.0f} s"
            )
    encoder.eval()
    tail = slice(-max(1, steps // 10), None)
    return {
        "seconds": time.perf_counter() - start,
        "loss": float(np.mean(losses[tail])) if losses else None,
        "losses": losses,
        "cell_accuracy": float(np.mean(accuracies[tail])) if accuracies else None,
    }


# ---------------------------------------------------------------------------------------------
# the two stages


def train_base(
    pipe: ShapesWorldPipeline,
    scenes: Sequence[SceneSpec],
    *,
    steps: int,
    batch_size: int = DEFAULT_BATCH_SIZE,
    lr: float = 1e-3,
    seed: int = 0,
    ema_decay: float = 0.999,
    log: Callable[[str], None] = print,
    log_every: int = 100,
    mixed_precision: str | None = None,
) -> dict[str, Any]:
    """Stage 1: train the text encoder and the UNet (no adapter) on renders of ``scenes``; the EMA
    weights are copied in at the end. Returns {"seconds", "loss" (mean of the last tenth of steps; None
    without steps), "losses" (per step)}."""
    if pipe.has_adapter:
        raise ValueError("stage 1 trains a base model; this pipeline already has an adapter")
    params = [p for m in (pipe.text_encoder, pipe.unet) for p in m.parameters()]
    return _train(
        pipe,
        "base",
        params,
        by_category(scenes),
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        ema_decay=ema_decay,
        log=log,
        log_every=log_every,
        mixed_precision=mixed_precision,
    )


def train_adapter(
    pipe: ShapesWorldPipeline,
    scenes: Sequence[SceneSpec],
    *,
    steps: int,
    batch_size: int = DEFAULT_BATCH_SIZE,
    lr: float = 1e-3,
    seed: int = 0,
    ema_decay: float = 0.999,
    log: Callable[[str], None] = print,
    log_every: int = 100,
    mixed_precision: str | None = None,
) -> dict[str, Any]:
    """Stage 2b: with the text encoder, the UNet's own weights and the (pretrained) image encoder
    frozen, train the projection and the IP processors' ``to_k_ip`` / ``to_v_ip`` (IP scale 1).
    Returns as :func:`train_base`."""
    if not pipe.has_adapter:
        raise ValueError("stage 2 trains the image-prompt adapter; add one first (add_ip_adapter)")
    pipe.text_encoder.requires_grad_(False)
    pipe.unet.requires_grad_(False)
    # the image encoder stays as pretrained (:func:`pretrain_image_encoder`), as IP-Adapter keeps CLIP
    pipe.image_encoder.requires_grad_(False)
    params = list(pipe.image_projection.parameters())
    for processor in ip_processors(pipe.unet):
        params += list(processor.parameters())
    for p in params:
        p.requires_grad_(True)
    pipe.set_ip_scale(1.0)
    try:
        return _train(
            pipe,
            "adapter",
            params,
            by_category(scenes),
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            seed=seed,
            ema_decay=ema_decay,
            log=log,
            log_every=log_every,
            mixed_precision=mixed_precision,
        )
    finally:
        pipe.set_ip_scale(0.0)


def train_joint(
    pipe: ShapesWorldPipeline,
    text_scenes: Sequence[SceneSpec],
    image_scenes: Sequence[SceneSpec],
    *,
    steps: int,
    batch_size: int = DEFAULT_BATCH_SIZE,
    lr: float = 1e-3,
    seed: int = 0,
    conditions: Sequence[float] = JOINT_CONDITIONS,
    ema_decay: float = 0.999,
    log: Callable[[str], None] = print,
    log_every: int = 100,
    mixed_precision: str | None = None,
) -> dict[str, Any]:
    """The joint method: the text encoder, the UNet with its IP processors, the projection and the
    (pretrained) image encoder learn together from step 1, on plain v-MSE. Each row is, with the
    chances ``conditions``: text only, text + image, image only, or neither; its scene comes from
    ``text_scenes`` where it has text, else from ``image_scenes``. A row's image is its own target,
    objects moved by up to 1.5 px, blurred and noised (the adapter learns to reproduce what it
    encodes); a dropped image is zero tokens, which add exactly nothing, so IP scale 0 is the
    text-only model. Returns as :func:`train_base`."""
    if not pipe.has_adapter:
        raise ValueError("the joint method trains the model with its adapter; add one first (add_ip_adapter)")
    if len(conditions) != 4 or min(conditions) < 0 or sum(conditions) <= 0:
        raise ValueError(f"conditions must be 4 chances >= 0 with a positive sum, got {list(conditions)}")
    params = [
        p
        for m in (pipe.text_encoder, pipe.unet, pipe.image_projection, pipe.image_encoder)
        for p in m.parameters()
    ]
    for p in params:
        p.requires_grad_(True)
    pipe.set_ip_scale(1.0)
    try:
        return _train(
            pipe,
            "joint",
            params,
            by_category(text_scenes),
            image_pool=by_category(image_scenes),
            conditions=np.asarray(conditions, dtype=float) / sum(conditions),
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            seed=seed,
            ema_decay=ema_decay,
            log=log,
            log_every=log_every,
            mixed_precision=mixed_precision,
        )
    finally:
        pipe.set_ip_scale(0.0)


def _train(
    pipe: ShapesWorldPipeline,
    stage: str,
    params: list[torch.nn.Parameter],
    pool: dict[str, list[SceneSpec]],
    *,
    image_pool: dict[str, list[SceneSpec]] | None = None,
    conditions: np.ndarray | None = None,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    ema_decay: float,
    log: Callable[[str], None],
    log_every: int,
    mixed_precision: str,
) -> dict[str, Any]:
    """The loop every stage shares: sample scenes, render, one denoising loss, AdamW with warmup and
    cosine decay, EMA of ``params``. The joint stage draws each row's condition from ``conditions``
    and its scene from ``pool`` (rows with text) or ``image_pool``."""
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from diffusers.training_utils import EMAModel

    mixed_precision = resolve_mixed_precision(mixed_precision, pipe.device)
    if steps < 0 or batch_size < 1:
        raise ValueError(f"steps must be >= 0 and batch_size >= 1, got {steps} and {batch_size}")
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = get_cosine_schedule_with_warmup(optimizer, min(100, steps // 10), max(steps, 1))
    # EMA warm-up (power 3/4): the decay grows to ema_decay over ~10k steps, so short runs average little
    ema = EMAModel(params, decay=ema_decay, use_ema_warmup=True, power=3 / 4)
    for module in pipe.modules().values():
        module.train()
    losses: list[float] = []
    start = last = time.perf_counter()
    for step in range(1, steps + 1):
        if stage == "joint":  # 0 text only, 1 text + image, 2 image only, 3 neither
            kinds = rng.choice(4, size=batch_size, p=conditions)
            specs = [sample_scenes(pool if k < 2 else image_pool, rng, 1)[0] for k in kinds]
        else:
            specs = sample_scenes(pool, rng, batch_size)
        images, layouts = render_scenes(specs, rng)
        pixels = to_pixels(images)
        if stage == "joint":
            prompts = [describe(s) if k < 2 else "" for s, k in zip(specs, kinds, strict=True)]
            references = to_pixels(reference_images(specs, layouts, rng, same_layout=1.0))
            keep = torch.from_numpy(np.isin(kinds, (1, 2)))
        else:
            prompts = _drop(specs, rng, TEXT_DROPOUT if stage == "base" else ADAPTER_TEXT_DROPOUT)
        if stage == "adapter":
            references = to_pixels(reference_images(specs, layouts, rng))
            keep = torch.from_numpy(rng.random(batch_size) >= IMAGE_DROPOUT)
        with torch.autocast(pipe.device.type, dtype=torch.bfloat16, enabled=mixed_precision == "bf16"):
            if stage == "base":
                loss = denoising_loss(pipe, pixels, prompts, generator)
            elif stage == "joint":
                tokens = pipe.image_tokens(references) * keep[:, None, None].to(pipe.dtype)  # dropped: 0
                loss = denoising_loss(
                    pipe, pixels, prompts, generator, image_tokens=tokens, snr_gamma=JOINT_SNR_GAMMA
                )
            else:
                tokens = adapter_tokens(pipe, references, keep)
                full = [describe(s) for s in specs]
                loss = adapter_loss(pipe, pixels, prompts, full, tokens, keep, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        ema.step(params)
        losses.append(loss.item())
        if step % log_every == 0 or step == steps:
            now = time.perf_counter()
            recent = losses[-log_every:]
            log(
                f"[{stage}] step {step}/{steps}  loss {sum(recent) / len(recent):.4f}  "
                f"lr {schedule.get_last_lr()[0]:.2e}  {now - start:.0f} s "
                f"({(now - last) / len(recent):.2f} s/step)"
            )
            last = now
    ema.copy_to(params)
    pipe.eval()
    tail = losses[-max(1, steps // 10) :]
    loss = sum(tail) / len(tail) if tail else None
    return {"seconds": time.perf_counter() - start, "loss": loss, "losses": losses}


def train_generator(
    output_dir: str | os.PathLike,
    *,
    seed: int = 0,
    steps_base: int = DEFAULT_STEPS_BASE,
    steps_encoder: int = DEFAULT_STEPS_ENCODER,
    steps_adapter: int = DEFAULT_STEPS_ADAPTER,
    batch_size: int = DEFAULT_BATCH_SIZE,
    lr_base: float = 1e-3,
    lr_adapter: float = 1e-3,
    adapter_scenes: str = "all",
    unet: dict[str, Any] | None = None,
    base_model: str | os.PathLike | None = None,
    mixed_precision: str | None = None,
    method: str = "two-stage",
    conditions: Sequence[float] = JOINT_CONDITIONS,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train the base generator, then its adapter, and save the model folder to ``output_dir`` (see
    :mod:`img_guidance.shapes.models`), with ``training.json`` (settings, split, timings, losses).

    ``method`` "two-stage" (the module docstring's stages 1 and 2: a global adapter on a frozen base)
    or "joint" (:func:`train_joint`: a spatial adapter, coordinate channels, and the whole model
    trained together for ``steps_base`` steps at ``lr_base`` on ``conditions``, after the encoder's
    pretraining; ``steps_adapter`` and ``base_model`` do not apply).

    ``adapter_scenes``: the scenes stage 2 renders, ``"all"`` (default) or ``"train"``. ``unet``
    overrides keys of :func:`~img_guidance.shapes.models.unet_config`. ``base_model``: a model folder
    whose base (text encoder, UNet) to start from instead of stage 1 (``steps_base`` and ``unet`` are
    then ignored; any adapter in it is not loaded). The defaults take about 25 minutes of one busy CPU
    core (less on two free ones). Returns {"seconds": {"base", "adapter", "total"}, "loss": {"base",
    "adapter"}, "folder"}.
    """
    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()):
        raise FileExistsError(f"{output_dir} exists and is not empty; give a new folder")
    if adapter_scenes not in ("all", "train"):
        raise ValueError(f"adapter_scenes must be 'all' or 'train', got {adapter_scenes!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if method == "joint" and base_model is not None:
        raise ValueError("the joint method trains the base with its adapter: base_model does not apply")
    joint = method == "joint"
    if joint:
        unet = {"coordinates": True, **(unet or {})}
    start = time.perf_counter()
    splits = split_scenes(seed)
    unseen = [f"{c} {s}" for c, s in held_out_kinds(seed)]
    log(
        f"scenes: {len(splits['train'])} train, {len(splits['validation'])} validation, "
        f"{len(splits['test'])} test; never in two-group training scenes: {', '.join(unseen)}"
    )
    if base_model is None:
        pipe = ShapesWorldPipeline.build(seed=seed, unet=unet)
    else:
        pipe = ShapesWorldPipeline.from_pretrained(base_model, adapter=False)
    log(f"base model: UNet {_millions(pipe.unet)}M, text encoder {_millions(pipe.text_encoder)}M parameters")
    mixed_precision = resolve_mixed_precision(mixed_precision, pipe.device)  # recorded as resolved
    if joint:
        log("stage 1 is the joint stage (after the image encoder's pretraining)")
        base = {"seconds": 0.0, "loss": None, "losses": []}
    elif base_model is None:
        base = train_base(
            pipe,
            splits["train"],
            steps=steps_base,
            batch_size=batch_size,
            lr=lr_base,
            seed=seed,
            log=log,
            mixed_precision=mixed_precision,
        )
    else:
        log(f"stage 1 skipped: the base model of {base_model}")
        base = {"seconds": 0.0, "loss": None, "losses": []}
    pipe.add_ip_adapter(seed=seed + 1, kind="spatial" if joint else "global")
    log(f"adapter: image encoder {_millions(pipe.image_encoder)}M parameters")
    adapter_pool = all_scenes() if adapter_scenes == "all" else splits["train"]
    encoder = pretrain_image_encoder(pipe, adapter_pool, steps=steps_encoder, seed=seed + 2, log=log)
    if joint:
        base = train_joint(
            pipe,
            splits["train"],
            adapter_pool,
            steps=steps_base,
            batch_size=batch_size,
            lr=lr_base,
            seed=seed,
            conditions=conditions,
            log=log,
            mixed_precision=mixed_precision,
        )
        adapter = {"seconds": 0.0, "loss": None, "losses": []}
    else:
        adapter = train_adapter(
            pipe,
            adapter_pool,
            steps=steps_adapter,
            batch_size=batch_size,
            lr=lr_adapter,
            seed=seed + 1,
            log=log,
            mixed_precision=mixed_precision,
        )
    # written next to the destination, then moved into place: a folder is complete or absent
    staging = output_dir.with_name(output_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    pipe.save_pretrained(staging)
    total = time.perf_counter() - start
    summary = {
        "seconds": {
            "base": base["seconds"],
            "encoder": encoder["seconds"],
            "adapter": adapter["seconds"],
            "total": total,
        },
        "loss": {"base": base["loss"], "encoder": encoder["loss"], "adapter": adapter["loss"]},
        "encoder_cell_accuracy": encoder["cell_accuracy"],
    }
    record = {
        "settings": dict(
            seed=seed,
            method=method,
            steps_base=steps_base if base_model is None else 0,
            steps_encoder=steps_encoder,
            steps_adapter=0 if joint else steps_adapter,
            batch_size=batch_size,
            lr_base=lr_base,
            lr_adapter=lr_adapter,
            adapter_scenes=adapter_scenes,
            unet=unet or {},
            base_model=None if base_model is None else os.fspath(base_model),
            mixed_precision=mixed_precision,
            text_dropout=TEXT_DROPOUT,
            adapter_text_dropout=ADAPTER_TEXT_DROPOUT,
            image_dropout=IMAGE_DROPOUT,
            snr_gamma=JOINT_SNR_GAMMA if joint else SNR_GAMMA,
            adapter_snr_gamma=None if joint else ADAPTER_SNR_GAMMA,
            conditions=list(conditions) if joint else None,
        ),
        "split": {k: len(v) for k, v in splits.items()} | {"held_out_kinds": unseen},
        **summary,
        "losses": {"base": base["losses"], "encoder": encoder["losses"], "adapter": adapter["losses"]},
    }
    (staging / "training.json").write_text(json.dumps(record) + "\n")
    if output_dir.exists():
        output_dir.rmdir()  # empty, checked above
    os.replace(staging, output_dir)
    log(f"saved {output_dir} in {total:.0f} s")
    return {**summary, "folder": str(output_dir)}


def _millions(module: torch.nn.Module) -> str:
    return f"{sum(p.numel() for p in module.parameters()) / 1e6:.2f}"


# ---------------------------------------------------------------------------------------------
# evaluation


def _report(verdicts_report) -> dict[str, Any]:
    def stats(s) -> dict[str, Any]:
        lo, hi = s.interval
        return {"n": s.n, "accuracy": s.accuracy, "interval": [lo, hi], "undecidable": s.undecidable}

    return {
        "per_category": {c: stats(s) for c, s in verdicts_report.per_category.items()},
        "overall": stats(verdicts_report.overall),
    }


def evaluate_generator(
    folder: str | os.PathLike | ShapesWorldPipeline,
    scenes: Sequence[SceneSpec],
    seeds: Sequence[int],
    *,
    steps: int = SAMPLING_STEPS,
    guidance_scale: float = GUIDANCE_SCALE,
    batch_size: int = 64,
) -> dict[str, Any]:
    """The judge's accuracy of plain generation: one image per scene and seed. Returns
    {"per_category": {category: {"n", "accuracy", "interval", "undecidable"}}, "overall": {...},
    "seconds", "markdown"}."""
    pipe = folder if isinstance(folder, ShapesWorldPipeline) else ShapesWorldPipeline.from_pretrained(folder)
    start = time.perf_counter()
    jobs = [(spec, seed) for spec in scenes for seed in seeds]
    images = []
    for i in range(0, len(jobs), batch_size):
        chunk = jobs[i : i + batch_size]
        generators = [torch.Generator().manual_seed(int(seed)) for _, seed in chunk]
        images += pipe(
            [describe(s) for s, _ in chunk], generators, steps=steps, guidance_scale=guidance_scale
        )
    report = judge_many(images, [spec for spec, _ in jobs])
    return {**_report(report), "seconds": time.perf_counter() - start, "markdown": report.to_markdown()}


def evaluate_reconstruction(
    folder: str | os.PathLike | ShapesWorldPipeline,
    scenes: Sequence[SceneSpec],
    seeds: Sequence[int],
    *,
    ip_scales: Sequence[float] = (0.0, 0.3, 0.6, 1.0),
    steps: int = SAMPLING_STEPS,
    guidance_scale: float = GUIDANCE_SCALE,
    batch_size: int = 64,
) -> dict[str, Any]:
    """How well image tokens steer generation: for each scene and seed, generate from the prompt and
    the tokens of a correct render (:func:`oracle_render`, not the generation's own layout) at each IP
    scale, and judge. Returns {ip_scale: like :func:`evaluate_generator`}."""
    pipe = folder if isinstance(folder, ShapesWorldPipeline) else ShapesWorldPipeline.from_pretrained(folder)
    jobs = [(spec, seed) for spec in scenes for seed in seeds]
    negative = pipe.negative_image_tokens()
    results = {}
    for scale in ip_scales:
        start = time.perf_counter()
        images = []
        for i in range(0, len(jobs), batch_size):
            chunk = jobs[i : i + batch_size]
            tokens = pipe.encode_images([oracle_render(s, seed) for s, seed in chunk])
            generators = [torch.Generator().manual_seed(int(seed)) for _, seed in chunk]
            images += pipe(
                [describe(s) for s, _ in chunk],
                generators,
                image_tokens=tokens,
                negative_image_tokens=negative,
                ip_scale=scale,
                steps=steps,
                guidance_scale=guidance_scale,
            )
        report = judge_many(images, [spec for spec, _ in jobs])
        results[float(scale)] = {
            **_report(report),
            "seconds": time.perf_counter() - start,
            "markdown": report.to_markdown(),
        }
    return results
