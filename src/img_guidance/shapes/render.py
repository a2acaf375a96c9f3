"""The ShapesWorld renderer: a scene and a seed -> a small RGB image (numpy drawing).

Geometry, in pixels with x to the right and y down; pixel (row i, column j) covers
[j, j+1) x [i, i+1) and takes the object's colour mixed with the background by the share of it the
shape covers (anti-aliased edges, 4 x 4 samples per pixel):

- every object has a bounding box of side ``size`` centred on (cx, cy): a circle of that diameter,
  an axis-aligned square of that side, or a triangle pointing up whose base and height are
  ``size`` (its centroid lies ``size / 6`` below the box centre);
- sizes are drawn uniformly from [1/4, 3/8] of the image side (8-12 px at 32 px), positions
  uniformly among the places that keep the whole box :data:`BORDER` away from the edges and at
  least :data:`GAP` away from every other box (3 px at 32 px), so objects never touch;
- "A left of B": B's centre is at least one object size (the larger) to the right of A's and at
  most half that distance off the horizontal; the same for the other relations;
- the plain background :data:`BACKGROUND` and the :data:`PALETTE` are far apart in RGB.

The same scene and seed give the same image on every machine. Where objects go depends only on
the seed, the counts and the relation, not on colours or shapes: a scene and its recoloured or
reshaped edit, rendered with one seed, differ only where the edit is (handy for preference pairs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike
from PIL import Image, ImageFilter

from img_guidance.shapes.grammar import COLOURS, SHAPES, SceneSpec, as_scene

BACKGROUND = (20, 20, 20)
PALETTE = {
    "red": (220, 30, 30),
    "green": (30, 190, 50),
    "blue": (40, 80, 230),
    "yellow": (235, 215, 30),
}
MIN_SIZE, MAX_SIZE = 1 / 4, 3 / 8  # object size as a fraction of the image side
GAP = 3 / 32  # least distance between bounding boxes, as a fraction of the image side
BORDER = 1 / 32  # least distance between a bounding box and the image edge
MIN_IMAGE_SIZE = 16
SUPERSAMPLE = 4  # anti-aliasing: samples per pixel along each axis
_GRID_STEP = 0.5  # candidate centres are this far apart (plus a random offset per object)
_ATTEMPTS = 200


@dataclass(frozen=True)
class PlacedObject:
    """One drawn object: its bounding box is ``size`` px wide, centred on (cx, cy) px."""

    shape: str
    colour: str
    cx: float
    cy: float
    size: float


def relation_holds(a: PlacedObject, b: PlacedObject, relation: str) -> bool:
    """Whether the renderer's rule for "a <relation> b" holds: along the relation's axis the centres
    are at least the larger object size apart, on the right side, and across it at most half of
    that distance apart."""
    along, across = relation_offsets(b.cx - a.cx, b.cy - a.cy, relation)
    return bool(along >= max(a.size, b.size) and abs(across) <= along / 2)


def relation_offsets(dx: ArrayLike, dy: ArrayLike, relation: str) -> tuple[ArrayLike, ArrayLike]:
    """(along, across): how far b lies from a in the relation's direction, and off that axis, given
    b's position minus a's (x right, y down; numbers or arrays). "a left of b": b lies to the right."""
    if relation == "left of":
        return dx, dy
    if relation == "right of":
        return -dx, dy
    if relation == "above":
        return dy, dx
    if relation == "below":
        return -dy, dx
    raise ValueError(f"unknown relation {relation!r}")


def shape_mask(shape: str, cx: float, cy: float, size: float, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Which points lie in the shape: ``xs`` [1, W] and ``ys`` [H, 1] are coordinates in px; the
    result is a bool mask [H, W]."""
    half = size / 2
    dx, dy = xs - cx, ys - cy
    if shape == "circle":
        return dx * dx + dy * dy <= half * half
    if shape == "square":
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if shape == "triangle":
        # the half-width grows from 0 at the apex (dy = -half) to half at the base (dy = +half)
        return (dy <= half) & (np.abs(dx) <= (dy + half) / 2)
    raise ValueError(f"unknown shape {shape!r}: expected one of {SHAPES}")


