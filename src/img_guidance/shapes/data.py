"""ShapesWorld's training data, written in the schemas of the real datasets so that the project's
own readers, feature stage and recipes consume it unchanged.

- Instruction triplets (:func:`write_triplets`): the CLIP-filtered InstructPix2Pix parquet schema
  (``original_prompt``, ``original_image``, ``edit_prompt``, ``edited_prompt``, ``edited_image``):
  a render of a scene A, the prompt of a scene B, and the instruction that turns A into B
  (:func:`~img_guidance.shapes.grammar.edit_instruction`). A is one edit away from B most of the
  time (a near miss, as a generator's mistakes are), sometimes B itself ("no change"), sometimes
  any other scene. Read back by :func:`img_guidance.data.triplets.iter_triplets`.
- Preference pairs (:func:`write_pairs`): the Pick-a-Pic v2 parquet schema (``caption``, ``jpg_0``,
  ``jpg_1``, ``label_0``, ``label_1``, ``has_label``, ``ranking_id``): two generations per prompt
  (two seeds), labelled by the judge's score; equal scores are ties (0.5, 0.5), which the pair
  reader drops. Images are stored as PNG (lossless: a 32 px JPEG would shift the colours the judge
  reads); the reader decodes any format PIL knows. Read back by
  :func:`img_guidance.data.pairs.iter_pairs`.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from img_guidance.shapes.grammar import SceneSpec, all_scenes, describe, edit_instruction, near_misses
from img_guidance.shapes.render import render

if TYPE_CHECKING:
    from PIL import Image

# How a triplet's source scene A is drawn for a target B
NEAR_MISS, SAME, OTHER = 0.85, 0.1, 0.05


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _write_parquet(path: str | os.PathLike, columns: dict[str, list[Any]], types: dict[str, Any]) -> Path:
    """Write ``columns`` to ``path`` atomically (a temporary file, then a rename)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({name: pa.array(values, type=types[name]) for name, values in columns.items()})
    tmp = path.with_name(f".tmp-{path.name}")
    pq.write_table(table, tmp, row_group_size=256)
    os.replace(tmp, path)
    return path


def source_scene(target: SceneSpec, rng: np.random.Generator, scenes: Sequence[SceneSpec]) -> SceneSpec:
    """A scene whose render a triplet edits into ``target``: a near miss of it (probability
    :data:`NEAR_MISS`), itself (:data:`SAME`), or any scene of ``scenes``."""
    draw = rng.random()
    misses = near_misses(target)
    if draw < NEAR_MISS and misses:
        return misses[int(rng.integers(len(misses)))]
    if draw < NEAR_MISS + SAME:
        return target
    return scenes[int(rng.integers(len(scenes)))]


def make_triplets(
    targets: Sequence[SceneSpec], *, count: int, seed: int, size: int = 32
) -> list[dict[str, Any]]:
    """``count`` triplets (rows of the InstructPix2Pix schema) whose target prompts are drawn from
    ``targets``; deterministic in ``seed``."""
    if not targets:
        raise ValueError("make_triplets needs at least one target scene")
    rng = np.random.default_rng([seed, 0x7217])
    scenes = all_scenes()
    rows = []
    for _ in range(count):
        target = targets[int(rng.integers(len(targets)))]
        source = source_scene(target, rng, scenes)
        rows.append(
            {
                "original_prompt": describe(source),
                "original_image": png_bytes(render(source, seed=rng, size=size)),
                "edit_prompt": edit_instruction(source, target),
                "edited_prompt": describe(target),
                "edited_image": png_bytes(render(target, seed=rng, size=size)),
            }
        )
    return rows


def write_triplets(path: str | os.PathLike, rows: Sequence[dict[str, Any]]) -> Path:
    """Rows of :func:`make_triplets` as an InstructPix2Pix-schema parquet file."""
    import pyarrow as pa

    names = ("original_prompt", "original_image", "edit_prompt", "edited_prompt", "edited_image")
    types = {name: pa.binary() if name.endswith("image") else pa.string() for name in names}
    return _write_parquet(path, {name: [row[name] for row in rows] for name in names}, types)


def label_pair(score_0: float, score_1: float) -> tuple[float, float]:
    """Pick-a-Pic labels from two judge scores: the higher wins, equal scores tie."""
    if score_0 == score_1:
        return 0.5, 0.5
    return (1.0, 0.0) if score_0 > score_1 else (0.0, 1.0)


def make_pairs(
    generate: Callable[[list[str], list[int]], list[Image.Image]],
    scenes: Sequence[SceneSpec],
    *,
    seeds: tuple[int, int] | Callable[[int], tuple[int, int]],
    batch_size: int = 64,
    progress: Callable[[int, int], None] | None = None,
) -> list[dict[str, Any]]:
    """Two generations per scene (``generate(prompts, seeds)``; the seeds of scene i are
    ``seeds(i)``, or the same two for all), judged and labelled: rows of the Pick-a-Pic schema,
    ties included (the reader drops them)."""
    from img_guidance.shapes.judge import judge

    seed_of = seeds if callable(seeds) else (lambda i: seeds)
    rows = []
    for begin in range(0, len(scenes), batch_size):
        chunk = list(range(begin, min(begin + batch_size, len(scenes))))
        prompts = [describe(scenes[i]) for i in chunk]
        first = generate(prompts, [seed_of(i)[0] for i in chunk])
        second = generate(prompts, [seed_of(i)[1] for i in chunk])
        for i, prompt, image_0, image_1 in zip(chunk, prompts, first, second, strict=True):
            score_0, score_1 = judge(image_0, scenes[i]).score, judge(image_1, scenes[i]).score
            label_0, label_1 = label_pair(score_0, score_1)
            rows.append(
                {
                    "caption": prompt,
                    "jpg_0": png_bytes(image_0),
                    "jpg_1": png_bytes(image_1),
                    "label_0": label_0,
                    "label_1": label_1,
                    "has_label": True,
                    "ranking_id": i,
                }
            )
        if progress is not None:
            progress(min(begin + batch_size, len(scenes)), len(scenes))
    return rows


def write_pairs(path: str | os.PathLike, rows: Sequence[dict[str, Any]]) -> Path:
    """Rows of :func:`make_pairs` as a Pick-a-Pic-schema parquet file."""
    import pyarrow as pa

    types = {
        "caption": pa.string(),
        "jpg_0": pa.binary(),
        "jpg_1": pa.binary(),
        "label_0": pa.float64(),
        "label_1": pa.float64(),
        "has_label": pa.bool_(),
        "ranking_id": pa.int64(),
    }
    return _write_parquet(path, {name: [row[name] for row in rows] for name in types}, types)
