"""Does IMG improve alignment? ShapesWorld's judge on a fixed held-out prompt set, for the base model,
IMG, and the paper's baselines and ablations at equal settings.

    python -m benchmarks.shapes_eval --run runs/shapes            # a finished `shapes train-all` folder
    python -m benchmarks.shapes_eval --run runs/shapes --split validation   # for choosing settings

The prompt set is the TEST split of ``split_scenes`` (scenes never used to train any model; its
two-object scenes include colour-shape combinations the generator never saw together), up to
``--per-category`` scenes per category (default: all 211), each with ``--seeds`` seeds (default 3).
Hyper-parameters are chosen on the validation split (``--split validation``), never on this one.

Systems (every one starts from the same initial images where it re-generates):

- base: the generator alone;
- IMG (1 round, 3 passes) and IMG (2 rounds): the shipped detector + aligner;
- another seed: re-generation with a different seed, the same compute without guidance;
- unaligned tokens ("no guidance"): re-generation from the initial image's own IP tokens (0 passes);
- correct-render tokens (oracle): re-generation from the IP tokens of a correct render of the prompt
  in a fresh layout, which no aligner has at test time: what steering through the adapter can give;
- nearest-correct-render tokens (oracle): re-generation from the IP tokens of the render of the
  initial image with exactly its mistakes fixed (``shapes.correct.nearest_correct_render``): what an
  aligner that had learnt its training pairs' corrections perfectly would produce;
- text-embedding guidance: an aligner trained (same recipe, same pairs) on the generator's text
  embedding of the prompt instead of the detector's hidden states;
- untrained detector: an aligner trained on the hidden states of the detector before finetuning;
- L_base only / + DPO / + DPO + SPIN (the shipped recipe), and lambda 0.5 and 2 (lambda 0 is L_base
  only, lambda 1 the shipped aligner);
- the reference never replaced (k past the run's steps; the shipped recipe replaces it after 10
  consecutive wins); IMG with 1 pass instead of 3; IMG at IP scales 0.2, 0.5, 1.0 and 1.5 (less the
  run's own, chosen on validation by ``train-all``).
- with ``--aligner-seeds 1,2,3`` (with or without the ablations): "aligner seed N", the shipped
  recipe's aligner trained with seed N instead of the run's on the same feature cache, guided by the
  same detector: how much of IMG's result is the draw of the aligner's seed.

Every system is also compared with IMG (1 round) on the same images: the accuracy difference with a
95% cluster-bootstrap interval (a scene's seeds resampled together) and McNemar's exact test
(``eval.stats.compare_paired``). ``--chart PATH`` draws the per-category accuracy of base, IMG,
another seed and the oracle with their intervals.

Ablation aligners are trained on first use into ``RUN/ablations/NAME`` with the shipped aligner's
recipe (its feature caches into ``RUN/ablations/features_*``); the closing line (and ``--json``'s
``seconds``) says how much of the time that took. Output: a markdown table of accuracy per category
with 95% Wilson intervals, each system's win/tie/loss against the base per (prompt, seed), the
failure kinds of base's and IMG's images per category (``shapes.judge.failure_kinds``),
and ``--json`` with everything.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import time
from pathlib import Path

OTHER_SEED_OFFSET = 500_000
IP_SCALES = (0.2, 0.5, 1.0, 1.5)  # the IMG-at-IP-scale ablations: these, less the run's own scale


def prompt_set(split: str, per_category: int | None, seed: int) -> list:
    """Up to ``per_category`` scenes of each category of ``split`` (None: all), a seeded choice."""
    import numpy as np

    from img_guidance.shapes.grammar import category
    from img_guidance.shapes.splits import split_scenes

    scenes = split_scenes(seed)[split]
    rng = np.random.default_rng([seed, 0xE7A1])
    chosen = []
    pools: dict[str, list] = {}
    for scene in scenes:
        pools.setdefault(category(scene), []).append(scene)
    for name in sorted(pools):
        pool = pools[name]
        order = rng.permutation(len(pool))[:per_category]
        chosen += [pool[i] for i in sorted(order)]
    return chosen


NOVELTY = {
    "unseen": "unseen combination",
    "seen": "seen combination (two groups)",
    "one_group": "one group",
}


def novelty(spec, seed: int) -> str:
    """A scene's key in :data:`NOVELTY`: two groups holding a held-out kind (a combination no training
    scene holds), two groups otherwise, or one group."""
    from img_guidance.shapes.splits import unseen_combination

    if len(spec.objects) < 2:
        return "one_group"
    return "unseen" if unseen_combination(spec, seed) else "seen"


def novelty_markdown(verdicts: dict[str, list], seed: int, results: dict[str, dict]) -> str:
    """Each system's accuracy on scenes with an unseen combination, on the other two-group scenes and
    on one-group scenes, with 95% Wilson intervals; also stored in ``results[name]["by_novelty"]``."""
    from img_guidance.shapes.judge import wilson_interval
    from img_guidance.shapes.splits import held_out_kinds

    kinds = ", ".join(f"{c} {s}" for c, s in held_out_kinds(seed))
    keys = [novelty(v.spec, seed) for v in next(iter(verdicts.values()))]
    counts = {key: keys.count(key) for key in NOVELTY}
    lines = [
        f"### Combinations no training scene holds (two groups with a held-out kind: {kinds})",
        "",
        "| system | " + " | ".join(f"{label} (n = {counts[key]})" for key, label in NOVELTY.items()) + " |",
        "|---|" + "---|" * len(NOVELTY),
    ]
    for name, system in verdicts.items():
        cells, stored = [], {}
        for key in NOVELTY:
            n = counts[key]
            correct = sum(v.correct is True for v, k in zip(system, keys, strict=True) if k == key)
            low, high = wilson_interval(correct, n)
            cells.append(f"{correct / n:.3f} [{low:.2f}, {high:.2f}]" if n else "-")
            stored[key] = {"n": n, "correct": correct}
        results[name]["by_novelty"] = stored
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ablation_aligner(
    run: Path,
    name: str,
    *,
    guidance: str,
    lam: float,
    terms: list[str],
    log,
    k: int | None = None,
    seed: int | None = None,
) -> Path:
    """The aligner of one ablation, trained on first use with the shipped recipe's settings (``seed``:
    another training seed than the recipe's, for the same data)."""
    from img_guidance.recipes.train_shapes import ShapesRecipe, recorded_settings, train_aligner_on

    final = run / "ablations" / name / "final"
    if final.is_dir():
        return final
    settings = recorded_settings(json.loads((run / "train_all.json").read_text())["recipe"])
    recipe = ShapesRecipe(**{**settings, "aligner_terms": tuple(settings["aligner_terms"])})
    cache = run / "features" if guidance == "detector" else features_for(run, guidance, recipe, log)
    log(f"training the ablation aligner {name} ({guidance} guidance, lambda {lam}, terms {terms})")
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries the table only
        train_aligner_on(cache, run / "ablations" / name, recipe, lam=lam, terms=terms, k=k, seed=seed)
    return final