def shape_coverage(
    shape: str, cx: float, cy: float, size: float, *, x0: int, y0: int, width: int, height: int
) -> np.ndarray:
    """How much of each pixel of the window [y0 : y0 + height, x0 : x0 + width] the shape covers,
    in [0, 1], from SUPERSAMPLE x SUPERSAMPLE points per pixel: [height, width] float64."""
    fine = (np.arange(SUPERSAMPLE) + 0.5) / SUPERSAMPLE  # sample offsets inside a pixel
    xs = (np.arange(x0, x0 + width)[:, None] + fine).reshape(1, -1)
    ys = (np.arange(y0, y0 + height)[:, None] + fine).reshape(-1, 1)
    mask = shape_mask(shape, cx, cy, size, xs, ys)  # [height * S, width * S]
    return mask.reshape(height, SUPERSAMPLE, width, SUPERSAMPLE).mean(axis=(1, 3))


def draw(objects: list[PlacedObject], *, size: int = 32) -> Image.Image:
    """Paint placed objects on the background: an RGB image of ``size`` x ``size``. Edge pixels mix
    the object's colour and the background by the share of the pixel the object covers."""
    _check_size(size)
    canvas = np.empty((size, size, 3), dtype=np.float64)
    canvas[:] = BACKGROUND
    for o in objects:
        if o.colour not in COLOURS:
            raise ValueError(f"unknown colour {o.colour!r}: expected one of {COLOURS}")
        # only the window around the box is drawn: [y0:y1, x0:x1]
        x0, y0 = max(0, math.floor(o.cx - o.size / 2)), max(0, math.floor(o.cy - o.size / 2))
        x1, y1 = min(size, math.ceil(o.cx + o.size / 2)), min(size, math.ceil(o.cy + o.size / 2))
        cover = shape_coverage(o.shape, o.cx, o.cy, o.size, x0=x0, y0=y0, width=x1 - x0, height=y1 - y0)
        window = canvas[y0:y1, x0:x1]
        window += cover[..., None] * (np.array(PALETTE[o.colour], dtype=np.float64) - window)
    return Image.fromarray(canvas.round().astype(np.uint8), mode="RGB")


def place_object(
    shape: str,
    colour: str,
    object_size: float,
    placed: list[PlacedObject],
    *,
    rng: np.random.Generator | None,
    size: int = 32,
    relation: str | None = None,
    anchor: PlacedObject | None = None,
    anchor_first: bool = True,
    near: tuple[float, float] | None = None,
) -> PlacedObject | None:
    """One more object of side ``object_size`` px at a random free place: its whole box
    :data:`BORDER` inside the image and :data:`GAP` away from every box in ``placed``; with a
    ``relation`` and an ``anchor``, also where "anchor <relation> it" holds (``anchor_first``) or
    "it <relation> anchor". None when there is no such place. ``rng=None`` chooses, deterministically,
    the free place nearest ``near`` (x, y) px, by default the image centre (the first in row order
    among equals)."""
    s, gap, border = object_size, max(2.0, GAP * size), max(1.0, BORDER * size)
    start = s / 2 + border + (0.0 if rng is None else float(rng.uniform(0, _GRID_STEP)))
    grid = np.arange(start, size - s / 2 - border + 1e-9, _GRID_STEP)
    cx, cy = grid[None, :], grid[:, None]  # [1, G] and [G, 1] -> masks [G, G]
    ok = np.ones((grid.size, grid.size), dtype=bool)
    for p in placed:
        reach = (s + p.size) / 2 + gap
        ok &= (np.abs(cx - p.cx) >= reach) | (np.abs(cy - p.cy) >= reach)
    if relation is not None and anchor is not None:
        sign = 1 if anchor_first else -1  # offsets from the relation's first object to its second
        along, across = relation_offsets(sign * (cx - anchor.cx), sign * (cy - anchor.cy), relation)
        ok &= (along >= max(s, anchor.size)) & (np.abs(across) <= along / 2)
    rows, cols = np.nonzero(ok)
    if rows.size == 0:
        return None
    if rng is None:
        x, y = (size / 2, size / 2) if near is None else near
        pick = int(np.argmin((grid[cols] - x) ** 2 + (grid[rows] - y) ** 2))
    else:
        pick = int(rng.integers(rows.size))
    return PlacedObject(shape, colour, float(grid[cols[pick]]), float(grid[rows[pick]]), s)


