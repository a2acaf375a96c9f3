"""Train the Implicit Aligner with the Iteratively Updated Preference Objective (paper Sec. 3.3).

An accelerate recipe in torchtune's shape (:class:`AlignerRecipe`: ``setup``, ``train_step``,
``save_checkpoint``, ``train``, ``cleanup``; checkpoints through :mod:`~img_guidance.recipes.checkpoint`).
Launch it with::

    img-guidance train configs/sdxl_llava13b.yaml [key=value ...] [--resume [PATH]]
    accelerate launch --multi_gpu --num_processes 8 -m img_guidance.recipes.train_aligner CONFIG ...
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 \\
        -m img_guidance.recipes.train_aligner CONFIG

(the last: several CPU processes, which ``accelerate launch --cpu`` does not start on one machine).

Each step feeds (guidance of l, tokens of l, guidance mask) to the aligner and to the reference
aligner (no gradient, same inputs), takes ``iupo_loss`` against the tokens of w and l, and tells the
:class:`ReferenceTracker` the batch errors (it averages them over processes, so every process
replaces its reference at the same step).

Data order is a seeded permutation per epoch, cut into global batches (``batch_size`` x processes):
process p takes the p-th per-process slice of each global batch, so N processes see the same global
batches as one process with N times the batch size. Checkpoints store where in which epoch the run
is, so ``--resume`` continues with the very next batch and the result equals an uninterrupted run.
With ``online:`` instead of ``cache_dir``, features are computed on the fly by
:class:`~img_guidance.features.extract.OnlineFeatures` (the pairs in source order, dealt over the
processes by the dataset; a resumed run recomputes the batches it skips to get back to its place).

Exit status of :func:`main`: 0 done, 1 the loss (or gradient norm) went non-finite (nothing is
saved after the last good step), 2 a bad command line or config.

Output folder::

    OUTPUT/config.yaml                       the resolved config
    OUTPUT/checkpoints/step_00005000/        aligner/ (save_pretrained), reference.safetensors,
                                             optimizer.pt, scheduler.pt, rng/process_<i>.pt,
                                             trainer_state.json (step, data position, tracker, config)
    OUTPUT/logs/img-guidance/                TensorBoard events
    OUTPUT/logs/reference_replacements.process<i>.json   the steps at which each process replaced f_ref
    OUTPUT/final/                            the trained aligner: load_aligner(OUTPUT/final)
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, Subset

from img_guidance.precision import resolve_dtype
from img_guidance.recipes.checkpoint import (
    changed_keys,
    diverged,
    hparams,
    list_checkpoints,
    read_checkpoint,
    recipe_accelerator,
    remove_stale_temps,
    resolve_resume,
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

MIXED_PRECISION = ("no", "bf16", "fp16")
REPORTERS = ("tensorboard", "wandb")
# keys that may change between a run and its resumption without making the resumption inexact
RESUME_FREE_KEYS = {
    "max_steps",
    "checkpoint_every",
    "keep_checkpoints",
    "log_every",
    "validate_every",
    "num_workers",
    "report_to",
    "output_dir",
}
# iupo_loss parts logged every step (after averaging over processes)
LOGGED_PARTS = ("L_base", "L_pref", "margin_dpo", "margin_spin", "win_fraction")
TRACKER_PROJECT = "img-guidance"
# the ``online:`` section: the pairs and the models of the feature stage (as ``img-guidance features``)
ONLINE_KEYS = {
    "pairs": "Pick-a-Pic parquet file or folder, pairs JSONL folder, or hub dataset id (required)",
    "model": "backend whose image tokens are the targets: sdxl, flux or a pipeline folder (required)",
    "ip_adapter": "IP-Adapter weights overriding the model's",
    "image_encoder": "image encoder overriding the model's",
    "mllm": "guidance model (default: the paper's finetuned LLaVA-1.5-13B)",
    "prompt_format": "the guidance model's prompt format",
    "questions": "JSON file of question templates (default: the project's 100)",
    "dtype": "the feature models' dtype (default bfloat16 where native, float32 elsewhere)",
    "storage_dtype": "round features as a cache would store them, e.g. bfloat16 (default: no rounding)",
    "limit": "use only the first rows of the pairs source",
    "batch_size": "pairs per feature-model batch",
    "seed": "the question seed (as the feature cache's question_seed)",
    "rows_per_block": "source rows per block dealt to a process (as the cache's rows_per_shard)",
}


@dataclass
class TrainConfig:
    """Every key of a training config. Defaults are the paper's (AdamW, lr 1e-4 constant, weight
    decay 1e-4, batch 8 per GPU, lambda 1, k 10, 100K steps, DPO + SPIN terms)."""

    output_dir: str
    # data: a finished feature cache, or online extraction (options of OnlineFeatures)
    cache_dir: str | None = None
    online: dict[str, Any] | None = None
    val_cache_dir: str | None = None
    val_fraction: float = 0.0
    num_workers: int = 2
    # aligner (guidance_dim and image_dim come from the data)
    depth: int = 4
    heads: int = 20
    head_dim: int = 64
    ff_mult: int = 4
    init_from: str | None = None
    # objective
    lam: float = 1.0
    k: int = 10
    terms: list[str] = field(default_factory=lambda: ["dpo", "spin"])
    # optimisation
    max_steps: int = 100_000
    batch_size: int = 8
    lr: float = 1e-4
    weight_decay: float = 1e-4
    warmup_steps: int = 0
    grad_clip: float = 0.0
    mixed_precision: str = "no"
    seed: int = 0
    # bookkeeping
    checkpoint_every: int = 5000
    keep_checkpoints: int = 3
    log_every: int = 50
    validate_every: int = 5000
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])


def check_config(cfg: TrainConfig, *, dataset_given: bool = False) -> None:
    """Every value checked before any data or model is touched; errors name the key and value.
    ``dataset_given``: the caller brings the training data, so no cache_dir or online is needed."""
    positive = ("max_steps", "batch_size", "k", "depth", "heads", "head_dim", "ff_mult", "checkpoint_every")
    for key in positive:
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{key} must be at least 1, got {getattr(cfg, key)}")
    for key in ("num_workers", "warmup_steps", "log_every", "validate_every", "keep_checkpoints"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"{key} must be 0 or more, got {getattr(cfg, key)}")
    for key in ("lr", "weight_decay", "lam", "grad_clip"):
        value = getattr(cfg, key)
        if not math.isfinite(value) or value < 0 or (key == "lr" and value == 0):
            raise ConfigError(
                f"{key} must be a finite number {'> 0' if key == 'lr' else '>= 0'}, got {value}"
            )
    if not cfg.output_dir:
        raise ConfigError("output_dir must be set")
    if cfg.mixed_precision not in MIXED_PRECISION:
        raise ConfigError(
            f"mixed_precision must be one of {', '.join(MIXED_PRECISION)}, got {cfg.mixed_precision!r}"
        )
    from img_guidance.objective import PREFERENCE_TERMS

    if any(t not in PREFERENCE_TERMS for t in cfg.terms) or len(set(cfg.terms)) != len(cfg.terms):
        raise ConfigError(f"terms must be distinct names from {list(PREFERENCE_TERMS)}, got {cfg.terms}")
    if any(r not in REPORTERS for r in cfg.report_to):
        raise ConfigError(f"report_to may list {', '.join(REPORTERS)}, got {cfg.report_to}")
    if "wandb" in cfg.report_to:
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise ConfigError(
                "report_to asks for wandb, which is not installed: pip install wandb, or drop it"
            )
    if (cfg.cache_dir is None) == (cfg.online is None) and not dataset_given:
        raise ConfigError(
            "set exactly one of cache_dir (a finished feature cache) and online (extraction options)"
        )
    if cfg.online is not None:
        unknown = sorted(set(cfg.online) - set(ONLINE_KEYS))
        if unknown:
            raise ConfigError(f"unknown online key {unknown[0]!r}; valid keys: {', '.join(ONLINE_KEYS)}")
        missing = [key for key in ("pairs", "model") if cfg.online.get(key) is None]
        if missing:
            raise ConfigError(f"online needs {' and '.join(missing)}")
        if cfg.val_fraction > 0:
            raise ConfigError(
                "online features cannot be split: set val_cache_dir for validation, val_fraction 0"
            )
        if cfg.num_workers > 0:
            raise ConfigError("online extraction runs its models in the main process: set num_workers: 0")
    if not 0 <= cfg.val_fraction < 1:
        raise ConfigError(f"val_fraction must be in [0, 1), got {cfg.val_fraction}")
    if cfg.val_fraction > 0 and cfg.val_cache_dir is not None:
        raise ConfigError("set val_fraction or val_cache_dir, not both")
    for key in ("cache_dir", "val_cache_dir"):
        path = getattr(cfg, key)
        if path is not None and not Path(path).is_dir():
            raise ConfigError(f"{key} {path} is not a folder")


# -- data ------------------------------------------------------------------------------------------


class EpochSampler(Sampler[int]):
    """A seeded, epoch-aware order over ``indices``, resumable in the middle of an epoch.

    Epoch e is a permutation drawn from (seed, e), cut to whole global batches (the remainder is
    dropped, and reshuffled in next epoch); iteration starts ``start`` global batches in. Every
    process draws the same order; accelerate's batch sharding gives process p the p-th batch of
    ``global_batch / num_processes`` samples of each global batch.
    """

    def __init__(self, indices: Sequence[int], *, global_batch: int, seed: int):
        self.indices = np.asarray(indices, dtype=np.int64)
        self.global_batch = global_batch
        self.seed = seed
        self.batches_per_epoch = len(self.indices) // global_batch
        if self.batches_per_epoch == 0:
            raise ConfigError(
                f"{len(self.indices)} training samples do not fill one global batch of {global_batch} "
                "(batch_size x processes)"
            )
        self.epoch = 0
        self.start = 0

    def order(self, epoch: int) -> np.ndarray:
        """The training indices of ``epoch`` in the order they are used (whole global batches)."""
        permutation = np.random.default_rng([self.seed, epoch]).permutation(len(self.indices))
        return self.indices[permutation[: self.batches_per_epoch * self.global_batch]]

    def set_epoch(self, epoch: int) -> None:
        # accelerate calls this at every iteration start; only a new epoch starts from its beginning
        if epoch != self.epoch:
            self.epoch, self.start = epoch, 0

    def set_position(self, epoch: int, start: int) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start) * self.global_batch

    def __iter__(self) -> Iterator[int]:
        yield from self.order(self.epoch)[self.start * self.global_batch :].tolist()


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded (train, validation) split of range(n); validation holds ceil(n * val_fraction)."""
    n_val = math.ceil(n * val_fraction)
    permutation = np.random.default_rng([seed, 0x7A1]).permutation(n)
    return sorted(permutation[n_val:].tolist()), sorted(permutation[:n_val].tolist())


