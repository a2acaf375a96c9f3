"""How far the ShapesWorld judge can be trusted, and how fast the world renders and is judged.

For every scene of the grammar and ``--n`` seeds each, it renders the scene and, for each image
condition (clean; Gaussian noise; blur; both; a colour cast on top; two stress conditions past
what generated images should look like), measures:

- accuracy: the verdict against the scene the image was rendered from is True (with the 95%
  Wilson interval), and how often it is undecidable (None) or wrong (False);
- false accepts: the verdict against scenes that the image does *not* show is True. Two kinds of
  wrong scene: ``--negatives`` near misses (one edit away: a colour, a shape, a count, a flipped
  relation, an object more or less) and one random scene of the grammar that no render of the
  scene can satisfy (a scene without a relation may satisfy one by chance, so those are left out);
- images/s of the judge (reading plus one verdict), one process, one thread.

It also prints the per-category table for one degraded condition and the renderer's images/s.

    python -m benchmarks.shapes_judge                       # 3 seeds per scene, 32 px
    python -m benchmarks.shapes_judge --n 1 --size 64 --seed 1
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from img_guidance.shapes import (
    Report,
    SceneSpec,
    all_scenes,
    degrade,
    describe,
    detect,
    implies,
    judge_objects,
    near_misses,
    wilson_interval,
)
from img_guidance.shapes.render import render

# (name, noise std in 0-255 units, blur std in px at 32 px, colour cast in 0-255 units)
CONDITIONS = [
    ("clean", 0.0, 0.0, 0.0),
    ("noise 10", 10.0, 0.0, 0.0),
    ("noise 20", 20.0, 0.0, 0.0),
    ("blur 0.8", 0.0, 0.8, 0.0),
    ("noise 15 + blur 0.8", 15.0, 0.8, 0.0),
    ("noise 20 + blur 1.0", 20.0, 1.0, 0.0),
    ("noise 10 + blur 0.6 + cast 30", 10.0, 0.6, 30.0),
    # beyond what the judge is built for: where it starts to abstain
    ("stress: blur 1.5", 0.0, 1.5, 0.0),
    ("stress: noise 40", 40.0, 0.0, 0.0),
]
CATEGORY_CONDITION = "noise 15 + blur 0.8"


def surely_wrong(shown: SceneSpec, prompt: SceneSpec) -> bool:
    """Whether no render of ``shown`` can satisfy ``prompt``: renders of a scene without a
    relation may happen to satisfy one ("a red circle and a blue square" drawn side by side)."""
    if implies(shown, prompt):
        return False
    return shown.relation is not None or set(shown.objects) != set(prompt.objects)


def rate(k: int, n: int) -> str:
    lo, hi = wilson_interval(k, n)
    return f"{k / n:.4f} [{lo:.4f}, {hi:.4f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=3, help="seeds per scene")
    parser.add_argument("--size", type=int, default=32, help="image side in px")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--negatives", type=int, default=3, help="near misses judged per image")
    args = parser.parse_args()

    scenes = all_scenes()
    misses = {s: near_misses(s) for s in scenes}
    start = time.perf_counter()
    renders = [
        (s, render(s, seed=np.random.default_rng([args.seed, r, i]), size=args.size))
        for r in range(args.n)
        for i, s in enumerate(scenes)
    ]
    render_rate = len(renders) / (time.perf_counter() - start)

    rows, category_report = [], None
    for name, noise, blur, cast in CONDITIONS:
        rng = np.random.default_rng([args.seed, 1])
        verdicts, wrong_near, wrong_random = [], [], []
        judge_time = 0.0
        for spec, image in renders:
            image = degrade(image, rng=rng, noise=noise, blur=blur * args.size / 32, tint=cast)
            t0 = time.perf_counter()
            objects = detect(image)
            verdicts.append(judge_objects(objects, spec, image_size=args.size))
            judge_time += time.perf_counter() - t0
            for k in rng.choice(
                len(misses[spec]), size=min(args.negatives, len(misses[spec])), replace=False
            ):
                wrong_near.append(judge_objects(objects, misses[spec][k], image_size=args.size).correct)
            other = scenes[int(rng.integers(len(scenes)))]
            while not surely_wrong(spec, other):
                other = scenes[int(rng.integers(len(scenes)))]
            wrong_random.append(judge_objects(objects, other, image_size=args.size).correct)
        report = Report(verdicts)
        if name == CATEGORY_CONDITION:
            category_report = report
        overall = report.overall
        wrong = sum(v.correct is False for v in verdicts)
        rows.append(
            [
                name,
                overall.n,
                rate(overall.correct, overall.n),
                f"{overall.undecidable / overall.n:.4f}",
                f"{wrong / overall.n:.4f}",
                f"{sum(c is True for c in wrong_near) / len(wrong_near):.4f} (n={len(wrong_near)})",
                f"{sum(c is None for c in wrong_near) / len(wrong_near):.4f}",
                f"{sum(c is True for c in wrong_random) / len(wrong_random):.4f} (n={len(wrong_random)})",
                f"{len(renders) / judge_time:.0f}",
            ]
        )

    print(f"ShapesWorld judge, {len(scenes)} scenes x {args.n} seeds at {args.size} px (seed {args.seed})\n")
    header = [
        "condition",
        "images",
        "accuracy [95% CI]",
        "undecidable",
        "wrong (False)",
        "false accept, near misses",
        "undecidable, near misses",
        "false accept, random scene",
        "judge img/s",
    ]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(map(str, row)) + " |")
    print(f"\nrender: {render_rate:.0f} images/s at {args.size} px")
    if category_report is not None:
        print(f"\nper category, {CATEGORY_CONDITION}:\n")
        print(category_report.to_markdown())
        failures = [v for v in category_report.verdicts if v.correct is not True][:5]
        for v in failures:
            failing = [k for k, c in v.checks.items() if c is not True]
            print(f"- {describe(v.spec)!r}: {v.correct}, failing checks {failing}")


if __name__ == "__main__":
    from img_guidance.allocator import keep_freed_memory

    keep_freed_memory()  # torch's freed CPU blocks stay in the process (img_guidance.allocator)
    main()
