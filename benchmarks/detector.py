"""GPU memory of finetuning LLaVA-1.5 (7B / 13B) as the misalignment detector, per GPU, at real sizes.

Part 2 measures the recipe's training throughput (samples/s) at tiny size on this machine: the
tests' random-weight LLaVA and a tiny triplet parquet, full and LoRA, through ``finetune``.

Part 1 computes (does not measure) the memory of one training process: LLaVA-1.5 is built at its
published size from the config values in ``benchmarks/configs.py`` on the meta device (nothing is
allocated or downloaded), its parameters are counted per component, and the LoRA parameters are
counted by wrapping that meta model with peft's ``get_peft_model``. Modes, as the detector recipe
trains them (vision tower frozen; projector and language model trained; AdamW; accelerate bf16 mixed
precision):

- full: projector + language model trained;
- LoRA: r = 128, alpha = 256 on q/k/v/o/gate/up/down of the language model (LLaVA's LoRA recipe),
  projector fully trained, the rest frozen in bf16;
- QLoRA: LoRA as above over a 4-bit NF4 base with double quantization (bitsandbytes);
- full, ZeRO-3 / FSDP: full finetuning with weights, gradients and AdamW states sharded over 8 GPUs.

Bytes per parameter. Trainable parameters are kept in fp32 (master weights, 4 B), with fp32
gradients (4 B) and two fp32 AdamW states (8 B); autocast casts their matmul weights to bf16 and
keeps those copies (2 B) through the forward. The recipe builds ``torch.optim.AdamW(fused=True)`` on
CUDA, which needs no step temporaries (the default); ``--adamw foreach`` models the foreach
implementation, which allocates sqrt(exp_avg_sq) for all parameters at the step (4 B). Frozen
parameters are bf16 (2 B), except the language model's decoder linear weights under QLoRA: NF4 codes
(0.5 B) + an 8-bit absmax per 64 weights + an fp32 absmax per 256 blocks = 0.5159 B; the vision
tower, the embeddings, the LM head and the norms stay bf16. With LoRA, peft's ``modules_to_save``
keeps the projector's frozen original next to its trained copy.

Activations of one sample of s tokens (576 image + text; bf16 = 2 B), per decoder layer, counting the
tensors autograd saves (h hidden, f intermediate, a heads, r LoRA rank; per token, bytes):

    full:        34h + 8f + core        (fp32 residual stream: two RMSNorms save an fp32 input and an
                                         fp32 normalized copy, autocast saves one bf16 input per linear)
    LoRA, QLoRA: 14h + 6f + core + (6h + f)(2 + d) + 14r
                                        (frozen norms save the fp32 input only; each LoRA branch saves
                                         a bf16 copy of its input, + a 1-byte dropout mask, d = 1 when
                                         lora_dropout > 0, and its r-wide hidden)
    core = 2h + 4a   (SDPA memory-efficient / flash: output + fp32 log-sum-exp)
         = 6as       (eager: fp32 softmax + its bf16 copy)

This is the standard estimate of Korthikanti et al. 2022, s*h*(34 + 5*a*s/h) bytes per layer for a GPT
layer without fused attention, redone for a Llama layer (SwiGLU MLP, RMSNorm in fp32, no dropout);
with fused attention the a*s^2 term drops. Outside the layers: the projector saves 576 * (2v + 4h)
(v the vision width), the LM head's loss 10 * s * vocab (bf16 logits, their fp32 copy, fp32
log-softmax). The frozen vision tower saves nothing. With gradient checkpointing each decoder
layer keeps only its input (4h per token full, 2h LoRA) and one layer is recomputed at a time.

Peak per GPU = weights + AdamW states + FSDP working set + 1 GiB (CUDA context, workspaces)
               + max(autocast copies + activations,
                     gradients + max(one layer's activations, AdamW step temporaries)),
activations being those alive at the end of the forward (with checkpointing: the layer inputs, the
projector's and the loss's, and the layer being run). The backward frees activations and bf16 copies
as the gradients fill in, so the two do not add up: its end holds the full gradients and the first
layer's activations, the optimizer step the gradients and its temporaries. The FSDP working set is
two gathered units in bf16 (current + prefetched) and one unit's fp32 gradients before the
reduce-scatter, a unit being a decoder layer or the embedding + LM head.

    python -m benchmarks.detector                          # both sizes, batch 4, SDPA; then part 2
    python -m benchmarks.detector --skip-timing            # part 1 only, about 7 s
    python -m benchmarks.detector --batch-size 8 --attention eager --json detector.json
    python -m benchmarks.detector --sizes 7b --seq-len 700 --lora-dropout 0 --adamw fused
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from dataclasses import asdict, dataclass

import torch

if not __package__:
    sys.exit("run the benchmarks from the repository root as modules: python -m benchmarks.detector")

from benchmarks.configs import LLAVA, LLAVA_TEXT, LLAVA_VISION
from benchmarks.configs import LLAVA_PARAMS as PUBLISHED_PARAMS
from benchmarks.meter import GIB, gib

GPU_GIB = (24, 40, 80)
OVERHEAD_BYTES = 1.0 * GIB  # CUDA context, cuBLAS / attention workspaces, allocator slack (a floor)
# NF4 with double quantization: 4-bit codes, 8-bit absmax per 64 weights, fp32 absmax per 256 blocks
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
MODES = ("full", "lora", "qlora")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def llava_config(size: str):
    """The ``LlavaConfig`` of LLaVA-1.5-7B or -13B (``size`` "7b" or "13b")."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    if size not in LLAVA_TEXT:
        raise ValueError(f"size must be one of {sorted(LLAVA_TEXT)}, got {size!r}")
    return LlavaConfig(
        vision_config=CLIPVisionConfig(**LLAVA_VISION), text_config=LlamaConfig(**LLAVA_TEXT[size]), **LLAVA
    )