def open_datasets(cfg: TrainConfig, accelerator) -> tuple[Dataset, Dataset | None]:
    """The training dataset (the feature cache, or online extraction) and the validation cache."""
    from img_guidance.features.cache import FeatureCache

    def open_cache(key: str, path: str) -> FeatureCache:
        try:
            return FeatureCache(path)
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(f"{key}: {err}") from err

    if cfg.online is None:
        train_set = open_cache("cache_dir", cfg.cache_dir)
    else:
        train_set = online_features(cfg.online, accelerator)
    val_set = open_cache("val_cache_dir", cfg.val_cache_dir) if cfg.val_cache_dir else None
    return train_set, val_set


def online_features(options: dict[str, Any], accelerator) -> IterableDataset:
    """:class:`~img_guidance.features.extract.OnlineFeatures` with its models loaded on this
    process's device, its pairs dealt over the accelerate processes."""
    from img_guidance.backends import load_image_encoder
    from img_guidance.features.extract import OnlineFeatures
    from img_guidance.guidance import default_mllm, load_guidance
    from img_guidance.guidance.questions import QUESTIONS, load_questions

    device = accelerator.device
    try:
        dtype = resolve_dtype(options.get("dtype"), device)
    except ValueError:
        dtype = options.get("dtype")
        raise ConfigError(
            f"online.dtype must name a torch dtype (float32, bfloat16, float16), got {dtype!r}"
        ) from None
    storage = options.get("storage_dtype")
    if storage is not None and not isinstance(getattr(torch, str(storage), None), torch.dtype):
        raise ConfigError(f"online.storage_dtype must name a torch dtype, got {storage!r}")
    questions = load_questions(options["questions"]) if options.get("questions") else QUESTIONS
    encoder = load_image_encoder(
        options["model"],
        ip_adapter=options.get("ip_adapter"),
        image_encoder=options.get("image_encoder"),
        torch_dtype=dtype,
        device=device,
    )
    guidance = load_guidance(
        options.get("mllm") or default_mllm(options["model"]),
        prompt_format=options.get("prompt_format"),
        torch_dtype=dtype,
        device=device,
    )
    extra = {key: options[key] for key in ("limit", "batch_size", "seed", "rows_per_block") if key in options}
    return OnlineFeatures(
        options["pairs"],
        image_encoder=encoder,
        guidance=guidance,
        questions=questions,
        dtype=getattr(torch, storage) if storage else None,
        process_index=accelerator.process_index,
        num_processes=accelerator.num_processes,
        **extra,
    )


