"""Reproduce every ShapesWorld model from nothing, with the project's own code paths and fixed seeds.

``img-guidance shapes train-all OUT`` runs, each stage resumable (a finished stage is skipped):

1. ``generator``: the base diffusion model and its image-prompt adapter
   (:func:`~img_guidance.recipes.train_shapes_generator.train_generator`) -> ``OUT/generator``.
2. ``detector``: the world's tiny LLaVA (:func:`~img_guidance.shapes.detector.make_detector_base`,
   ``OUT/detector_base``, kept for the untrained-detector ablation), finetuned by the detector recipe
   (:func:`~img_guidance.recipes.finetune_detector.finetune`) on triplets the world writes in the
   InstructPix2Pix schema (``OUT/data/triplets.parquet``) -> ``OUT/detector``.
3. ``pairs``: ``pair_generations`` generations per training prompt, judged, in the Pick-a-Pic
   schema (``OUT/data/pairs.parquet``). ``pair_method="correction"`` (the default): every image not
   judged right against the render of its nearest correct scene, its mistakes fixed and the rest kept
   (:func:`~img_guidance.shapes.data.make_correction_pairs`), and with ``pair_redraw_right`` every
   image judged right against its own redraw; ``"best-worst"``: a prompt's best image
   against its worst, prompts whose images all score alike giving no pair
   (:func:`~img_guidance.shapes.data.make_pairs`). Then ``pair_renders`` rows made without the
   generator (:func:`~img_guidance.shapes.data.make_render_pairs`): a degraded render of a training
   prompt or of a near miss of it, against its nearest correct render.
4. ``features``: the project's feature stage (:func:`~img_guidance.features.extract.extract_features`)
   with the generator's image tokens and the detector's guidance -> ``OUT/features``. It first
   names, in ``OUT/detector/img_guidance_detector.json``, how the guidance is read (every loader
   reads it there): the hidden state (``detector_guidance_layer``) and, with
   ``detector_guidance_standardize``, per-dimension statistics (:func:`set_detector_guidance`).
   Changing either reruns this stage and the ones after it, not the detector's finetuning.
5. ``aligner``: the aligner recipe (:func:`~img_guidance.recipes.train_aligner.train`) on that cache
   -> ``OUT/aligner``.
6. ``ip_scale``: the IP scale of IMG's re-generation, chosen on the validation split by
   :func:`choose_ip_scale` (the scale at which IMG gets the most images fully right) and written to
   ``OUT/generator/ip_scale.json``, where the backend finds it.

``OUT/train_all.json`` records each stage's seconds and results. ``install`` copies the three
models into the package (``img_guidance/shapes/weights``), where the demo and the ``shapes``
presets find them. Prompts come from the training split of
:func:`~img_guidance.shapes.splits.split_scenes` only; the validation split chooses
hyper-parameters, the test split is the benchmark's.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from img_guidance.outputs import write_json_atomic
from img_guidance.presets import SHAPES_WEIGHTS

WEIGHTS = SHAPES_WEIGHTS  # the package's ShapesWorld models, where the demo and presets find them
MODELS = ("generator", "detector", "aligner")
STAGES = ("generator", "detector", "pairs", "features", "aligner", "ip_scale")
PAIR_SEED_OFFSET = 1_000_000  # pair generations use seeds no benchmark uses
STANDARDIZE_RENDERS = 1024  # renders of training prompts that measure the guidance's statistics
STANDARDIZE_SEED_OFFSET = 700_000  # their render seeds, used nowhere else
PAIR_METHODS = ("correction", "best-worst")


@dataclass
class ShapesRecipe:
    """The settings of every stage (defaults: the shipped models)."""

    seed: int = 0
    # generator (stage 1)
    generator_steps_base: int = 5000
    generator_steps_encoder: int = 1000
    generator_steps_adapter: int = 1000
    generator_batch: int = 32
    # "joint" (the shipped run): a spatial adapter trained with the model from step 1 for
    # generator_steps_base steps (generator_steps_adapter then unused); or "two-stage": a global
    # adapter on a frozen base (the models shipped before 2026-12-05); see train_generator
    generator_method: str = "joint"
    # ip_scale (stage 6): candidates, and how many validation scenes choose among them (None: all)
    ip_scales: tuple[float, ...] = (0.2, 0.5, 1.0, 1.5)
    ip_scale_scenes: int | None = None
    # detector (stage 2)
    triplets: int = 12000
    detector_hidden: int = 96
    detector_layers: int = 3
    detector_steps: int = 1200
    detector_batch: int = 24
    detector_lr: float = 2e-3
    detector_val_rows: int = 200
    # every normalization layer's weights kept at the untrained detector's (the detector recipe's
    # freeze_norms): on validation at IP 1.5 IMG got 0.446 / 0.479 with it against 0.366 / 0.268
    # without, detector seeds 0 / 1 (2026-12-06, docs/shapesworld.md); False until then. Seeds 2 / 3
    # with it, run after, got 0.258 / 0.268: the detector's seed matters more than this setting
    # does, and the setting's gain is not established
    detector_freeze_norms: bool = True
    # the detector's hidden state read as guidance (recorded in OUT/detector, where every loader reads
    # it): 1, the output of the first of its 3 layers, chosen on validation (2026-12-06); the paper's
    # -1 (the last layer, after the final norm; the default until then) is this small model's
    # answer head and guides worse (docs/shapesworld.md)
    detector_guidance_layer: int = 1
    # the guidance standardized per dimension (guidance.standardize) with the mean and std of the
    # detector's hidden states on STANDARDIZE_RENDERS renders of training prompts, written into
    # OUT/detector by the features stage; off: on validation IMG got 0.347 at best with it (IP 0.5)
    # against 0.366 without (IP 1.5) (2026-12-06, docs/shapesworld.md)
    detector_guidance_standardize: bool = False
    # pairs (stage 3)
    pair_prompts: int = 2000
    pair_generations: int = 4  # images per prompt
    # "correction": every wrong image against the render of its nearest correct scene; or
    # "best-worst": the best against the worst of a prompt's images (the aligner shipped before the
    # correction pairs, until 2026-12-05)
    pair_method: str = "correction"
    # "correction" only: every image judged right also against its own redraw (the render of the
    # scene it shows), so that the aligner learns to keep what is right (False until 2026-12-05)
    pair_redraw_right: bool = True
    # rows made from renders, not generations (shapes.data.make_render_pairs), added to the pairs:
    # a training prompt's image (a degraded render of it or of a near miss) against its correction
    pair_renders: int = 60000
    # aligner (stage 5)
    aligner_depth: int = 2
    aligner_heads: int = 4
    aligner_head_dim: int = 16
    aligner_steps: int = 12000
    aligner_batch: int = 64
    aligner_lr: float = 1e-3
    aligner_lam: float = 1.0
    aligner_k: int = 10
    aligner_terms: tuple[str, ...] = ("dpo", "spin")

    def __post_init__(self) -> None:
        from img_guidance.guidance.llava import check_hidden_layer

        if self.pair_method not in PAIR_METHODS:
            raise ValueError(f"pair_method must be one of {PAIR_METHODS}, got {self.pair_method!r}")
        check_hidden_layer(self.detector_guidance_layer, self.detector_layers, "the world's detector")
        for key in ("detector_guidance_standardize", "detector_freeze_norms"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"{key} must be True or False, got {getattr(self, key)!r}")

    @classmethod
    def quick(cls, seed: int = 0) -> ShapesRecipe:
        """Tiny settings that run every stage in about a minute (tests, smoke runs); the models
        it makes are not the shipped quality."""
        return cls(
            seed=seed,
            generator_steps_base=4,
            generator_steps_encoder=2,
            generator_steps_adapter=2,
            generator_batch=4,
            triplets=48,
            detector_hidden=64,
            detector_layers=2,
            detector_steps=3,
            detector_batch=4,
            detector_val_rows=8,
            ip_scales=(0.5, 1.0),
            ip_scale_scenes=4,
            pair_prompts=24,
            pair_generations=2,
            pair_renders=30,
            aligner_steps=6,
            aligner_batch=4,
        )


def training_scenes(seed: int) -> list:
    from img_guidance.shapes.splits import split_scenes

    return split_scenes(seed)["train"]


def balanced_scenes(scenes: list, count: int, seed: int) -> list:
    """``count`` scenes drawn from ``scenes`` with the categories equally likely (a category picked
    uniformly, then a scene in it), seeded."""
    import numpy as np

    from img_guidance.shapes.grammar import category

    pools: dict[str, list] = {}
    for scene in scenes:
        pools.setdefault(category(scene), []).append(scene)
    names = sorted(pools)
    rng = np.random.default_rng([seed, 0xBA1])
    picked = []
    for _ in range(count):
        pool = pools[names[int(rng.integers(len(names)))]]
        picked.append(pool[int(rng.integers(len(pool)))])
    return picked


def _done(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def _publish(source: Path, dest: Path) -> None:
    """Copy ``source`` to ``dest``, replacing an existing ``dest`` only once the copy is complete."""
    tmp, old = dest.with_name(f".tmp-{dest.name}"), dest.with_name(f".old-{dest.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    if dest.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dest, old)
    os.replace(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)


def stage_generator(out: Path, recipe: ShapesRecipe, log: Callable[[str], None]) -> dict[str, Any]:
    from img_guidance.recipes.train_shapes_generator import train_generator

    return train_generator(
        out / "generator",
        seed=recipe.seed,
        steps_base=recipe.generator_steps_base,
        steps_encoder=recipe.generator_steps_encoder,
        steps_adapter=recipe.generator_steps_adapter,
        batch_size=recipe.generator_batch,
        method=recipe.generator_method,
        log=log,
    )


def choose_ip_scale(
    out: str | os.PathLike,
    scales: tuple[float, ...],
    *,
    seed: int = 0,
    scenes: int | None = None,
    batch_size: int = 64,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Choose the IP scale of IMG's re-generation on the validation split, with the models of the
    train-all folder ``out``: for each of ``scales``, IMG (1 round, 3 passes) on every validation
    scene (seed i for scene i, from the same initial images), judged; the scale at which IMG gets the
    most images fully right wins (ties: the smaller scale). Also recorded, not used for the choice:
    the base model, and at each scale re-generation from the tokens of a correct render in another
    layout (:func:`~img_guidance.recipes.train_shapes_generator.oracle_render`) and of the initial image's
    nearest correct render (:func:`~img_guidance.shapes.correct.nearest_correct_render`). Writes
    ``out/generator/ip_scale.json`` (the choice and every accuracy) atomically; returns its content."""
    import torch

    from img_guidance.aligner import load_aligner
    from img_guidance.backends.shapes import ShapesBackend
    from img_guidance.guidance import load_guidance
    from img_guidance.pipeline import IMGPipeline
    from img_guidance.recipes.train_shapes_generator import oracle_render
    from img_guidance.shapes.correct import nearest_correct_render
    from img_guidance.shapes.grammar import describe
    from img_guidance.shapes.judge import judge_many
    from img_guidance.shapes.models import IP_SCALE_FILE
    from img_guidance.shapes.splits import split_scenes

    if not scales or min(scales) <= 0:
        raise ValueError(f"ip_scales must be one or more scales > 0, got {list(scales)}")
    out = Path(out)
    folder = out / "generator"
    (folder / IP_SCALE_FILE).unlink(missing_ok=True)  # the backend must not read a stale choice
    backend = ShapesBackend.from_pretrained(folder)
    pipe = IMGPipeline(
        backend=backend, guidance=load_guidance(out / "detector"), aligner=load_aligner(out / "aligner")
    )
    chosen = split_scenes(seed)["validation"][:scenes]
    prompts, seeds = [describe(s) for s in chosen], list(range(len(chosen)))
    oracle = backend.encode_image([oracle_render(s, k) for s, k in zip(chosen, seeds, strict=True)])

    def batched(make) -> list:
        images = []
        for i in range(0, len(chosen), batch_size):
            with torch.no_grad():
                images += make(slice(i, i + batch_size))
        return images

    initial = batched(lambda part: backend.generate(prompts[part], seeds[part]))
    nearest = backend.encode_image(
        [nearest_correct_render(im, s) for im, s in zip(initial, chosen, strict=True)]
    )
    rows: dict[str, dict[str, Any]] = {}

    def record(name: str, scale: float, images: list) -> None:
        report = judge_many(images, chosen)
        rows[name] = {
            "ip_scale": scale,
            "accuracy": report.overall.accuracy,
            "category_mean": report.category_mean,
            "per_category": {c: s.accuracy for c, s in report.per_category.items()},
        }
        log(f"ip_scale: {name}: {report.overall.accuracy:.3f} of {len(chosen)} validation images right")

    record("base", 0.0, initial)
    for scale in scales:
        img = batched(
            lambda part, scale=scale: (
                pipe(prompts[part], seeds[part], ip_scale=scale, initial_images=initial[part]).calibrated
            )
        )
        record(f"IMG, IP {scale:g}", scale, img)
        oracle_images = batched(
            lambda part, scale=scale: backend.generate(
                prompts[part], seeds[part], image_tokens=oracle[part], ip_scale=scale
            )
        )
        record(f"oracle tokens, IP {scale:g}", scale, oracle_images)
        nearest_images = batched(
            lambda part, scale=scale: backend.generate(
                prompts[part], seeds[part], image_tokens=nearest[part], ip_scale=scale
            )
        )
        record(f"nearest-correct-render tokens, IP {scale:g}", scale, nearest_images)
    best = max(scales, key=lambda s: (rows[f"IMG, IP {s:g}"]["accuracy"], -s))
    result = {"ip_scale": best, "chosen_by": "IMG (1 round)", "split": "validation", "scenes": len(chosen)}
    result["rows"] = rows
    write_json_atomic(folder / IP_SCALE_FILE, result)
    log(f"ip_scale: chose {best:g} on validation")
    return result