def build_meta(config):
    """``LlavaForConditionalGeneration`` on the meta device: shapes only, no memory."""
    from transformers import LlavaForConditionalGeneration

    with torch.device("meta"):
        return LlavaForConditionalGeneration(config)


def image_tokens(config) -> int:
    vision = config.vision_config
    return (vision.image_size // vision.patch_size) ** 2


# ---------------------------------------------------------------------------------------------
# Parameter counts
# ---------------------------------------------------------------------------------------------


@dataclass
class ParameterBreakdown:
    vision_tower: int
    projector: int
    language_model: int  # decoder stack, embeddings, final norm and LM head
    embeddings: int
    lm_head: int
    decoder_linear: int  # linear weights of the decoder layers: what bitsandbytes quantizes
    decoder_layer: int  # one decoder layer, the FSDP unit

    @property
    def total(self) -> int:
        return self.vision_tower + self.projector + self.language_model


def parameter_breakdown(config) -> ParameterBreakdown:
    """Exact parameter counts of the model ``config`` describes, built on the meta device."""
    model = build_meta(config)

    def count(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    layers = model.model.language_model.layers
    return ParameterBreakdown(
        vision_tower=count(model.model.vision_tower),
        projector=count(model.model.multi_modal_projector),
        language_model=count(model.model.language_model) + count(model.lm_head),
        embeddings=count(model.model.language_model.embed_tokens),
        lm_head=count(model.lm_head),
        decoder_linear=sum(m.weight.numel() for m in layers.modules() if isinstance(m, torch.nn.Linear)),
        decoder_layer=count(layers[0]),
    )


def lora_trainable(config, r: int, targets: tuple[str, ...] = LORA_TARGETS) -> int:
    """LoRA parameters of rank ``r`` on the language model's ``targets`` linears, counted exactly by
    wrapping the meta model with peft (the vision tower's q/k/v_proj are not targeted)."""
    from peft import LoraConfig, get_peft_model

    if r <= 0:
        raise ValueError(f"LoRA rank must be positive, got {r}")
    lora = LoraConfig(r=r, lora_alpha=2 * r, target_modules=rf".*language_model\..*\.({'|'.join(targets)})")
    # on meta, so that the adapters' initialisation allocates and samples nothing
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore", FutureWarning)  # peft calls a deprecated transformers alias
        model = get_peft_model(build_meta(config), lora)
    return sum(p.numel() for name, p in model.named_parameters() if "lora_" in name)


# ---------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------


def activation_bytes(
    config,
    *,
    mode: str,
    seq_len: int,
    checkpointing: bool,
    attention: str = "sdpa",
    lora_rank: int = 0,
    lora_dropout: float = 0.0,
) -> tuple[float, float]:
    """(kept, layer) activation bytes of one sample: those alive at the end of the forward
    (with checkpointing: the layer inputs, projector and loss) and one decoder layer's."""
    text = config.text_config
    h, f, a = text.hidden_size, text.intermediate_size, text.num_attention_heads
    if attention == "sdpa":
        core = 2 * h + 4 * a
    elif attention == "eager":
        core = 6 * a * seq_len
    else:
        raise ValueError(f"attention must be 'sdpa' or 'eager', got {attention!r}")
    if mode == "full":
        per_token = 34 * h + 8 * f + core
        final_norm, stream = 10 * h, 4
    else:
        per_token = 14 * h + 6 * f + core + (6 * h + f) * (2 + (lora_dropout > 0)) + 14 * lora_rank
        final_norm, stream = 4 * h, 2
    layer = seq_len * per_token
    outside = image_tokens(config) * (2 * config.vision_config.hidden_size + 4 * h)
    outside += seq_len * (final_norm + 10 * text.vocab_size)
    if checkpointing:
        return text.num_hidden_layers * seq_len * stream * h + outside, layer
    return text.num_hidden_layers * layer + outside, layer


@dataclass
class MemoryEstimate:
    mode: str
    shards: int
    batch_size: int
    checkpointing: bool
    trainable: int
    weights: float
    gradients: float
    optimizer: float
    optimizer_step: float  # temporaries of the AdamW step
    autocast_copies: float
    fsdp_working_set: float
    activations_kept: float  # alive at the end of the forward
    activations_layer: float  # one decoder layer's (with checkpointing: recomputed in the backward)
    overhead: float = OVERHEAD_BYTES

    @property
    def activations(self) -> float:
        return self.activations_kept + (self.activations_layer if self.checkpointing else 0.0)

    @property
    def peak(self) -> float:
        # the end of the forward (with checkpointing while the last layer runs) against the end of the
        # backward (the gradients full, the first layer's activations in use) and the optimizer step
        forward = self.autocast_copies + self.activations
        backward = self.gradients + max(self.activations_layer, self.optimizer_step)
        return self.weights + self.optimizer + max(forward, backward) + self.fsdp_working_set + self.overhead

    def smallest_gpu(self) -> int | None:
        """The smallest of the 24 / 40 / 80 GiB GPUs the peak fits, None if none."""
        return next((g for g in GPU_GIB if self.peak <= g * GIB), None)


def memory_estimate(
    config,
    params: ParameterBreakdown,
    *,
    mode: str,
    lora_params: int = 0,
    lora_rank: int = 128,
    lora_dropout: float = 0.05,
    batch_size: int = 1,
    seq_len: int = 680,
    checkpointing: bool = False,
    attention: str = "sdpa",
    adamw: str = "foreach",
    shards: int = 1,
) -> MemoryEstimate:
    """Peak memory of one training process; ``shards`` > 1 shards weights, gradients and AdamW
    states FSDP / ZeRO-3 style over that many GPUs."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if adamw not in ("foreach", "fused"):
        raise ValueError(f"adamw must be 'foreach' or 'fused', got {adamw!r}")
    if mode != "full" and lora_params <= 0:
        raise ValueError(f"mode {mode!r} needs the LoRA parameter count, got lora_params={lora_params}")
    if batch_size < 1 or shards < 1:
        raise ValueError(f"batch_size and shards must be >= 1, got {batch_size} and {shards}")
    if seq_len <= image_tokens(config):
        raise ValueError(f"seq_len must exceed the {image_tokens(config)} image tokens, got {seq_len}")

    if mode == "full":
        trainable = params.projector + params.language_model
        frozen = 2.0 * params.vision_tower
        # matmul weights autocast copies to bf16: all trainable but the embeddings and the norms
        cast = params.projector + params.decoder_linear + params.lm_head
    else:
        trainable = params.projector + lora_params
        # the projector's frozen original stays next to its trained copy (peft's modules_to_save)
        base = params.vision_tower + params.projector + params.language_model
        frozen = 2.0 * base
        if mode == "qlora":
            frozen -= (2.0 - NF4_BYTES) * params.decoder_linear
        cast = trainable
    kept, layer = activation_bytes(
        config,
        mode=mode,
        seq_len=seq_len,
        checkpointing=checkpointing,
        attention=attention,
        lora_rank=0 if mode == "full" else lora_rank,
        lora_dropout=lora_dropout,
    )
    working_set, copies = 0.0, 2.0 * cast
    if shards > 1:
        # FSDP gathers each unit in bf16: no whole-model autocast copies
        unit = max(params.decoder_layer, params.embeddings + params.lm_head)
        working_set, copies = (2 * 2.0 + 4.0) * unit, 0.0
    return MemoryEstimate(
        mode=mode,
        shards=shards,
        batch_size=batch_size,
        checkpointing=checkpointing,
        trainable=trainable,
        weights=(frozen + 4.0 * trainable) / shards,
        gradients=4.0 * trainable / shards,
        optimizer=8.0 * trainable / shards,
        optimizer_step=(4.0 if adamw == "foreach" else 0.0) * trainable / shards,
        autocast_copies=copies,
        fsdp_working_set=working_set,
        activations_kept=batch_size * kept,
        activations_layer=batch_size * layer,
    )


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def billions(n: int) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def gpu(estimate: MemoryEstimate) -> str:
    smallest = estimate.smallest_gpu()
    return f"{smallest}" if smallest else f">{GPU_GIB[-1]}"


def print_parameters(sizes: dict[str, dict]) -> None:
    print("## Parameters (meta-device build; LoRA counted by peft get_peft_model on the meta model)")
    print()
    print(
        "| model | vision tower (frozen) | projector | language model (embeddings / decoder linear / LM head)"
        " | total | published | deviation | LoRA params | trainable with LoRA |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for size, s in sizes.items():
        p: ParameterBreakdown = s["params"]
        published = PUBLISHED_PARAMS[size]
        print(
            f"| LLaVA-1.5-{size.upper()} | {p.vision_tower:,} | {p.projector:,} | {p.language_model:,} "
            f"({billions(p.embeddings)} / {billions(p.decoder_linear)} / {billions(p.lm_head)}) "
            f"| {p.total:,} | ~{published / 1e9:.2f}B | {(p.total - published) / published:+.2%} "
            f"| {s['lora']:,} | {s['lora'] + p.projector:,} |"
        )


def print_activation_formula(sizes: dict[str, dict], args: argparse.Namespace) -> None:
    print()
    print(f"## Activations per sample ({args.seq_len} tokens, {args.attention} attention, bf16)")
    print()
    print(
        "Per decoder layer and token (bytes): full 34h + 8f + core; LoRA / QLoRA 14h + 6f + core "
        "+ (6h + f)(2 + d) + 14r; core = 2h + 4a (SDPA) or 6as (eager); d = 1 with LoRA dropout. "
        "Checkpointing keeps each layer's input (4h full, 2h LoRA) and recomputes one layer. "
        "Outside the layers: projector 576(2v + 4h), loss 10 s vocab."
    )
    print()
    print("| model | mode | one layer (GiB) | no ckpt: all layers + outside | ckpt: kept + one layer |")
    print("|---|---|---|---|---|")
    for size, s in sizes.items():
        config = s["config"]
        layers = config.text_config.num_hidden_layers
        for mode in ("full", "lora"):
            common = dict(
                mode=mode,
                seq_len=args.seq_len,
                attention=args.attention,
                lora_rank=args.lora_rank if mode == "lora" else 0,
                lora_dropout=args.lora_dropout,
            )
            kept, layer = activation_bytes(config, checkpointing=False, **common)
            ckpt_kept, _ = activation_bytes(config, checkpointing=True, **common)
            label = "full" if mode == "full" else "LoRA / QLoRA"
            print(
                f"| LLaVA-1.5-{size.upper()} ({layers} layers) | {label} | {gib(layer, 3)} | {gib(kept, 2)} "
                f"| {gib(ckpt_kept, 2)} + {gib(layer, 3)} |"
            )


def print_memory(rows: list[dict], batch_size: int) -> None:
    print()
    print(
        f"## Peak GPU memory per GPU, one training process (GiB; 'a / b' = without / with gradient "
        f"checkpointing; smallest of {' / '.join(map(str, GPU_GIB))} GiB GPUs that fits)"
    )
    print()
    print(
        "| model | mode | trainable | weights | grads | AdamW states + step temporaries "
        "| autocast copies (FSDP: gathered units) "
        "| activations / sample "
        f"| peak bs 1 | peak bs {batch_size} | fits bs 1 | fits bs {batch_size} |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        one, one_ckpt, many, many_ckpt = row["estimates"]
        print(
            f"| LLaVA-1.5-{row['size'].upper()} | {row['label']} | {billions(one.trainable)} "
            f"| {gib(one.weights, 1)} | {gib(one.gradients, 1)} "
            f"| {gib(one.optimizer, 1)} + {gib(one.optimizer_step, 1)} "
            f"| {gib(one.autocast_copies + one.fsdp_working_set, 1)} "
            f"| {gib(one.activations, 1)} / {gib(one_ckpt.activations, 1)} "
            f"| {gib(one.peak, 1)} / {gib(one_ckpt.peak, 1)} "
            f"| {gib(many.peak, 1)} / {gib(many_ckpt.peak, 1)} "
            f"| {gpu(one)} / {gpu(one_ckpt)} | {gpu(many)} / {gpu(many_ckpt)} |"
        )


NOTES = [
    "Computed, not measured: parameter counts are exact (meta-device build of the published configs); "
    "memory follows the byte counts and activation formula above.",
    "Mixed precision as accelerate runs it with bf16: trainable parameters fp32 (master weights), "
    "fp32 gradients, AdamW exp_avg / exp_avg_sq fp32; frozen parameters bf16; autocast keeps a bf16 "
    "copy of every trainable matmul weight through the forward (FSDP gathers bf16 instead).",
    "AdamW fused, as the recipe builds it on CUDA: no step temporaries; --adamw foreach adds "
    "sqrt(exp_avg_sq) for every trainable parameter at the step (4 B).",
    "LoRA / QLoRA: adapters in fp32 (peft's default autocast_adapter_dtype), the projector trained "
    "through peft's modules_to_save (its bf16 original kept). QLoRA quantizes the language model's "
    "decoder linears only (vision tower, projector, embeddings and LM head stay bf16) and keeps the "
    "frozen bf16 parameters bf16 (peft's prepare_model_for_kbit_training upcasts them to fp32: +2 B each).",
    "Single process, no DDP: DDP's gradient buckets add about the gradients' size again unless "
    "gradient_as_bucket_view=True. ZeRO-3 / FSDP x 8: weights, gradients and AdamW states / 8; "
    "activations are not sharded.",
    f"Overhead: {gib(OVERHEAD_BYTES, 1)} GiB for the CUDA context and workspaces, a floor; allocator "
    "fragmentation adds to it. GPU sizes in GiB, nominal: a card exposes a little less.",
]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", nargs="+", choices=list(LLAVA_TEXT), default=list(LLAVA_TEXT))
    parser.add_argument("--batch-size", type=int, default=4, help="per-GPU batch of the second peak column")
    parser.add_argument("--seq-len", type=int, default=680, help="tokens per sample: 576 image + text")
    parser.add_argument("--attention", choices=("sdpa", "eager"), default="sdpa")
    parser.add_argument("--lora-rank", type=int, default=128)
    parser.add_argument("--lora-dropout", type=float, default=0.05)
    parser.add_argument(
        "--adamw",
        choices=("foreach", "fused"),
        default="fused",
        help="torch.optim.AdamW implementation (the recipe uses fused on CUDA)",
    )
    parser.add_argument("--shards", type=int, default=8, help="GPUs of the ZeRO-3 / FSDP row")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument(
        "--skip-timing", action="store_true", help="compute part 1 only, skip the measured part"
    )
    parser.add_argument("--steps", type=int, default=12, help="measured steps per method in part 2")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.shards < 2 or args.lora_rank < 1:
        parser.error(
            f"--batch-size and --lora-rank must be >= 1 and --shards >= 2, got {args.batch_size}, "
            f"{args.lora_rank} and {args.shards}"
        )
    configs = {size: llava_config(size) for size in args.sizes}
    tokens = image_tokens(next(iter(configs.values())))
    if args.seq_len <= tokens:
        parser.error(f"--seq-len must exceed the {tokens} image tokens, got {args.seq_len}")

    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    print(
        f"# LLaVA-1.5 detector finetuning: memory per GPU, computed at real size, torch {torch.__version__}"
    )
    print()
    sizes = {
        size: dict(
            config=config, params=parameter_breakdown(config), lora=lora_trainable(config, args.lora_rank)
        )
        for size, config in configs.items()
    }
    print_parameters(sizes)
    print_activation_formula(sizes, args)

    rows = []
    variants = ((1, False), (1, True), (args.batch_size, False), (args.batch_size, True))
    for size, s in sizes.items():
        for label, mode, shards in (
            ("full", "full", 1),
            (f"full, ZeRO-3 / FSDP x {args.shards}", "full", args.shards),
            (f"LoRA r={args.lora_rank}", "lora", 1),
            (f"QLoRA r={args.lora_rank} (NF4 + DQ)", "qlora", 1),
        ):
            estimates = [
                memory_estimate(
                    s["config"],
                    s["params"],
                    mode=mode,
                    lora_params=s["lora"],
                    lora_rank=args.lora_rank,
                    lora_dropout=args.lora_dropout,
                    batch_size=batch,
                    seq_len=args.seq_len,
                    checkpointing=checkpointing,
                    attention=args.attention,
                    adamw=args.adamw,
                    shards=shards,
                )
                for batch, checkpointing in variants
            ]
            rows.append(dict(size=size, label=label, estimates=estimates))
    print_memory(rows, args.batch_size)
    print()
    for note in NOTES:
        print(f"- {note}")

    timing = None if args.skip_timing else measure_training(steps=args.steps)

    out = dict(
        timing=timing,
        args=vars(args),
        parameters={
            size: dict(asdict(s["params"]), total=s["params"].total, lora=s["lora"])
            for size, s in sizes.items()
        },
        memory=[
            dict(
                size=row["size"], label=row["label"], **asdict(e), peak=e.peak, smallest_gpu=e.smallest_gpu()
            )
            for row in rows
            for e in row["estimates"]
        ],
        notes=NOTES,
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


# ---------------------------------------------------------------------------------------------
# Part 2: measured samples/s of the recipe's training step at tiny size, on this machine
# ---------------------------------------------------------------------------------------------


def measure_training(*, steps: int, batch_size: int = 4) -> list[dict]:
    """Run the detector recipe (``finetune``) on the tests' tiny random-weight LLaVA (2 layers,
    width 32, 28 px images, character-level tokenizer: about 300 tokens per sample) and a tiny
    InstructPix2Pix parquet, full and LoRA; report the recipe's own samples/s over the steps after
    the first (data reading, preprocessing, forward, backward and optimizer step included)."""
    import tempfile
    import time
    from pathlib import Path

    from img_guidance.recipes.finetune_detector import FinetuneConfig, finetune
    from img_guidance.testing.llava import make_tiny_llava
    from img_guidance.testing.triplets import TripletRow, solid, write_instructpix2pix_parquet

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        llava = make_tiny_llava(root / "llava")
        rows = [
            TripletRow(
                image=solid((40 * i % 255, 90, 160)), prompt=f"a scene {i}", instruction=f"add {i} dots"
            )
            for i in range((steps + 1) * batch_size)
        ]
        write_instructpix2pix_parquet(root / "data.parquet", rows, row_group_size=32)
        for method in ("full", "lora"):
            cfg = FinetuneConfig(
                model=str(llava),
                data=str(root / "data.parquet"),
                output_dir=str(root / method),
                method=method,
                lora_r=8,
                lora_alpha=16,
                batch_size=batch_size,
                max_steps=steps + 1,
                log_every=1,
                checkpoint_every=10**6,
                report_to=[],
            )
            start = time.perf_counter()
            summary = finetune(cfg)
            rates = [row["train/samples_per_s"] for row in summary["history"][1:]]
            results.append(
                dict(
                    method=method,
                    batch_size=batch_size,
                    steps=len(rates),
                    samples_per_s=sum(rates) / len(rates),
                    wall_s=time.perf_counter() - start,
                )
            )
    print()
    print(
        f"## Part 2: measured, tiny LLaVA, {torch.get_num_threads()} CPU threads, torch {torch.__version__}"
    )
    print()
    print("| method | batch | steps | samples/s (recipe's log) | whole run incl. load and save (s) |")
    print("|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['method']} | {r['batch_size']} | {r['steps']} | {r['samples_per_s']:.1f} "
            f"| {r['wall_s']:.1f} |"
        )
    return results


if __name__ == "__main__":
    main()
