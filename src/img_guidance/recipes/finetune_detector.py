"""Finetune a multimodal LLM into a misalignment detector on instruction triplets (paper Sec. 3.2).

The paper turns LLaVA-1.5-13B into the detector whose hidden states guide the aligner by finetuning
it for one epoch on InstructPix2Pix triplets {I0, T1, TE}: the model sees the original image I0 with
a question asking how it should change to match the edited prompt T1, and learns to answer with the
edit instruction TE. An accelerate recipe in torchtune's shape (:class:`DetectorRecipe`: ``setup``,
``train_step``, ``save_checkpoint``, ``train``, ``cleanup``)::

    img-guidance finetune-detector configs/detector_llava13b_lora.yaml [key=value ...] [--resume [PATH]]
    accelerate launch --multi_gpu --num_processes 8 -m img_guidance.recipes.finetune_detector CONFIG ...

Each sample: question = a template from the project's 100 (or ``questions``) drawn from
(``question_seed``, the triplet's row index), with T1 filled in; the model text is built by the
guidance wrapper itself (:meth:`~img_guidance.guidance.llava.TransformersGuidance.examples`,
:meth:`~img_guidance.guidance.llava.TransformersGuidance.encode`), so training and guidance share
one prompt format and one image preprocessing. Labels are the answer tokens only: the system text,
image, question and assistant tag are masked out (-100), as is padding.

``method: full`` trains the language model and the projector; ``method: lora`` adds peft LoRA
adapters to the language model's projections and trains the projector fully (``modules_to_save``).
The vision tower is frozen unless ``freeze_vision: false``; ``freeze_norms: true`` keeps every
normalization layer's weights as the base has them. Trainable weights are kept in float32
(master weights) whatever ``dtype`` the frozen ones are loaded in; ``mixed_precision`` autocasts.

Data is streamed in source order (one epoch = one pass); process p of N reads the rows whose index
is p modulo N, decoding only those. Checkpoints record each process's next row, so ``--resume``
continues with the very next batch and equals an uninterrupted run (same process count).

Output folder::

    OUTPUT/config.yaml                       the resolved config
    OUTPUT/checkpoints/step_00000500/        trainable.safetensors (trainable weights only),
                                             optimizer.pt, scheduler.pt, rng/process_<i>.pt,
                                             trainer_state.json (step, epoch, rows, config)
    OUTPUT/eval/step_00000500.json           held-out loss, exact match, token F1, generated examples
    OUTPUT/logs/img-guidance-detector/       TensorBoard events
    OUTPUT/final/                            the detector: a transformers folder (full, or LoRA merged)
                                             or a peft adapter folder (LoRA unmerged); either loads
                                             with load_guidance(OUTPUT/final) / --mllm OUTPUT/final

``final`` also holds ``img_guidance_detector.json`` (the prompt format and questions it was trained
with), from which the guidance stage takes its prompt format. Exit status of :func:`main`: 0 done,
1 the loss went non-finite, 2 a bad command line or config.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader, IterableDataset

from img_guidance.precision import resolve_dtype
from img_guidance.recipes.checkpoint import (
    changed_keys,
    checkpoint_name,
    diverged,
    hparams,
    latest_checkpoint,
    read_checkpoint,
    recipe_accelerator,
    remove_stale_temps,
    resume_point,
    write_checkpoint,
    write_folder,
)
from img_guidance.recipes.config import (
    ConfigError,
    TrainingDiverged,
    config_to_dict,
    run_recipe,
)

if TYPE_CHECKING:
    from img_guidance.data.triplets import InstructionTriplet
    from img_guidance.guidance.llava import TransformersGuidance

METHODS = ("full", "lora")
MIXED_PRECISION = ("no", "bf16", "fp16")
SCHEDULERS = ("cosine", "linear", "constant")
REPORTERS = ("tensorboard", "wandb")
TRACKER_PROJECT = "img-guidance-detector"
# LLaVA's LoRA recipe adapts every projection of the language model
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# keys that may change between a run and its resumption without making the resumption inexact
RESUME_FREE_KEYS = {
    "max_steps",
    "checkpoint_every",
    "keep_checkpoints",
    "log_every",
    "eval_every",
    "eval_max_new_tokens",
    "eval_examples",
    "num_workers",
    "report_to",
    "output_dir",
    "merge_lora",
}
TRAINABLE_FILE = "trainable.safetensors"
IGNORE_INDEX = -100


@dataclass
class FinetuneConfig:
    """Every key of a detector finetuning config. Defaults follow LLaVA-1.5's published finetune
    recipe (lr 2e-5 full / 2e-4 LoRA, cosine schedule, 3% warm-up, no weight decay, 1 epoch)."""

    model: str  # the MLLM to finetune: a guidance preset, a folder or a hub id
    data: str  # triplets: InstructPix2Pix parquet file/folder/hub dataset id, or JSONL
    output_dir: str
    prompt_format: str | None = None  # None: the model's default (the preset's, else llava_v0 / chat)
    questions: str | None = None  # JSON file of question templates (default: the project's 100)
    question_seed: int = 0
    # held-out triplets: the first val_rows rows of val_data, or of data (then not trained on)
    val_data: str | None = None
    val_rows: int = 0
    limit: int | None = None  # train on the rows before this one only
    # what is trained
    method: str = "full"
    lora_r: int = 128
    lora_alpha: int = 256
    lora_dropout: float = 0.05
    lora_targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    merge_lora: bool = False
    freeze_vision: bool = True
    train_projector: bool = True
    # keep every normalization layer's weights (LayerNorm, RMSNorm) as the base model has them
    freeze_norms: bool = False
    quantization: str | None = None  # 4bit / 8bit base weights (QLoRA; bitsandbytes and a GPU)
    # frozen weights' dtype; None: bfloat16 where native under mixed_precision, else float32
    dtype: str | None = None
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    # optimisation
    epochs: int = 1
    max_steps: int | None = None  # None: epochs over the data
    batch_size: int = 4  # per process and micro-step
    gradient_accumulation_steps: int = 1
    lr: float = 2e-5
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    lr_scheduler: str = "cosine"
    max_grad_norm: float = 1.0  # 0: off
    max_length: int = 2048
    seed: int = 0
    num_workers: int = 0  # 0, or 1: a background process reads and preprocesses the next batches
    # bookkeeping
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate at the end only
    eval_max_new_tokens: int = 48
    eval_examples: int = 5
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])


def check_config(cfg: FinetuneConfig) -> None:
    """Every value checked before any data or model is touched; errors name the key and value."""
    from img_guidance.guidance.prompts import PROMPT_FORMATS

    for key in ("epochs", "batch_size", "gradient_accumulation_steps", "max_length", "checkpoint_every"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{key} must be at least 1, got {getattr(cfg, key)}")
    for key in ("val_rows", "log_every", "eval_every", "eval_max_new_tokens", "eval_examples"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"{key} must be 0 or more, got {getattr(cfg, key)}")
    if cfg.keep_checkpoints < 0:
        raise ConfigError(f"keep_checkpoints must be 0 (keep all) or more, got {cfg.keep_checkpoints}")
    for key in ("max_steps", "limit"):
        if getattr(cfg, key) is not None and getattr(cfg, key) < 1:
            raise ConfigError(f"{key} must be null or at least 1, got {getattr(cfg, key)}")
    for key in ("lr", "weight_decay", "max_grad_norm", "lora_dropout", "warmup_ratio"):
        value = getattr(cfg, key)
        if not math.isfinite(value) or value < 0 or (key == "lr" and value == 0):
            raise ConfigError(
                f"{key} must be a finite number {'> 0' if key == 'lr' else '>= 0'}, got {value}"
            )
    if cfg.warmup_ratio >= 1 or cfg.lora_dropout >= 1:
        raise ConfigError(
            f"warmup_ratio and lora_dropout must be below 1, got {cfg.warmup_ratio}, {cfg.lora_dropout}"
        )
    if not cfg.output_dir:
        raise ConfigError("output_dir must be set")
    choices = {
        "method": METHODS,
        "mixed_precision": MIXED_PRECISION,
        "lr_scheduler": SCHEDULERS,
        "prompt_format": (None, *PROMPT_FORMATS),
        "quantization": (None, "4bit", "8bit"),
        "dtype": (None, "float32", "bfloat16", "float16"),
    }
    for key, valid in choices.items():
        if getattr(cfg, key) not in valid:
            names = ", ".join("null" if v is None else v for v in valid)
            raise ConfigError(f"{key} must be one of {names}, got {getattr(cfg, key)!r}")
    if cfg.method == "lora":
        if cfg.lora_r < 1 or cfg.lora_alpha < 1:
            raise ConfigError(f"lora_r and lora_alpha must be at least 1, got {cfg.lora_r}, {cfg.lora_alpha}")
        if not cfg.lora_targets:
            raise ConfigError("lora_targets must name at least one projection (e.g. q_proj)")
    if cfg.quantization is not None and cfg.method != "lora":
        raise ConfigError(
            f"quantization {cfg.quantization!r} trains adapters on frozen weights: set method: lora"
        )
    if cfg.merge_lora and cfg.method != "lora":
        raise ConfigError("merge_lora applies to method: lora only")
    if cfg.merge_lora and cfg.quantization is not None:
        raise ConfigError(
            "merge_lora cannot merge into quantized weights: save the adapter (merge_lora: false) and load "
            "it over the unquantized base"
        )
    if cfg.dtype in ("bfloat16", "float16") and cfg.mixed_precision == "no":
        raise ConfigError(
            f"dtype {cfg.dtype} keeps frozen weights in half precision, which needs autocast: "
            "set mixed_precision: bf16 (or fp16)"
        )
    if cfg.num_workers not in (0, 1):
        raise ConfigError(f"num_workers must be 0 or 1 (the stream is read in order), got {cfg.num_workers}")
    if any(r not in REPORTERS for r in cfg.report_to):
        raise ConfigError(f"report_to may list {', '.join(REPORTERS)}, got {cfg.report_to}")
    if "wandb" in cfg.report_to:
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise ConfigError(
                "report_to asks for wandb, which is not installed: pip install wandb, or drop it"
            )
    if cfg.val_data is not None and cfg.val_rows == 0:
        raise ConfigError("val_data is set but val_rows is 0: say how many of its rows to evaluate on")
    if cfg.questions is not None and not Path(cfg.questions).is_file():
        raise ConfigError(f"questions file {cfg.questions} does not exist")


# -- examples --------------------------------------------------------------------------------------


class ExampleBuilder:
    """Triplets -> model inputs with answer-only labels, through the detector's own prompt format
    and preprocessing.

    A batch: ``inputs`` (what the model's forward takes, right-padded), ``labels`` [B, L] (the
    input ids where the answer is, -100 elsewhere), ``index`` [B] (row indices), ``next_row`` (the
    row after the last triplet in the batch).
    """

    def __init__(
        self, detector: TransformersGuidance, *, questions: Sequence[str], question_seed: int, max_length: int
    ):
        self.detector = detector
        self.questions = tuple(questions)
        self.question_seed = question_seed
        self.max_length = max_length

    def question(self, triplet: InstructionTriplet) -> str:
        """The filled question of a triplet: a template drawn from (question_seed, row index)."""
        from img_guidance.guidance.questions import choose_question, fill

        return fill(choose_question(self.question_seed, triplet.index, self.questions), triplet.prompt)

    def __call__(self, triplets: Sequence[InstructionTriplet]) -> dict[str, Any]:
        questions = [self.question(t) for t in triplets]
        examples = self.detector.examples(questions, [t.instruction for t in triplets])
        images = [t.image for t in triplets]
        full = self.detector.encode(images, [prompt + target for prompt, target in examples])
        prompts = self.detector.encode(images, [prompt for prompt, _ in examples])
        prompt_lengths = prompts["attention_mask"].sum(1)
        ids, mask = full["input_ids"], full["attention_mask"].bool()
        labels = ids.masked_fill(~mask, IGNORE_INDEX)
        for i, length in enumerate(prompt_lengths.tolist()):
            if not torch.equal(ids[i, :length], prompts["input_ids"][i, :length]):
                raise ValueError(
                    f"row {triplets[i].row_id}: the prompt tokenizes differently alone and followed by its "
                    f"answer, so the answer cannot be told apart: {examples[i][0]!r} + {examples[i][1]!r}"
                )
            if length >= self.max_length:
                raise ValueError(
                    f"row {triplets[i].row_id}: the prompt alone is {length} tokens, which leaves no room "
                    f"for the answer within max_length {self.max_length}; raise max_length"
                )
            labels[i, :length] = IGNORE_INDEX
        inputs = dict(full)
        if ids.shape[1] > self.max_length:  # cut every [B, L] tensor: answers lose their tails
            for key, value in inputs.items():
                if torch.is_tensor(value) and value.shape[:2] == ids.shape:
                    inputs[key] = value[:, : self.max_length]
            labels = labels[:, : self.max_length]
        return {
            "inputs": inputs,
            "labels": labels,
            "index": torch.tensor([t.index for t in triplets]),
            "next_row": triplets[-1].index + 1,
        }


class TripletBatches(IterableDataset):
    """Collated batches of this process's triplets (rows ``i`` with ``i % num_processes ==
    process_index``) of ``[start, stop)``, in source order; each batch also carries the reader's
    running counts (``stats``)."""

    def __init__(
        self,
        source: str,
        *,
        build: ExampleBuilder,
        batch_size: int,
        start: int,
        stop: int | None,
        process_index: int = 0,
        num_processes: int = 1,
    ):
        self.source, self.build, self.batch_size = source, build, batch_size
        self.start, self.stop = start, stop
        self.process_index, self.num_processes = process_index, num_processes

    def __iter__(self) -> Iterator[dict[str, Any]]:
        from img_guidance.data.triplets import TripletStats, iter_triplets

        stats = TripletStats()
        n, p = self.num_processes, self.process_index
        batch: list[InstructionTriplet] = []
        triplets = iter_triplets(
            self.source, start=self.start, stop=self.stop, keep=lambda i: i % n == p, stats=stats
        )
        for triplet in triplets:
            batch.append(triplet)
            if len(batch) == self.batch_size:
                yield {**self.build(batch), "stats": stats.as_dict()}
                batch = []
        if batch:
            yield {**self.build(batch), "stats": stats.as_dict()}


# -- model -----------------------------------------------------------------------------------------


def load_detector(cfg: FinetuneConfig, device: torch.device) -> TransformersGuidance:
    """The MLLM to finetune, through the guidance loader (presets, folders, hub ids, the original
    LLaVA layout), in the prompt format it will be read with."""
    from img_guidance.guidance import load_guidance
    from img_guidance.guidance.llava import TransformersGuidance

    # frozen weights in half precision need autocast (check_config): without it, unset, they are float32
    dtype = (
        torch.float32
        if cfg.dtype is None and cfg.mixed_precision == "no"
        else resolve_dtype(cfg.dtype, device)
    )
    try:
        detector = load_guidance(
            cfg.model,
            prompt_format=cfg.prompt_format,
            torch_dtype=dtype,
            device=None if cfg.quantization else device,
            quantization=cfg.quantization,
        )
    except (FileNotFoundError, ImportError, ValueError) as err:
        raise ConfigError(f"model {cfg.model}: {err}") from err
    if not isinstance(detector, TransformersGuidance):
        raise ConfigError(f"model {cfg.model} is not a transformers MLLM the recipe can finetune")
    detector.dtype = dtype
    if os.path.exists(detector.location):  # the base an unmerged adapter names
        detector.location = os.path.abspath(detector.location)
    return detector


def _is_vision(name: str) -> bool:
    return (".vision_tower." in f".{name}" or ".visual." in f".{name}") and not _is_projector(name)


def _is_projector(name: str) -> bool:
    return ".multi_modal_projector." in f".{name}" or ".visual.merger." in f".{name}"


def projector_module(model: torch.nn.Module) -> str:
    """The name (last part) of the module mapping image features into the language model."""
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules() if _is_projector(name + ".")}
    for candidate in ("multi_modal_projector", "merger"):
        if candidate in names:
            return candidate
    raise ConfigError(
        f"cannot find the projector (multi_modal_projector or visual.merger) of {type(model).__name__}"
    )


def _is_norm(module: torch.nn.Module) -> bool:
    """A normalization layer: torch's LayerNorm, or a model's own LayerNorm / RMSNorm class."""
    return isinstance(module, torch.nn.LayerNorm) or type(module).__name__.endswith(("RMSNorm", "LayerNorm"))


def prepare_model(model: torch.nn.Module, cfg: FinetuneConfig, *, base: str = "") -> torch.nn.Module:
    """``model`` with the trainable parts chosen by the config (wrapped by peft for LoRA, its
    adapter naming ``base`` as its base model), those in float32; returns the model to train."""
    if cfg.method == "full":
        for name, param in model.named_parameters():
            frozen = (cfg.freeze_vision and _is_vision(name)) or (
                not cfg.train_projector and _is_projector(name)
            )
            param.requires_grad_(not frozen)
    else:
        from peft import LoraConfig, get_peft_model

        if cfg.quantization is not None:
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=cfg.gradient_checkpointing
            )
        targets = "|".join(re.escape(t) for t in cfg.lora_targets)
        lora = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            # the language model's projections only: the vision tower has q/k/v projections too
            target_modules=rf".*language_model\..*\.(?:{targets})",
            modules_to_save=[projector_module(model)] if cfg.train_projector else None,
        )
        found = {
            name.rsplit(".", 1)[-1] for name, _ in model.named_modules() if ".language_model." in f".{name}"
        }
        missing = [t for t in cfg.lora_targets if t not in found]
        if missing:
            raise ConfigError(f"lora_targets {missing} are not modules of the language model of {cfg.model}")
        model = get_peft_model(model, lora)
        model.peft_config["default"].base_model_name_or_path = base
        if not cfg.freeze_vision:
            for name, param in model.named_parameters():
                if _is_vision(name) and "lora_" not in name:
                    param.requires_grad_(True)
    if cfg.freeze_norms:
        for module in model.modules():
            if _is_norm(module):
                for param in module.parameters(recurse=False):
                    param.requires_grad_(False)
    for param in model.parameters():
        if param.requires_grad and param.is_floating_point():
            param.data = param.data.float()  # float32 master weights for what is trained
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    return model


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable weights by name, on the CPU (what a checkpoint stores of the model)."""
    return {
        name: param.detach().to("cpu", copy=True).contiguous()
        for name, param in model.named_parameters()
        if param.requires_grad
    }


