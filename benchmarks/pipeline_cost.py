"""Compute and weight memory of one IMG image (1024x1024) at the real model sizes, stage by stage.

Every network is built at its published size on the meta device from the config values in
``benchmarks/configs.py`` (each with the file it comes from), so no weight is allocated and nothing
is downloaded. Each stage's forward runs once on meta tensors under
``torch.utils.flop_counter.FlopCounterMode`` (``benchmarks/meter.py``) and is multiplied by how often
one image calls it:

- base generation: the text encoders once, the UNet / transformer once per step (SDXL: 50 steps,
  CFG = batch 2 per step; FLUX.1-dev: 30 steps, the official IMG true CFG 3.5 = two forwards per
  step, plus a row without true CFG), the VAE decoder once;
- guidance: one MLLM forward (LLaVA-1.5-13B over system text + 576 image tokens + question,
  ``--guidance-length`` tokens; Qwen2.5-VL-7B over the same text with its own image tokens at
  ``--qwen-image-size``), the last hidden layer only (the LM head is left out, its cost is noted);
- encoding: the CLIP vision tower + IP-Adapter projection of the image and of the negative
  (black / zeros) image, batch 2;
- the Implicit Aligner x3 (guidance projected once, as ``ImplicitAligner.align`` does);
- re-generation: the base generation again, with the IP-Adapter attention on the aligned tokens.

FLOPs are those FlopCounterMode counts: matmuls, convolutions and attention, one multiply-add =
2 FLOPs; normalisation, activations and softmax are not counted. Attention is routed to the fused
SDPA kernel, as on a GPU, and counted in full L x L (also for causal masks). Activation memory is a
rough estimate: the peak of live tensors (weights excluded) during the stage's forward on meta, in
bf16 (SDXL's VAE in fp32, as diffusers runs it for fp16 SDXL), the fused attention's scores never
materialised. Weights-only peaks under the three offload modes follow from the parameter counts.

    python -m benchmarks.pipeline_cost                          # all tables, about 30 s on 2 cores
    python -m benchmarks.pipeline_cost --steps-sdxl 30 --steps-flux 28 --guidance-length 700
    python -m benchmarks.pipeline_cost --qwen-image-size 448 --json cost.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from functools import partial

import torch
from torch import nn

if not __package__:
    sys.exit("run the benchmarks from the repository root as modules: python -m benchmarks.pipeline_cost")

from benchmarks.configs import (
    CLIP_BIGG_TEXT,
    CLIP_H_VISION,
    CLIP_L_TEXT,
    CLIP_L_VISION,
    FLUX_IP_TOKENS,
    FLUX_TRANSFORMER,
    FLUX_VAE,
    LLAVA,
    LLAVA_IMAGE_TOKENS,
    LLAVA_TEXT,
    LLAVA_VISION,
    PUBLISHED_PARAMS,
    QWEN_MAX_PIXELS,
    QWEN_MIN_PIXELS,
    QWEN_TEXT,
    QWEN_VISION,
    SDXL_IP_TOKENS,
    SDXL_RESAMPLER,
    SDXL_UNET,
    SDXL_VAE,
    T5_XXL,
)
from benchmarks.meter import (
    BF16,
    GIB,
    Cost,
    build,
    causal_mask,
    gib,
    measure,
    meta,
    meta_ids,
    tflops,
    weight_bytes,
)

LLAVA_13B_TEXT = LLAVA_TEXT["13b"]

# ---------------------------------------------------------------------------------------------
# Pure helpers (tested in tests/test_pipeline_cost.py)
# ---------------------------------------------------------------------------------------------


def qwen_image_grid(
    height: int,
    width: int,
    patch: int = 14,
    merge: int = 2,
    min_pixels: int = QWEN_MIN_PIXELS,
    max_pixels: int = QWEN_MAX_PIXELS,
) -> tuple[int, int, int]:
    """The Qwen2.5-VL processor's resize rule (sides to multiples of patch*merge, area within
    [min_pixels, max_pixels], aspect kept): returns (patch rows, patch columns, LLM image tokens)."""
    factor = patch * merge
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    rows, cols = h // patch, w // patch
    return rows, cols, rows * cols // merge**2


def llava_flops_closed_form(length: int) -> int:
    """LLaVA-1.5-13B forward in closed form (2 FLOPs per multiply-add; attention 4 L^2 d per layer):
    CLIP ViT-L/14-336 over 577 tokens (all 24 layers run), the 2-layer projector on 576 features,
    the Llama body over ``length`` tokens (no LM head)."""
    d, ff, layers = (
        LLAVA_13B_TEXT["hidden_size"],
        LLAVA_13B_TEXT["intermediate_size"],
        LLAVA_13B_TEXT["num_hidden_layers"],
    )
    lm = layers * (2 * length * (4 * d * d + 3 * d * ff) + 4 * length * length * d)
    v, vff = LLAVA_VISION["hidden_size"], LLAVA_VISION["intermediate_size"]
    vlayers = LLAVA_VISION["num_hidden_layers"]
    patch = LLAVA_VISION["patch_size"]
    t = LLAVA_IMAGE_TOKENS + 1
    vision = vlayers * (2 * t * (4 * v * v + 2 * v * vff) + 4 * t * t * v)
    vision += 2 * LLAVA_IMAGE_TOKENS * 3 * patch * patch * v  # patch embedding
    projector = 2 * LLAVA_IMAGE_TOKENS * (v * d + d * d)
    return lm + vision + projector


def offload_peaks(
    stages: dict[str, Iterable[str]],
    module_bytes: dict[str, float],
    module_leaf_bytes: dict[str, float],
    pinned: Iterable[str] = (),
) -> dict[str, tuple[float, str]]:
    """Peak resident weight bytes (and what sets it) when all modules stay on the accelerator
    (``none``), when one stage's modules are moved in at a time (``model``) and when one leaf
    module (a layer with its own parameters) is moved in at a time (``sequential``). ``pinned``
    modules never leave the accelerator (a bitsandbytes-quantized model that cannot be moved)."""
    pinned = set(pinned)
    used = sorted({name for names in stages.values() for name in names})
    kept = sum(module_bytes[n] for n in pinned)
    stage_bytes = {
        stage: sum(module_bytes[n] for n in names if n not in pinned) for stage, names in stages.items()
    }
    model_stage = max(stage_bytes, key=stage_bytes.__getitem__)
    movable = [n for n in used if n not in pinned]
    leaf_module = max(movable, key=module_leaf_bytes.__getitem__)
    return {
        "none": (sum(module_bytes[n] for n in used), "all stages"),
        "model": (kept + stage_bytes[model_stage], model_stage),
        "sequential": (kept + module_leaf_bytes[leaf_module], leaf_module),
    }


# ---------------------------------------------------------------------------------------------
# The modules
# ---------------------------------------------------------------------------------------------


@dataclass
class ModuleInfo:
    name: str
    label: str
    params: int
    quantizable: int  # linear weights a bitsandbytes load would quantize (all but the LM head)
    leaf: str
    leaf_params: int

    def bytes(self, precision: str = "bf16") -> float:
        return weight_bytes(self.params, self.quantizable, precision)

    def leaf_bytes(self, precision: str = "bf16") -> float:
        # the largest leaf of a quantized model is its (bf16) embedding or LM head, or a linear
        return self.leaf_params * (4.0 if precision == "fp32" else 2.0)


def describe(name: str, label: str, module: nn.Module, skip_quantize: tuple[str, ...] = ()) -> ModuleInfo:
    params = sum(p.numel() for p in module.parameters())
    quantizable = sum(
        m.weight.numel()
        for n, m in module.named_modules()
        if isinstance(m, nn.Linear) and not any(n == s or n.endswith("." + s) for s in skip_quantize)
    )
    leaves = [(sum(p.numel() for p in m.parameters(recurse=False)), n) for n, m in module.named_modules()]
    leaf_params, leaf = max(leaves)
    return ModuleInfo(name, label, params, quantizable, leaf or name, leaf_params)


def describe_params(name: str, label: str, parameters: list[nn.Parameter]) -> ModuleInfo:
    params = sum(p.numel() for p in parameters)
    quantizable = sum(p.numel() for p in parameters if p.dim() == 2)
    return ModuleInfo(name, label, params, quantizable, "to_k_ip", max(p.numel() for p in parameters))


@dataclass
class Stage:
    family: str
    name: str
    modules: tuple[str, ...]
    calls: int  # forwards per image
    cost: Cost
    method: str = "FlopCounterMode (meta)"
    note: str = ""

    @property
    def flops(self) -> int:
        return self.calls * self.cost.flops


@dataclass
class Results:
    args: dict
    modules: dict[str, ModuleInfo] = field(default_factory=dict)
    stages: dict[str, Stage] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, info: ModuleInfo) -> None:
        self.modules[info.name] = info

    def stage(self, key: str, stage: Stage) -> None:
        self.stages[key] = stage
        print(f"  done: {key}", file=sys.stderr, flush=True)


def text_encoders_sdxl(res: Results) -> None:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    te1 = build(lambda: CLIPTextModel(hf_config(CLIPTextConfig, CLIP_L_TEXT)))
    te2 = build(lambda: CLIPTextModelWithProjection(hf_config(CLIPTextConfig, CLIP_BIGG_TEXT)))
    res.add(describe("clip_l_text", "CLIP ViT-L/14 text", te1))
    res.add(describe("clip_bigg_text", "OpenCLIP ViT-bigG/14 text + proj", te2))
    c1 = measure(lambda: te1(input_ids=meta_ids(1, 77), output_hidden_states=True))
    c2 = measure(lambda: te2(input_ids=meta_ids(1, 77), output_hidden_states=True))
    # force_zeros_for_empty_prompt: SDXL base zeroes the negative embeddings instead of encoding ""
    res.stage(
        "sdxl_text",
        Stage(
            "sdxl",
            "text encoders (77 tokens)",
            ("clip_l_text", "clip_bigg_text"),
            1,
            Cost(c1.flops + c2.flops, max(c1.activation_bytes, c2.activation_bytes)),
            note="negative prompt zeroed (force_zeros_for_empty_prompt), not encoded",
        ),
    )


def hf_config(cls, values: dict):
    config = cls(**values)
    config._attn_implementation = "sdpa"
    return config


def sdxl(res: Results, steps: int) -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0
    from diffusers.models.embeddings import IPAdapterPlusImageProjection, MultiIPAdapterImageProjection
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    text_encoders_sdxl(res)
    unet = build(lambda: UNet2DConditionModel(**SDXL_UNET))
    res.add(describe("sdxl_unet", "SDXL UNet", unet))
    cond = dict(text_embeds=meta(2, 1280), time_ids=meta(2, 6))

    def unet_forward(image_tokens: torch.Tensor | None = None):
        kwargs = dict(cond) if image_tokens is None else dict(cond, image_embeds=[image_tokens])
        return unet(
            meta(2, 4, 128, 128), meta(2), encoder_hidden_states=meta(2, 77, 2048), added_cond_kwargs=kwargs
        )

    base = measure(unet_forward)
    res.stage(
        "sdxl_denoise", Stage("sdxl", f"UNet x {steps} steps (CFG batch 2)", ("sdxl_unet",), steps, base)
    )

    # IP-Adapter-Plus: decoupled k/v on the 16 image tokens in every cross-attention (attn2); the
    # tokens enter already projected (the resampler runs once, in encoding), so the UNet's
    # encoder_hid_proj is an identity here.
    processors = {}
    with torch.device("meta"):
        for key in unet.attn_processors:
            attention = unet.get_submodule(key.removesuffix(".processor"))
            if key.endswith("attn1.processor"):
                processors[key] = AttnProcessor2_0()
            else:
                processors[key] = IPAdapterAttnProcessor2_0(
                    hidden_size=attention.to_k.out_features,
                    cross_attention_dim=SDXL_UNET["cross_attention_dim"],
                    num_tokens=(SDXL_IP_TOKENS,),
                    scale=0.2,
                )
    unet.set_attn_processor(processors)
    unet.to(BF16)
    unet.encoder_hid_proj = MultiIPAdapterImageProjection([nn.Identity()])
    unet.config.encoder_hid_dim_type = "ip_image_proj"
    ip_params = [p for n, p in unet.named_parameters() if "_ip." in n]
    res.add(describe_params("sdxl_ip_attn", "IP-Adapter-Plus to_k_ip/to_v_ip (SDXL)", ip_params))
    with_ip = measure(lambda: unet_forward(meta(2, 1, SDXL_IP_TOKENS, 2048)))
    res.stage(
        "sdxl_ip_extra",
        Stage(
            "sdxl",
            f"IP-Adapter attention extra x {steps} steps (batch 2)",
            ("sdxl_ip_attn",),
            steps,
            Cost(with_ip.flops - base.flops, with_ip.activation_bytes - base.activation_bytes),
            method="FlopCounterMode (meta), UNet with IP minus without",
        ),
    )
    res.stages["sdxl_denoise_ip"] = Stage("sdxl", "UNet + IP", ("sdxl_unet", "sdxl_ip_attn"), steps, with_ip)

    vae = build(lambda: AutoencoderKL(**SDXL_VAE), dtype=torch.float32)
    res.add(describe("sdxl_vae", "SDXL VAE", vae))
    res.stage(
        "sdxl_decode",
        Stage(
            "sdxl",
            "VAE decode 128x128 -> 1024x1024 (fp32)",
            ("sdxl_vae",),
            1,
            measure(lambda: vae.decode(meta(1, 4, 128, 128, dtype=torch.float32))),
        ),
    )

    encoder = build(lambda: CLIPVisionModelWithProjection(hf_config(CLIPVisionConfig, CLIP_H_VISION)))
    resampler = build(lambda: IPAdapterPlusImageProjection(**SDXL_RESAMPLER, num_queries=SDXL_IP_TOKENS))
    res.add(describe("clip_h_vision", "CLIP ViT-H/14 vision + proj", encoder))
    res.add(describe("sdxl_resampler", "IP-Adapter-Plus resampler", resampler))

    def encode():
        hidden = encoder(pixel_values=meta(2, 3, 224, 224), output_hidden_states=True).hidden_states[-2]
        return resampler(hidden)

    res.stage(
        "sdxl_encode",
        Stage(
            "sdxl",
            "encoding: CLIP ViT-H + resampler (image + zeros image)",
            ("clip_h_vision", "sdxl_resampler"),
            1,
            measure(encode),
            note="the negative (zeros-image) tokens are constant and can be cached",
        ),
    )


def flux(res: Results, steps: int) -> None:
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from diffusers.models.embeddings import ImageProjection
    from diffusers.models.transformers.transformer_flux import FluxIPAdapterAttnProcessor
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
        T5Config,
        T5EncoderModel,
    )

    clip = build(lambda: CLIPTextModel(hf_config(CLIPTextConfig, CLIP_L_TEXT)))
    t5 = build(lambda: T5EncoderModel(hf_config(T5Config, T5_XXL)))
    if "clip_l_text" not in res.modules:
        res.add(describe("clip_l_text", "CLIP ViT-L/14 text", clip))
    res.add(describe("t5_xxl", "T5 v1.1 XXL encoder", t5))
    c1 = measure(lambda: clip(input_ids=meta_ids(1, 77)))
    c2 = measure(lambda: t5(input_ids=meta_ids(1, 512)))
    text = Cost(c1.flops + c2.flops, max(c1.activation_bytes, c2.activation_bytes))
    for key, calls, label, note in (
        ("flux_text", 2, "text encoders (CLIP 77 + T5 512 tokens) x 2", "prompt + empty negative (true CFG)"),
        ("flux_text_nocfg", 1, "text encoders (CLIP 77 + T5 512 tokens)", "prompt only"),
    ):
        res.stage(key, Stage("flux", label, ("clip_l_text", "t5_xxl"), calls, text, note=note))

    transformer = build(lambda: FluxTransformer2DModel(**FLUX_TRANSFORMER))
    res.add(describe("flux_transformer", "FLUX.1-dev transformer", transformer))
    tokens = (1024 // 16) ** 2  # 128x128 latents, 2x2 patches

    def forward(ip_tokens: torch.Tensor | None = None):
        kwargs = None if ip_tokens is None else {"ip_hidden_states": [ip_tokens]}
        return transformer(
            hidden_states=meta(1, tokens, 64),
            encoder_hidden_states=meta(1, 512, 4096),
            pooled_projections=meta(1, 768),
            timestep=meta(1),
            img_ids=meta(tokens, 3),
            txt_ids=meta(512, 3),
            guidance=meta(1),
            joint_attention_kwargs=kwargs,
        )

    base = measure(forward)
    res.stage(
        "flux_denoise",
        Stage("flux", f"transformer x {steps} steps x 2 (true CFG)", ("flux_transformer",), 2 * steps, base),
    )
    res.stage(
        "flux_denoise_nocfg",
        Stage("flux", f"transformer x {steps} steps", ("flux_transformer",), steps, base),
    )
    # XLabs IP-Adapter: k/v on the 4 image tokens in the 19 double-stream blocks
    with torch.device("meta"):
        for block in transformer.transformer_blocks:
            block.attn.set_processor(
                FluxIPAdapterAttnProcessor(
                    hidden_size=transformer.inner_dim,
                    cross_attention_dim=FLUX_TRANSFORMER["joint_attention_dim"],
                    num_tokens=(FLUX_IP_TOKENS,),
                    scale=0.2,
                )
            )
    transformer.to(BF16)
    ip_params = [p for n, p in transformer.named_parameters() if "_ip." in n]
    res.add(describe_params("flux_ip_attn", "XLabs IP-Adapter to_k_ip/to_v_ip (FLUX)", ip_params))
    with_ip = measure(lambda: forward(meta(1, FLUX_IP_TOKENS, 4096)))
    res.stage(
        "flux_ip_extra",
        Stage(
            "flux",
            f"IP-Adapter attention extra x {steps} steps x 2",
            ("flux_ip_attn",),
            2 * steps,
            Cost(with_ip.flops - base.flops, with_ip.activation_bytes - base.activation_bytes),
            method="FlopCounterMode (meta), transformer with IP minus without",
        ),
    )
    res.stages["flux_denoise_ip"] = Stage(
        "flux", "transformer + IP", ("flux_transformer", "flux_ip_attn"), 2 * steps, with_ip
    )

    vae = build(lambda: AutoencoderKL(**FLUX_VAE))
    res.add(describe("flux_vae", "FLUX VAE", vae))
    res.stage(
        "flux_decode",
        Stage(
            "flux",
            "VAE decode 128x128 -> 1024x1024",
            ("flux_vae",),
            1,
            measure(lambda: vae.decode(meta(1, 16, 128, 128))),
        ),
    )

    encoder = build(lambda: CLIPVisionModelWithProjection(hf_config(CLIPVisionConfig, CLIP_L_VISION)))
    projection = build(lambda: ImageProjection(768, 4096, FLUX_IP_TOKENS))
    res.add(describe("clip_l_vision", "CLIP ViT-L/14 vision + proj", encoder))
    res.add(describe("flux_ip_proj", "XLabs image projection 768 -> 4x4096", projection))
    res.stage(
        "flux_encode",
        Stage(
            "flux",
            "encoding: CLIP ViT-L + projection (image + black image)",
            ("clip_l_vision", "flux_ip_proj"),
            1,
            measure(lambda: projection(encoder(pixel_values=meta(2, 3, 224, 224)).image_embeds)),
            note="the negative (black-image) tokens are constant and can be cached",
        ),
    )


def llava(res: Results, length: int) -> None:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(
        vision_config=hf_config(CLIPVisionConfig, LLAVA_VISION),
        text_config=hf_config(LlamaConfig, LLAVA_13B_TEXT),
        **LLAVA,
    )
    config._attn_implementation = "sdpa"
    model = build(lambda: LlavaForConditionalGeneration(config))
    res.add(describe("llava_13b", "LLaVA-1.5-13B", model, skip_quantize=("lm_head",)))
    hidden = LLAVA_13B_TEXT["hidden_size"]

    def forward():
        # vision tower + projector, then the LM on the embeddings (the 576 image features placed
        # among the text embeddings): the same work as the full call, which on meta cannot check
        # the placeholder count (it reads tensor values)
        model.model.get_image_features(pixel_values=meta(1, 3, 336, 336))
        return model.model.language_model(
            inputs_embeds=meta(1, length, hidden), attention_mask=causal_mask(length), use_cache=False
        )

    head = 2 * length * hidden * LLAVA_13B_TEXT["vocab_size"]
    res.stage(
        "guide_llava",
        Stage(
            "mllm",
            f"LLaVA-1.5-13B forward, {length} tokens (576 image)",
            ("llava_13b",),
            1,
            measure(forward),
            note=f"LM head over all tokens (official call computes logits): +{head / 1e12:.3f} TFLOPs",
        ),
    )


def qwen(res: Results, length: int, image_size: int) -> int:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.vision_utils import (
        get_vision_cu_seqlens,
        get_vision_position_ids,
        get_vision_window_index,
    )

    config = Qwen2_5_VLConfig(text_config=QWEN_TEXT, vision_config=QWEN_VISION, tie_word_embeddings=False)
    for c in (config, config.text_config, config.vision_config):
        c._attn_implementation = "sdpa"
    model = build(lambda: Qwen2_5_VLForConditionalGeneration(config))
    res.add(describe("qwen25vl_7b", "Qwen2.5-VL-7B", model, skip_quantize=("lm_head",)))
    rows, cols, image_tokens = qwen_image_grid(image_size, image_size)
    total = length - LLAVA_IMAGE_TOKENS + image_tokens + 2  # same text, <|vision_start|>/<|vision_end|>
    vision = config.vision_config
    # The grid-derived index tensors are computed on the CPU and handed in (the vision tower's
    # hook for precomputed values): on meta their values would be unknown.
    grid = torch.tensor([[1, rows, cols]])
    window_index, cu_window = get_vision_window_index(
        grid, vision.spatial_merge_size, vision.window_size, vision.patch_size
    )
    extras = dict(
        position_ids=get_vision_position_ids(grid, vision.spatial_merge_size).to("meta"),
        cu_seqlens=get_vision_cu_seqlens(grid),
        window_index=window_index.to("meta"),
        cu_window_seqlens=cu_window,
    )
    patch_dim = 3 * vision.temporal_patch_size * vision.patch_size**2
    hidden = QWEN_TEXT["hidden_size"]

    def forward():
        model.model.visual(meta(rows * cols, patch_dim), grid_thw=grid, **dict(extras))
        position_ids = meta_ids(3, 1, total)  # M-RoPE (t, h, w) positions; values do not change the work
        return model.model.language_model(
            inputs_embeds=meta(1, total, hidden),
            attention_mask=causal_mask(total),
            position_ids=position_ids,
            use_cache=False,
        )

    head = 2 * total * hidden * QWEN_TEXT["vocab_size"]
    res.stage(
        "guide_qwen",
        Stage(
            "mllm",
            f"Qwen2.5-VL-7B forward, {total} tokens ({image_tokens} image, {image_size}px -> {cols * 14}px)",
            ("qwen25vl_7b",),
            1,
            measure(forward),
            method="FlopCounterMode (meta), window indices from the CPU",
            note=f"LM head over all tokens: +{head / 1e12:.3f} TFLOPs",
        ),
    )
    return total


def aligners(res: Results, llava_length: int, qwen_length: int) -> None:
    from img_guidance import ImplicitAligner

    for family, image_dim, n_tokens in (("sdxl", 2048, SDXL_IP_TOKENS), ("flux", 4096, FLUX_IP_TOKENS)):
        for mllm, guidance_dim, length in (("llava", 5120, llava_length), ("qwen", 3584, qwen_length)):
            aligner = build(partial(ImplicitAligner, guidance_dim=guidance_dim, image_dim=image_dim))
            name = f"aligner_{family}" if mllm == "llava" else f"aligner_{family}_qwen"
            res.add(describe(name, f"Implicit Aligner {guidance_dim} -> {image_dim}", aligner))
            inputs = (meta(1, length, guidance_dim), meta(1, n_tokens, image_dim), 3)
            res.stage(
                f"{family}_align_{mllm}",
                Stage(
                    family,
                    f"aligner x3 (guidance {length} x {guidance_dim})",
                    (name,),
                    1,
                    measure(partial(aligner.align, *inputs)),
                ),
            )


# ---------------------------------------------------------------------------------------------
# Pipelines and tables
# ---------------------------------------------------------------------------------------------


@dataclass
class Pipeline:
    name: str
    base: list[str]  # stage keys of one base generation
    guide: str
    encode: str
    align: str
    ip_extra: str
    denoise_ip: str  # the re-generation denoiser stage (weights and activations)
    mllm: str
    capacity_gib: float

    def img_stages(self) -> list[str]:
        return [self.guide, self.encode, self.align, self.ip_extra]

    def flops(self, res: Results) -> tuple[int, int]:
        base = sum(res.stages[k].flops for k in self.base)
        extra = sum(res.stages[k].flops for k in self.img_stages())
        return base, 2 * base + extra  # re-generation = base again + the IP extra

    def groups(self) -> dict[str, str]:
        """What is resident in each stage (a stage's weights move in together under model offload)."""
        return {
            "text encoders": self.base[0],
            "denoiser + IP layers": self.denoise_ip,
            "VAE": self.base[2],
            "MLLM": self.guide,
            "image encoder + projection": self.encode,
            "aligner": self.align,
        }

    def residency(self, res: Results) -> dict[str, tuple[str, ...]]:
        return {group: res.stages[key].modules for group, key in self.groups().items()}

    def activations(self, res: Results) -> dict[str, int]:
        return {group: res.stages[key].cost.activation_bytes for group, key in self.groups().items()}


def pipelines() -> list[Pipeline]:
    sdxl_base = ["sdxl_text", "sdxl_denoise", "sdxl_decode"]
    out = []
    for mllm, key in (("LLaVA-1.5-13B", "llava"), ("Qwen2.5-VL-7B", "qwen")):
        model = "llava_13b" if key == "llava" else "qwen25vl_7b"
        out.append(
            Pipeline(
                f"SDXL + {mllm}",
                sdxl_base,
                f"guide_{key}",
                "sdxl_encode",
                f"sdxl_align_{key}",
                "sdxl_ip_extra",
                "sdxl_denoise_ip",
                model,
                24,
            )
        )
        for suffix, label in (("", "true CFG"), ("_nocfg", "no true CFG")):
            if suffix and key != "llava":
                continue
            out.append(
                Pipeline(
                    f"FLUX.1-dev ({label}) + {mllm}",
                    [f"flux_text{suffix}", f"flux_denoise{suffix}", "flux_decode"],
                    f"guide_{key}",
                    "flux_encode",
                    f"flux_align_{key}",
                    "flux_ip_extra",
                    "flux_denoise_ip",
                    model,
                    40,
                )
            )
    return out


MODES = ("none", "model", "sequential")
KEPT_MODES = ("model+kept", "sequential+kept")  # the quantized MLLM stays on the accelerator
FASTEST = ("none", "model+kept", "model", "sequential+kept", "sequential")  # fewest transfers first


def memory_row(p: Pipeline, res: Results, precision: str) -> dict:
    """Peak weights (and weights + the rough activations of the stage then running) per offload
    mode; for a quantized MLLM also with the MLLM kept on the accelerator throughout."""
    stages = p.residency(res)
    acts = p.activations(res)
    module_bytes = {n: m.bytes(precision if n == p.mllm else "bf16") for n, m in res.modules.items()}
    leaf_bytes = {n: m.leaf_bytes() for n, m in res.modules.items()}
    weights, with_act, where = {}, {}, {}
    variants = [((), MODES)] + ([((p.mllm,), ("none", *KEPT_MODES))] if precision != "bf16" else [])
    for pinned, names in variants:
        peaks = offload_peaks(stages, module_bytes, leaf_bytes, pinned)
        kept = sum(module_bytes[n] for n in pinned)
        model_act = kept + max(
            sum(module_bytes[n] for n in stages[s] if n not in pinned) + acts[s] for s in stages
        )
        for mode, name in zip(MODES, names, strict=True):
            weights[name] = peaks[mode][0]
            with_act[name] = model_act if mode == "model" else peaks[mode][0] + max(acts.values())
            where[name] = peaks[mode][1]
    leaf = where["sequential"]
    cap = p.capacity_gib * GIB
    return dict(
        pipeline=p.name,
        mllm_precision=precision,
        weights=weights,
        with_activations=with_act,
        model_stage=where["model"],
        sequential_leaf=f"{res.modules[leaf].label}: {res.modules[leaf].leaf}",
        capacity_gib=p.capacity_gib,
        fits_weights=[m for m in weights if weights[m] <= cap],
        fits_with_activations=[m for m in weights if with_act[m] <= cap],
    )


def print_tables(res: Results, runtime: float) -> dict:
    a = res.args
    print()
    print("## Modules at their published sizes (built on meta)")
    print()
    print("| module | params | bf16 GiB | fp32 GiB | MLLM int8 GiB | MLLM nf4 GiB | largest leaf (params) |")
    print("|---|---|---|---|---|---|---|")
    mllms = {p.mllm for p in pipelines()}
    for m in res.modules.values():
        quantized = (gib(m.bytes("int8")), gib(m.bytes("nf4"))) if m.name in mllms else ("-", "-")
        print(
            f"| {m.label} | {m.params:,} | {gib(m.bytes('bf16'))} | {gib(m.bytes('fp32'))} "
            f"| {quantized[0]} | {quantized[1]} | {m.leaf} ({m.leaf_params:,}) |"
        )

    print()
    print("## Parameter counts against the published totals")
    print()
    print("| module | counted | published (or closed form) | difference |")
    print("|---|---|---|---|")
    checks = {}
    for name, (published, label) in PUBLISHED_PARAMS.items():
        counted = res.modules[name].params
        diff = (counted - published) / published
        checks[name] = dict(counted=counted, published=published, relative_difference=diff)
        print(f"| {label} | {counted:,} | {published:,.0f} | {diff:+.3%} |")
    counted = res.stages["guide_llava"].cost.flops
    closed = llava_flops_closed_form(a["guidance_length"])
    checks["llava_forward_flops"] = dict(counted=counted, closed_form=closed)
    print(
        f"| LLaVA-1.5-13B forward FLOPs ({a['guidance_length']} tokens): FlopCounterMode vs closed form "
        f"| {counted:,} | {closed:,} | {(counted - closed) / closed:+.3%} |"
    )

    print()
    print(
        f"## Stages of one 1024x1024 image (SDXL {a['steps_sdxl']} steps, FLUX {a['steps_flux']} steps, "
        f"guidance length {a['guidance_length']})"
    )
    print()
    print(
        "| stage | forwards | TFLOPs/forward | TFLOPs/image | weights bf16 GiB | weights fp32 GiB "
        "| activations GiB (rough) | counted by | note |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for key, s in res.stages.items():
        if key.endswith("_denoise_ip"):
            continue
        weights = sum(res.modules[n].params for n in s.modules)
        print(
            f"| {s.family}: {s.name} | {s.calls} | {tflops(s.cost.flops)} | {tflops(s.flops)} "
            f"| {gib(2 * weights)} | {gib(4 * weights)} | {gib(s.cost.activation_bytes)} | {s.method} "
            f"| {s.note} |"
        )

    print()
    print("## IMG against the base generation (TFLOPs per image)")
    print()
    print(
        "| pipeline | base generation | guidance | encoding | aligner x3 | re-generation (base + IP extra) "
        "| IMG total | IMG / base | IMG over 2 x base | guidance share of IMG |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    summary = []
    for p in pipelines():
        base, total = p.flops(res)
        guide, encode, align, ip_extra = (res.stages[k].flops for k in p.img_stages())
        summary.append(
            dict(
                pipeline=p.name,
                base_flops=base,
                guidance_flops=guide,
                encoding_flops=encode,
                aligner_flops=align,
                regeneration_flops=base + ip_extra,
                img_flops=total,
                ratio=total / base,
            )
        )
        print(
            f"| {p.name} | {tflops(base)} | {tflops(guide)} | {tflops(encode)} | {tflops(align)} "
            f"| {tflops(base + ip_extra)} ({tflops(ip_extra)} IP) | {tflops(total)} | {total / base:.3f} "
            f"| {(total - 2 * base) / (2 * base):+.2%} | {guide / total:.2%} |"
        )

    print()
    print("## Peak resident weights under offload (GiB, weights only; rough activations after the slash)")
    print()
    print(
        "| pipeline | MLLM weights | none: all resident | model: one stage at a time "
        "| sequential: one leaf module at a time | model+kept (quantized MLLM stays) | sequential+kept "
        "| fits (weights only) | fits (+ activations) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    memory = []
    for p in pipelines():
        if "no true CFG" in p.name:
            continue  # the same modules as with true CFG
        for precision in ("bf16", "int8", "nf4"):
            row = memory_row(p, res, precision)
            memory.append(row)
            weights, total = row["weights"], row["with_activations"]
            cells = {m: f"{gib(weights[m])} / {gib(total[m])}" for m in weights}
            print(
                f"| {p.name} | {precision} | {cells['none']} | {cells['model']} ({row['model_stage']}) "
                f"| {cells['sequential']} ({row['sequential_leaf']}) "
                + "".join(f"| {cells.get(m, '-')} " for m in KEPT_MODES)
                + f"| {p.capacity_gib:g} GiB: {', '.join(row['fits_weights']) or '-'} "
                f"| {', '.join(row['fits_with_activations']) or '-'} |"
            )
    print()
    for target in ("SDXL + LLaVA-1.5-13B", "FLUX.1-dev (true CFG) + LLaVA-1.5-13B"):
        rows = [r for r in memory if r["pipeline"] == target]
        verdicts = []
        for r in rows:
            fits = [
                f"{m} {gib(r['with_activations'][m])}" for m in FASTEST if m in r["fits_with_activations"]
            ]
            tight = [m for m in r["fits_weights"] if m not in r["fits_with_activations"]]
            verdicts.append(
                f"{r['mllm_precision']} MLLM: {', '.join(fits) or 'nothing'}"
                + (f" (weights alone also fit with {', '.join(tight)})" if tight else "")
            )
        print(
            f"- {target} on a {rows[0]['capacity_gib']:g} GiB GPU, offload modes that fit, fastest first "
            f"(GiB with rough activations): {'; '.join(verdicts)}."
        )

    print()
    for note in res.notes:
        print(f"- {note}")
    print(f"- runtime: {runtime:.1f} s, torch {torch.__version__}, threads {torch.get_num_threads()}")
    return dict(
        args=a,
        modules={k: asdict(v) for k, v in res.modules.items()},
        stages={
            k: dict(asdict(v), flops_per_forward=v.cost.flops, flops=v.flops) for k, v in res.stages.items()
        },
        parameter_checks=checks,
        summary=summary,
        memory=memory,
        runtime_s=runtime,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps-sdxl", type=int, default=50)
    parser.add_argument("--steps-flux", type=int, default=30)
    parser.add_argument(
        "--guidance-length", type=int, default=680, help="LLaVA tokens: system text + 576 image + question"
    )
    parser.add_argument(
        "--qwen-image-size", type=int, default=1024, help="side of the image given to Qwen2.5-VL"
    )
    parser.add_argument("--json", help="also write the raw results here")
    parser.add_argument(
        "--tiny-repeats", type=int, default=3, help="timed runs of the tiny CPU pipeline (0 skips it)"
    )
    args = parser.parse_args()
    if args.guidance_length <= LLAVA_IMAGE_TOKENS:
        parser.error(f"--guidance-length must exceed the {LLAVA_IMAGE_TOKENS} image tokens")

    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()

    start = time.perf_counter()
    print(f"# IMG pipeline cost: meta-device builds, torch {torch.__version__}", flush=True)
    res = Results(args=vars(args))
    sdxl(res, args.steps_sdxl)
    flux(res, args.steps_flux)
    llava(res, args.guidance_length)
    qwen_length = qwen(res, args.guidance_length, args.qwen_image_size)
    aligners(res, args.guidance_length, qwen_length)
    res.notes += [
        "FLOPs: FlopCounterMode on meta tensors for every stage (no closed forms were needed): matmuls, "
        "convolutions and fused attention (full L x L, causal masks not halved), 1 multiply-add = 2 FLOPs; "
        "norms, activations and softmax are not counted.",
        "LLaVA: the vision tower + projector and the language model are run as two calls (the full call's "
        "placeholder check reads tensor values, which meta tensors do not have); same work. "
        "Qwen2.5-VL: its window/rotary indices are computed on the CPU from the image grid and passed in.",
        "One diffusion pipeline serves both passes (the official SDXL demo loads two SDXL pipelines: "
        "+4.8 GiB for the second UNet when all are resident).",
        "Qwen2.5-VL uses its own aligner (guidance_dim 3584, as the paper's Table 4 retrains it).",
        "Weights: int8 / nf4 = 1 / 0.5 byte per MLLM linear weight (LM head and embeddings kept bf16); "
        "bitsandbytes adds scales (nf4 absmax: +0.0625 byte per weight without double quantisation).",
        "Offload: model = the largest stage's modules resident (stages: text encoders, denoiser + IP "
        "layers, VAE, MLLM, image encoder + projection, aligner); sequential = the largest leaf module "
        "(accelerate's hook granularity); a block-level offload holds one transformer block instead.",
        "Activations: rough peak of live tensors (weights excluded) during the stage's forward on meta, "
        "bf16; SDXL's VAE decode in fp32, as diffusers upcasts it for fp16 SDXL (force_upcast; in bf16 "
        "it halves, and tiled decoding shrinks it); fused attention (no score matrix); no CUDA context, "
        "allocator slack or workspace (add ~0.5-1 GiB).",
    ]
    runtime = time.perf_counter() - start
    out = print_tables(res, runtime)
    if args.tiny_repeats > 0:
        out["tiny_wallclock"] = tiny_wallclock(args.tiny_repeats)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2, default=str)


def tiny_wallclock(repeats: int) -> dict:
    """Wall-clock IMG / base on the tiny random-weight SDXL + LLaVA + aligner of the tests, on this CPU.

    Base = one generation of the prompt batch; IMG = the whole pipeline call (base generation,
    guidance, encoding, 3 aligner passes, re-generation). Tiny models make the MLLM and the aligner
    relatively far cheaper or dearer than at real size: the FLOP table above is the real-size answer.
    """
    import tempfile
    from pathlib import Path

    from img_guidance import ImplicitAligner
    from img_guidance.pipeline import IMGPipeline
    from img_guidance.testing.llava import HIDDEN_SIZE, make_tiny_llava
    from img_guidance.testing.sdxl import make_tiny_sdxl

    with tempfile.TemporaryDirectory() as tmp:
        sdxl_paths = make_tiny_sdxl(Path(tmp) / "sdxl")
        aligner = ImplicitAligner(
            guidance_dim=HIDDEN_SIZE, image_dim=sdxl_paths["token_shape"][1], depth=1, heads=1
        )
        aligner.save_pretrained(Path(tmp) / "aligner")
        pipe = IMGPipeline.from_pretrained(
            sdxl_paths["model"],
            mllm=str(make_tiny_llava(Path(tmp) / "llava")),
            aligner=str(Path(tmp) / "aligner"),
            ip_adapter=sdxl_paths["ip_adapter"],
            image_encoder=sdxl_paths["image_encoder"],
            device="cpu",
            torch_dtype=torch.float32,
        )
        pipe.backend.pipe.set_progress_bar_config(disable=True)
        prompts = ["a red circle left of a blue square", "two green triangles"]
        sampling = dict(steps=10, height=32, width=32)
        pipe(prompts, seeds=0, **sampling)  # warm-up
        base, img, stages = [], [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            pipe.backend.generate(prompts, [0, 0], **sampling)
            base.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            out = pipe(prompts, seeds=0, **sampling)
            img.append(time.perf_counter() - t0)
            stages.append(out.rounds[0].seconds)
    best = min(range(repeats), key=lambda i: img[i])
    result = {"base_s": min(base), "img_s": min(img), "ratio": min(img) / min(base), "stages_s": stages[best]}
    print()
    print("## Wall clock on the tiny CPU models (batch 2, 32x32, 10 steps; best of", repeats, "runs)")
    print()
    print("| base s | IMG s | IMG / base | " + " | ".join(f"{k} s" for k in result["stages_s"]) + " |")
    print("|---" * (3 + len(result["stages_s"])) + "|")
    print(
        f"| {result['base_s']:.3f} | {result['img_s']:.3f} | {result['ratio']:.2f} | "
        + " | ".join(f"{v:.3f}" for v in result["stages_s"].values())
        + " |"
    )
    return result


if __name__ == "__main__":
    main()