def stage_ip_scale(out: Path, recipe: ShapesRecipe, log: Callable[[str], None]) -> dict[str, Any]:
    return choose_ip_scale(
        out, tuple(recipe.ip_scales), seed=recipe.seed, scenes=recipe.ip_scale_scenes, log=log
    )


def stage_detector(out: Path, recipe: ShapesRecipe, log: Callable[[str], None]) -> dict[str, Any]:
    from img_guidance.guidance import DETECTOR_INFO
    from img_guidance.recipes.finetune_detector import FinetuneConfig, finetune
    from img_guidance.shapes.data import make_triplets, write_triplets
    from img_guidance.shapes.detector import make_detector_base

    base = out / "detector_base"
    if not _done(base):
        make_detector_base(
            base, hidden_size=recipe.detector_hidden, layers=recipe.detector_layers, seed=recipe.seed
        )
    data = out / "data" / "triplets.parquet"
    rows = make_triplets(training_scenes(recipe.seed), count=recipe.triplets, seed=recipe.seed)
    write_triplets(data, rows)
    log(f"wrote {len(rows)} triplets to {data}")
    run = out / "detector_run"
    shutil.rmtree(run, ignore_errors=True)
    cfg = FinetuneConfig(
        model=str(base),
        data=str(data),
        output_dir=str(run),
        prompt_format="llava_v0",
        question_seed=recipe.seed,
        val_rows=recipe.detector_val_rows,
        method="full",
        freeze_vision=False,  # the world's vision tower starts random: it has to learn to see
        freeze_norms=recipe.detector_freeze_norms,
        batch_size=recipe.detector_batch,
        max_steps=recipe.detector_steps,
        lr=recipe.detector_lr,
        warmup_ratio=0.05,
        lr_scheduler="cosine",
        seed=recipe.seed,
        checkpoint_every=recipe.detector_steps,
        keep_checkpoints=1,
        log_every=max(1, recipe.detector_steps // 10),
        eval_max_new_tokens=16,
        eval_examples=8,
        report_to=["tensorboard"],
    )
    summary = finetune(cfg)
    final = Path(summary["final_dir"])
    info = json.loads((final / DETECTOR_INFO).read_text())
    write_json_atomic(final / DETECTOR_INFO, _relative(info, out))  # no path of this machine
    _publish(final, out / "detector")
    evaluation = summary["evaluations"][-1] if summary["evaluations"] else {}
    return {
        "steps": summary["step"],
        "held_out": {k: v for k, v in evaluation.items() if k.startswith("val/") or k == "samples"},
        "examples": evaluation.get("examples", []),
    }


def stage_pairs(out: Path, recipe: ShapesRecipe, log: Callable[[str], None]) -> dict[str, Any]:
    from img_guidance.backends.shapes import ShapesBackend
    from img_guidance.shapes.data import make_correction_pairs, make_pairs, write_pairs

    backend = ShapesBackend.from_pretrained(out / "generator")
    scenes = balanced_scenes(training_scenes(recipe.seed), recipe.pair_prompts, recipe.seed)
    # scene i's seeds are base + n * i + k (k < n): no two scenes, nor two recipe seeds, share one
    n = recipe.pair_generations
    base = PAIR_SEED_OFFSET + recipe.seed * n * recipe.pair_prompts
    options = {
        "generations": n,
        "seeds": lambda i: range(base + n * i, base + n * (i + 1)),
        "progress": lambda done, total: log(f"pairs: {done}/{total} prompts generated and judged"),
    }
    generate = lambda prompts, seeds: backend.generate(prompts, seeds)  # noqa: E731
    if recipe.pair_method == "correction":
        rows, counts = make_correction_pairs(
            generate, scenes, seed=recipe.seed, redraw_right=recipe.pair_redraw_right, **options
        )
        empty = f"every one of the {counts.images} images was judged right: no correction to learn from"
    else:
        rows, counts = make_pairs(generate, scenes, **options)
        empty = (
            f"the judge scored all {n} images of every one of the {counts.prompts} prompts alike: no "
            "preference pair to train on (is the generator trained?)"
        )
    if not rows:
        raise RuntimeError(empty)
    added, rendered = render_pairs(recipe, log)
    write_pairs(out / "data" / "pairs.parquet", rows + added)
    return {**asdict(counts), **({"rendered": asdict(rendered)} if added else {})}


def render_pairs(recipe: ShapesRecipe, log: Callable[[str], None]) -> tuple[list[dict[str, Any]], Any]:
    """The recipe's ``pair_renders`` rows from renders of training prompts
    (:func:`~img_guidance.shapes.data.make_render_pairs`), ranking ids after the generated rows'."""
    from img_guidance.shapes.data import make_render_pairs

    if recipe.pair_renders:
        log(f"pairs: {recipe.pair_renders} rows from renders")
    return make_render_pairs(
        training_scenes(recipe.seed),
        count=recipe.pair_renders,
        seed=recipe.seed,
        first_id=recipe.pair_prompts,
        workers=os.cpu_count() or 1,
    )


def stage_features(out: Path, recipe: ShapesRecipe, log: Callable[[str], None]) -> dict[str, Any]:
    from img_guidance.backends.shapes import ShapesBackend
    from img_guidance.features.extract import extract_features

    shutil.rmtree(out / "features", ignore_errors=True)
    guidance = set_detector_guidance(out / "detector", recipe, log)
    manifest = extract_features(
        out / "data" / "pairs.parquet",
        out / "features",
        image_encoder=ShapesBackend.from_pretrained(out / "generator"),
        guidance=guidance,
        seed=recipe.seed,
        batch_size=64,
        dtype="float16",
        progress=False,
    )
    return {
        "samples": manifest.get("samples"),
        "dims": manifest.get("dims"),
        "guidance_layer": recipe.detector_guidance_layer,
        "guidance_standardized": recipe.detector_guidance_standardize,
    }


def set_detector_guidance(detector: Path, recipe: ShapesRecipe, log: Callable[[str], None]):
    """Record in the detector folder how its guidance is read (every loader reads it there): the
    hidden layer and, with ``detector_guidance_standardize``, per-dimension statistics measured on
    :data:`STANDARDIZE_RENDERS` renders of training prompts. Returns the detector, loaded so."""
    import random

    from img_guidance.guidance import DETECTOR_INFO, load_guidance
    from img_guidance.guidance.questions import choose_question, fill
    from img_guidance.guidance.standardize import STATS_FILE, fit_standardization, save_standardization
    from img_guidance.shapes.grammar import describe
    from img_guidance.shapes.render import render

    record = detector / DETECTOR_INFO
    info = json.loads(record.read_text())
    info["hidden_layer"] = recipe.detector_guidance_layer
    info.pop("standardize", None)
    write_json_atomic(record, info)
    (detector / STATS_FILE).unlink(missing_ok=True)
    guidance = load_guidance(detector)
    if not recipe.detector_guidance_standardize:
        return guidance
    rng = random.Random(recipe.seed)
    scenes = training_scenes(recipe.seed)
    picked = [rng.choice(scenes) for _ in range(STANDARDIZE_RENDERS)]
    first = STANDARDIZE_SEED_OFFSET + recipe.seed * STANDARDIZE_RENDERS
    images = [render(scene, seed=first + i) for i, scene in enumerate(picked)]
    questions = [fill(choose_question(first + i), describe(scene)) for i, scene in enumerate(picked)]
    stats = fit_standardization(guidance, images, questions)
    save_standardization(stats, detector / STATS_FILE)
    write_json_atomic(record, {**info, "standardize": STATS_FILE})
    guidance.standardize = stats
    log(
        f"features: the detector's guidance standardized (std of its {stats['std'].numel()} dimensions "
        f"{stats['std'].min():.3g} to {stats['std'].max():.3g}, on {len(images)} training renders)"
    )
    return guidance


def stage_aligner(out: Path, recipe: ShapesRecipe, log: Callable[[str], None]) -> dict[str, Any]:
    summary = train_aligner_on(
        out / "features",
        out / "aligner_run",
        recipe,
        lam=recipe.aligner_lam,
        terms=list(recipe.aligner_terms),
    )
    _publish(Path(summary["final_dir"]), out / "aligner")
    return {"steps": summary["step"], "validation": summary["validations"][-1:]}


def train_aligner_on(
    cache: Path,
    run: Path,
    recipe: ShapesRecipe,
    *,
    lam: float,
    terms: list[str],
    seed: int | None = None,
    k: int | None = None,
) -> dict[str, Any]:
    """The aligner recipe on a ShapesWorld feature cache with the recipe's settings (the benchmark's
    ablations change ``lam``, ``terms`` and ``k``: the reference is replaced after k consecutive wins;
    ``k`` past the run's steps keeps it for the whole run)."""
    from img_guidance.recipes.train_aligner import TrainConfig, train

    shutil.rmtree(run, ignore_errors=True)
    cfg = TrainConfig(
        output_dir=str(run),
        cache_dir=str(cache),
        val_fraction=0.05,
        num_workers=0,
        depth=recipe.aligner_depth,
        heads=recipe.aligner_heads,
        head_dim=recipe.aligner_head_dim,
        ff_mult=2,
        lam=lam,
        k=recipe.aligner_k if k is None else k,
        terms=terms,
        max_steps=recipe.aligner_steps,
        batch_size=recipe.aligner_batch,
        lr=recipe.aligner_lr,
        seed=recipe.seed if seed is None else seed,
        checkpoint_every=recipe.aligner_steps,
        keep_checkpoints=1,
        log_every=max(1, recipe.aligner_steps // 10),
        validate_every=max(1, recipe.aligner_steps // 3),
        report_to=["tensorboard"],
    )
    return train(cfg)


# The recipe settings each stage reads itself (names or prefixes; a setting is the stage's whose
# matching entry is the longest: detector_guidance_layer is the features stage's, not the detector's),
# and the stages whose outputs it reads: a stage's settings (stage_settings) are its own and every
# upstream stage's, so a changed setting reruns the stage that reads it and every stage after it that
# depends on it, and nothing else.
STAGE_OWN_SETTINGS = {
    "generator": ("seed", "generator_"),
    "detector": ("seed", "triplets", "detector_"),
    "pairs": ("seed", "pair_"),
    "features": ("seed", "detector_guidance_layer", "detector_guidance_standardize"),
    "aligner": ("seed", "aligner_"),
    "ip_scale": ("seed", "ip_scale"),
}
STAGE_INPUTS = {
    "generator": (),
    "detector": (),
    "pairs": ("generator",),
    "features": ("generator", "detector", "pairs"),
    "aligner": ("features",),
    "ip_scale": ("generator", "detector", "aligner"),
}

# Folders a stage keeps when it finds them, removed when a reused run's stage has to run again: the
# generator's trainer refuses a full folder, the detector's untrained base is made once, and
# benchmarks/shapes_eval.py trains its ablation aligners (on the pairs, features and detectors the
# aligner's settings reach) once into OUT/ablations.
STAGE_REBUILT = {"generator": ("generator",), "detector": ("detector_base",), "aligner": ("ablations",)}


def stage_settings(name: str, settings: dict[str, Any]) -> dict[str, Any]:
    """The recipe settings (a JSON dict of :class:`ShapesRecipe`) that stage ``name``'s output
    depends on: its own and, through the stages it reads, every upstream stage's."""
    stages, pending = set(), [name]
    while pending:
        stage = pending.pop()
        if stage not in stages:
            stages.add(stage)
            pending += STAGE_INPUTS[stage]
    return {key: value for key, value in settings.items() if setting_owners(key) & stages}


def setting_owners(key: str) -> set[str]:
    """The stages that read recipe setting ``key`` themselves: those whose longest entry in
    :data:`STAGE_OWN_SETTINGS` matching it is the longest of all (``seed``: every stage)."""
    longest = {
        stage: max((len(entry) for entry in entries if key.startswith(entry)), default=0)
        for stage, entries in STAGE_OWN_SETTINGS.items()
    }
    best = max(longest.values())
    return {stage for stage, length in longest.items() if length == best > 0}


STAGE_FUNCTIONS = {
    "generator": stage_generator,
    "ip_scale": stage_ip_scale,
    "detector": stage_detector,
    "pairs": stage_pairs,
    "features": stage_features,
    "aligner": stage_aligner,
}


def train_all(
    out: str | os.PathLike,
    *,
    recipe: ShapesRecipe | None = None,
    log: Callable[[str], None] = print,
    reuse: bool = False,
) -> dict[str, Any]:
    """Run every stage not yet finished in ``out``; returns (and writes to ``out/train_all.json``)
    each stage's seconds and results.

    A folder holding a run with other settings is refused, unless ``reuse``: then the stages whose
    settings (:func:`stage_settings`) are unchanged are kept, with the seconds they took when they
    ran, and the others run again."""
    import torch

    recipe = recipe or ShapesRecipe()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report_path = out / "train_all.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    settings = json.loads(json.dumps(asdict(recipe)))
    before = recorded_settings(report.get("recipe", settings))
    if before != settings:
        changed = sorted(key for key in settings if before.get(key) != settings[key])
        if not reuse:
            raise ValueError(
                f"{out} holds a run with other settings ({', '.join(changed)}; {report_path}): give a "
                "new folder, or reuse it (--reuse) to keep the stages those settings do not reach"
            )
        for name in STAGES:
            if name in report.get("stages", {}):
                old, new = stage_settings(name, before), stage_settings(name, settings)
                if old != new:
                    log(f"[{name}] other settings ({', '.join(k for k in new if old.get(k) != new[k])})")
                    del report["stages"][name]
                    for folder in STAGE_REBUILT.get(name, ()):
                        shutil.rmtree(out / folder, ignore_errors=True)
    report["recipe"] = settings
    report.setdefault("stages", {})
    report["threads"] = torch.get_num_threads()
    for name in STAGES:
        if name in report["stages"]:
            log(f"[{name}] done before ({report['stages'][name]['seconds']:.0f} s), skipped")
            continue
        log(f"[{name}] ...")
        start = time.perf_counter()
        result = STAGE_FUNCTIONS[name](out, recipe, log)
        seconds = time.perf_counter() - start
        result = _relative(json.loads(json.dumps(result, default=str)), out)
        report["stages"][name] = {"seconds": seconds, "result": result}
        report["stages"] = {stage: report["stages"][stage] for stage in STAGES if stage in report["stages"]}
        report["total_seconds"] = sum(s["seconds"] for s in report["stages"].values())
        write_json_atomic(report_path, report)
        log(f"[{name}] done in {seconds:.0f} s")
    return report


# Settings added to the recipe after runs were recorded, at the value that is what the code did
# before the setting existed (no rows from renders, guidance from the last layer, not standardized,
# the detector's norms trained), whatever their default is now.
SETTINGS_BEFORE_THEY_EXISTED = {
    "pair_renders": 0,
    "detector_guidance_layer": -1,
    "detector_guidance_standardize": False,
    "detector_freeze_norms": False,
}


def recorded_settings(recipe: dict[str, Any]) -> dict[str, Any]:
    """A report's recipe with the settings added since it was written at the value they stand for
    in it (:data:`SETTINGS_BEFORE_THEY_EXISTED`): a run recorded without ``pair_renders`` made no
    rows from renders."""
    return {**{k: v for k, v in SETTINGS_BEFORE_THEY_EXISTED.items() if k not in recipe}, **recipe}


def _relative(value: Any, out: Path) -> Any:
    """``value`` (JSON data) with every path inside ``out`` written relative to it: the report, which
    ships with the models, holds no path of the machine that trained them."""
    if isinstance(value, dict):
        return {k: _relative(v, out) for k, v in value.items()}
    if isinstance(value, list):
        return [_relative(v, out) for v in value]
    if isinstance(value, str):
        for root in {str(out), str(out.resolve())}:
            if value == root or value.startswith(root + os.sep):
                return os.path.relpath(value, root)
    return value


def install(out: str | os.PathLike, dest: str | os.PathLike = WEIGHTS) -> Path:
    """Copy the generator, detector and aligner of a finished ``train_all`` folder into ``dest``
    (default: the package's weights, which the demo and presets load), with the run's report; paths
    inside ``out`` in the report and the detector's record are written relative to it."""
    from img_guidance.guidance import DETECTOR_INFO

    out, dest = Path(out), Path(dest)
    missing = [name for name in MODELS if not _done(out / name)]
    report = json.loads((out / "train_all.json").read_text()) if (out / "train_all.json").is_file() else {}
    missing += [name for name in STAGES if name not in report.get("stages", {}) and name not in missing]
    if missing:
        raise FileNotFoundError(f"{out} has no finished {', '.join(missing)}: run train-all first")
    dest.mkdir(parents=True, exist_ok=True)
    for name in MODELS:
        _publish(out / name, dest / name)
    info = dest / "detector" / DETECTOR_INFO  # written with this machine's paths before 2026-12-06
    if info.is_file():
        write_json_atomic(info, _relative(json.loads(info.read_text()), out))
    write_json_atomic(dest / "train_all.json", _relative(report, out))
    return dest