def dataset_dims(dataset: Dataset) -> dict[str, int]:
    """guidance_dim, num_tokens, image_dim of a dataset of feature samples (its ``dims`` when it
    has them, else read off its first sample)."""
    dims = getattr(dataset, "dims", None)
    if dims is None and isinstance(dataset, Subset):
        dims = getattr(dataset.dataset, "dims", None)
    if dims is None:
        sample = next(iter(dataset)) if isinstance(dataset, IterableDataset) else dataset[0]
        dims = {
            "guidance_dim": int(sample["guidance"].shape[-1]),
            "num_tokens": int(sample["tokens_l"].shape[0]),
            "image_dim": int(sample["tokens_l"].shape[-1]),
        }
    return {key: int(dims[key]) for key in ("guidance_dim", "num_tokens", "image_dim")}


# -- model -----------------------------------------------------------------------------------------


def build_aligner(cfg: TrainConfig, dims: dict[str, int]):
    """A fresh aligner for the data's widths, or ``init_from`` (checked against the config)."""
    from img_guidance.aligner import ImplicitAligner, load_aligner

    arch = {"depth": cfg.depth, "heads": cfg.heads, "head_dim": cfg.head_dim, "ff_mult": cfg.ff_mult}
    wanted = {"guidance_dim": dims["guidance_dim"], "image_dim": dims["image_dim"], **arch}
    if cfg.init_from is None:
        return ImplicitAligner(**wanted)
    try:
        model = load_aligner(cfg.init_from, heads=cfg.heads, head_dim=cfg.head_dim).float()
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"init_from {cfg.init_from}: {err}") from err
    found = model.config.to_dict()
    differences = [f"{k}={found[k]} (config or data: {v})" for k, v in wanted.items() if found[k] != v]
    if differences:
        raise ConfigError(f"init_from {cfg.init_from} does not fit this run: it has {', '.join(differences)}")
    return model.train()