def load_trainable(model: torch.nn.Module, weights: dict[str, torch.Tensor], where: str) -> None:
    """Put checkpointed trainable weights back; every trainable parameter must be in ``weights``
    with its shape, and ``weights`` must hold nothing else."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(params) - set(weights)), sorted(set(weights) - set(params))
    if missing or unexpected:
        raise ConfigError(
            f"{where} does not fit this run's trainable weights (method, lora_* or freeze_* changed?): "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    with torch.no_grad():
        for name, param in params.items():
            if weights[name].shape != param.shape:
                raise ConfigError(
                    f"{where}: {name} has shape {tuple(weights[name].shape)}, the model {tuple(param.shape)}"
                )
            param.copy_(weights[name])


def build_scheduler(optimizer: torch.optim.Optimizer, kind: str, warmup: int, total: int):
    """Linear warm-up over ``warmup`` steps, then cosine or linear decay to 0 at ``total``, or constant."""
    from transformers import (
        get_constant_schedule_with_warmup,
        get_cosine_schedule_with_warmup,
        get_linear_schedule_with_warmup,
    )

    if kind == "constant":
        return get_constant_schedule_with_warmup(optimizer, warmup)
    make = get_cosine_schedule_with_warmup if kind == "cosine" else get_linear_schedule_with_warmup
    return make(optimizer, warmup, total)


# -- evaluation ------------------------------------------------------------------------------------


def normalize_answer(text: str) -> list[str]:
    """Lower-cased words without punctuation: what exact match and token F1 compare."""
    return re.sub(r"[^\w\s]", " ", text.lower()).split()


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of word precision and recall (multiset overlap of the normalized words)."""
    pred, ref = normalize_answer(prediction), normalize_answer(reference)
    if not pred or not ref:
        return float(pred == ref)
    overlap = sum((Counter(pred) & Counter(ref)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred), overlap / len(ref)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, reference: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(reference)


@torch.no_grad()
def evaluate(
    accelerator, model, detector, build: ExampleBuilder, triplets, cfg: FinetuneConfig
) -> dict[str, Any]:
    """Held-out loss (answer tokens), exact match and token F1 of greedy answers against TE, and
    the first few examples; each process scores every num_processes-th triplet, sums are reduced."""
    unwrapped = accelerator.unwrap_model(model)
    was_training = unwrapped.training
    unwrapped.eval()
    shard = triplets[accelerator.process_index :: accelerator.num_processes]
    # loss x tokens, tokens, exact matches, F1 sum, samples
    sums = torch.zeros(5, device=accelerator.device)
    examples: list[dict[str, Any]] = []
    for begin in range(0, len(shard), cfg.batch_size):
        chunk = shard[begin : begin + cfg.batch_size]
        batch = build(chunk)
        inputs = {
            k: v.to(accelerator.device) if torch.is_tensor(v) else v for k, v in batch["inputs"].items()
        }
        labels = batch["labels"].to(accelerator.device)
        with accelerator.autocast():
            loss = unwrapped(**inputs, labels=labels, use_cache=False).loss
            # the detector wraps the model being trained: peft and accelerate wrap it without a copy
            answers = detector.answer(
                [t.image for t in chunk],
                [build.question(t) for t in chunk],
                max_new_tokens=cfg.eval_max_new_tokens,
            )
        tokens = (labels[:, 1:] != IGNORE_INDEX).sum()
        for triplet, answer in zip(chunk, answers, strict=True):
            sums[2] += exact_match(answer, triplet.instruction)
            sums[3] += token_f1(answer, triplet.instruction)
            if len(examples) < cfg.eval_examples:
                examples.append(
                    {
                        "row": triplet.row_id,
                        "question": build.question(triplet),
                        "target": triplet.instruction,
                        "generated": answer,
                    }
                )
        sums[0] += loss.float() * tokens
        sums[1] += tokens
        sums[4] += len(chunk)
    total = accelerator.reduce(sums, "sum").tolist()
    if was_training:
        unwrapped.train()
    samples = max(total[4], 1.0)
    return {
        "val/loss": total[0] / max(total[1], 1.0),
        "val/exact_match": total[2] / samples,
        "val/token_f1": total[3] / samples,
        "samples": int(total[4]),
        "examples": examples,
    }


# -- the recipe ------------------------------------------------------------------------------------


def _plan(cfg: FinetuneConfig, num_processes: int) -> dict[str, int | None]:
    """Which rows train and evaluate, and the number of optimizer steps the schedule spans."""
    from img_guidance.data.triplets import count_triplet_rows

    try:
        rows = count_triplet_rows(cfg.data)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"data {cfg.data}: {err}") from err
    held_out = cfg.val_rows if cfg.val_data is None else 0
    start, stop = min(held_out, rows), rows if cfg.limit is None else min(rows, cfg.limit)
    if stop <= start:
        raise ConfigError(
            f"data {cfg.data} has {rows} rows; after holding out val_rows {held_out} "
            f"{f'and stopping at limit {cfg.limit} ' if cfg.limit else ''}none is left to train on"
        )
    samples_per_step = cfg.batch_size * cfg.gradient_accumulation_steps * num_processes
    steps_per_epoch = max(1, (stop - start) // samples_per_step)
    return {
        "rows": rows,
        "start": start,
        "stop": stop,
        "steps_per_epoch": steps_per_epoch,
        "total_steps": cfg.max_steps or cfg.epochs * steps_per_epoch,
    }


def _val_triplets(cfg: FinetuneConfig) -> list[InstructionTriplet]:
    from img_guidance.data.triplets import iter_triplets

    if cfg.val_rows == 0:
        return []
    source = cfg.val_data or cfg.data
    try:
        return list(iter_triplets(source, start=0, stop=cfg.val_rows))
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"{'val_data' if cfg.val_data else 'data'} {source}: {err}") from err