def guidance_model(run: Path, guidance: str):
    from img_guidance.guidance import load_guidance, read_detector_info
    from img_guidance.guidance.text import TextEmbeddingGuidance

    if guidance == "text":
        return TextEmbeddingGuidance.from_pretrained(run / "generator")
    if guidance == "untrained":  # read at the finetuned detector's layer
        info = read_detector_info(run / "detector") or {}
        return load_guidance(run / "detector_base", hidden_layer=info.get("hidden_layer", -1))
    return load_guidance(run / "detector")


def features_for(run: Path, guidance: str, recipe, log) -> Path:
    """The feature cache of the training pairs with another guidance model."""
    from img_guidance.backends.shapes import ShapesBackend
    from img_guidance.features.extract import extract_features
    from img_guidance.guidance.questions import QUESTIONS
    from img_guidance.guidance.text import PROMPT_ONLY

    out = run / "ablations" / f"features_{guidance}"
    if (out / "manifest.json").is_file():
        return out
    log(f"extracting features with {guidance} guidance into {out}")
    with contextlib.redirect_stdout(sys.stderr):
        extract_features(
            run / "data" / "pairs.parquet",
            out,
            image_encoder=ShapesBackend.from_pretrained(run / "generator"),
            guidance=guidance_model(run, guidance),
            questions=PROMPT_ONLY if guidance == "text" else QUESTIONS,
            seed=recipe.seed,
            batch_size=64,
            dtype="float16",
            progress=False,
        )
    return out