class LinearWarmup:
    """LR factor rising linearly over ``steps`` scheduler steps, then 1 (``steps=0``: constant).
    A class, not a lambda, so the scheduler's state dict carries it."""

    def __init__(self, steps: int):
        self.steps = steps

    def __call__(self, step: int) -> float:
        return 1.0 if self.steps == 0 else min(1.0, (step + 1) / self.steps)


# -- checkpoints -----------------------------------------------------------------------------------


def check_resume_architecture(path: Path, current: dict[str, Any]) -> None:
    """Raise ConfigError listing every dimension in which the checkpoint's aligner (its
    ``aligner/config.json``) differs from the one this run builds, before any weight is read."""
    config_file = path / "aligner" / "config.json"
    try:
        saved = json.loads(config_file.read_text())
    except (OSError, json.JSONDecodeError):
        return  # the weights' own check reports a checkpoint without a readable config
    differences = [
        f"{key} {saved[key]} there, {current[key]} here"
        for key in sorted(current)
        if not key.startswith("_") and key in saved and saved[key] != current[key]
    ]
    if differences:
        raise ConfigError(
            f"cannot resume from {path}: its aligner differs from this run's ({'; '.join(differences)}); "
            "resume with the checkpoint's settings, or start a new output_dir"
        )


# -- validation ------------------------------------------------------------------------------------


@torch.no_grad()
def validate(accelerator, model, loader: DataLoader) -> dict[str, float]:
    """Mean L_base on held-out samples, the input tokens' distance to w, and the fraction of
    samples whose aligned tokens are closer to w than the input tokens were (summed over processes)."""
    from accelerate.utils import send_to_device

    from img_guidance.objective import squared_distance

    # sum of L_base, sum of input distance, closer count, sample count
    sums = torch.zeros(4, device=accelerator.device)  # float32: MPS has no float64
    aligner = accelerator.unwrap_model(model)
    for batch in loader:
        batch = send_to_device(batch, accelerator.device)
        with accelerator.autocast():
            pred = aligner(batch["guidance"], batch["tokens_l"], batch["guidance_mask"])
        error = squared_distance(batch["tokens_w"], pred)  # [B]
        before = squared_distance(batch["tokens_w"], batch["tokens_l"])
        sums += torch.stack([error.sum(), before.sum(), (error < before).sum(), error.new_tensor(len(error))])
    total = accelerator.reduce(sums, "sum").tolist()
    count = max(total[3], 1.0)
    return {
        "val/L_base": total[0] / count,
        "val/input_distance": total[1] / count,
        "val/closer_fraction": total[2] / count,
    }


# -- the recipe ------------------------------------------------------------------------------------


