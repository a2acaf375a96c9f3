"""The feature stage: what the Implicit Aligner trains on, computed once per preference pair.

For the pair (prompt, preferred image w, unpreferred image l) at source row ``index``:

    question  = fill(choose_question(seed, index=index, questions), prompt)
    guidance  = guidance_model.guide([l], [question]), its real tokens only    [L, G]
    tokens_l, tokens_w = image_encoder.encode_image([l, w])                    [N, D] each

(the aligner's input is (guidance, tokens_l), its target tokens_w; paper Sec. 3.4). The question
depends only on the seed and the pair's row, so a resumed, re-sharded or online run asks the same one.

:func:`extract_features` writes the sharded cache of :mod:`img_guidance.features.cache` (resumable,
split across accelerate processes); :class:`OnlineFeatures` yields the same samples on the fly for
users without the disk for a cache; :func:`run_features` is the ``img-guidance features`` command.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import IterableDataset

from img_guidance.features.cache import (
    MANIFEST,
    FeatureCacheWriter,
    check_compatible,
    existing_settings,
    read_manifest,
    setting_differences,
)
from img_guidance.features.cache import storage_dtype as torch_storage_dtype
from img_guidance.guidance.questions import QUESTIONS, choose_question, fill
from img_guidance.precision import resolve_dtype

if TYPE_CHECKING:
    from img_guidance.data.pairs import PreferencePair
    from img_guidance.guidance.base import GuidanceModel

DEFAULT_ROWS_PER_SHARD = 256  # LLaVA-13B guidance in bfloat16 is ~6 MB a sample: ~1.6 GB shards
DEFAULT_BATCH_SIZE = 8


def questions_fingerprint(questions: Sequence[str]) -> str:
    """A short, stable name for a question list (recorded with the features it chose from)."""
    digest = hashlib.sha256(json.dumps(list(questions)).encode("utf-8")).hexdigest()
    return f"sha256:{digest[:16]}"


def feature_models(image_encoder: Any, guidance: GuidanceModel, questions: Sequence[str]) -> dict:
    """What made a cache's features, from the models' own ``describe()``."""
    return {
        "image_encoder": dict(image_encoder.describe()),
        "guidance": dict(guidance.describe()),
        "questions": questions_fingerprint(questions),
    }


def feature_dims(image_encoder: Any, guidance: GuidanceModel) -> dict[str, int]:
    num_tokens, image_dim = image_encoder.token_shape
    return {
        "guidance_dim": int(guidance.hidden_size),
        "num_tokens": int(num_tokens),
        "image_dim": int(image_dim),
    }


def pair_question(pair: PreferencePair, *, seed: int, questions: Sequence[str] = QUESTIONS) -> str:
    """The question asked about the pair's unpreferred image (a function of seed and row only)."""
    return fill(choose_question(seed, index=pair.index, questions=questions), pair.prompt)


