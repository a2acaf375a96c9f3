"""The world's splits: which scenes train, which choose settings (validation) and which are the
benchmark's (test), and how scenes are drawn from them with the categories equally likely.

Scenes that ask the same of an image (the two word orders of a pair) always share a split, and two
colour-shape kinds never appear in a two-object training scene, so the test split holds
combinations no model saw.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from img_guidance.shapes.grammar import (
    CATEGORIES,
    COLOURS,
    INVERSE_RELATIONS,
    SHAPES,
    SceneSpec,
    all_scenes,
    category,
)


def _meaning_key(spec: SceneSpec) -> tuple:
    """Scenes that ask the same of an image share a key: "a and b" = "b and a", "a left of b" = "b
    right of a". A whole meaning goes to one split."""
    relation = spec.relation
    if relation in ("right of", "below"):
        relation = (spec.objects[1], INVERSE_RELATIONS[relation], spec.objects[0])
    elif relation is not None:
        relation = (spec.objects[0], relation, spec.objects[1])
    return frozenset(spec.objects), relation


def held_out_kinds(seed: int = 0, *, count: int = 2) -> list[tuple[str, str]]:
    """``count`` (colour, shape) kinds drawn from ``seed``, no two sharing a colour or a shape: the
    kinds that never appear in a two-group training scene (see :func:`split_scenes`)."""
    if not 0 <= count <= min(len(COLOURS), len(SHAPES)):
        raise ValueError(f"count must lie in [0, {min(len(COLOURS), len(SHAPES))}], got {count}")
    rng = np.random.default_rng(seed)
    kinds: list[tuple[str, str]] = []
    for index in rng.permutation(len(COLOURS) * len(SHAPES)):
        colour, shape = COLOURS[index // len(SHAPES)], SHAPES[index % len(SHAPES)]
        if len(kinds) < count and all(colour != c and shape != s for c, s in kinds):
            kinds.append((colour, shape))
    return kinds


def split_scenes(
    seed: int = 0, *, held_out: int = 2, held_out_fraction: float = 0.1
) -> dict[str, list[SceneSpec]]:
    """Disjoint ``"train"``, ``"validation"`` and ``"test"`` scene lists (each in :func:`all_scenes`
    order; together all scenes).

    The ``held_out`` kinds of :func:`held_out_kinds` never appear in a two-group training scene: every
    such scene goes to validation or test, half and half. Of the other meanings (the two word orders
    of a pair go together), per category, ``held_out_fraction`` go to validation and as many to test
    (at least one each); single objects of the held-out kinds stay in training, so those kinds are
    known and only their combinations are new.
    """
    if not 0 <= held_out_fraction < 0.5:
        raise ValueError(f"held_out_fraction must lie in [0, 0.5), got {held_out_fraction}")
    kinds = held_out_kinds(seed, count=held_out)
    rng = np.random.default_rng([seed, 1])
    meanings: dict[tuple, list[SceneSpec]] = {}
    for spec in all_scenes():
        meanings.setdefault(_meaning_key(spec), []).append(spec)
    side: dict[tuple, str] = {}
    for name in CATEGORIES:
        keys = [k for k, specs in meanings.items() if category(specs[0]) == name]
        unseen = [k for k in keys if len(meanings[k][0].objects) == 2 and _has_kind(meanings[k][0], kinds)]
        for i, j in enumerate(rng.permutation(len(unseen))):
            side[unseen[j]] = "validation" if i % 2 == 0 else "test"
        seen = [k for k in keys if k not in side]
        candidates = [
            seen[j] for j in rng.permutation(len(seen)) if not _has_kind(meanings[seen[j]][0], kinds)
        ]
        count = max(1, round(held_out_fraction * len(seen))) if held_out_fraction > 0 else 0
        for k in candidates[:count]:
            side[k] = "validation"
        for k in candidates[count : 2 * count]:
            side[k] = "test"
    splits: dict[str, list[SceneSpec]] = {"train": [], "validation": [], "test": []}
    for spec in all_scenes():
        splits[side.get(_meaning_key(spec), "train")].append(spec)
    return splits


def unseen_combination(spec: SceneSpec, seed: int = 0, *, held_out: int = 2) -> bool:
    """Whether ``spec`` is a two-group scene holding one of the ``held_out`` kinds of
    :func:`held_out_kinds` (``seed``): a combination no training scene of :func:`split_scenes` holds
    (every such scene is in validation or test)."""
    return len(spec.objects) == 2 and _has_kind(spec, held_out_kinds(seed, count=held_out))


def _has_kind(spec: SceneSpec, kinds: Sequence[tuple[str, str]]) -> bool:
    return any((o.colour, o.shape) in kinds for o in spec.objects)


def by_category(scenes: Sequence[SceneSpec]) -> dict[str, list[SceneSpec]]:
    """Scenes grouped by category, categories in ``CATEGORIES`` order, empty ones left out."""
    groups = {name: [s for s in scenes if category(s) == name] for name in CATEGORIES}
    return {name: specs for name, specs in groups.items() if specs}


def sample_scenes(pool: dict[str, list[SceneSpec]], rng: np.random.Generator, n: int) -> list[SceneSpec]:
    """``n`` scenes: a category uniformly among ``pool``'s, then a scene uniformly in it."""
    names = list(pool)
    picks = []
    for _ in range(n):
        specs = pool[names[int(rng.integers(len(names)))]]
        picks.append(specs[int(rng.integers(len(specs)))])
    return picks
