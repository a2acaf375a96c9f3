"""The nearest correct scene to an image: what a minimal fix of a wrong image looks like.

ShapesWorld can do what Pick-a-Pic cannot: show the aligner, for a wrong image, the same image with
only its mistakes fixed. :func:`corrected_layout` reads what :func:`~img_guidance.shapes.judge.detect`
found in an image and keeps as much of it as the prompt allows:

1. every object the prompt asks for is matched to a found object (the fewest changed attributes in
   all, larger objects first among equals): a matched object keeps its place and size and takes the
   asked-for shape and colour (a wrong colour is recoloured, a wrong shape redrawn where it was);
2. found objects matched to nothing are left out (extra objects go), objects the prompt asks for that
   nothing matched are added (a missing object or a count too low);
3. a relation that does not hold is fixed by swapping the two objects' places, else by moving the
   second (then the first) to a place where it holds;
4. a kept place that breaks the renderer's spacing rules is given up; and if the result is still not
   judged right, the scene's canonical layout (its render with seed 0) is used (``kept == 0``).

Everything is deterministic, so that the correction is a function of the image and the prompt that a
model can learn: an added or moved object gets the mean object size and the free place nearest the
image centre. The result always satisfies the prompt (the judge reads it as right).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from img_guidance.shapes.grammar import SceneSpec, as_scene
from img_guidance.shapes.judge import DetectedObject, judge
from img_guidance.shapes.render import (
    MAX_SIZE,
    MIN_SIZE,
    PlacedObject,
    draw,
    fits,
    layout,
    place_object,
    relation_holds,
)

if TYPE_CHECKING:
    from PIL import Image

# a shape's area as a share of its bounding box: a detected area -> the box side
_FILL = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}
_MAX_FOUND = 8  # more found objects than this (a garbled image): the canonical layout
CANONICAL_SEED = 0  # the layout of a scene when nothing of the image can be kept


@dataclass(frozen=True)
class Correction:
    """A corrected layout and how many of the image's objects kept their place (0: a fresh layout)."""

    objects: list[PlacedObject]
    kept: int


def _box(o: DetectedObject, shape: str, colour: str, size: int) -> PlacedObject:
    """A found object redrawn as ``shape`` and ``colour`` in its own box."""
    side = math.sqrt(o.area / _FILL.get(o.shape or "square", 1.0))
    side = float(np.clip(side, MIN_SIZE * size, MAX_SIZE * size))
    # the same box, whatever is drawn in it: a triangle's centroid lies side / 6 below its box centre
    cy = o.cy - side / 6 if o.shape == "triangle" else o.cy
    return PlacedObject(shape, colour, o.cx, cy, side)


def _mismatch(o: DetectedObject, shape: str, colour: str) -> int:
    return (o.shape != shape) + (o.colour != colour)


def _match(found: Sequence[DetectedObject], slots: Sequence[tuple[str, str]]) -> list[int | None]:
    """For each slot, the index of the found object it keeps (None: none): the assignment with the
    fewest changed attributes; found objects come largest first, so ties keep the larger ones."""
    best, best_cost = [None] * len(slots), math.inf
    for chosen in itertools.permutations(range(len(found)), min(len(found), len(slots))):
        cost = sum(_mismatch(found[j], *slot) for j, slot in zip(chosen, slots, strict=False))
        if cost < best_cost:
            best, best_cost = [*chosen, *[None] * (len(slots) - len(chosen))], cost
    return best