def save_detector(
    model, detector: TransformersGuidance, cfg: FinetuneConfig, folder: Path, *, questions: Sequence[str]
) -> None:
    """The finetuned detector as a folder the guidance stage loads: a transformers model folder
    (full finetuning, or LoRA merged) or a peft adapter folder, with the processor and
    :data:`~img_guidance.guidance.DETECTOR_INFO`."""
    from img_guidance.guidance import DETECTOR_INFO
    from img_guidance.guidance.questions import QUESTIONS

    if cfg.method == "lora" and cfg.merge_lora:
        model = model.merge_and_unload()
    if cfg.quantization is None:
        model = model.to(detector.dtype)  # trained weights were float32 masters
    # full or merged: a transformers folder; LoRA: peft's adapter folder (adapters and projector)
    model.save_pretrained(folder)
    detector.processor.save_pretrained(folder)
    info = {
        "prompt_format": detector.prompt_format,
        "base_model": detector.location,
        "method": cfg.method,
        "merged": cfg.method == "full" or cfg.merge_lora,
        "question_seed": cfg.question_seed,
        "questions": None if tuple(questions) == QUESTIONS else list(questions),
    }
    (folder / DETECTOR_INFO).write_text(json.dumps(info, indent=2) + "\n")


class DetectorRecipe:
    """The detector's finetuning run: ``setup()`` plans the rows, loads the MLLM with its trainable
    parts, optimizer and schedule and resumes from a checkpoint; ``train()`` runs the planned steps,
    evaluates and saves the detector; ``cleanup()`` ends the trackers. The run's state lives on the
    recipe."""

    def __init__(self, cfg: FinetuneConfig, *, resume: str | bool | None = None):
        self.cfg = cfg
        self.resume = resume
        self.output = Path(cfg.output_dir)
        self.checkpoints = self.output / "checkpoints"
        # where the run is: optimizer steps taken, the pass over the data, this process's next row
        self.step, self.epoch, self.next_row = 0, 0, 0
        self.reader_stats: dict[str, Any] = {}
        self.history: list[dict[str, Any]] = []
        self.evaluations: list[dict[str, Any]] = []

    # -- setup ---------------------------------------------------------------------------------------

    def setup(self) -> None:
        """Everything before the first step; the config and data are checked before any model loads."""
        from accelerate.utils import set_seed

        cfg = self.cfg
        check_config(cfg)
        resume_from = resume_point(self.resume, self.checkpoints)
        self._setup_accelerator()
        set_seed(cfg.seed)
        self._setup_data()
        self._setup_output()
        self._setup_model()
        self._setup_optimizer()
        if resume_from is not None:
            self._resume(resume_from)
        self.accelerator.init_trackers(
            TRACKER_PROJECT,
            config=hparams(cfg),
            init_kwargs={"wandb": {"name": self.output.name, "dir": str(self.output)}},
        )
        self._print_plan()

    def _setup_accelerator(self) -> None:
        self.accelerator, self.console = recipe_accelerator(
            self.cfg.mixed_precision, self.cfg.report_to, self.output
        )

    def _setup_data(self) -> None:
        """The rows to train on and the steps they make (the plan), the held-out triplets, the questions."""
        from img_guidance.guidance.questions import QUESTIONS, load_questions

        cfg, n = self.cfg, self.accelerator.num_processes
        self.plan = _plan(cfg, n)
        self.val_triplets = _val_triplets(cfg)
        self.questions = load_questions(cfg.questions) if cfg.questions else QUESTIONS
        self.samples_per_step = cfg.batch_size * cfg.gradient_accumulation_steps * n
        self.next_row = self.plan["start"]

    def _setup_output(self) -> None:
        """OUTPUT with the resolved config, rid of what a killed run left half-written (main process)."""
        if self.accelerator.is_main_process:
            import yaml

            self.output.mkdir(parents=True, exist_ok=True)
            for stale in remove_stale_temps(self.checkpoints):
                self.console.print(f"removed {stale}, a checkpoint a killed run did not finish")
            (self.output / "config.yaml").write_text(
                yaml.safe_dump(config_to_dict(self.cfg), sort_keys=False)
            )
        self.accelerator.wait_for_everyone()

    def _setup_model(self) -> None:
        """The MLLM, the examples built in its own format, and its trainable parts chosen by the config."""
        cfg = self.cfg
        self.detector = load_detector(cfg, self.accelerator.device)
        self.build = ExampleBuilder(
            self.detector,
            questions=self.questions,
            question_seed=cfg.question_seed,
            max_length=cfg.max_length,
        )
        self.model = prepare_model(self.detector.model, cfg, base=self.detector.location)
        if not cfg.quantization:
            self.model.to(self.accelerator.device)

    def _setup_optimizer(self) -> None:
        """AdamW over the trainable weights, the warm-up and decay schedule, then accelerate."""
        cfg, accelerator = self.cfg, self.accelerator
        params = [p for p in self.model.parameters() if p.requires_grad]
        # fused on CUDA: no step temporaries the size of the trained weights (benchmarks/detector.py)
        fused = accelerator.device.type == "cuda"
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)
        self.warmup = math.ceil(cfg.warmup_ratio * self.plan["total_steps"])
        self.scheduler = build_scheduler(optimizer, cfg.lr_scheduler, self.warmup, self.plan["total_steps"])
        self.model, self.optimizer = accelerator.prepare(self.model, optimizer)

    def _resume(self, path: Path) -> None:
        """Continue the run of checkpoint ``path``, warning about what changed since."""
        n, p = self.accelerator.num_processes, self.accelerator.process_index
        state = self.load_checkpoint(path)
        self.step, self.epoch = state["step"], state["epoch"]
        rows = state["next_rows"]
        if len(rows) == n:
            self.next_row = rows[p]
        else:
            self.next_row = min(rows)
            self.console.print(
                f"warning: the checkpoint was written by {len(rows)} processes, this run has {n}: "
                "restarting from the earliest row any of them had reached"
            )
        changed = changed_keys(state["config"], self.cfg, RESUME_FREE_KEYS)
        if changed:
            self.console.print(
                f"warning: resuming with other values of {', '.join(changed)} than the checkpoint"
            )
        self.console.print(
            f"resumed from {path} at step {self.step} (epoch {self.epoch}, row {self.next_row})"
        )

    def _print_plan(self) -> None:
        cfg, plan = self.cfg, self.plan
        unwrapped = self.accelerator.unwrap_model(self.model)
        n_train = sum(q.numel() for q in unwrapped.parameters() if q.requires_grad)
        n_all = sum(q.numel() for q in unwrapped.parameters())
        self.console.print(
            f"finetuning {cfg.model} ({cfg.method}; {n_train:,} of {n_all:,} parameters trained) as a "
            f"detector in the {self.detector.prompt_format} format on rows {plan['start']}-{plan['stop']} "
            f"of {cfg.data}"
            f"{f', evaluating on {len(self.val_triplets)} held-out triplets' if self.val_triplets else ''}; "
            f"{self.accelerator.num_processes} process(es) x batch {cfg.batch_size} x "
            f"{cfg.gradient_accumulation_steps} accumulation = {self.samples_per_step} samples per step; "
            f"{plan['total_steps']} steps ({self.warmup} warm-up)"
        )

    # -- checkpoints ---------------------------------------------------------------------------------

    def save_checkpoint(self) -> Path:
        """Checkpoint ``self.step``: the trainable weights, the optimizer, scheduler and RNG states, and
        the trainer state (epoch, every process's next row, config)."""
        accelerator = self.accelerator
        rows = accelerator.gather(torch.tensor([self.next_row], device=accelerator.device)).tolist()
        state = {
            "epoch": self.epoch,
            "next_rows": rows,
            "num_processes": accelerator.num_processes,
            "config": config_to_dict(self.cfg),
            "step": self.step,
        }
        path = write_checkpoint(
            accelerator,
            self.checkpoints,
            self.step,
            state=state,
            keep=self.cfg.keep_checkpoints,
            save_model=self._save_trainable,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
        )
        self.console.print(f"step {self.step}: checkpoint {path}")
        return path

    def _save_trainable(self, folder: Path) -> None:
        from safetensors.torch import save_file

        save_file(trainable_state(self.accelerator.unwrap_model(self.model)), folder / TRAINABLE_FILE)

    def load_checkpoint(self, path: Path) -> dict[str, Any]:
        """Restore what :meth:`save_checkpoint` wrote; returns its trainer state."""
        return read_checkpoint(
            path,
            self.accelerator,
            load_model=self._load_trainable,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
        )

    def _load_trainable(self, path: Path, state: dict[str, Any]) -> None:
        from safetensors.torch import load_file

        load_trainable(self.accelerator.unwrap_model(self.model), load_file(path / TRAINABLE_FILE), str(path))

    # -- training ------------------------------------------------------------------------------------

    def epoch_batches(self, start: int) -> Iterator[dict[str, Any]]:
        """This process's batches from row ``start`` on; ends for all processes when one runs out."""
        cfg, accelerator = self.cfg, self.accelerator
        stream = TripletBatches(
            cfg.data,
            build=self.build,
            batch_size=cfg.batch_size,
            start=start,
            stop=self.plan["stop"],
            process_index=accelerator.process_index,
            num_processes=accelerator.num_processes,
        )
        # its own generator: making an iterator must not draw from the global RNG (dropout), or a
        # resumed run would differ from an uninterrupted one
        loader = DataLoader(
            stream,
            batch_size=None,
            num_workers=cfg.num_workers,
            generator=torch.Generator().manual_seed(cfg.seed),
        )
        iterator = iter(loader)
        while True:
            batch = next(iterator, None)
            ready = torch.tensor([batch is not None], dtype=torch.int64, device=accelerator.device)
            if int(accelerator.reduce(ready, "sum")) < accelerator.num_processes:
                return
            yield batch

    def train_step(self, micro: list[dict[str, Any]]) -> float:
        """One optimizer step over the batches of one gradient accumulation; returns their mean loss
        over the processes. Raises :class:`TrainingDiverged` before stepping on a non-finite loss."""
        cfg, accelerator, model = self.cfg, self.accelerator, self.model
        losses = []
        for i, batch in enumerate(micro):
            inputs = {
                k: v.to(accelerator.device) if torch.is_tensor(v) else v for k, v in batch["inputs"].items()
            }
            labels = batch["labels"].to(accelerator.device)
            sync = nullcontext() if i == len(micro) - 1 else accelerator.no_sync(model)
            with sync, accelerator.autocast():
                loss = model(**inputs, labels=labels, use_cache=False).loss
            losses.append(loss.detach().float())
            if not torch.isfinite(loss).all():
                break
            accelerator.backward(loss / len(micro))
        mean_loss = float(accelerator.reduce(torch.stack(losses).mean(), "mean"))
        if not math.isfinite(mean_loss):
            raise TrainingDiverged(f"step {self.step + 1}: non-finite loss {mean_loss}")
        if cfg.max_grad_norm > 0:
            accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.next_row = micro[-1]["next_row"]
        self.reader_stats = micro[-1]["stats"]
        return mean_loss

    def train(self) -> dict[str, Any]:
        """Train from where :meth:`setup` left the run to the planned steps, evaluate, and save the
        detector; returns the summary. A non-finite loss raises :class:`TrainingDiverged`, nothing
        saved after the last good step."""
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        cfg, total = self.cfg, self.plan["total_steps"]
        self.progress = Progress(
            TextColumn("[bold]finetune[/]"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[status]}"),
            console=self.console,
            disable=not self.accelerator.is_main_process,
        )
        self.task = self.progress.add_task("finetune", total=total, completed=self.step, status="")
        self.window_loss, self.window_steps, self.window_samples = 0.0, 0, 0
        self.clock = time.perf_counter()

        self.model.train()
        self.progress.start()
        try:
            while self.step < total and self.epoch < (cfg.epochs if cfg.max_steps is None else math.inf):
                self._train_epoch()
            last = latest_checkpoint(self.checkpoints)
            if last is None or last.name != checkpoint_name(self.step):
                self.save_checkpoint()
        except TrainingDiverged as err:
            raise diverged(err, self.checkpoints) from err
        finally:
            self.progress.stop()
        self._evaluate()
        final = self._save_final()
        return {
            "step": self.step,
            "final_dir": str(final),
            "history": self.history,
            "evaluations": self.evaluations,
            "reader": self.reader_stats,
            "plan": self.plan,
        }

    def _train_epoch(self) -> None:
        """Train from ``self.next_row`` to the end of the pass over the data, or to the planned steps."""
        stream = self.epoch_batches(self.next_row)
        stepped = False
        while self.step < self.plan["total_steps"]:
            micro = self._accumulation(stream)
            if micro is None:
                break  # the epoch ran out (a partial accumulation is dropped)
            mean_loss = self.train_step(micro)
            stepped = True
            self._after_step(micro, mean_loss)
        else:
            return  # the planned steps are done
        if not stepped and self.next_row == self.plan["start"]:
            raise ConfigError(f"data {self.cfg.data} gave no full step of {self.samples_per_step} triplets")
        self.epoch, self.next_row = self.epoch + 1, self.plan["start"]

    def _accumulation(self, stream: Iterator[dict[str, Any]]) -> list[dict[str, Any]] | None:
        """The next ``gradient_accumulation_steps`` batches of ``stream``; None when it runs out first."""
        micro = []
        for batch in stream:
            micro.append(batch)
            if len(micro) == self.cfg.gradient_accumulation_steps:
                return micro
        return None

    def _after_step(self, micro: list[dict[str, Any]], mean_loss: float) -> None:
        """Log, evaluate and checkpoint on their schedules."""
        cfg, step, total = self.cfg, self.step, self.plan["total_steps"]
        self.window_loss += mean_loss
        self.window_steps += 1
        self.window_samples += sum(len(b["index"]) for b in micro) * self.accelerator.num_processes
        self.progress.update(self.task, completed=step, status=f"loss {mean_loss:.4g}")
        if cfg.log_every and (step % cfg.log_every == 0 or step == total):
            self._log_window()
        if cfg.eval_every and step % cfg.eval_every == 0 and step < total:
            self._evaluate()
        if step % cfg.checkpoint_every == 0 or step == total:
            self.save_checkpoint()
            self.clock = time.perf_counter()

    def _log_window(self) -> None:
        """Log the mean loss of the steps since the last log, the lr and the throughput."""
        seconds = time.perf_counter() - self.clock
        row = {
            "train/loss": self.window_loss / self.window_steps,
            "train/lr": self.scheduler.get_last_lr()[0],
            "train/samples_per_s": self.window_samples / max(seconds, 1e-9),
        }
        self.accelerator.log(row, step=self.step)
        self.history.append({"step": self.step, **row})
        self.window_loss, self.window_steps, self.window_samples = 0.0, 0, 0
        self.clock = time.perf_counter()

    def _evaluate(self) -> None:
        """Score the held-out triplets: logged, written to OUTPUT/eval/step_<step>.json, a few printed."""
        if not self.val_triplets:
            return
        step = self.step
        result = evaluate(
            self.accelerator, self.model, self.detector, self.build, self.val_triplets, self.cfg
        )
        self.accelerator.log({k: v for k, v in result.items() if k.startswith("val/")}, step=step)
        self.evaluations.append({"step": step, **result})
        if self.accelerator.is_main_process:
            (self.output / "eval").mkdir(parents=True, exist_ok=True)
            (self.output / "eval" / f"{checkpoint_name(step)}.json").write_text(
                json.dumps({"step": step, **result}, indent=2) + "\n"
            )
        self.console.print(
            f"step {step}: held-out loss {result['val/loss']:.4g}, "
            f"exact match {result['val/exact_match']:.1%}, token F1 {result['val/token_f1']:.3f} "
            f"on {result['samples']} triplets"
        )
        for example in result["examples"][:3]:
            self.console.print(f"  target {example['target']!r} | generated {example['generated']!r}")

    def _save_final(self) -> Path:
        """OUTPUT/final: the detector (main process), and what the reader skipped."""
        final = self.output / "final"
        if self.accelerator.is_main_process:
            write_folder(final, self._save_detector)
            undecodable = self.reader_stats.get("undecodable", [])
            skipped = len(undecodable) + self.reader_stats.get("empty", 0)
            self.console.print(
                f"done: {self.step} steps; detector in {final}"
                + (f"; {skipped} triplets skipped" if skipped else "")
            )
            for row_id in undecodable[:20]:
                self.console.print(f"undecodable image skipped: {row_id}")
        self.accelerator.wait_for_everyone()
        return final

    def _save_detector(self, folder: Path) -> None:
        model = self.accelerator.unwrap_model(self.model)
        save_detector(model, self.detector, self.cfg, folder, questions=self.questions)

    # -- cleanup -------------------------------------------------------------------------------------

    def cleanup(self) -> None:
        """End the trackers (and the process group)."""
        self.accelerator.end_training()


