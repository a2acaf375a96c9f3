"""ShapesWorld's training data, written in the schemas of the real datasets so that the project's
own readers, feature stage and recipes consume it unchanged.

- Instruction triplets (:func:`write_triplets`): the CLIP-filtered InstructPix2Pix parquet schema
  (``original_prompt``, ``original_image``, ``edit_prompt``, ``edited_prompt``, ``edited_image``):
  a render of a scene A, the prompt of a scene B, and the instruction that turns A into B
  (:func:`~img_guidance.shapes.grammar.edit_instruction`). A is one edit away from B most of the
  time (a near miss, as a generator's mistakes are), sometimes B itself ("no change"), sometimes
  any other scene. Read back by :func:`img_guidance.data.triplets.iter_triplets`.
- Preference pairs (:func:`write_pairs`): the Pick-a-Pic v2 parquet schema (``caption``, ``jpg_0``,
  ``jpg_1``, ``label_0``, ``label_1``, ``has_label``, ``ranking_id``), N generations per prompt (N
  seeds), all judged, made one of two ways. :func:`make_correction_pairs`: every image not judged
  right against the render of its nearest correct scene (:mod:`img_guidance.shapes.correct`: the
  image's mistakes fixed, the rest kept where it was), which is preferred, and optionally every right
  image against its own redraw; the side the preferred image takes is a seeded coin.
  :func:`make_pairs`: a prompt's best-scoring image against its worst-scoring one, in
  generation order, labelled by the judge's scores; a prompt whose N images all score alike gives no
  row (a tie teaches nothing) and is counted (:class:`PairCounts`). Images are stored as PNG
  (lossless: a 32 px JPEG would shift the colours the judge reads); the reader decodes any format PIL
  knows. Read back by :func:`img_guidance.data.pairs.iter_pairs`.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from img_guidance.shapes.grammar import SceneSpec, all_scenes, describe, edit_instruction, near_misses
from img_guidance.shapes.render import render

if TYPE_CHECKING:
    from PIL import Image

    from img_guidance.shapes.judge import Verdict

# How a triplet's source scene A is drawn for a target B
NEAR_MISS, SAME, OTHER = 0.85, 0.1, 0.05
# How make_render_pairs draws its images: the share of right ones, of near misses two edits away,
# and the most blur (px at 32 x 32), colour cast and noise (0-255 units) it adds to a render
RENDER_RIGHT, RENDER_SECOND_EDIT = 0.45, 0.3
RENDER_BLUR, RENDER_TINT, RENDER_NOISE = 0.7, 8.0, 12.0


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


@dataclass
class PairCounts:
    """What :func:`make_pairs` made: ``prompts == pairs + ties_dropped``."""

    prompts: int = 0  # scenes generated for
    images: int = 0  # generations judged (``generations`` per prompt)
    pairs: int = 0  # rows: best against worst
    ties_dropped: int = 0  # prompts whose images all scored alike


@dataclass
class CorrectionCounts:
    """What :func:`make_correction_pairs` made: ``images == pairs + right``; the rows are
    ``pairs + redraws``."""

    prompts: int = 0  # scenes generated for
    images: int = 0  # generations judged (``generations`` per prompt)
    pairs: int = 0  # rows: a wrong image against its correction
    right: int = 0  # images judged right: nothing to correct
    redraws: int = 0  # rows: a right image against its own redraw (``redraw_right``)
    kept_objects: int = 0  # objects of the wrong images that kept their place in the correction
    fresh_layouts: int = 0  # corrections that kept nothing: the scene's canonical layout


def _judged_generations(
    generate: Callable[[list[str], list[int]], list[Image.Image]],
    scenes: Sequence[SceneSpec],
    *,
    generations: int,
    seeds: Callable[[int], Sequence[int]] | Sequence[int],
    batch_size: int,
    progress: Callable[[int, int], None] | None,
) -> Iterator[tuple[int, str, tuple[Image.Image, ...], list[Verdict]]]:
    """(scene index, prompt, its ``generations`` images, their verdicts), scene by scene, from one
    ``generate`` call per generation index per ``batch_size`` scenes; every scene's seeds are checked
    before any generation."""
    from img_guidance.shapes.judge import judge

    if generations < 1:
        raise ValueError(f"generations must be >= 1, got {generations}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    seed_lists = [list(seeds(i) if callable(seeds) else seeds) for i in range(len(scenes))]
    for i, scene_seeds in enumerate(seed_lists):
        if len(scene_seeds) != generations:
            raise ValueError(
                f"generations={generations} needs {generations} seeds per scene, but scene {i} "
                f"({describe(scenes[i])!r}) has {len(scene_seeds)}: {scene_seeds}"
            )
    for begin in range(0, len(scenes), batch_size):
        chunk = range(begin, min(begin + batch_size, len(scenes)))
        prompts = [describe(scenes[i]) for i in chunk]
        # images[k][j] is generation k of scene chunk[j]
        images = [generate(prompts, [seed_lists[i][k] for i in chunk]) for k in range(generations)]
        for i, prompt, scene_images in zip(chunk, prompts, zip(*images, strict=True), strict=True):
            yield i, prompt, scene_images, [judge(image, scenes[i]) for image in scene_images]
        if progress is not None:
            progress(chunk.stop, len(scenes))


def pair_row(
    prompt: str, image_0: bytes, image_1: bytes, labels: tuple[float, float], ranking_id: int
) -> dict:
    return {
        "caption": prompt,
        "jpg_0": image_0,
        "jpg_1": image_1,
        "label_0": labels[0],
        "label_1": labels[1],
        "has_label": True,
        "ranking_id": ranking_id,
    }


def make_pairs(
    generate: Callable[[list[str], list[int]], list[Image.Image]],
    scenes: Sequence[SceneSpec],
    *,
    generations: int = 4,
    seeds: Callable[[int], Sequence[int]] | Sequence[int],
    batch_size: int = 64,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[list[dict[str, Any]], PairCounts]:
    """``generations`` images per scene (``generate(prompts, seeds)``, called once per generation
    index per ``batch_size`` scenes; the seeds of scene i are ``seeds(i)``, or the same ones for all),
    every one judged. A scene's row (Pick-a-Pic schema) is its best-scoring image against its
    worst-scoring one, in generation order, labelled by :func:`label_pair`; among images of equal
    score the lowest generation index is taken. Scenes whose images all score alike give no row.
    ``progress(done, total)`` is called with the scenes done after each batch."""
    if generations < 2:
        raise ValueError(f"make_pairs needs generations >= 2 (a best and a worst image), got {generations}")
    rows, counts = [], PairCounts()
    judged = _judged_generations(
        generate, scenes, generations=generations, seeds=seeds, batch_size=batch_size, progress=progress
    )
    for i, prompt, scene_images, verdicts in judged:
        # max/min return the first of equal scores: the lowest index
        scores = [v.score for v in verdicts]
        best = max(range(generations), key=scores.__getitem__)
        worst = min(range(generations), key=scores.__getitem__)
        counts.prompts += 1
        counts.images += generations
        if scores[best] == scores[worst]:
            counts.ties_dropped += 1
            continue
        # the pair in generation order, so that the preferred side carries no position bias
        first, second = sorted((best, worst))
        labels = label_pair(scores[first], scores[second])
        rows.append(
            pair_row(prompt, png_bytes(scene_images[first]), png_bytes(scene_images[second]), labels, i)
        )
        counts.pairs += 1
    return rows, counts


def make_correction_pairs(
    generate: Callable[[list[str], list[int]], list[Image.Image]],
    scenes: Sequence[SceneSpec],
    *,
    generations: int = 4,
    seeds: Callable[[int], Sequence[int]] | Sequence[int],
    seed: int = 0,
    batch_size: int = 64,
    progress: Callable[[int, int], None] | None = None,
    redraw_right: bool = False,
) -> tuple[list[dict[str, Any]], CorrectionCounts]:
    """``generations`` images per scene, generated and judged as in :func:`make_pairs`; every image
    not judged right gives a row (Pick-a-Pic schema): the image against the render of its nearest
    correct scene (:func:`~img_guidance.shapes.correct.corrected_layout`: its mistakes fixed, the
    rest kept), which is preferred. With ``redraw_right``, every image judged right gives a row too:
    the image against the render of the scene it shows (every object kept where it is), so that the
    aligner also learns to leave a right image as it is. Which side the preferred image takes is a
    seeded coin (``seed``, the scene and the generation index)."""
    from img_guidance.shapes.correct import corrected_layout
    from img_guidance.shapes.render import draw

    rows, counts = [], CorrectionCounts()
    judged = _judged_generations(
        generate, scenes, generations=generations, seeds=seeds, batch_size=batch_size, progress=progress
    )
    for i, prompt, scene_images, verdicts in judged:
        counts.prompts += 1
        for k, (image, verdict) in enumerate(zip(scene_images, verdicts, strict=True)):
            counts.images += 1
            right = verdict.correct is True
            counts.right += right
            if right and not redraw_right:
                continue
            found = verdict.objects if verdict.readable else None
            # a right image's correction keeps every object: its redraw
            fix = corrected_layout(found, scenes[i], size=image.width)
            fixed = png_bytes(draw(fix.objects, size=image.width))
            generated = png_bytes(image)
            if np.random.default_rng([seed, i, k]).random() < 0.5:
                rows.append(pair_row(prompt, fixed, generated, (1.0, 0.0), i))
            else:
                rows.append(pair_row(prompt, generated, fixed, (0.0, 1.0), i))
            if right:
                counts.redraws += 1
            else:
                counts.pairs += 1
                counts.kept_objects += fix.kept
                counts.fresh_layouts += fix.kept == 0
    return rows, counts


@dataclass
class RenderCounts:
    """What :func:`make_render_pairs` made: ``rows == right + wrong``."""

    rows: int = 0
    right: int = 0  # images judged right: the row is the image against its own redraw
    wrong: int = 0  # images of a near miss: the row is the image against its correction
    fresh_layouts: int = 0  # corrections that kept nothing: the scene's canonical layout


RENDER_CHUNK = 500  # rows per random stream: the rows do not depend on how many workers make them


def make_render_pairs(
    targets: Sequence[SceneSpec],
    *,
    count: int,
    seed: int,
    right: float = RENDER_RIGHT,
    second_edit: float = RENDER_SECOND_EDIT,
    first_id: int = 0,
    size: int = 32,
    workers: int = 1,
) -> tuple[list[dict[str, Any]], RenderCounts]:
    """``count`` preference rows (Pick-a-Pic schema) made without the generator, as
    :func:`make_correction_pairs` makes them from generations: a prompt drawn from ``targets``; an
    image of it (probability ``right``) or of a near miss of it (one edit; with probability
    ``second_edit`` two), rendered and made to look generated (:func:`~img_guidance.shapes.render.degrade`
    with a blur, tint and noise drawn per image); against the render of its nearest correct scene
    (:func:`~img_guidance.shapes.correct.corrected_layout`; a right image's is its redraw), which is
    preferred, on the side of a seeded coin. A row costs about 8 ms of one core, a generation about
    140 ms, so the aligner can see far more corrections than the generator can make. ``ranking_id``
    counts from ``first_id``. Deterministic in ``seed`` whatever ``workers`` (processes) make them."""
    if not targets:
        raise ValueError("make_render_pairs needs at least one target scene")
    if count < 0 or not (0 <= right <= 1 and 0 <= second_edit <= 1) or workers < 1:
        raise ValueError(
            "count must be >= 0, right and second_edit in [0, 1], workers >= 1; got "
            f"{count}, {right}, {second_edit}, {workers}"
        )
    jobs = [
        (list(targets), seed, c, min(RENDER_CHUNK, count - c * RENDER_CHUNK), right, second_edit, size)
        for c in range(-(-count // RENDER_CHUNK))
    ]
    if workers > 1 and len(jobs) > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(min(workers, len(jobs))) as pool:
            chunks = list(pool.map(_render_chunk, *zip(*jobs, strict=True)))
    else:
        chunks = [_render_chunk(*job) for job in jobs]
    rows, counts = [], RenderCounts()
    for chunk_rows, chunk_counts in chunks:
        for row in chunk_rows:
            row["ranking_id"] = first_id + len(rows)
            rows.append(row)
        for name, value in asdict(chunk_counts).items():
            setattr(counts, name, getattr(counts, name) + value)
    return rows, counts


def _render_chunk(
    targets: list[SceneSpec], seed: int, chunk: int, count: int, right: float, second_edit: float, size: int
) -> tuple[list[dict[str, Any]], RenderCounts]:
    from img_guidance.shapes.correct import corrected_layout
    from img_guidance.shapes.judge import judge
    from img_guidance.shapes.render import degrade, draw

    rng = np.random.default_rng([seed, 0x2E4D, chunk])
    rows, counts = [], RenderCounts()
    for _ in range(count):
        target = targets[int(rng.integers(len(targets)))]
        shown = target
        if rng.random() >= right:
            misses = near_misses(target)
            shown = misses[int(rng.integers(len(misses)))]
            if rng.random() < second_edit:
                further = [s for s in near_misses(shown) if s != target]
                shown = further[int(rng.integers(len(further)))] if further else shown
        image = degrade(
            render(shown, seed=rng, size=size),
            rng=rng,
            noise=rng.uniform(0, RENDER_NOISE),
            blur=rng.uniform(0, RENDER_BLUR) * size / 32,
            tint=rng.uniform(0, RENDER_TINT),
        )
        verdict = judge(image, target)
        fix = corrected_layout(verdict.objects if verdict.readable else None, target, size=size)
        fixed, shown_bytes = png_bytes(draw(fix.objects, size=size)), png_bytes(image)
        prompt = describe(target)
        if rng.random() < 0.5:
            rows.append(pair_row(prompt, fixed, shown_bytes, (1.0, 0.0), 0))
        else:
            rows.append(pair_row(prompt, shown_bytes, fixed, (0.0, 1.0), 0))
        counts.rows += 1
        if verdict.correct is True:
            counts.right += 1
        else:
            counts.wrong += 1
            counts.fresh_layouts += fix.kept == 0
    return rows, counts


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