def _fix_relation(
    a: PlacedObject | None, b: PlacedObject | None, slots: Sequence[tuple[str, str]], relation: str, size: int
) -> tuple[PlacedObject | None, PlacedObject | None, int]:
    """ "a <relation> b" made to hold with the fewest kept places given up: as it is; else a and b
    swapped; else one of them moved to the nearest place where it holds, the other kept (b first,
    then a; then the same after a swap). An object without a kept place is put where the relation
    holds with the other. Returns (a, b, kept places given up); (None, None, ...) when nothing works."""
    mean = (MIN_SIZE + MAX_SIZE) / 2 * size

    def move(slot, side: float, anchor: PlacedObject, anchor_first: bool, near=None) -> PlacedObject | None:
        return place_object(
            *slot,
            side,
            [anchor],
            rng=None,
            size=size,
            relation=relation,
            anchor=anchor,
            anchor_first=anchor_first,
            near=near,
        )

    if a is not None and b is not None:
        if relation_holds(a, b, relation):
            return a, b, 0
        swapped_a = PlacedObject(a.shape, a.colour, b.cx, b.cy, a.size)
        swapped_b = PlacedObject(b.shape, b.colour, a.cx, a.cy, b.size)
        if relation_holds(swapped_a, swapped_b, relation) and fits(swapped_b, [swapped_a], size=size):
            return swapped_a, swapped_b, 0
        for first, second in ((a, b), (swapped_a, swapped_b)):
            moved = move(slots[1], second.size, first, True, near=(second.cx, second.cy))
            if moved is not None:
                return first, moved, 1
            moved = move(slots[0], first.size, second, False, near=(first.cx, first.cy))
            if moved is not None:
                return moved, second, 1
        return None, None, 2
    if a is None and b is not None:
        moved = move(slots[0], mean, b, False)
        return (moved, b, 0) if moved is not None else (None, None, 1)
    if b is None and a is not None:
        moved = move(slots[1], mean, a, True)
        return (a, moved, 0) if moved is not None else (None, None, 1)
    return None, None, 0


def _canonical(spec: SceneSpec, size: int) -> Correction:
    return Correction(layout(spec, seed=CANONICAL_SEED, size=size), 0)


def corrected_layout(
    found: Sequence[DetectedObject] | None,
    spec: SceneSpec | str,
    *,
    size: int = 32,
) -> Correction:
    """The nearest correct layout of ``spec`` to an image in which ``found`` was detected (None: an
    unreadable image), at ``size`` px; the rules are the module docstring's."""
    spec = as_scene(spec)
    found = list(found or ())
    slots = [(o.shape, o.colour) for o in spec.objects for _ in range(o.count)]
    if not found or len(found) > _MAX_FOUND:
        return _canonical(spec, size)

    # 1. Match; a kept place must keep the spacing rules with the objects kept before it
    matched = _match(found, slots)
    objects: list[PlacedObject | None] = []
    for slot, j in zip(slots, matched, strict=True):
        o = None if j is None else _box(found[j], *slot, size)
        objects.append(o if o is not None and fits(o, [p for p in objects if p], size=size) else None)
    kept = sum(o is not None for o in objects)

    # 2. A relation (two single objects, a then b)
    if spec.relation is not None:
        a, b, lost = _fix_relation(*objects, slots, spec.relation, size)
        objects, kept = [a, b], kept - lost

    # 3. Add what is missing
    for i, slot in enumerate(slots):
        if objects[i] is None:
            side = (MIN_SIZE + MAX_SIZE) / 2 * size
            objects[i] = place_object(*slot, side, [o for o in objects if o], rng=None, size=size)
    placed = [o for o in objects if o is not None]

    # 4. Only a layout the judge reads as right; else the canonical one
    if len(placed) != len(slots) or judge(draw(placed, size=size), spec).correct is not True:
        return _canonical(spec, size)
    return Correction(placed, kept)


def nearest_correct_render(image: Image.Image, spec: SceneSpec | str) -> Image.Image:
    """The render of the nearest correct scene to ``image`` (a right image is redrawn as it is): the
    tokens an aligner that fixes exactly the mistakes would produce."""
    verdict = judge(image, spec)
    found = verdict.objects if verdict.readable else None
    return draw(corrected_layout(found, spec, size=image.width).objects, size=image.width)
