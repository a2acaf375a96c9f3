"""Time and memory of IMG at the real model sizes, measured on a GPU through the project's own code.

Weights cannot be downloaded here, but time and memory do not depend on their values: every network
is built at its published size from the config values in ``benchmarks/configs.py`` (the ones
``pipeline_cost.py`` counts), with random weights, in bf16, directly on the GPU (no CPU copy, no
hub). The IP-Adapters are random files in the h94 (SDXL, ip-adapter-plus_sdxl_vit-h) and XLabs
(FLUX) layouts, installed by diffusers' own loaders through ``SDXLBackend.from_pipe`` /
``FluxBackend.from_pipe``. The tokenizers are stand-ins that give the real lengths: CLIP pads every
prompt to 77 tokens and T5 to 512, whatever the tokenizer; LLaVA's prompt is read word by word
(the ShapesWorld vocabulary covers the system text, the questions and the prompts used), about the
length LLaMA's tokenizer gives, and the length is reported. Then the project's ``IMGPipeline``
runs: generate, guide (LLaVA-1.5-13B), encode, align (the official-size aligner, 3 passes),
regenerate.

It measures, per pipeline (SDXL + LLaVA-1.5-13B; FLUX.1-dev + LLaVA-1.5-13B) and cell (offload
mode, batch, steps, speed lever): seconds per stage, IMG / base time, peak GPU memory
(``torch.cuda.max_memory_allocated`` and ``max_memory_reserved``), and for each lever how far its
images are from the default's. The paper's settings (1024 x 1024; SDXL 50 steps, CFG 7.5; FLUX 30
steps, guidance 3.5, true CFG 3.5) are the headline cell of each pipeline; the other cells run
fewer steps (``--short-steps``) so that the whole fits in 8 minutes, and say so: memory does not
depend on the step count, time per step does not either, and the table never scales a time up.

    python -m benchmarks.gpu_realsize --json gpu.json           # on a GPU: every cell that fits
    python -m benchmarks.gpu_realsize --tiny --json tiny.json   # the test models, on a CPU

Cells run in order of what the goals need; a cell that would start after its pipeline's budget
(``--budget-sdxl`` / ``--budget-flux`` seconds of cells) is listed as skipped, not run. ``--tiny``
runs the same code on the test suite's tiny models (CPU, float32, 32 x 32): it checks the script,
its figures mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

if not __package__:
    sys.exit("run the benchmarks from the repository root as modules: python -m benchmarks.gpu_realsize")

from benchmarks.configs import (
    CLIP_BIGG_TEXT,
    CLIP_H_VISION,
    CLIP_L_TEXT,
    CLIP_L_VISION,
    FLUX_IP_TOKENS,
    FLUX_SCHEDULER,
    FLUX_T5_TOKENS,
    FLUX_TRANSFORMER,
    FLUX_VAE,
    LLAVA,
    LLAVA_TEXT,
    LLAVA_VISION,
    SDXL_IP_TOKENS,
    SDXL_RESAMPLER,
    SDXL_SCHEDULER,
    SDXL_UNET,
    SDXL_VAE,
    T5_XXL,
)

GIB = 1024**3
PIPELINES = ("sdxl", "flux")
# ShapesWorld prompts: every word is in the word-level vocabulary the LLaVA stand-in reads
PROMPTS = (
    "a red circle to the left of a blue square",
    "two green triangles",
    "a yellow square above a red circle",
    "three blue circles",
)
LEVERS = ("math-attention", "channels-last", "vae-tiling", "compile")
LEVER_NOTES = {
    "default": "diffusers' and transformers' defaults: SDPA (flash / memory-efficient kernels)",
    "math-attention": "scaled_dot_product_attention forced to its unfused math kernel (what SDPA saves)",
    "channels-last": "the UNet and VAE (FLUX: the VAE) in channels-last memory format",
    "vae-tiling": "the VAE decodes in tiles (diffusers' enable_tiling)",
    "compile": "torch.compile of the UNet / transformer (in place); compile time apart",
    "mllm-kept": "model offload for the diffusion model, the MLLM and aligner kept on the GPU",
}
GOAL_RATIO = 2.1
GOAL_SDXL_GIB = 24
GOAL_FLUX_GIB = 40
PAPER_MLLM_SHARE = 0.04


# ---------------------------------------------------------------------------------------------
# Building the models
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def building(device: str | torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Modules made inside are allocated on ``device`` in ``dtype`` from the start."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def on_cpu(factory: Callable[[], Any]) -> Any:
    """What ``factory`` makes, outside any :func:`building` context (schedulers keep their float32
    tables on the CPU, as diffusers makes them)."""
    with building("cpu", torch.float32):
        return factory()


def hf_model(model_cls, config_cls, values: dict, dtype: torch.dtype):
    """A transformers model from config values, random weights, SDPA attention, in ``dtype``."""
    return model_cls._from_config(config_cls(**values), dtype=dtype, attn_implementation="sdpa").eval()


@dataclass
class Sizes:
    """What one run builds: the real models (``benchmarks.configs``) or the test suite's tiny ones."""

    name: str
    image_side: int
    sdxl_parts: Callable[[torch.dtype], dict]
    sdxl_image_encoder: Callable[[torch.dtype], torch.nn.Module]
    sdxl_ip: dict  # ip_adapter_plus_state_dict's sizes
    flux_parts: Callable[[torch.dtype], dict]
    flux_image_encoder: Callable[[torch.dtype], torch.nn.Module]
    flux_ip: Callable[[Any], dict]  # transformer -> xlabs_ip_adapter_state_dict's sizes
    llava: Callable[[Any, torch.dtype], Any]  # tokenizer, dtype -> LlavaForConditionalGeneration
    llava_image_side: int
    aligner: dict  # ImplicitAligner's size arguments besides the widths
    weight_std: float  # of the random IP-Adapter weights