@torch.no_grad()
def pair_features(
    pairs: Sequence[PreferencePair],
    *,
    image_encoder: Any,
    guidance: GuidanceModel,
    questions: Sequence[str] = QUESTIONS,
    seed: int = 0,
    dtype: torch.dtype | None = None,
) -> list[dict]:
    """The samples of one batch of pairs: ``{"guidance": [L, G], "tokens_l": [N, D], "tokens_w": [N, D],
    "index": int}`` each, on the CPU (in ``dtype`` when given, else the models' dtype).

    ``image_encoder``: anything with ``encode_image(images) -> [B, N, D]`` (a backend, or the
    encoder-only :func:`~img_guidance.backends.load_image_encoder`).
    """
    pairs = list(pairs)
    if not pairs:
        return []
    unpreferred = [pair.unpreferred for pair in pairs]
    output = guidance.guide(unpreferred, [pair_question(p, seed=seed, questions=questions) for p in pairs])
    # one call for both images of every pair: [2B, N, D] -> l rows then w rows
    tokens = image_encoder.encode_image(unpreferred + [pair.preferred for pair in pairs])
    tokens_l, tokens_w = tokens[: len(pairs)], tokens[len(pairs) :]

    def cpu(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(device="cpu", dtype=dtype or t.dtype)

    hidden, mask = cpu(output.hidden_states), output.attention_mask.cpu()
    return [
        {
            "guidance": hidden[i][mask[i]],  # [L_max, G] -> [L_i, G]: the sample's real tokens
            "tokens_l": cpu(tokens_l[i]),
            "tokens_w": cpu(tokens_w[i]),
            "index": int(pair.index),
        }
        for i, pair in enumerate(pairs)
    ]


def _batched(items: Iterable, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _positive(name: str, value: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _source_rows(pairs_source: Any, limit: int | None) -> int:
    from img_guidance.data.pairs import count_rows

    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 0):
        raise ValueError(f"limit must be a non-negative integer or None, got {limit!r}")
    rows = count_rows(pairs_source)
    return rows if limit is None else min(rows, limit)


class _SingleProcess:
    """What extract_features reads from an accelerate ``Accelerator`` when there is none."""

    num_processes = 1
    process_index = 0
    is_main_process = True

    def wait_for_everyone(self) -> None:
        pass


def extract_features(
    pairs_source: Any,
    out_dir: str | os.PathLike,
    *,
    image_encoder: Any,
    guidance: GuidanceModel,
    questions: Sequence[str] = QUESTIONS,
    seed: int = 0,
    rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
    batch_size: int = DEFAULT_BATCH_SIZE,
    limit: int | None = None,
    dtype: str = "bfloat16",
    accelerator: Any = None,
    models: dict | None = None,
    progress: bool = True,
) -> dict:
    """Compute the features of every pair of ``pairs_source`` into the cache folder ``out_dir`` and
    return its manifest.

    pairs_source: what :func:`img_guidance.data.pairs.iter_pairs` reads (a Pick-a-Pic parquet file
        or folder of them, a pairs ``.jsonl`` file, a hub dataset id).
    image_encoder: has ``encode_image`` and ``token_shape`` (a backend or an encoder-only model).
    guidance: the guidance model; it sees the unpreferred image with the seeded question.
    rows_per_shard: source rows per shard; shard k covers rows [k * rows_per_shard, (k + 1) * rows_per_shard).
    batch_size: pairs per forward pass (batches never cross a shard).
    limit: use only the first ``limit`` source rows.
    dtype: storage dtype ("bfloat16" or "float16").
    accelerator: an accelerate ``Accelerator`` (or anything with ``num_processes``, ``process_index``,
        ``is_main_process``, ``wait_for_everyone``): process p makes the shards k with
        k % num_processes == p; the main process writes the manifest after all are done (and
        shows the progress of its own shards).
    models: what made the features, recorded in the cache (default: the models' ``describe()``);
        the question list's fingerprint is added as ``models["questions"]``.

    Resumable: shards already written (shard and sidecar both present) are skipped, so a killed run
    continues where it stopped when started again with the same arguments. A folder holding a cache
    made with other settings is refused before any work.
    """
    _positive("batch_size", batch_size)
    questions = tuple(questions)
    if not questions:
        raise ValueError("the question list is empty")
    store = torch_storage_dtype(dtype)  # a bad name fails before any work
    accelerator = accelerator if accelerator is not None else _SingleProcess()
    models = dict(models) if models is not None else feature_models(image_encoder, guidance, questions)
    models.setdefault("questions", questions_fingerprint(questions))
    writer = FeatureCacheWriter(
        out_dir,
        dims=feature_dims(image_encoder, guidance),
        dtype=dtype,
        models=models,
        question_seed=seed,
        rows_per_shard=_positive("rows_per_shard", rows_per_shard),
    )
    rows = _source_rows(pairs_source, limit)
    ranges = {
        k: (k * rows_per_shard, min((k + 1) * rows_per_shard, rows))
        for k in range(math.ceil(rows / rows_per_shard))
    }
    todo = [k for k in ranges if not writer.shard_done(k, stop_row=ranges[k][1])]
    if todo and accelerator.is_main_process:
        # a manifest says the cache is complete; it is written again once it is
        (Path(out_dir) / MANIFEST).unlink(missing_ok=True)
    mine = [k for k in todo if k % accelerator.num_processes == accelerator.process_index]
    with _progress_bar(
        progress and accelerator.is_main_process, sum(b - a for a, b in (ranges[k] for k in mine))
    ) as advance:
        for k in mine:
            first, stop = ranges[k]
            samples, stats = _shard_samples(
                pairs_source,
                first,
                stop,
                image_encoder,
                guidance,
                questions,
                seed,
                batch_size,
                store,
                advance,
            )
            writer.write_shard(k, samples, first_row=first, stop_row=stop, stats=stats)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        writer.finalize(rows=rows)
    accelerator.wait_for_everyone()
    return read_manifest(out_dir)


def _empty_stats():
    from img_guidance.data.pairs import PairStats

    return PairStats(rows=0, pairs=0, ties=0, unlabeled=0, undecodable=[])


def _shard_samples(
    pairs_source: Any,
    first: int,
    stop: int,
    image_encoder: Any,
    guidance: GuidanceModel,
    questions: Sequence[str],
    seed: int,
    batch_size: int,
    dtype: torch.dtype | None,
    advance: Callable[[int], None],
) -> tuple[list[dict], dict]:
    """The samples of source rows [first, stop) and the stats of reading them."""
    from img_guidance.data.pairs import iter_pairs

    stats = _empty_stats()
    samples: list[dict] = []
    done = first
    for batch in _batched(iter_pairs(pairs_source, start=first, stop=stop, stats=stats), batch_size):
        samples += pair_features(
            batch, image_encoder=image_encoder, guidance=guidance, questions=questions, seed=seed, dtype=dtype
        )
        advance(batch[-1].index + 1 - done)
        done = batch[-1].index + 1
    advance(stop - done)
    return samples, stats.as_dict()


@contextlib.contextmanager
def _progress_bar(enabled: bool, total: int) -> Iterator[Callable[[int], None]]:
    """A rich progress bar over source rows; yields ``advance(rows)`` (a no-op when disabled)."""
    if not enabled:
        yield lambda n: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (
        TextColumn("features"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("rows"),
        TimeRemainingColumn(),
    )
    with Progress(*columns) as progress:
        task = progress.add_task("features", total=total)
        yield lambda n: progress.advance(task, n)


class OnlineFeatures(IterableDataset):
    """The samples of a feature cache, computed on the fly (no disk): for users who cannot store
    one. Yields ``{"guidance": [L, G], "tokens_l": [N, D], "tokens_w": [N, D], "index": int}`` like
    :class:`~img_guidance.features.cache.FeatureCache`; batch them with
    :func:`~img_guidance.features.cache.collate_features`.

    The source rows are cut into blocks of ``rows_per_block`` (the cache's shards) and the blocks are
    dealt round-robin over every consumer: DataLoader worker w of process p is consumer
    p * num_workers + w of num_processes * num_workers, so no pair is read twice and none is left
    out. ``process_index``/``num_processes`` default to torch.distributed's rank and world size when it
    is initialised (pass ``accelerator.process_index``/``num_processes`` otherwise). With the same
    models, seed, ``rows_per_block`` = rows_per_shard and ``batch_size`` the samples equal the
    cache's (``dtype``: round to the cache's storage dtype, e.g. torch.bfloat16).

    Models on a GPU should run in the main process (``num_workers=0``): forked DataLoader workers
    cannot use CUDA. Processes get unequal sample counts when rows are dropped (ties,
    undecodable images); distributed training on it needs uneven-input handling
    (accelerate's ``even_batches``/``join_uneven_inputs``), which the cache avoids.
    """

    def __init__(
        self,
        pairs_source: Any,
        *,
        image_encoder: Any,
        guidance: GuidanceModel,
        questions: Sequence[str] = QUESTIONS,
        seed: int = 0,
        batch_size: int = DEFAULT_BATCH_SIZE,
        limit: int | None = None,
        rows_per_block: int = DEFAULT_ROWS_PER_SHARD,
        dtype: torch.dtype | None = None,
        process_index: int | None = None,
        num_processes: int | None = None,
    ) -> None:
        self.pairs_source = pairs_source
        self.image_encoder = image_encoder
        self.guidance = guidance
        self.questions = tuple(questions)
        if not self.questions:
            raise ValueError("the question list is empty")
        self.seed = seed
        self.batch_size = _positive("batch_size", batch_size)
        self.rows_per_block = _positive("rows_per_block", rows_per_block)
        self.rows = _source_rows(pairs_source, limit)
        self.dtype = dtype
        if (process_index is None) != (num_processes is None):
            raise ValueError("give both process_index and num_processes, or neither")
        if num_processes is not None and not 0 <= process_index < _positive("num_processes", num_processes):
            raise ValueError(f"process_index must be in [0, {num_processes}), got {process_index}")
        self.process_index, self.num_processes = process_index, num_processes
        self.dims = feature_dims(image_encoder, guidance)

    def _consumer(self) -> tuple[int, int]:
        """(this consumer's number, how many consumers) over processes x DataLoader workers."""
        rank, world = self.process_index, self.num_processes
        if rank is None:
            dist = torch.distributed
            ready = dist.is_available() and dist.is_initialized()
            rank, world = (dist.get_rank(), dist.get_world_size()) if ready else (0, 1)
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return rank * workers + worker, world * workers

    def blocks(self) -> list[tuple[int, int]]:
        """The row ranges this consumer reads, in order."""
        consumer, consumers = self._consumer()
        count = math.ceil(self.rows / self.rows_per_block)
        return [
            (k * self.rows_per_block, min((k + 1) * self.rows_per_block, self.rows))
            for k in range(consumer, count, consumers)
        ]

    def __iter__(self) -> Iterator[dict]:
        from img_guidance.data.pairs import iter_pairs

        for first, stop in self.blocks():
            pairs = iter_pairs(self.pairs_source, start=first, stop=stop)
            for batch in _batched(pairs, self.batch_size):
                yield from pair_features(
                    batch,
                    image_encoder=self.image_encoder,
                    guidance=self.guidance,
                    questions=self.questions,
                    seed=self.seed,
                    dtype=self.dtype,
                )


def _location(spec: str | os.PathLike) -> str:
    """A location as recorded in a cache: local paths made absolute (a rerun from another working
    directory is the same run), hub ids as they are."""
    spec = os.fspath(spec)
    return os.path.abspath(spec) if os.path.exists(spec) else spec


def run_features(
    pairs: str | os.PathLike,
    out: str | os.PathLike,
    *,
    model: str | os.PathLike,
    unet: str | None = None,
    ip_adapter: str | os.PathLike | None = None,
    image_encoder: str | os.PathLike | None = None,
    mllm: str | os.PathLike | None = None,
    prompt_format: str | None = None,
    questions: str | os.PathLike | Sequence[str] | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    limit: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
    rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
    storage_dtype: str = "bfloat16",
    progress: bool = True,
) -> dict:
    """``img-guidance features``: the feature cache of a pairs source, with models loaded from
    locations. Returns the manifest.

    pairs: a Pick-a-Pic parquet file or folder of them, a pairs ``.jsonl`` file, or a hub dataset id.
    out: the cache folder (a rerun into it resumes; one made with other settings is refused).
    model: the backend preset or pipeline whose image tokens are cached (``sdxl``, ``flux``, a
        folder); only its image encoder and IP-Adapter projection are loaded (``ip_adapter`` and
        ``image_encoder`` override them). ``unet`` is accepted for symmetry with ``generate`` and
        ignored: the denoiser does not change image tokens (SDXL and SDXL-DPO share a cache).
    mllm, prompt_format: the guidance model (default: the paper's detector) and its prompt format.
    questions: a JSON file of templates or a list (default: the project's 100).
    device: default the accelerate process's device; dtype: the models' dtype (default
        :func:`~img_guidance.precision.default_dtype`: bfloat16 where the hardware has it natively,
        float32 elsewhere); storage_dtype: the cache's ("bfloat16" or "float16").
    limit, batch_size, seed, rows_per_shard: as :func:`extract_features`.

    Everything that can be checked without weights is checked before any model loads: the pairs
    source, the numbers, the question file, and an existing cache's settings and model locations.
    Runs under ``accelerate launch`` with one process per GPU.
    """
    from img_guidance.backends import image_encoder_locations, load_image_encoder
    from img_guidance.guidance import default_mllm, load_guidance
    from img_guidance.guidance.questions import load_questions
    from img_guidance.hub import split_hub_path

    # -- inputs, before any weights
    pairs_name = os.fspath(pairs)
    if not os.path.exists(pairs_name):
        try:
            split_hub_path(pairs_name)
        except FileNotFoundError:
            raise FileNotFoundError(
                f"pairs {pairs_name!r}: no such file or folder, and not a hub dataset id (owner/name)"
            ) from None
    if Path(out).exists() and not Path(out).is_dir():
        raise NotADirectoryError(f"out {os.fspath(out)!r} is a file; the feature cache is a folder")
    _positive("batch_size", batch_size)
    _positive("rows_per_shard", rows_per_shard)
    torch_storage_dtype(storage_dtype)
    if questions is None:
        question_list = QUESTIONS
    elif isinstance(questions, (str, os.PathLike)):
        question_list = load_questions(questions)
    else:
        question_list = tuple(questions)
        if not question_list:
            raise ValueError("the question list is empty")
    _source_rows(pairs, limit)  # reads the source's row count: a bad source fails here
    locations = image_encoder_locations(model, ip_adapter=ip_adapter, image_encoder=image_encoder)
    models = {
        "family": locations["family"],
        "ip_adapter": _location(locations["ip_adapter"]),
        "image_encoder": _location(locations["image_encoder"]),
        "mllm": _location(mllm if mllm is not None else default_mllm(model)),
        "questions": questions_fingerprint(question_list),
    }
    _check_models(out, models)
    check_compatible(out, dtype=storage_dtype, question_seed=seed, rows_per_shard=rows_per_shard)

    # -- models
    from accelerate import Accelerator

    accelerator = Accelerator()
    device = torch.device(device) if device is not None else accelerator.device
    dtype = resolve_dtype(dtype, device)
    encoder = load_image_encoder(
        model, ip_adapter=ip_adapter, image_encoder=image_encoder, torch_dtype=dtype, device=device
    )
    guidance = load_guidance(
        mllm if mllm is not None else default_mllm(model),
        prompt_format=prompt_format,
        torch_dtype=dtype,
        device=device,
    )
    models["prompt_format"] = getattr(guidance, "prompt_format", prompt_format)
    return extract_features(
        pairs,
        out,
        image_encoder=encoder,
        guidance=guidance,
        questions=question_list,
        seed=seed,
        rows_per_shard=rows_per_shard,
        batch_size=batch_size,
        limit=limit,
        dtype=storage_dtype,
        accelerator=accelerator,
        models=models,
        progress=progress,
    )


def _check_models(out: str | os.PathLike, models: dict) -> None:
    """Before loading: an existing cache in ``out`` must have been made by the same models (the keys
    known without loading them); the error names both."""
    found = existing_settings(out)
    if found is None:
        return
    settings, source = found
    differences = setting_differences(settings.get("models"), models, "models.")
    if differences:
        raise ValueError(
            f"{out} already holds features made with other models ({source}): "
            + "; ".join(differences)
            + ". Use another output folder, or delete this one to start over."
        )