def finetune(cfg: FinetuneConfig, *, resume: str | bool | None = None) -> dict[str, Any]:
    """Finetune a detector; returns a summary (final step, folders, logged rows, evaluations).

    Raises :class:`TrainingDiverged` on a non-finite loss, after the last good checkpoint.
    """
    recipe = DetectorRecipe(cfg, resume=resume)
    recipe.setup()
    try:
        return recipe.train()
    finally:
        recipe.cleanup()


# -- command line ----------------------------------------------------------------------------------

USAGE = """usage: finetune_detector CONFIG [key=value ...] [--resume [PATH]]

Finetune a multimodal LLM into an IMG misalignment detector on instruction triplets. CONFIG is a
YAML file (see configs/detector_*.yaml); key=value overrides any key, the value read as YAML
(lr=2e-4, method=lora). --resume continues from the newest complete checkpoint in
OUTPUT_DIR/checkpoints, or from PATH.
"""


def main(argv: list[str] | None = None) -> int:
    """Run the recipe from the command line; 0 on success, 1 when training diverged, 2 on a bad
    config or command line."""
    return run_recipe(argv, FinetuneConfig, USAGE, finetune)


__all__ = [
    "DetectorRecipe",
    "ExampleBuilder",
    "FinetuneConfig",
    "TrainingDiverged",
    "TripletBatches",
    "check_config",
    "evaluate",
    "exact_match",
    "finetune",
    "main",
    "prepare_model",
    "save_detector",
    "token_f1",
]

if __name__ == "__main__":
    raise SystemExit(main())
