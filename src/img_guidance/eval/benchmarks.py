"""Benchmarks: a prompt set with its categories, images per prompt and default scorers.

- ``shapes``: ShapesWorld's test split (211 scenes; seed 0's split, held out from every training
  stage), GenEval's categories from the world's grammar, 3 images per prompt (seeds 0, 1, 2), scored by
  ``shapes-judge`` and ``shapes-checks``. Offline.

The paper's benchmarks (HPD v2, Parti-Prompts, the Pick-a-Pic test prompts, T2I-CompBench, GenEval,
DPG-Bench) are still to come (issue 14).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from img_guidance.data.prompts import PromptItem


@dataclass(frozen=True)
class Benchmark:
    name: str
    description: str
    images_per_prompt: int
    scorers: tuple[str, ...]
    prompts: Callable[[], list[tuple[str, str]]]  # [(prompt, category)] in the benchmark's order

    def items(self, *, limit: int | None = None, images_per_prompt: int | None = None) -> list[PromptItem]:
        """The first ``limit`` prompts, each with seeds 0 .. images_per_prompt - 1, as prompt items."""
        k = self.images_per_prompt if images_per_prompt is None else images_per_prompt
        if k < 1:
            raise ValueError(f"images per prompt must be >= 1, got {k}")
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        prompts = self.prompts()[:limit]
        return [PromptItem(p, seed, category) for p, category in prompts for seed in range(k)]


def _shapes_prompts() -> list[tuple[str, str]]:
    from img_guidance.shapes.grammar import category, describe
    from img_guidance.shapes.train_generator import split_scenes

    return [(describe(s), category(s)) for s in split_scenes(0)["test"]]


BENCHMARKS = {
    "shapes": Benchmark(
        name="shapes",
        description="ShapesWorld's test split: 211 prompts in GenEval's categories, judged exactly",
        images_per_prompt=3,
        scorers=("shapes-judge", "shapes-checks"),
        prompts=_shapes_prompts,
    ),
}


def get_benchmark(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]