def real_sdxl_parts(dtype: torch.dtype) -> dict:
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from img_guidance.testing.tokenizers import clip_tokenizer

    return {
        "unet": UNet2DConditionModel(**SDXL_UNET).eval(),
        "vae": AutoencoderKL(**SDXL_VAE).eval(),
        "text_encoder": hf_model(CLIPTextModel, CLIPTextConfig, CLIP_L_TEXT, dtype),
        "text_encoder_2": hf_model(CLIPTextModelWithProjection, CLIPTextConfig, CLIP_BIGG_TEXT, dtype),
        "tokenizer": clip_tokenizer(),
        "tokenizer_2": clip_tokenizer(),
        "scheduler": on_cpu(lambda: EulerDiscreteScheduler(**SDXL_SCHEDULER)),
    }


def real_flux_parts(dtype: torch.dtype) -> dict:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from img_guidance.testing.tokenizers import clip_tokenizer, t5_tokenizer

    return {
        "transformer": FluxTransformer2DModel(**FLUX_TRANSFORMER).eval(),
        "vae": AutoencoderKL(**FLUX_VAE).eval(),
        "text_encoder": hf_model(CLIPTextModel, CLIPTextConfig, CLIP_L_TEXT, dtype),
        "text_encoder_2": hf_model(T5EncoderModel, T5Config, T5_XXL, dtype),
        "tokenizer": clip_tokenizer(),
        "tokenizer_2": t5_tokenizer(model_max_length=FLUX_T5_TOKENS),
        "scheduler": on_cpu(lambda: FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER)),
    }


def vision_encoder(values: dict, dtype: torch.dtype):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    return hf_model(CLIPVisionModelWithProjection, CLIPVisionConfig, values, dtype)