class AlignerRecipe:
    """The aligner's training run: ``setup()`` opens the data, builds the aligner, its reference and
    optimizer and resumes from a checkpoint; ``train()`` runs to ``max_steps`` and saves the final
    aligner; ``cleanup()`` ends the trackers. The run's state lives on the recipe.

    ``dataset``/``val_dataset``: as for :func:`train`.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        *,
        resume: str | bool | None = None,
        dataset: Dataset | None = None,
        val_dataset: Dataset | None = None,
    ):
        self.cfg = cfg
        self.resume = resume
        self.dataset, self.val_dataset = dataset, val_dataset
        self.output = Path(cfg.output_dir)
        self.checkpoints = self.output / "checkpoints"
        # where the run is: optimizer steps taken, and the next batch of which epoch
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.replacement_steps: list[int] = []
        self.history: list[dict[str, float]] = []
        self.validations: list[dict[str, float]] = []

    # -- setup ---------------------------------------------------------------------------------------

    def setup(self) -> None:
        """Everything before the first step; the config is checked before any data or model is touched."""
        from accelerate.utils import set_seed

        cfg = self.cfg
        check_config(cfg, dataset_given=self.dataset is not None)
        resume_from = resume_point(self.resume, self.checkpoints)
        self._setup_accelerator()
        set_seed(cfg.seed)
        self._setup_output()
        self._setup_data()
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
        from accelerate.utils import DistributedType

        self.accelerator, self.console = recipe_accelerator(
            self.cfg.mixed_precision, self.cfg.report_to, self.output
        )
        self.deepspeed = self.accelerator.distributed_type == DistributedType.DEEPSPEED

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

    def _open_data(self) -> list[int] | None:
        """The training and validation datasets on ``self`` (the given ones, else the config's, with
        ``val_fraction`` split off); returns the training indices (None for a streamed dataset)."""
        cfg = self.cfg
        if self.dataset is None:
            self.dataset, opened_val = open_datasets(cfg, self.accelerator)
            self.val_dataset = self.val_dataset if self.val_dataset is not None else opened_val
        self.dims = dataset_dims(self.dataset)
        # A map-style dataset (the cache) goes through the seeded epoch sampler and accelerate's batch
        # sharding; an iterable one (online features) deals its samples over the processes itself.
        self.streaming = isinstance(self.dataset, IterableDataset)
        train_indices = None if self.streaming else list(range(len(self.dataset)))
        if cfg.val_fraction > 0:
            if self.streaming:
                raise ConfigError(
                    "val_fraction needs a map-style dataset; give streamed features a val_cache_dir"
                )
            train_indices, val_indices = split_indices(len(self.dataset), cfg.val_fraction, cfg.seed)
            self.val_dataset = Subset(self.dataset, val_indices)
        if self.val_dataset is not None and dataset_dims(self.val_dataset) != self.dims:
            raise ConfigError(
                f"validation features have dims {dataset_dims(self.val_dataset)}, "
                f"training features {self.dims}"
            )
        return train_indices

    def _setup_data(self) -> None:
        """The training loader (seeded epoch order, or the stream's own) and the validation loader."""
        from img_guidance.features.cache import collate_features

        cfg, accelerator = self.cfg, self.accelerator
        train_indices = self._open_data()
        self.train_samples = None if train_indices is None else len(train_indices)
        self.global_batch = cfg.batch_size * accelerator.num_processes
        self.sampler = (
            None
            if self.streaming
            else EpochSampler(train_indices, global_batch=self.global_batch, seed=cfg.seed)
        )
        self.loader = DataLoader(
            self.dataset,
            batch_size=cfg.batch_size,
            sampler=self.sampler,
            drop_last=True,
            collate_fn=collate_features,
            num_workers=cfg.num_workers,
            persistent_workers=cfg.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )
        self.steps_per_epoch = None if self.streaming else self.sampler.batches_per_epoch
        self.val_loader = None
        if self.val_dataset is not None and len(self.val_dataset) > 0 and cfg.validate_every > 0:
            # each process scores every num_processes-th held-out sample; sums are reduced
            every = range(accelerator.process_index, len(self.val_dataset), accelerator.num_processes)
            self.val_loader = DataLoader(
                Subset(self.val_dataset, every), batch_size=cfg.batch_size, collate_fn=collate_features
            )

    def _setup_model(self) -> None:
        """The aligner on this process's device, and its reference tracker: the reference is a fresh
        random aligner (paper), broadcast from process 0."""
        from img_guidance.objective import ReferenceTracker

        self.model = build_aligner(self.cfg, self.dims).to(self.accelerator.device)
        self.tracker = ReferenceTracker(self.model, k=self.cfg.k)

    def _setup_optimizer(self) -> None:
        """AdamW and its warm-up, then the model, optimizer, scheduler and loader through accelerate."""
        cfg, accelerator = self.cfg, self.accelerator
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        # accelerate steps a prepared scheduler once per process per optimizer step, so the warm-up
        # is counted in those units to last warmup_steps optimizer steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, LinearWarmup(cfg.warmup_steps * accelerator.num_processes)
        )
        if self.streaming:
            self.model, self.optimizer, self.scheduler = accelerator.prepare(self.model, optimizer, scheduler)
        else:
            self.model, self.optimizer, self.loader, self.scheduler = accelerator.prepare(
                self.model, optimizer, self.loader, scheduler
            )
        if self.deepspeed:
            self.tracker.model = accelerator.unwrap_model(self.model)

    def _resume(self, path: Path) -> None:
        """Continue the run of checkpoint ``path``, warning about what changed since."""
        state = self.load_checkpoint(path)
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.replacement_steps = list(state.get("replacement_steps", []))
        changed = changed_keys(state["config"], self.cfg, RESUME_FREE_KEYS)
        if changed:
            self.console.print(
                f"warning: resuming with other values of {', '.join(changed)} than the checkpoint"
            )
        if state.get("global_batch") != self.global_batch or state.get("train_samples") != self.train_samples:
            self.console.print(
                "warning: the global batch or the training set changed; the data order differs"
            )
            if self.steps_per_epoch is not None:
                self.batch_in_epoch = min(self.batch_in_epoch, self.steps_per_epoch)
        self.console.print(
            f"resumed from {path} at step {self.step} (epoch {self.epoch}, batch {self.batch_in_epoch})"
        )

    def _print_plan(self) -> None:
        cfg, dims = self.cfg, self.dims
        n_params = sum(p.numel() for p in self.accelerator.unwrap_model(self.model).parameters())
        self.console.print(
            f"training an aligner ({n_params:,} parameters; guidance {dims['guidance_dim']}, tokens "
            f"{dims['num_tokens']} x {dims['image_dim']}) on "
            f"{'streamed features' if self.streaming else f'{self.train_samples} samples'}"
            f"{f', validating on {len(self.val_dataset)}' if self.val_loader else ''}; "
            f"{self.accelerator.num_processes} process(es) x batch {cfg.batch_size} = global batch "
            f"{self.global_batch}; "
            f"{f'{self.steps_per_epoch} steps per epoch; ' if self.steps_per_epoch else ''}"
            f"to step {cfg.max_steps}"
        )

    # -- checkpoints ---------------------------------------------------------------------------------

    def position(self) -> dict[str, int]:
        """The epoch and batch the next step trains on (past an epoch's last batch: the next epoch)."""
        if self.steps_per_epoch is not None and self.batch_in_epoch >= self.steps_per_epoch:
            return {"epoch": self.epoch + 1, "batch_in_epoch": 0}
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}

    def save_checkpoint(self) -> Path:
        """Checkpoint ``self.step``: aligner/ (save_pretrained), reference.safetensors, the optimizer,
        scheduler and RNG states, and the trainer state (data position, tracker, config)."""
        tracker = self.tracker
        state = {
            **self.position(),
            "replacement_steps": self.replacement_steps,
            "global_batch": self.global_batch,
            "train_samples": self.train_samples,
            "num_processes": self.accelerator.num_processes,
            "config": config_to_dict(self.cfg),
            "step": self.step,
            "tracker": {"k": tracker.k, "count": tracker.count, "replacements": tracker.replacements},
        }
        path = write_checkpoint(
            self.accelerator,
            self.checkpoints,
            self.step,
            state=state,
            keep=self.cfg.keep_checkpoints,
            save_model=self._save_model,
            # ZeRO shards the optimizer state: every process writes its part
            optimizer=None if self.deepspeed else self.optimizer,
            scheduler=self.scheduler,
            save_shard=self._save_deepspeed if self.deepspeed else None,
        )
        self.console.print(f"step {self.step}: checkpoint {path}")
        return path

    def _save_model(self, folder: Path) -> None:
        from safetensors.torch import save_file

        self.accelerator.unwrap_model(self.model).save_pretrained(folder / "aligner")
        reference = {k: v.detach().cpu().contiguous() for k, v in self.tracker.reference.state_dict().items()}
        save_file(reference, folder / "reference.safetensors")

    def _save_deepspeed(self, folder: Path) -> None:
        self.model.save_checkpoint(str(folder / "deepspeed"), tag="state")

    def load_checkpoint(self, path: Path) -> dict[str, Any]:
        """Restore everything :meth:`save_checkpoint` wrote; returns its trainer state."""
        return read_checkpoint(
            path,
            self.accelerator,
            load_model=self._load_model,
            optimizer=None if self.deepspeed else self.optimizer,
            scheduler=self.scheduler,
        )

    def _load_model(self, path: Path, state: dict[str, Any]) -> None:
        from safetensors.torch import load_file

        from img_guidance.aligner import check_state_dict, read_state_dict

        unwrapped = self.accelerator.unwrap_model(self.model)
        check_resume_architecture(path, unwrapped.config.to_dict())
        if self.deepspeed:
            self.model.load_checkpoint(str(path / "deepspeed"), tag="state")
        else:
            weights = read_state_dict(path / "aligner" / "model.safetensors")
            check_state_dict(unwrapped, weights, str(path / "aligner"))
            unwrapped.load_state_dict(weights)
        reference = load_file(path / "reference.safetensors")
        self.tracker.load_state_dict({**state["tracker"], "reference": reference})

    # -- training ------------------------------------------------------------------------------------

    def epoch_batches(self, epoch: int, start: int) -> Iterator[dict[str, torch.Tensor]]:
        """The batches of ``epoch`` from its ``start``-th on, on this process's device."""
        from accelerate.utils import send_to_device

        accelerator = self.accelerator
        if not self.streaming:
            self.loader.set_epoch(epoch)
            self.sampler.set_position(epoch, start)
            yield from self.loader
            return
        if start:
            self.console.print(
                f"skipping {start} batches to the resume position (their features are recomputed)"
            )
        # processes may hold different numbers of samples: the epoch ends for all when one runs out
        for seen, batch in enumerate(itertools.chain(self.loader, [None])):
            ready = torch.tensor([batch is not None], dtype=torch.int64, device=accelerator.device)
            if int(accelerator.reduce(ready, "sum")) < accelerator.num_processes:
                return
            if seen >= start:
                yield send_to_device(batch, accelerator.device)

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """One optimizer step; returns the loss and its logged parts averaged over processes (and the
        gradient norm when clipped). Raises :class:`TrainingDiverged` before stepping on a non-finite loss."""
        from img_guidance.objective import iupo_loss

        cfg, accelerator, model = self.cfg, self.accelerator, self.model
        guidance, mask = batch["guidance"], batch["guidance_mask"]  # [B, L, G], [B, L]
        tokens_l, tokens_w = batch["tokens_l"], batch["tokens_w"]  # [B, N, D]
        pred = model(guidance, tokens_l, mask)
        with torch.no_grad(), accelerator.autocast():
            ref_pred = self.tracker.reference(guidance, tokens_l, mask)
        loss, parts = iupo_loss(pred, ref_pred, tokens_w, tokens_l, lam=cfg.lam, terms=cfg.terms)

        # one all-reduce serves the logs and the finiteness check, so all processes stop together
        local = torch.stack([loss.detach().float(), *(parts[name].float() for name in LOGGED_PARTS)])
        values = dict(zip(("loss", *LOGGED_PARTS), accelerator.reduce(local, "mean").tolist(), strict=True))
        bad = [f"{name}={value}" for name, value in values.items() if not math.isfinite(value)]
        if bad:
            raise TrainingDiverged(f"step {self.step + 1}: non-finite loss ({', '.join(bad)})")

        accelerator.backward(loss)
        if cfg.grad_clip > 0:
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            if grad_norm is not None:
                values["grad_norm"] = float(grad_norm)
                # fp16 overflows are the grad scaler's business: it skips those steps
                if not math.isfinite(values["grad_norm"]) and cfg.mixed_precision != "fp16":
                    raise TrainingDiverged(f"step {self.step + 1}: non-finite gradient norm ({grad_norm})")
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.tracker.observe(parts["policy_error"], parts["reference_error"]):
            self.replacement_steps.append(self.step + 1)
        self.step += 1
        self.batch_in_epoch += 1
        return values

    def train(self) -> dict[str, Any]:
        """Train from where :meth:`setup` left the run to ``max_steps``, then save the final aligner;
        returns the summary. A non-finite loss raises :class:`TrainingDiverged`, nothing saved after
        the last good step."""
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        columns = (
            TextColumn("[bold]train[/]"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[status]}"),
        )
        self.progress = Progress(*columns, console=self.console, disable=not self.accelerator.is_main_process)
        self.task = self.progress.add_task("train", total=self.cfg.max_steps, completed=self.step, status="")
        # samples/s counts the time of training steps (data loading included), not validation or saving
        self.window: dict[str, float] = {}
        self.window_steps, self.window_seconds, self.clock = 0, 0.0, time.perf_counter()

        self.model.train()
        self.progress.start()
        try:
            while self.step < self.cfg.max_steps:
                self._train_epoch()
        except TrainingDiverged as err:
            raise diverged(err, self.checkpoints) from err
        finally:
            self.progress.stop()
        final = self._save_final()
        tracker = self.tracker
        return {
            "step": self.step,
            "final_dir": str(final),
            "history": self.history,
            "validations": self.validations,
            "replacement_steps": self.replacement_steps,
            "tracker": {"k": tracker.k, "count": tracker.count, "replacements": tracker.replacements},
        }

    def _train_epoch(self) -> None:
        """Train from the run's position to the end of its epoch, or to ``max_steps``."""
        here = self.position()
        self.epoch, self.batch_in_epoch = here["epoch"], here["batch_in_epoch"]
        first_step = self.step
        for batch in self.epoch_batches(self.epoch, self.batch_in_epoch):
            values = self.train_step(batch)
            self._after_step(values)
            if self.step >= self.cfg.max_steps:
                return
        if self.step == first_step and self.batch_in_epoch == 0:
            raise ConfigError("the training data gave no batch")
        self.epoch, self.batch_in_epoch = self.epoch + 1, 0

    def _after_step(self, values: dict[str, float]) -> None:
        """Log, validate and checkpoint on their schedules."""
        cfg, step = self.cfg, self.step
        for name, value in values.items():
            self.window[name] = self.window.get(name, 0.0) + value
        self.window_steps += 1
        self.window_seconds += time.perf_counter() - self.clock  # the clock restarts after saving
        self.progress.update(self.task, completed=step, status=f"loss {values['loss']:.4g}")
        if cfg.log_every and (step % cfg.log_every == 0 or step == cfg.max_steps):
            self._log_window()
        if self.val_loader is not None and (step % cfg.validate_every == 0 or step == cfg.max_steps):
            self._validate()
        if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
            self.save_checkpoint()
        self.clock = time.perf_counter()

    def _log_window(self) -> None:
        """Log the means of the steps since the last log, and the reference, lr and throughput."""
        row = {f"train/{name}": total / self.window_steps for name, total in self.window.items()}
        row |= {
            "train/reference_replacements": self.tracker.replacements,
            "train/lr": self.scheduler.get_last_lr()[0],
            "train/samples_per_s": self.window_steps * self.global_batch / max(self.window_seconds, 1e-9),
        }
        self.accelerator.log(row, step=self.step)
        self.history.append({"step": self.step, **row})
        self.window, self.window_steps, self.window_seconds = {}, 0, 0.0

    def _validate(self) -> None:
        result = validate(self.accelerator, self.model, self.val_loader)
        self.accelerator.log(result, step=self.step)
        self.validations.append({"step": self.step, **result})
        self.console.print(
            f"step {self.step}: validation L_base {result['val/L_base']:.4g} "
            f"(inputs {result['val/input_distance']:.4g}), "
            f"closer to w: {result['val/closer_fraction']:.1%}"
        )

    def _save_final(self) -> Path:
        """OUTPUT/final: the trained aligner (main process)."""
        final = self.output / "final"
        if self.accelerator.is_main_process:
            write_folder(final, self.accelerator.unwrap_model(self.model).save_pretrained)
            self.console.print(
                f"done: {self.step} steps, {self.tracker.replacements} reference replacements; "
                f"aligner in {final}"
            )
        return final

    # -- cleanup -------------------------------------------------------------------------------------

    def cleanup(self) -> None:
        """Record the steps at which this process replaced the reference, and end the trackers."""
        record = self.output / "logs" / f"reference_replacements.process{self.accelerator.process_index}.json"
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps({"steps": self.replacement_steps, "last_step": self.step}) + "\n")
        self.accelerator.end_training()


