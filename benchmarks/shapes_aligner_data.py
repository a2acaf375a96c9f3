"""What limits ShapesWorld's aligner: its data, its guidance or its training seed? Two measurements
on a finished ``shapes train-all`` folder, neither touching the test split.

    python -m benchmarks.shapes_aligner_data probe --run runs/shapes7
    python -m benchmarks.shapes_aligner_data variant --run runs/shapes7 --out runs/flip --variant flip

``probe`` (a few minutes): aligners trained by plain L_base (MSE to the preferred tokens; AdamW, lr
1e-3, batch 32, 3,000 steps) on the run's feature cache, scored on 800 held-out pairs of it (a fixed
seeded split) by the mean squared distance of their output to the preferred tokens, against the
inputs' distance. Rows: a quarter, a half and all of the remaining training pairs, each with the
detector's guidance and with the prompt's words given exactly (one-hot word and position, no image:
an oracle prompt encoding); a deeper aligner (depth 4, 8 heads) on all pairs; and the preferred
tokens themselves as guidance (can the architecture copy?).

``variant`` (about 6 minutes): the run's last stages again in ``--out`` (the generator and detector
copied) with one change, then IMG on the validation split at IP 0.5 and 1.0
(``recipes.train_shapes.choose_ip_scale``):

- ``seed``: the same pairs; the features' question draw and the aligner with ``--seed``;
- ``flip``: every pair also mirrored left to right, "left of" and "right of" swapped in its prompt,
  where the mirrored prompt is a training scene (the world is symmetric under that flip);
- ``reprompt``: every generated image also paired with ``--reprompts`` near misses of its prompt
  (``shapes.grammar.near_misses``) that are training scenes, against the render of its nearest
  correct scene for that prompt (``shapes.correct.corrected_layout``), as the pairs stage does.
- ``renders``: the recipe's ``pair_renders`` rows made from renders
  (``shapes.data.make_render_pairs``) added to the run's pairs (a run whose pairs already hold
  such rows is refused: they would be repeated).

``--set KEY=VALUE`` (repeatable) changes a recipe setting of the variant's stages, for example
``--set pair_renders=60000 --set aligner_steps=12000 --set aligner_batch=64``.

Prints one JSON line per row.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from img_guidance.aligner import ImplicitAligner
from img_guidance.features.cache import FeatureCache, collate_features
from img_guidance.recipes.train_shapes import ShapesRecipe

HELD_OUT = 800
STEPS = 3000


def _load(run: Path) -> dict[str, torch.Tensor]:
    import pyarrow.parquet as pq

    cache = FeatureCache(run / "features")
    batch = collate_features([cache[i] for i in range(len(cache))])
    captions = pq.read_table(run / "data" / "pairs.parquet", columns=["caption"]).column("caption")
    captions = [captions[int(i)].as_py().split() for i in batch["index"]]
    vocab = sorted({w for c in captions for w in c})
    length = max(len(c) for c in captions)
    words = torch.zeros(len(captions), length, len(vocab) + length)
    for k, caption in enumerate(captions):
        for j, word in enumerate(caption):
            words[k, j, vocab.index(word)] = 1
            words[k, j, len(vocab) + j] = 1
    batch["words"], batch["words_mask"] = words, words.sum(-1) > 0
    return batch


def _probe_row(
    data: dict,
    train: torch.Tensor,
    held: torch.Tensor,
    *,
    guidance: str,
    depth: int = 2,
    heads: int = 4,
    steps: int = 3000,
    seed: int = 0,
) -> dict:
    torch.manual_seed(seed)
    if guidance == "detector":
        g, mask = data["guidance"], data["guidance_mask"]
    elif guidance == "words":
        g, mask = data["words"], data["words_mask"]
    else:  # the preferred tokens themselves
        g, mask = data["tokens_w"], None
    tl, tw = data["tokens_l"], data["tokens_w"]
    model = ImplicitAligner(
        guidance_dim=g.shape[-1], image_dim=tl.shape[-1], depth=depth, heads=heads, head_dim=16, ff_mult=4
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    generator = torch.Generator().manual_seed(seed)

    def run(idx: torch.Tensor) -> torch.Tensor:
        return model(g[idx], tl[idx], None if mask is None else mask[idx])

    for _ in range(steps):
        idx = train[torch.randint(len(train), (32,), generator=generator)]
        loss = F.mse_loss(run(idx), tw[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def distance(idx: torch.Tensor) -> float:
        with torch.no_grad():
            return float(((run(idx) - tw[idx]) ** 2).mean())

    return {
        "guidance": guidance,
        "depth": depth,
        "heads": heads,
        "training_pairs": len(train),
        "train_distance": distance(train[: len(held)]),
        "held_out_distance": distance(held),
        "held_out_input_distance": float(((tl[held] - tw[held]) ** 2).mean()),
    }


def probe(run: Path, *, steps: int = STEPS, held_out: int = HELD_OUT) -> list[dict]:
    data = _load(run)
    order = torch.randperm(len(data["tokens_l"]), generator=torch.Generator().manual_seed(0))
    held, rest = order[:held_out], order[held_out:]
    if len(rest) < 4:
        raise ValueError(f"{run / 'features'} has {len(order)} pairs: too few to hold out {held_out}")
    rows = [(g, fraction, {}) for g in ("detector", "words") for fraction in (0.25, 0.5, 1.0)]
    rows += [("detector", 1.0, {"depth": 4, "heads": 8}), ("preferred tokens", 1.0, {})]
    results = []
    for guidance, fraction, options in rows:
        start = time.perf_counter()
        train = rest[: max(1, int(len(rest) * fraction))]
        row = _probe_row(data, train, held, guidance=guidance, steps=steps, **options)
        row["seconds"] = round(time.perf_counter() - start, 1)
        print(json.dumps(row), flush=True)
        results.append(row)
    return results


def _variant_pairs(run: Path, out: Path, variant: str, reprompts: int, split_seed: int, recipe) -> dict:
    import pyarrow.parquet as pq
    from PIL import Image

    from img_guidance.recipes.train_shapes import render_pairs, training_scenes
    from img_guidance.shapes.correct import corrected_layout
    from img_guidance.shapes.data import pair_row, png_bytes, write_pairs
    from img_guidance.shapes.grammar import describe, near_misses, parse
    from img_guidance.shapes.judge import judge
    from img_guidance.shapes.render import draw

    train = {describe(s) for s in training_scenes(split_seed)}
    rows = pq.read_table(run / "data" / "pairs.parquet").to_pylist()
    added: list[dict] = []
    rng = np.random.default_rng(123)

    def flip(data: bytes) -> bytes:
        return png_bytes(
            Image.open(io.BytesIO(data)).convert("RGB").transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        )

    for row in rows:
        spec = parse(row["caption"])
        if variant == "flip":
            swap = {"left of": "right of", "right of": "left of"}
            mirrored = describe(replace(spec, relation=swap.get(spec.relation, spec.relation)))
            if mirrored in train:
                labels = (row["label_0"], row["label_1"])
                added.append(
                    pair_row(mirrored, flip(row["jpg_0"]), flip(row["jpg_1"]), labels, row["ranking_id"])
                )
        elif variant == "reprompt":
            generated = row["jpg_0"] if row["label_0"] == 0.0 else row["jpg_1"]
            image = Image.open(io.BytesIO(generated)).convert("RGB")
            near = [s for s in near_misses(spec) if describe(s) in train]
            for j in rng.permutation(len(near))[:reprompts]:
                verdict = judge(image, near[j])
                fix = corrected_layout(
                    verdict.objects if verdict.readable else None, near[j], size=image.width
                )
                fixed = png_bytes(draw(fix.objects, size=image.width))
                first = rng.random() < 0.5
                pair = (fixed, generated) if first else (generated, fixed)
                added.append(
                    pair_row(describe(near[j]), *pair, (1.0, 0.0) if first else (0.0, 1.0), row["ranking_id"])
                )
    if variant == "renders":
        added, _ = render_pairs(recipe, print)
    write_pairs(out / "data" / "pairs.parquet", rows + added)
    return {"pairs": len(rows), "added": len(added)}


def _recorded_renders(run: Path) -> int | None:
    """The rows from renders a finished run's pairs hold (its recorded ``pair_renders``), or None
    where ``run`` has no report."""
    from img_guidance.recipes.train_shapes import recorded_settings

    report = run / "train_all.json"
    if not report.is_file():
        return None
    return int(recorded_settings(json.loads(report.read_text())["recipe"]).get("pair_renders", 0))


def variant(
    run: Path, out: Path, name: str, seed: int, reprompts: int, overrides: dict | None = None
) -> dict:
    from img_guidance.recipes.train_shapes import (
        ShapesRecipe,
        choose_ip_scale,
        recorded_settings,
        stage_aligner,
        stage_features,
    )

    settings = recorded_settings(json.loads((run / "train_all.json").read_text())["recipe"])
    split_seed = settings["seed"]  # the run's split: its validation scenes stay unseen
    settings = {k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()}
    recipe = ShapesRecipe(**{**settings, "seed": seed, **(overrides or {})})
    out.mkdir(parents=True, exist_ok=True)
    for folder in ("generator", "detector"):
        if not (out / folder).exists():
            shutil.copytree(run / folder, out / folder)
    start = time.perf_counter()
    counts = _variant_pairs(run, out, name, reprompts, split_seed, recipe)
    stage_features(out, recipe, print)
    stage_aligner(out, recipe, print)
    result = choose_ip_scale(out, (0.5, 1.0), seed=split_seed, scenes=recipe.ip_scale_scenes, log=print)
    rows = {k: round(v["accuracy"], 3) for k, v in result["rows"].items() if k.startswith(("IMG", "base"))}
    line = {"variant": name, "seed": seed, **counts, "validation": rows}
    line["seconds"] = round(time.perf_counter() - start)
    print(json.dumps(line), flush=True)
    return line


def main(argv: list[str] | None = None) -> list[dict] | dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["probe", "variant"])
    parser.add_argument("--run", type=Path, required=True, help="a finished `shapes train-all` folder")
    parser.add_argument("--out", type=Path, help="variant: a new folder for its stages")
    parser.add_argument("--variant", choices=["seed", "flip", "reprompt", "renders"], default="seed")
    parser.add_argument("--seed", type=int, default=0, help="variant: the recipe seed of its stages")
    parser.add_argument("--reprompts", type=int, default=4)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="variant: a recipe setting of its stages (repeatable), e.g. pair_renders=60000",
    )
    parser.add_argument("--steps", type=int, default=STEPS, help="probe: training steps per aligner")
    parser.add_argument("--held-out", type=int, default=HELD_OUT, help="probe: held-out pairs")
    args = parser.parse_args(argv)
    if args.what == "probe":
        return probe(args.run, steps=args.steps, held_out=args.held_out)
    if args.out is None:
        parser.error("variant needs --out")
    if args.out.exists() and any(args.out.iterdir()):
        parser.error(f"--out {args.out} is not empty: give a new folder")
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in ShapesRecipe.__dataclass_fields__ or not value:
            parser.error(f"--set {item}: give KEY=VALUE with a ShapesRecipe setting as KEY")
        kind = type(getattr(ShapesRecipe(), key))
        if kind not in (bool, int, float, str):
            parser.error(f"--set {item}: {key} is not a single value; only scalar settings can be set")
        try:
            overrides[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
        except ValueError:
            parser.error(f"--set {item}: {key} takes a {kind.__name__}, got {value!r}")
    if args.variant == "renders":
        if overrides.get("pair_renders", 0) < 1:
            parser.error("--variant renders adds the recipe's pair_renders rows: give --set pair_renders=N")
        held = _recorded_renders(args.run)
        if held is None:
            parser.error(f"--run {args.run} has no train_all.json: give a finished `shapes train-all` folder")
        if held:
            parser.error(
                f"--variant renders: the pairs of {args.run} already hold {held} rows from renders "
                "(its recipe's pair_renders); adding them again would repeat them: give a run made "
                "with pair_renders=0"
            )
    return variant(args.run, args.out, args.variant, args.seed, args.reprompts, overrides)


if __name__ == "__main__":
    from img_guidance.allocator import keep_freed_memory

    keep_freed_memory()  # torch's freed CPU blocks stay in the process (img_guidance.allocator)
    main()