def llava_model(text: dict, vision: dict, tokenizer, dtype: torch.dtype):
    """LlavaForConditionalGeneration of the given language and vision sizes; the image token is the
    stand-in tokenizer's (a config value: it names which id is an image placeholder)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    side, patch = vision["image_size"], vision["patch_size"]
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**vision),
        text_config=LlamaConfig(**text),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=(side // patch) ** 2,
        **{k: v for k, v in LLAVA.items() if k != "image_token_id"},
    )
    return LlavaForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation="sdpa").eval()


def real_sizes() -> Sizes:
    return Sizes(
        name="real",
        image_side=1024,
        sdxl_parts=real_sdxl_parts,
        sdxl_image_encoder=lambda dtype: vision_encoder(CLIP_H_VISION, dtype),
        sdxl_ip=dict(
            clip_width=CLIP_H_VISION["hidden_size"],
            queries=SDXL_IP_TOKENS,
            heads=SDXL_RESAMPLER["heads"],
            depth=SDXL_RESAMPLER["depth"],
        ),
        flux_parts=real_flux_parts,
        flux_image_encoder=lambda dtype: vision_encoder(CLIP_L_VISION, dtype),
        flux_ip=lambda transformer: dict(
            num_double_blocks=FLUX_TRANSFORMER["num_layers"],
            clip_dim=CLIP_L_VISION["projection_dim"],
            token_dim=FLUX_TRANSFORMER["joint_attention_dim"],
            inner_dim=transformer.inner_dim,
            num_tokens=FLUX_IP_TOKENS,
        ),
        llava=lambda tokenizer, dtype: llava_model(LLAVA_TEXT["13b"], LLAVA_VISION, tokenizer, dtype),
        llava_image_side=LLAVA_VISION["image_size"],
        aligner={},  # ImplicitAligner's defaults are the official checkpoints' sizes
        weight_std=0.02,
    )


def tiny_sizes() -> Sizes:
    from img_guidance.testing import flux as tiny_flux
    from img_guidance.testing import llava as tiny_llava
    from img_guidance.testing import sdxl as tiny_sdxl

    def llava(tokenizer, dtype):
        text = tiny_llava.llama_config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
        vision = tiny_llava.clip_vision_config()
        return llava_model(text.to_dict(), vision.to_dict(), tokenizer, dtype)

    return Sizes(
        name="tiny",
        image_side=32,
        sdxl_parts=lambda dtype: tiny_sdxl.pipeline_parts(),
        sdxl_image_encoder=lambda dtype: tiny_sdxl.image_encoder(),
        sdxl_ip={},  # ip_adapter_plus_state_dict's defaults are the tiny model's
        flux_parts=lambda dtype: tiny_flux.pipeline_parts(),
        flux_image_encoder=lambda dtype: tiny_flux.image_encoder(),
        flux_ip=lambda transformer: {},
        llava=llava,
        llava_image_side=tiny_llava.IMAGE_SIZE,
        aligner=dict(depth=1, heads=1),
        weight_std=0.2,
    )


def build_sdxl(sizes: Sizes, device: torch.device, dtype: torch.dtype, folder: Path):
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import save_file

    from img_guidance.backends.sdxl import SDXLBackend
    from img_guidance.testing.sdxl import ip_adapter_plus_state_dict

    with building(device, dtype):
        parts = sizes.sdxl_parts(dtype)
        encoder = sizes.sdxl_image_encoder(dtype)
    pipe = StableDiffusionXLPipeline(**parts, image_encoder=encoder)
    pipe.to(device, dtype)
    # a random IP-Adapter-Plus file (h94 layout) that diffusers' own loader reads, as for the real one
    state = ip_adapter_plus_state_dict(
        pipe.unet, scale=sizes.weight_std, ip_scale=sizes.weight_std, dtype=dtype, **sizes.sdxl_ip
    )
    ip_file = folder / "ip-adapter-plus_sdxl.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, ip_file)
    del state
    backend = SDXLBackend.from_pipe(pipe, ip_adapter=ip_file, sources={"model": f"random {sizes.name} SDXL"})
    backend.set_offload("none", device)
    return backend


def build_flux(sizes: Sizes, device: torch.device, dtype: torch.dtype, folder: Path):
    from diffusers import FluxPipeline
    from safetensors.torch import save_file

    from img_guidance.backends.flux import FluxBackend
    from img_guidance.testing.flux import xlabs_ip_adapter_state_dict

    with building(device, dtype):
        parts = sizes.flux_parts(dtype)
        encoder = sizes.flux_image_encoder(dtype)
    pipe = FluxPipeline(**parts, image_encoder=encoder)
    pipe.to(device, dtype)
    state = xlabs_ip_adapter_state_dict(
        scale=sizes.weight_std, dtype=dtype, **sizes.flux_ip(pipe.transformer)
    )
    ip_file = folder / "ip_adapter_flux.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, ip_file)
    del state
    backend = FluxBackend.from_pipe(
        pipe, ip_adapter=ip_file, true_cfg_scale=3.5, sources={"model": f"random {sizes.name} FLUX.1-dev"}
    )
    backend.set_offload("none", device)
    return backend


def build_guidance(sizes: Sizes, device: torch.device, dtype: torch.dtype):
    from transformers import LlavaProcessor

    from img_guidance.guidance.llava import LlavaGuidance
    from img_guidance.shapes.detector import world_tokenizer
    from img_guidance.testing.llava import PATCH_SIZE, clip_image_processor

    tokenizer = world_tokenizer()
    with building(device, dtype):
        model = sizes.llava(tokenizer, dtype)
    processor = LlavaProcessor(
        image_processor=clip_image_processor(sizes.llava_image_side),
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )
    return LlavaGuidance(model=model, processor=processor, location=f"random {sizes.name} LLaVA-1.5")


def build_aligner(sizes: Sizes, guidance_dim: int, image_dim: int, device: torch.device, dtype: torch.dtype):
    from img_guidance import ImplicitAligner

    with building(device, dtype):
        return ImplicitAligner(guidance_dim=guidance_dim, image_dim=image_dim, **sizes.aligner).eval()


def parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------------------------
# Cells: one measured configuration each
# ---------------------------------------------------------------------------------------------


@dataclass
class Cell:
    pipeline: str
    offload: str  # none / model / sequential / model+kept (the MLLM stays on the GPU)
    batch: int
    steps: int
    lever: str = "default"
    why: str = ""
    result: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.pipeline} {self.offload} b{self.batch} {self.steps} steps {self.lever}"


def plan(pipeline: str, paper_steps: int, short: int, batches: tuple[int, ...], levers: tuple[str, ...]):
    """The cells of one pipeline, in the order they run (what the goals need first)."""
    large = max(batches)
    cells = [
        Cell(
            pipeline,
            "none",
            1,
            paper_steps,
            why="headline: IMG / base and the MLLM's share at the paper's steps",
        ),
        Cell(pipeline, "model", 1, short, why="memory with model offload"),
        Cell(pipeline, "none", 1, short, why="the levers' reference"),
    ]
    # compile last: its first call compiles for a minute or more, so it runs only if time is left
    cells += [
        Cell(pipeline, "none", 1, short, lever, "speed lever") for lever in levers if lever != "compile"
    ]
    if large > 1:
        cells.append(Cell(pipeline, "none", large, short, why="batch"))
    cells.append(Cell(pipeline, "model+kept", 1, short, "mllm-kept", why="the MLLM kept resident"))
    if large > 1:
        cells.append(Cell(pipeline, "model", large, short, why="batch with model offload"))
    cells.append(Cell(pipeline, "sequential", 1, short, why="memory with sequential offload"))
    if large > 1:
        cells.append(Cell(pipeline, "sequential", large, short, why="batch with sequential offload"))
    if "compile" in levers:
        cells.append(Cell(pipeline, "none", 1, short, "compile", "speed lever"))
    return cells


@contextlib.contextmanager
def lever_applied(lever: str, backend, compile_backend: str) -> Iterator[None]:
    """The pipeline with ``lever`` on for the duration."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    pipe = backend.pipe
    if lever == "math-attention":
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    elif lever == "channels-last":
        convolutional = [pipe.vae] + ([pipe.unet] if backend.family == "sdxl" else [])
        for module in convolutional:
            module.to(memory_format=torch.channels_last)
        try:
            yield
        finally:
            for module in convolutional:
                module.to(memory_format=torch.contiguous_format)
    elif lever == "vae-tiling":
        pipe.vae.enable_tiling()
        try:
            yield
        finally:
            pipe.vae.disable_tiling()
    elif lever == "compile":
        module = backend.denoiser
        backend.compile(backend=compile_backend)
        try:
            yield
        finally:
            module._compiled_call_impl = None  # nn.Module.compile's in-place wrapper, undone
            torch._dynamo.reset()
    else:
        yield