def fits(o: PlacedObject, placed: list[PlacedObject], *, size: int = 32) -> bool:
    """Whether ``o`` keeps the renderer's rules: its box :data:`BORDER` inside the image and
    :data:`GAP` away from every box in ``placed``."""
    gap, border = max(2.0, GAP * size), max(1.0, BORDER * size)
    half = o.size / 2
    if min(o.cx, o.cy) - half < border - 1e-9 or max(o.cx, o.cy) + half > size - border + 1e-9:
        return False
    for p in placed:
        reach = (o.size + p.size) / 2 + gap
        if abs(o.cx - p.cx) < reach and abs(o.cy - p.cy) < reach:
            return False
    return True


def layout(spec: SceneSpec | str, *, seed: int | np.random.Generator, size: int = 32) -> list[PlacedObject]:
    """Where the objects of a scene go: one :class:`PlacedObject` per object, group by group in the
    scene's order. Deterministic given ``seed`` (an int, or a Generator that is advanced)."""
    spec = as_scene(spec)
    _check_size(size)
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    kinds = [(o.shape, o.colour) for o in spec.objects for _ in range(o.count)]
    lo, hi = MIN_SIZE * size, MAX_SIZE * size
    for attempt in range(_ATTEMPTS):
        # a crowded scene that keeps failing gets smaller objects
        top = hi - (hi - lo) * min(1.0, attempt / 50)
        placed: list[PlacedObject] = []
        for shape, colour in kinds:
            s = float(rng.uniform(lo, top))
            anchor = placed[0] if placed else None
            o = place_object(
                shape, colour, s, placed, rng=rng, size=size, relation=spec.relation, anchor=anchor
            )
            if o is None:
                break
            placed.append(o)
        else:
            return placed
    raise RuntimeError(f"could not place {kinds} in a {size} px image after {_ATTEMPTS} attempts")


def render_with_layout(
    spec: SceneSpec | str, *, seed: int | np.random.Generator, size: int = 32
) -> tuple[Image.Image, list[PlacedObject]]:
    """A scene drawn at ``size`` x ``size`` px, and where its objects went (see :func:`layout`)."""
    objects = layout(spec, seed=seed, size=size)
    return draw(objects, size=size), objects


def render(spec: SceneSpec | str, *, seed: int | np.random.Generator, size: int = 32) -> Image.Image:
    """A scene (or a prompt of the grammar) drawn as an RGB image of ``size`` x ``size`` px."""
    return render_with_layout(spec, seed=seed, size=size)[0]


def degrade(
    image: Image.Image,
    *,
    rng: np.random.Generator,
    noise: float = 0.0,
    blur: float = 0.0,
    tint: float = 0.0,
) -> Image.Image:
    """A render made to look generated: a Gaussian blur of std ``blur`` px, then a colour cast (one
    offset per channel, uniform in [-tint, tint]) and Gaussian noise of std ``noise`` (0-255 units),
    rounded and clipped to 0-255."""
    if min(noise, blur, tint) < 0:
        raise ValueError(f"noise, blur and tint must be >= 0, got {noise}, {blur} and {tint}")
    if blur > 0:
        image = image.filter(ImageFilter.GaussianBlur(blur))
    array = np.asarray(image.convert("RGB"), dtype=np.float64)
    if tint > 0:
        array = array + rng.uniform(-tint, tint, size=3)
    if noise > 0:
        array = array + rng.normal(0.0, noise, size=array.shape)
    return Image.fromarray(array.round().clip(0, 255).astype(np.uint8), mode="RGB")


def _check_size(size: int) -> None:
    if not isinstance(size, int) or size < MIN_IMAGE_SIZE:
        raise ValueError(f"image size must be an integer of at least {MIN_IMAGE_SIZE} px, got {size!r}")