def seed_list(text: str) -> tuple[int, ...]:
    """``--aligner-seeds``: distinct seeds >= 0, comma-separated."""
    try:
        seeds = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"expected distinct seeds >= 0, got {text!r}")
    return seeds


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--run", type=Path, required=True, help="a finished `img-guidance shapes train-all` folder"
    )
    parser.add_argument("--split", choices=("test", "validation"), default="test")
    parser.add_argument(
        "--per-category", type=int, default=None, help="at most this many scenes per category (default: all)"
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument(
        "--ip-scale", type=float, help="IP scale of every re-generation (default: the backend's, 0.2)"
    )
    parser.add_argument(
        "--skip-ablations", action="store_true", help="base, IMG and the two re-generations only"
    )
    parser.add_argument(
        "--aligner-seeds",
        type=seed_list,
        default=(),
        help="comma-separated training seeds: a row for each, the recipe's aligner trained with that "
        "seed on the same features (how much IMG owes to the aligner's seed)",
    )
    parser.add_argument("--json", type=Path)
    parser.add_argument("--chart", type=Path, help="a PNG of per-category accuracy (needs matplotlib)")
    args = parser.parse_args(argv)

    import torch

    from img_guidance.aligner import load_aligner
    from img_guidance.backends.shapes import ShapesBackend
    from img_guidance.eval.shapes import report_dict
    from img_guidance.eval.stats import compare_paired
    from img_guidance.guidance.questions import QUESTIONS
    from img_guidance.guidance.text import PROMPT_ONLY
    from img_guidance.pipeline import IMGPipeline
    from img_guidance.recipes.train_shapes_generator import oracle_render
    from img_guidance.shapes.correct import nearest_correct_render
    from img_guidance.shapes.grammar import describe
    from img_guidance.shapes.judge import Report, failure_counts, failure_markdown, judge, win_tie_loss

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    start = time.perf_counter()
    run = args.run
    if not (run / "train_all.json").is_file():
        parser.error(f"--run {run}: no train_all.json there; give a finished `shapes train-all` folder")
    recipe = json.loads((run / "train_all.json").read_text())["recipe"]
    if recipe["seed"] in args.aligner_seeds:
        parser.error(f"--aligner-seeds {recipe['seed']}: that is the run's own seed (the IMG row)")
    scenes = prompt_set(args.split, args.per_category, recipe["seed"])
    prompts = [describe(s) for s in scenes for _ in range(args.seeds)]
    seeds = [k for _ in scenes for k in range(args.seeds)]
    specs = [s for s in scenes for _ in range(args.seeds)]
    log(f"{len(scenes)} {args.split} scenes x {args.seeds} seeds = {len(prompts)} images per system")
    backend = ShapesBackend.from_pretrained(run / "generator")
    if args.ip_scale is not None:
        backend.defaults = dataclasses.replace(backend.defaults, ip_scale=args.ip_scale)
    log(f"re-generation at IP scale {backend.defaults.ip_scale}")
    detector = guidance_model(run, "detector")

    def batched(fn, *lists):
        out = []
        for i in range(0, len(lists[0]), args.batch_size):
            out += fn(*(x[i : i + args.batch_size] for x in lists))
        return out

    systems: dict[str, list] = {}
    torch.manual_seed(0)
    systems["base"] = batched(lambda p, s: backend.generate(p, s), prompts, seeds)

    def img(
        aligner_dir: Path, guidance, questions=QUESTIONS, *, rounds=1, passes=3, ip_scale=None
    ) -> list[list]:
        pipe = IMGPipeline(
            backend=backend, guidance=guidance, aligner=load_aligner(aligner_dir), questions=questions
        )
        per_round: list[list] = [[] for _ in range(rounds)]
        for i in range(0, len(prompts), args.batch_size):
            sl = slice(i, i + args.batch_size)
            out = pipe(
                prompts[sl],
                seeds[sl],
                rounds=rounds,
                passes=passes,
                ip_scale=ip_scale,
                initial_images=systems["base"][sl],
            )
            for r in range(rounds):
                per_round[r] += out.rounds[r].calibrated
        return per_round

    shipped = run / "aligner"
    one, two = img(shipped, detector, rounds=2)
    systems["IMG (1 round, 3 passes)"] = one
    systems["IMG (2 rounds)"] = two
    systems["another seed"] = batched(
        lambda p, s: backend.generate(p, [x + OTHER_SEED_OFFSET for x in s]), prompts, seeds
    )
    systems["unaligned tokens (0 passes)"] = img(shipped, detector, passes=0)[0]

    def from_renders(p, s, sp):
        tokens = backend.encode_image([oracle_render(x, k) for x, k in zip(sp, s, strict=True)])
        return backend.generate(p, s, image_tokens=tokens, ip_scale=backend.defaults.ip_scale)

    systems["correct-render tokens (oracle)"] = batched(from_renders, prompts, seeds, specs)

    def from_corrections(p, s, sp, initial):
        fixed = [nearest_correct_render(im, x) for im, x in zip(initial, sp, strict=True)]
        tokens = backend.encode_image(fixed)
        return backend.generate(p, s, image_tokens=tokens, ip_scale=backend.defaults.ip_scale)

    systems["nearest-correct-render tokens (oracle)"] = batched(
        from_corrections, prompts, seeds, specs, systems["base"]
    )
    training = 0.0  # seconds spent training ablation aligners (once per run folder)
    if not args.skip_ablations:
        systems["IMG, 1 pass"] = img(shipped, detector, passes=1)[0]
        for scale in IP_SCALES:
            if scale != backend.defaults.ip_scale:
                systems[f"IMG at IP scale {scale}"] = img(shipped, detector, ip_scale=scale)[0]
        ablations = {
            "text-embedding guidance": dict(guidance="text", lam=1.0, terms=["dpo", "spin"]),
            "untrained detector": dict(guidance="untrained", lam=1.0, terms=["dpo", "spin"]),
            "L_base only (lambda 0)": dict(guidance="detector", lam=0.0, terms=[]),
            "L_base + DPO": dict(guidance="detector", lam=1.0, terms=["dpo"]),
            "lambda 0.5": dict(guidance="detector", lam=0.5, terms=["dpo", "spin"]),
            "lambda 2": dict(guidance="detector", lam=2.0, terms=["dpo", "spin"]),
            "reference never replaced": dict(
                guidance="detector", lam=1.0, terms=["dpo", "spin"], k=recipe["aligner_steps"] + 1
            ),
        }
        for label, spec in ablations.items():
            name = label.split(" (")[0].replace(" ", "_").replace("+", "plus").lower()
            started = time.perf_counter()
            aligner = ablation_aligner(run, name, log=log, **spec)
            training += time.perf_counter() - started
            guidance = guidance_model(run, spec["guidance"])
            questions = PROMPT_ONLY if spec["guidance"] == "text" else QUESTIONS
            systems[label] = img(aligner, guidance, questions)[0]
            log(f"{label}: done")
    shipped_spec = dict(guidance="detector", lam=recipe["aligner_lam"], terms=list(recipe["aligner_terms"]))
    for seed in args.aligner_seeds:
        started = time.perf_counter()
        aligner = ablation_aligner(run, f"aligner_seed_{seed}", log=log, seed=seed, **shipped_spec)
        training += time.perf_counter() - started
        systems[f"aligner seed {seed}"] = img(aligner, detector)[0]
        log(f"aligner seed {seed}: done")

    verdicts = {
        name: [judge(im, spec) for im, spec in zip(images, specs, strict=True)]
        for name, images in systems.items()
    }
    reports = {name: Report(v) for name, v in verdicts.items()}
    categories = list(reports["base"].per_category)
    print(f"## ShapesWorld: judge accuracy on {len(scenes)} {args.split} scenes x {args.seeds} seeds")
    print()
    print(
        "| system | "
        + " | ".join(categories)
        + " | overall (per image) | category mean | vs base: win / tie / loss |"
    )
    print("|---|" + "---|" * (len(categories) + 3))
    results = {}
    for name, report in reports.items():
        cells = []
        for c in [*categories, "overall"]:
            s = report.overall if c == "overall" else report.per_category[c]
            low, high = s.interval
            cells.append(f"{s.accuracy:.3f} [{low:.2f}, {high:.2f}]")
        cells.append(f"{report.category_mean:.3f}")
        outcome = win_tie_loss(verdicts[name], verdicts["base"])
        versus = "-" if name == "base" else f"{outcome.wins} / {outcome.ties} / {outcome.losses}"
        print(f"| {name} | " + " | ".join(cells) + f" | {versus} |")
        results[name] = {
            **report_dict(report),
            "vs_base": [outcome.wins, outcome.ties, outcome.losses],
            "correct": [v.correct for v in verdicts[name]],  # per image, in prompt x seed order
        }
    reference = "IMG (1 round, 3 passes)"
    print()
    print(f"### Paired against {reference} (same images; positive: {reference} is right more often)")
    print()
    print("| system | difference | 95% CI (cluster bootstrap) | only IMG right / only it right | McNemar p |")
    print("|---|---|---|---|---|")
    groups = [describe(s) for s in specs]  # a scene's seeds are resampled together
    for name in systems:
        if name == reference:
            continue
        paired = compare_paired(
            [v.correct for v in verdicts[reference]], [v.correct for v in verdicts[name]], groups=groups
        )
        low, high = paired.ci95
        mark = " *" if paired.significant else ""
        print(
            f"| {name} | {paired.difference:+.3f} | [{low:+.3f}, {high:+.3f}] | "
            f"{paired.only_a} / {paired.only_b} | {paired.p_value:.3g}{mark} |"
        )
        results[name]["vs_img"] = paired.to_dict()
    print()
    print(novelty_markdown(verdicts, recipe["seed"], results))
    for name in ("base", reference):
        print()
        print(f"### Why {name}'s images are wrong (share of each category's images; one may show several)")
        print()
        print(failure_markdown(verdicts[name]))
        results[name]["failures"] = {c: dict(n) for c, n in failure_counts(verdicts[name]).items()}
    seconds = time.perf_counter() - start
    print()
    print(
        f"{len(prompts)} images per system; 95% Wilson intervals; * McNemar p < 0.05; "
        f"{seconds / 60:.1f} min on {torch.get_num_threads()} threads"
        + (
            f", {training / 60:.1f} of them training ablation aligners"
            if not args.skip_ablations or args.aligner_seeds
            else ""
        )
    )
    if args.chart:
        from img_guidance.eval.plots import category_accuracy_chart

        shown = ["base", reference, "another seed", "correct-render tokens (oracle)"]
        category_accuracy_chart(
            {name: results[name] for name in shown},
            args.chart,
            title=f"ShapesWorld {args.split}: {len(scenes)} scenes x {args.seeds} seeds",
        )
    out = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "images_per_system": len(prompts),
        "seconds": {"total": round(seconds, 1), "ablation_training": round(training, 1)},
        "ip_scale": backend.defaults.ip_scale,
        "systems": results,
    }
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    from img_guidance.allocator import keep_freed_memory

    keep_freed_memory()  # torch's freed CPU blocks stay in the process (img_guidance.allocator)
    main()