def set_offload(img, mode: str, device: torch.device) -> None:
    diffusion = "model" if mode == "model+kept" else mode
    img.backend.set_offload(diffusion, device)
    img.guidance.set_offload("none" if mode == "model+kept" else mode, device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peaks(device: torch.device) -> dict[str, float | None]:
    if device.type != "cuda":
        return {"peak_allocated_gib": None, "peak_reserved_gib": None}
    return {
        "peak_allocated_gib": torch.cuda.max_memory_allocated(device) / GIB,
        "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / GIB,
    }


def pixels(images) -> torch.Tensor:
    import numpy as np

    return torch.from_numpy(np.stack([np.asarray(image.convert("RGB"), dtype=np.int16) for image in images]))


def run_cell(img, cell: Cell, side: int, device: torch.device, compile_backend: str) -> tuple[dict, Any]:
    """Base generation, then the IMG call, each timed; peak memory of each."""
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(cell.batch)]
    seeds = list(range(cell.batch))
    sampling = dict(steps=cell.steps, height=side, width=side)
    set_offload(img, cell.offload, device)
    out: dict[str, Any] = {}
    with lever_applied(cell.lever, img.backend, compile_backend):
        if cell.lever == "compile":  # the first call compiles: timed apart, then the timed calls
            sync(device)
            start = time.perf_counter()
            img(prompts, seeds, **sampling)
            sync(device)
            out["first_call_s"] = time.perf_counter() - start
        reset_peak(device)
        sync(device)
        start = time.perf_counter()
        img.backend.generate(prompts, seeds, **sampling)
        sync(device)
        out["base_s"] = time.perf_counter() - start
        out["base_peak"] = peaks(device)
        reset_peak(device)
        sync(device)
        start = time.perf_counter()
        result = img(prompts, seeds, **sampling)
        sync(device)
        out["img_wall_s"] = time.perf_counter() - start
    stages = dict(result.rounds[0].seconds)
    out["stages_s"] = stages
    out["img_s"] = sum(stages.values())
    out["img_over_base"] = out["img_s"] / out["base_s"]
    out["mllm_share"] = stages["guide"] / out["img_s"]
    out["img_peak"] = peaks(device)
    if "first_call_s" in out:
        out["compile_s"] = out["first_call_s"] - out["img_wall_s"]
    return out, result