def train(
    cfg: TrainConfig,
    *,
    resume: str | bool | None = None,
    dataset: Dataset | None = None,
    val_dataset: Dataset | None = None,
) -> dict[str, Any]:
    """Train an aligner; returns a summary (final step, folders, logged rows, validations).

    ``dataset``/``val_dataset``: datasets of feature samples (``guidance`` [L, G], ``tokens_l``/
    ``tokens_w`` [N, D], ``index``) instead of the config's cache_dir/online/val_cache_dir. A
    map-style one is shuffled per epoch and sharded over the processes by the recipe; an iterable
    one (online features) must deal its samples over the processes itself, and is read in its own
    order each epoch (a resumed run re-reads the batches it skips).
    Raises :class:`TrainingDiverged` on a non-finite loss, after the last good checkpoint.
    """
    recipe = AlignerRecipe(cfg, resume=resume, dataset=dataset, val_dataset=val_dataset)
    try:
        recipe.setup()
        try:
            return recipe.train()
        finally:
            recipe.cleanup()
    except BaseException:
        remove_unstarted_run(recipe.output)
        raise


def remove_unstarted_run(output: Path) -> None:
    """After a run that stopped before its first checkpoint: remove what it wrote (config.yaml,
    logs/, an empty checkpoints/), and OUTPUT itself if that leaves it empty. A folder holding a
    checkpoint or a final aligner is left as it is. Main process only."""
    from accelerate import PartialState

    if not PartialState().is_main_process or not output.is_dir():
        return
    checkpoints = output / "checkpoints"
    if list_checkpoints(checkpoints) or (output / "final").exists():
        return
    (output / "config.yaml").unlink(missing_ok=True)
    shutil.rmtree(output / "logs", ignore_errors=True)
    for folder in (checkpoints, output):
        with contextlib.suppress(OSError):
            folder.rmdir()  # only where empty


# -- command line ----------------------------------------------------------------------------------

USAGE = """usage: train_aligner CONFIG [key=value ...] [--resume [PATH]]

Train the Implicit Aligner. CONFIG is a YAML file (see configs/); key=value overrides any key,
the value read as YAML (lr=3e-4, terms=[dpo], online.batch_size=4). --resume continues from the
newest complete checkpoint in OUTPUT_DIR/checkpoints, or from PATH.
"""


def main(argv: list[str] | None = None) -> int:
    """Run the recipe from the command line; 0 on success, 1 when training diverged, 2 on a bad
    config or command line."""
    return run_recipe(argv, TrainConfig, USAGE, train)


__all__ = [
    "AlignerRecipe",
    "EpochSampler",
    "TrainConfig",
    "TrainingDiverged",
    "check_config",
    "main",
    "open_datasets",
    "resolve_resume",
    "split_indices",
    "train",
]

if __name__ == "__main__":
    raise SystemExit(main())