def guidance_length(img) -> int:
    """Tokens the MLLM reads for the first prompt (system text, image tokens, question)."""
    from PIL import Image

    from img_guidance.guidance.questions import choose_question, fill

    question = fill(choose_question(0, index=0, questions=img.questions), PROMPTS[0])
    texts = img.guidance.prompts([question])
    return int(img.guidance.encode([Image.new("RGB", (64, 64))], texts)["input_ids"].shape[1])


def run_pipeline(
    name: str, sizes: Sizes, args, device: torch.device, dtype: torch.dtype, guidance, folder: Path
) -> dict:
    from img_guidance.pipeline import IMGPipeline

    started = time.perf_counter()
    build = build_sdxl if name == "sdxl" else build_flux
    backend = build(sizes, device, dtype, folder)
    backend.pipe.set_progress_bar_config(disable=True)
    guidance.set_offload("none", device)
    aligner = build_aligner(sizes, guidance.hidden_size, backend.token_shape[1], device, dtype)
    img = IMGPipeline(backend=backend, guidance=guidance, aligner=aligner)
    sync(device)
    report: dict[str, Any] = {
        "build_s": time.perf_counter() - started,
        "parameters": {
            "denoiser": parameters(backend.denoiser),
            "mllm": parameters(guidance.model),
            "aligner": parameters(aligner),
        },
        "token_shape": list(backend.token_shape),
        "guidance_tokens": guidance_length(img),
    }
    paper = args.steps_sdxl if name == "sdxl" else args.steps_flux
    cells = plan(name, paper, args.short_steps, tuple(args.batches), tuple(args.levers))
    side = args.side or sizes.image_side
    started = time.perf_counter()
    img([PROMPTS[0]], [0], steps=2, height=side, width=side)  # warm-up: kernels chosen, caches made
    sync(device)
    report["warmup_s"] = time.perf_counter() - started
    budget = args.budget_sdxl if name == "sdxl" else args.budget_flux
    reference = None
    report["cells"], report["skipped"] = [], []
    started = time.perf_counter()
    for index, cell in enumerate(cells):
        if cell.offload == "sequential" and device.type != "cuda":
            # diffusers offloads to "cpu:0" there, which accelerate's hooks then fail on
            report["skipped"].append(asdict(cell) | {"reason": "sequential offload needs a GPU"})
            continue
        if index > 0 and time.perf_counter() - started > budget:
            report["skipped"].append(asdict(cell) | {"reason": f"past the {budget:.0f} s budget"})
            continue
        print(f"  {cell.name} ...", file=sys.stderr, flush=True)
        try:
            cell.result, result = run_cell(img, cell, side, device, args.compile_backend)
        except Exception as error:  # one failed cell must not cost the others their device time
            cell.result = {"error": f"{type(error).__name__}: {str(error).strip().splitlines()[0][:200]}"}
            report["cells"].append(asdict(cell))
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        images = pixels(result.calibrated)
        if (
            cell.lever == "default"
            and cell.offload == "none"
            and cell.batch == 1
            and cell.steps == args.short_steps
        ):
            reference = images
        elif cell.batch == 1 and cell.steps == args.short_steps and reference is not None:
            difference = (images - reference).abs()
            cell.result["vs_reference"] = {
                "max_pixel_difference": int(difference.max()),
                "mean_pixel_difference": float(difference.float().mean()),
            }
        report["cells"].append(asdict(cell))
    guidance.set_offload("none", device)  # for the next pipeline; this one's models are dropped
    del img, aligner, backend
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return report


# ---------------------------------------------------------------------------------------------
# Goals and tables
# ---------------------------------------------------------------------------------------------


def find(report: dict, pipeline: str, **match) -> dict | None:
    for cell in report["pipelines"].get(pipeline, {}).get("cells", []):
        if all(cell[k] == v for k, v in match.items()) and "error" not in cell["result"]:
            return cell
    return None


def goals(report: dict, paper: dict[str, int]) -> list[dict]:
    """Issue 17's goals against the measured cells (None where the cell did not run)."""
    rows = []
    for pipeline, label in (("sdxl", "SDXL"), ("flux", "FLUX.1-dev")):
        cell = find(report, pipeline, offload="none", batch=1, steps=paper[pipeline], lever="default")
        ratio = cell["result"]["img_over_base"] if cell else None
        rows.append(
            {
                "goal": f"{label}: IMG / base time <= {GOAL_RATIO}",
                "measured": None if ratio is None else f"{ratio:.2f}",
                "met": None if ratio is None else ratio <= GOAL_RATIO,
            }
        )
    sdxl = [
        (c["result"]["img_peak"]["peak_allocated_gib"], c["offload"])
        for c in report["pipelines"].get("sdxl", {}).get("cells", [])
        if c["batch"] == 1 and "error" not in c["result"] and c["result"]["img_peak"]["peak_allocated_gib"]
    ]
    best = min(sdxl) if sdxl else None
    rows.append(
        {
            "goal": f"SDXL + LLaVA-13B + IMG peak <= {GOAL_SDXL_GIB} GB in some mode",
            "measured": None if best is None else f"{best[0]:.1f} GiB ({best[1]})",
            "met": None if best is None else best[0] * GIB <= GOAL_SDXL_GIB * 1e9,
        }
    )
    cell = find(report, "flux", offload="model", batch=1)
    peak = cell["result"]["img_peak"]["peak_allocated_gib"] if cell else None
    rows.append(
        {
            "goal": f"FLUX + LLaVA-13B + IMG <= {GOAL_FLUX_GIB} GB with --offload model",
            "measured": None if peak is None else f"{peak:.1f} GiB",
            "met": None if peak is None else peak * GIB <= GOAL_FLUX_GIB * 1e9,
        }
    )
    for pipeline, label in (("sdxl", "SDXL"), ("flux", "FLUX.1-dev")):
        cell = find(report, pipeline, offload="none", batch=1, steps=paper[pipeline], lever="default")
        share = cell["result"]["mllm_share"] if cell else None
        rows.append(
            {
                "goal": f"{label}: the MLLM's share of IMG time (paper: about {PAPER_MLLM_SHARE:.0%})",
                "measured": None if share is None else f"{share:.1%}",
                "met": None,  # reported, not a pass/fail goal
            }
        )
    return rows


def fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_tables(report: dict) -> None:
    print(f"# IMG at {report['sizes']} size on {report['device']} ({report['dtype']})")
    print(f"torch {report['torch']}, diffusers {report['diffusers']}, transformers {report['transformers']}")
    for pipeline, data in report["pipelines"].items():
        print(f"\n## {pipeline}: built in {data['build_s']:.1f} s; {data['guidance_tokens']} MLLM tokens")
        print()
        print(
            "| offload | batch | steps | lever | base s | IMG s | IMG / base | generate | guide | encode |"
            " align | regenerate | MLLM share | peak alloc GiB | peak reserved GiB |"
            " vs reference (max / mean px) |"
        )
        print("|---" * 16 + "|")
        for cell in data["cells"]:
            r = cell["result"]
            head = f"| {cell['offload']} | {cell['batch']} | {cell['steps']} | {cell['lever']} |"
            if "error" in r:
                print(head + f" {r['error']} |" + " |" * 11)
                continue
            s = r["stages_s"]
            vs = r.get("vs_reference")
            vs_text = (
                "-" if vs is None else f"{vs['max_pixel_difference']} / {vs['mean_pixel_difference']:.2f}"
            )
            compile_note = f" (first call {r['first_call_s']:.1f} s)" if "first_call_s" in r else ""
            print(
                head
                + f" {fmt(r['base_s'])} | {fmt(r['img_s'])}{compile_note} | {fmt(r['img_over_base'])} |"
                + "".join(f" {fmt(s[k])} |" for k in ("generate", "guide", "encode", "align", "regenerate"))
                + f" {r['mllm_share']:.1%} | {fmt(r['img_peak']['peak_allocated_gib'], 1)} |"
                + f" {fmt(r['img_peak']['peak_reserved_gib'], 1)} | {vs_text} |"
            )
        for cell in data["skipped"]:
            where = f"| {cell['offload']} | {cell['batch']} | {cell['steps']} | {cell['lever']} |"
            print(where + f" skipped: {cell['reason']} |" + " |" * 11)
    print("\n## Goals\n")
    print("| goal | measured | met |")
    print("|---|---|---|")
    for row in report["goals"]:
        met = "-" if row["met"] is None else ("yes" if row["met"] else "no")
        print(f"| {row['goal']} | {row['measured'] or 'not measured'} | {met} |")
    if report["sizes"] == "tiny":
        print("\n(tiny models on a CPU: a check of the script; none of these figures is a goal's)")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiny", action="store_true", help="the test suite's tiny models on the CPU")
    parser.add_argument("--pipelines", type=lambda s: s.split(","), default=list(PIPELINES))
    parser.add_argument("--steps-sdxl", type=int, default=None, help="headline steps (default: 50; tiny: 2)")
    parser.add_argument("--steps-flux", type=int, default=None, help="headline steps (default: 30; tiny: 2)")
    parser.add_argument("--short-steps", type=int, default=None, help="steps of the other cells (8; tiny: 1)")
    parser.add_argument("--batches", type=lambda s: [int(b) for b in s.split(",")], default=[1, 4])
    parser.add_argument("--levers", type=lambda s: [x for x in s.split(",") if x], default=list(LEVERS))
    parser.add_argument("--side", type=int, default=None, help="image side (default: 1024; tiny: 32)")
    parser.add_argument("--budget-sdxl", type=float, default=120, help="seconds of SDXL cells")
    parser.add_argument("--budget-flux", type=float, default=180, help="seconds of FLUX cells")
    parser.add_argument(
        "--compile-backend", default=None, help="torch.compile backend (inductor; tiny: eager)"
    )
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    unknown = [p for p in args.pipelines if p not in PIPELINES] + [x for x in args.levers if x not in LEVERS]
    if unknown:
        parser.error(f"unknown pipeline or lever {unknown[0]!r}; pipelines: {PIPELINES}, levers: {LEVERS}")
    if any(b < 1 for b in args.batches):
        parser.error(f"batches must be positive, got {args.batches}")
    tiny = args.tiny
    args.steps_sdxl = args.steps_sdxl or (2 if tiny else 50)
    args.steps_flux = args.steps_flux or (2 if tiny else 30)
    args.short_steps = args.short_steps or (1 if tiny else 8)
    args.compile_backend = args.compile_backend or ("eager" if tiny else "inductor")
    if tiny:
        device, dtype, sizes = torch.device("cpu"), torch.float32, tiny_sizes()
    else:
        if not torch.cuda.is_available():
            parser.error(
                "no CUDA GPU here: the real sizes need one (run --tiny to check the script on a CPU)"
            )
        device, dtype, sizes = torch.device("cuda"), torch.bfloat16, real_sizes()

    import logging
    import warnings

    import diffusers
    import transformers
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()

    started = time.perf_counter()
    report: dict[str, Any] = {
        "sizes": sizes.name,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "args": vars(args),
        "levers": LEVER_NOTES,
        "pipelines": {},
    }
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        guidance = build_guidance(sizes, device, dtype)
        for name in args.pipelines:
            print(f"{name}: building and measuring", file=sys.stderr, flush=True)
            report["pipelines"][name] = run_pipeline(name, sizes, args, device, dtype, guidance, Path(folder))
    report["goals"] = goals(report, {"sdxl": args.steps_sdxl, "flux": args.steps_flux})
    report["total_s"] = time.perf_counter() - started
    print_tables(report)
    print(f"\n(total {report['total_s']:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    return report


if __name__ == "__main__":
    main()
