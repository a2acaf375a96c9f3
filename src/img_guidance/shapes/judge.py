"""The ShapesWorld oracle: read an image back into objects and check them against a prompt.

Reading (:func:`detect`) works on any RGB image of the world, rendered or generated (noisy,
blurred, tinted, colours a little off):

1. Colour. Each pixel is compared with the segment from the background colour to each palette
   colour: its *coverage* is how far along the segment it lies (0 background, 1 full colour) and its
   *residual* how far off the segment (RGB units, 0-255). It takes the colour of the nearest
   segment and belongs to an object when the coverage is at least 0.5 (blurred edges split where
   the true edge is), else to the background. It is *unknown* when no segment is within
   :data:`MAX_RESIDUAL`, or when it is an object pixel whose second-nearest segment is not
   :data:`COLOUR_RATIO` times further than the nearest (grey, orange, purple: colours this world
   does not have). The background colour is measured from the image itself (a tint is not a
   colour), and labels are taken on a copy smoothed by :data:`SMOOTH` px so that noise does not
   cut objects apart.
2. Objects. Connected pixels of one label (4-neighbours) form an object; connected unknown pixels
   form an object of unknown colour. Components below :data:`MIN_AREA` of the image are specks and
   are dropped. An image with more than :data:`MAX_UNKNOWN` of its pixels unknown is not a picture
   of this world: it is *unreadable* and every check is undecidable (a blank background is
   readable: it shows no objects).
3. Shape. Each shape of the renderer's geometry (circle, square, up-pointing triangle) is drawn
   with the object's area and centroid, both taken from its coverage, which blur does not change;
   blurred by each std in :data:`BLURS`; and compared with the object's coverage on its pixels and
   the rim nearer to it than to any other object. The least squared error wins, unless it is large
   (more than :data:`MAX_SHAPE_ERROR` per pixel of area beyond what the image's noise explains) or
   the runner-up is nearly as good (within :data:`MIN_SHAPE_MARGIN`, or within :data:`SHAPE_Z`
   standard deviations of what the noise could do): then the shape is undecided (None). A
   component is one object at most: two touching objects of one colour are one blob of undecided
   shape.

Judging (:func:`judge`) turns a scene's prompt into checks, each True, False or None:

- ``"<colour> <shape> present"`` per group: at least one such object;
- ``"<colour> <shape> count == n"`` per group: exactly n such objects;
- ``"<colour> <shape> <relation> <colour> <shape>"`` for a relation: it holds for every pair of
  such objects, and there is a pair. "a left of b" means b's centroid lies at least
  :data:`MIN_SHIFT` of the image side to the right of a's, and further right than up or down;
- ``"nothing else"``: every object belongs to a group of the prompt. Prompts are exact, as in
  GenEval's counting: "a red circle" next to a stray blue square is wrong.

An object whose colour or shape is undecided could be any of several kinds; a check is True
(False) only if it is True (False) whichever kinds such objects are, else None. ``correct`` is
decided the same way for all checks at once: True when every reading passes every check, False
when no reading does, else None (undecidable). ``score`` is the fraction of checks that are True.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageFilter

from img_guidance.shapes.grammar import CATEGORIES, COLOURS, SHAPES, SceneSpec, as_scene, category, describe
from img_guidance.shapes.render import BACKGROUND, PALETTE, relation_offsets, shape_coverage

MAX_RESIDUAL = 70.0  # RGB distance from the nearest background-to-colour segment
COLOUR_RATIO = 2.0  # an object pixel's second-nearest segment must be this many times further
MIN_AREA = 0.012  # of the image area: 12 px at 32 x 32 (the smallest rendered object has ~32)
MAX_UNKNOWN = 0.2  # of the image area
MIN_BACKGROUND = 0.2  # of the image area, to measure the background colour on
MAX_SHAPE_ERROR = 0.3  # squared coverage error per pixel of area, beyond noise
MIN_SHAPE_MARGIN = 0.002
SHAPE_Z = 2.0
BLURS = (0.0, 0.5, 0.8, 1.1, 1.5)  # px at 32 x 32, scaled with the image: the blurs shapes are fitted with
SMOOTH = 0.7  # px at 32 x 32: std of the Gaussian blur objects are found under
MIN_SHIFT = 0.1  # of the image side: least distance between centroids for a relation
_MATMUL_MAX = 64  # px: windows up to this size are blurred by matrix products
_MAX_READINGS = 4096  # undecided objects beyond this many joint readings leave every check None

_PALETTE_RGB = np.array([PALETTE[c] for c in COLOURS], dtype=np.float32)  # [C, 3]
_UNKNOWN = len(COLOURS)  # pixel label of unknown colour; background is -1


@dataclass(frozen=True)
class DetectedObject:
    """An object read from an image: its colour and shape (None where undecided), its centroid in
    pixels (x right, y down, pixel centres at +0.5) and its area in pixels."""

    shape: str | None
    colour: str | None
    cx: float
    cy: float
    area: int

    @property
    def decided(self) -> bool:
        return self.shape is not None and self.colour is not None


@dataclass(frozen=True)
class Verdict:
    """The judgement of one image against one scene (see the module docstring for the rules)."""

    spec: SceneSpec
    objects: tuple[DetectedObject, ...]
    checks: dict[str, bool | None]
    correct: bool | None
    score: float
    category: str
    readable: bool = True

    @property
    def prompt(self) -> str:
        return describe(self.spec)


def to_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """An image as uint8 [H, W, 3]: a PIL image (any mode) or a uint8 array [H, W, 3]."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(
                f"an image array must be uint8 [H, W, 3], got {image.dtype} {list(image.shape)} "
                "(from floats in [0, 1]: (x * 255).round().clip(0, 255).astype(np.uint8))"
            )
        return image
    raise ValueError(f"expected a PIL image or a uint8 array [H, W, 3], got {type(image).__name__}")


def classify_pixels(
    image: Image.Image | np.ndarray, *, background: Sequence[float] = BACKGROUND
) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel labels [H, W] and coverage [H, W, C] (step 1 of the module docstring). A label is
    the index of a colour in ``COLOURS``, -1 for the background or ``len(COLOURS)`` for unknown.
    The coverage of colour c is how far along the ``background``-to-c segment a pixel lies (not
    clipped, so that noise on the background averages out), 0 where it is far off the segment."""
    origin = np.asarray(background, dtype=np.float32)
    vectors = _PALETTE_RGB - origin  # [C, 3]
    d = to_array(image).astype(np.float32) - origin  # [H, W, 3]
    alpha = (d[:, :, None, :] * vectors).sum(-1) / (vectors * vectors).sum(1)  # [H, W, C]
    # distance to the segment's line, measured from its start where the pixel lies before it
    along = np.maximum(alpha, 0.0)[..., None] * vectors  # [H, W, C, 3]
    residual = np.linalg.norm(d[:, :, None, :] - along, axis=-1)  # [H, W, C]
    order = residual.argsort(-1)
    best, runner_up = np.take_along_axis(residual, order[..., :2], -1).transpose(2, 0, 1)  # [H, W] each
    best_alpha = np.take_along_axis(alpha, order[..., :1], -1)[..., 0]
    # an object pixel must be clearly nearer one colour than the next (orange is neither red nor yellow)
    unknown = (best > MAX_RESIDUAL) | ((best_alpha >= 0.5) & (runner_up < COLOUR_RATIO * best))
    labels = np.where(unknown, _UNKNOWN, np.where(best_alpha >= 0.5, order[..., 0], -1))
    return labels, np.where(residual <= MAX_RESIDUAL, alpha, 0.0)


def connected_components(labels: np.ndarray) -> np.ndarray:
    """4-connected components of equal non-negative labels: [H, W] -> [H, W] ids, each the
    smallest flat pixel index of its component, -1 where the label is negative."""
    h, w = labels.shape
    ids = np.arange(h * w).reshape(h, w)
    big = h * w
    same_x = (labels[:, 1:] == labels[:, :-1]) & (labels[:, 1:] >= 0)  # pixel joins its right neighbour
    same_y = (labels[1:, :] == labels[:-1, :]) & (labels[1:, :] >= 0)  # ... and the one below
    while True:
        new = ids.copy()
        np.minimum(new[:, :-1], np.where(same_x, ids[:, 1:], big), out=new[:, :-1])
        np.minimum(new[:, 1:], np.where(same_x, ids[:, :-1], big), out=new[:, 1:])
        np.minimum(new[:-1, :], np.where(same_y, ids[1:, :], big), out=new[:-1, :])
        np.minimum(new[1:, :], np.where(same_y, ids[:-1, :], big), out=new[1:, :])
        # every id names a pixel of the same component; following the pointers once halves paths
        new = new.ravel()[new]
        if np.array_equal(new, ids):
            return np.where(labels >= 0, ids, -1)
        ids = new


def _fit_shapes(
    coverage: np.ndarray, weight: np.ndarray, *, sigmas: Sequence[float]
) -> tuple[float, dict[str, float], dict[str, np.ndarray]]:
    """Fit each shape to one object: (area, errors, fitted shapes).

    The object's ``coverage`` [h, w] counts where ``weight`` [h, w] is True (its pixels and the
    background around them; the window reaches past the blurred rim). Each shape is drawn with the
    coverage's area and centroid (which blur leaves unchanged), as pixel coverage, and blurred with
    each Gaussian std in ``sigmas``; its error is the least squared difference over the blurs,
    divided by the area, and its fitted shape [h, w] is the blurred drawing that attains it."""
    h, w = coverage.shape
    c = np.where(weight, coverage, 0.0)
    gx = np.arange(w, dtype=np.float64) + 0.5
    gy = np.arange(h, dtype=np.float64) + 0.5
    area = float(c.sum())
    if area <= 1.0:
        return area, dict.fromkeys(SHAPES, math.inf), {s: np.zeros_like(c) for s in SHAPES}
    mx, my = float((c.sum(0) * gx).sum()) / area, float((c.sum(1) * gy).sum()) / area
    sides = {
        "circle": 2 * math.sqrt(area / math.pi),
        "square": math.sqrt(area),
        "triangle": math.sqrt(2 * area),
    }
    errors, fitted = {}, {}
    for shape, side in sides.items():
        # a triangle's centroid lies side / 6 below the centre of its box
        cy = my - side / 6 if shape == "triangle" else my
        drawn = shape_coverage(shape, mx, cy, side, x0=0, y0=0, width=w, height=h)
        candidates = [_blur(drawn, sigma) for sigma in sigmas]  # [h, w] each
        sse = [float((np.where(weight, c - t, 0.0) ** 2).sum()) for t in candidates]
        best = int(np.argmin(sse))
        errors[shape], fitted[shape] = sse[best] / area, candidates[best]
    return area, errors, fitted


def _blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of std ``sigma`` px, kernel cut at 3 sigma, zeros beyond the edges: [h, w].

    Small windows are blurred by two matrix products; large ones by sums of shifted copies, as
    threaded BLAS can crawl at those sizes when the cores are oversubscribed."""
    if sigma <= 0:
        return x
    h, w = x.shape
    if max(h, w) <= _MATMUL_MAX:
        return _blur_matrix(h, sigma) @ x @ _blur_matrix(w, sigma).T
    kernel = _kernel(sigma)
    radius = len(kernel) // 2
    padded = np.pad(x, radius)
    rows = sum(k * padded[:, i : i + w] for i, k in enumerate(kernel))  # [h + 2r, w]
    return sum(k * rows[i : i + h] for i, k in enumerate(kernel))


def _kernel(sigma: float) -> np.ndarray:
    radius = math.ceil(3 * sigma)
    kernel = np.exp(-(np.arange(-radius, radius + 1) ** 2) / (2 * sigma * sigma))
    return kernel / kernel.sum()


@functools.lru_cache(maxsize=256)
def _blur_matrix(n: int, sigma: float) -> np.ndarray:
    """[n, n]: multiplying a length-n signal by it is :func:`_blur` along that axis (cached: read
    only)."""
    kernel = _kernel(sigma)
    radius = len(kernel) // 2
    offsets = np.arange(n)[None, :] - np.arange(n)[:, None] + radius  # [n, n]
    inside = (offsets >= 0) & (offsets < len(kernel))
    return np.where(inside, kernel[np.clip(offsets, 0, len(kernel) - 1)], 0.0)


def _decide_shape(
    area: float, errors: dict[str, float], fitted: dict[str, np.ndarray], weight: np.ndarray, noise: float
) -> str | None:
    """The best-fitting shape, or None when the fit is poor or the runner-up nearly as good.

    Poor: the error beyond what pixel noise of std ``noise`` (coverage units) explains exceeds
    MAX_SHAPE_ERROR. Nearly as good: the runner-up's error exceeds the best by less than
    MIN_SHAPE_MARGIN, or by less than SHAPE_Z standard deviations of what noise alone would make of
    the difference (the two fitted shapes differ by a vector v; noise moves the difference of
    squared errors by 2 * noise * |v|, divided by the area)."""
    (first, best), (runner_up, second) = sorted(errors.items(), key=lambda kv: kv[1])[:2]
    if not math.isfinite(best):
        return None
    noise_floor = noise * noise * float(weight.sum()) / area
    spread = (
        2 * noise * float(np.linalg.norm(np.where(weight, fitted[first] - fitted[runner_up], 0.0))) / area
    )
    if best - noise_floor > MAX_SHAPE_ERROR or second - best < max(MIN_SHAPE_MARGIN, SHAPE_Z * spread):
        return None
    return first


def _background(array: np.ndarray, smooth: np.ndarray) -> np.ndarray:
    """The image's background colour: the mean of the pixels that pass for background next to
    :data:`BACKGROUND` (in ``smooth``) and lie at least 2 px from anything else (in ``array``),
    when they are at least :data:`MIN_BACKGROUND` of the image, else BACKGROUND itself. A tinted
    image keeps its tint out of the coverage, and clipped noise its bias."""
    labels, _ = classify_pixels(smooth)
    far = ~_dilate(_dilate(labels != -1))
    if far.mean() < MIN_BACKGROUND:
        return np.asarray(BACKGROUND, dtype=np.float32)
    return array[far].astype(np.float32).mean(axis=0)


def _noise_level(labels: np.ndarray, coverage: np.ndarray) -> np.ndarray:
    """Per colour, the std of coverage on background pixels (robust: 1.4826 x median absolute
    deviation): the image's noise in coverage units. [C]"""
    background = coverage[labels == -1]  # [N, C]
    if background.shape[0] < 16:
        return np.zeros(len(COLOURS))
    deviation = np.abs(background - np.median(background, axis=0))
    return 1.4826 * np.median(deviation, axis=0)


def detect(image: Image.Image | np.ndarray) -> tuple[DetectedObject, ...] | None:
    """The objects of an image, largest first; None when the image is unreadable (too many pixels
    of colours the world does not have)."""
    array = to_array(image)
    h, w = array.shape[:2]
    # objects are found on a smoothed copy, where noise cannot cut them apart, and measured on
    # the image itself
    smooth = np.asarray(Image.fromarray(array).filter(ImageFilter.GaussianBlur(SMOOTH * min(h, w) / 32)))
    background = _background(array, smooth)
    labels, _ = classify_pixels(smooth, background=background)
    _, coverage = classify_pixels(array, background=background)
    if (labels == _UNKNOWN).mean() > MAX_UNKNOWN:
        return None
    noise = _noise_level(labels, coverage)
    ids = connected_components(labels)
    roots, inverse, areas = np.unique(ids.ravel(), return_inverse=True, return_counts=True)
    inverse = inverse.reshape(h, w)
    kept = [k for k in np.argsort(-areas, kind="stable") if roots[k] >= 0 and areas[k] >= MIN_AREA * h * w]
    is_object = np.isin(inverse, kept)
    sigmas = [s * min(h, w) / 32 for s in BLURS]
    pad = math.ceil(2 * max(sigmas)) + 1
    objects = []
    for k in kept:
        ys, xs = np.divmod(np.flatnonzero(inverse == k), w)
        label = int(labels.flat[roots[k]])
        # the object's box and the rim around it: [y0:y1, x0:x1]
        y0, y1 = max(0, ys.min() - pad), min(h, ys.max() + 1 + pad)
        x0, x1 = max(0, xs.min() - pad), min(w, xs.max() + 1 + pad)
        own = inverse[y0:y1, x0:x1] == k
        weight = _nearer(own, is_object[y0:y1, x0:x1] & ~own, steps=pad)
        if label == _UNKNOWN:
            colour, cover, sigma = None, own.astype(np.float64), 0.0
        else:
            colour, cover, sigma = COLOURS[label], coverage[y0:y1, x0:x1, label], float(noise[label])
        # padded, so that the shapes drawn on the centroid fit in the window
        weight = np.pad(weight, pad)
        area, errors, fitted = _fit_shapes(np.pad(cover.astype(np.float64), pad), weight, sigmas=sigmas)
        shape = _decide_shape(area, errors, fitted, weight, sigma)
        objects.append(
            DetectedObject(shape, colour, float(xs.mean() + 0.5), float(ys.mean() + 0.5), int(areas[k]))
        )
    return tuple(objects)


def _nearer(own: np.ndarray, other: np.ndarray, *, steps: int) -> np.ndarray:
    """The pixels at most ``steps`` (chessboard distance) from ``own`` and strictly nearer to it than
    to ``other``: an object's rim, without the blurred rims of its neighbours."""
    mine, theirs = own.copy(), other.copy()
    for _ in range(steps):
        free = ~(mine | theirs)
        grow_mine, grow_theirs = _dilate(mine) & free, _dilate(theirs) & free
        mine |= grow_mine & ~grow_theirs
        theirs |= grow_theirs
    return mine


def _dilate(mask: np.ndarray) -> np.ndarray:
    """3 x 3 binary dilation (rows, then columns)."""
    rows = mask.copy()
    rows[:, 1:] |= mask[:, :-1]
    rows[:, :-1] |= mask[:, 1:]
    out = rows.copy()
    out[1:] |= rows[:-1]
    out[:-1] |= rows[1:]
    return out


def relation_seen(a: DetectedObject, b: DetectedObject, relation: str, image_size: int) -> bool:
    """Whether "a <relation> b" holds between detected centroids: b lies at least MIN_SHIFT of the
    image side from a in the relation's direction, and further along it than across it."""
    along, across = relation_offsets(b.cx - a.cx, b.cy - a.cy, relation)
    return bool(along >= MIN_SHIFT * image_size and along > abs(across))


def _check_names(spec: SceneSpec) -> list[str]:
    names = []
    for g in spec.objects:
        names += [f"{g.colour} {g.shape} present", f"{g.colour} {g.shape} count == {g.count}"]
    if spec.relation is not None:
        a, b = spec.objects
        names.append(f"{a.colour} {a.shape} {spec.relation} {b.colour} {b.shape}")
    return [*names, "nothing else"]


def _evaluate(
    spec: SceneSpec, groups: Sequence[int], objects: Sequence[DetectedObject], size: int
) -> list[bool]:
    """The checks (in ``_check_names`` order) for one reading: ``groups[i]`` is the index of the
    prompt group object i belongs to, or -1 for none."""
    members = [[o for o, g in zip(objects, groups, strict=True) if g == i] for i in range(len(spec.objects))]
    values = []
    for g, found in zip(spec.objects, members, strict=True):
        values += [len(found) >= 1, len(found) == g.count]
    if spec.relation is not None:
        pairs = [(a, b) for a in members[0] for b in members[1]]
        values.append(bool(pairs) and all(relation_seen(a, b, spec.relation, size) for a, b in pairs))
    return [*values, all(g >= 0 for g in groups)]


def _readings(spec: SceneSpec, o: DetectedObject) -> list[int]:
    """The prompt groups an object could belong to (-1: none), given what is undecided about it."""
    colours = COLOURS if o.colour is None else (o.colour,)
    shapes = SHAPES if o.shape is None else (o.shape,)
    kinds = set(itertools.product(shapes, colours))
    groups = [i for i, g in enumerate(spec.objects) if (g.shape, g.colour) in kinds]
    others = len(kinds) > len(groups)
    return groups + [-1] * others


def judge(image: Image.Image | np.ndarray, spec_or_prompt: SceneSpec | str) -> Verdict:
    """Judge an image against a scene or a prompt of the grammar (rules: the module docstring)."""
    array = to_array(image)
    return judge_objects(detect(array), spec_or_prompt, image_size=min(array.shape[:2]))


def judge_objects(
    objects: Sequence[DetectedObject] | None, spec_or_prompt: SceneSpec | str, *, image_size: int
) -> Verdict:
    """Judge what :func:`detect` read from an image (None: unreadable) of side ``image_size`` px
    against a scene or a prompt: one reading, many prompts."""
    spec = as_scene(spec_or_prompt)
    names = _check_names(spec)
    if objects is None:
        return Verdict(spec, (), dict.fromkeys(names), None, 0.0, category(spec), readable=False)
    objects = tuple(objects)
    options = [_readings(spec, o) for o in objects]
    if math.prod(len(r) for r in options) > _MAX_READINGS:
        checks, correct = dict.fromkeys(names), None
    else:
        readings = itertools.product(*options)
        outcomes = {tuple(_evaluate(spec, groups, objects, image_size)) for groups in readings}
        checks = {n: _consensus(v[i] for v in outcomes) for i, n in enumerate(names)}
        correct = _consensus(all(v) for v in outcomes)
    score = sum(v is True for v in checks.values()) / len(checks)
    return Verdict(spec, objects, checks, correct, score, category(spec))


def _consensus(values: Iterable[bool]) -> bool | None:
    seen = set(values)
    return seen.pop() if len(seen) == 1 else None


# ---------------------------------------------------------------------------------------------
# failure kinds

FAILURE_KINDS = (
    "missing object",
    "wrong colour",
    "wrong shape",
    "wrong count",
    "swapped relation",
    "wrong relation",
    "extra object",
    "other",
    "undecidable",
    "unreadable",
)


def failure_kinds(verdict: Verdict) -> tuple[str, ...]:
    """Why an image is not right, as kinds of :data:`FAILURE_KINDS` (empty for a right image), read
    from its decided objects against the prompt's groups:

    - a group with none of its objects: "wrong colour" when an object of no group has the group's
      shape, else "wrong shape" when one has its colour (that object is then accounted for), else
      "missing object";
    - a group with some but not all (or too many) of its objects: "wrong count";
    - a relation that fails between present objects: "swapped relation" when every pair lies the
      other way round (the inverse relation's direction), else "wrong relation";
    - each object of no group not accounted for above: one "extra object" (counted once per image);
    - "other" when the image is wrong for none of these reasons (an undecided object that can be
      nothing the prompt asks for); "undecidable" / "unreadable" when the judge could not decide.
    """
    if not verdict.readable:
        return ("unreadable",)
    if verdict.correct is None:
        return ("undecidable",)
    if verdict.correct:
        return ()
    spec, kinds = verdict.spec, []
    decided = [o for o in verdict.objects if o.decided]
    members = [[o for o in decided if (o.shape, o.colour) == (g.shape, g.colour)] for g in spec.objects]
    strays = [o for o in decided if all(o not in found for found in members)]
    for group, found in zip(spec.objects, members, strict=True):
        if found:
            if len(found) != group.count:
                kinds.append("wrong count")
            continue
        for kind, same in (("wrong colour", "shape"), ("wrong shape", "colour")):
            match = next((o for o in strays if getattr(o, same) == getattr(group, same)), None)
            if match is not None:
                strays.remove(match)
                kinds.append(kind)
                break
        else:
            kinds.append("missing object")
    if spec.relation is not None and all(members) and verdict.checks.get(_check_names(spec)[-2]) is False:
        pairs = [(a, b) for a in members[0] for b in members[1]]
        inverse = [relation_offsets(b.cx - a.cx, b.cy - a.cy, spec.relation) for a, b in pairs]
        swapped = all(along < 0 and -along > abs(across) for along, across in inverse)
        kinds.append("swapped relation" if swapped else "wrong relation")
    if strays:
        kinds.append("extra object")
    return tuple(dict.fromkeys(kinds)) or ("other",)


def failure_counts(verdicts: Iterable[Verdict]) -> dict[str, Counter]:
    """Per category (in ``CATEGORIES`` order, those present): how many images show each failure
    kind (an image may show several), with ``"images"`` the category's number of images."""
    counts: dict[str, Counter] = {}
    for v in verdicts:
        counts.setdefault(v.category, Counter())["images"] += 1
        counts[v.category].update(failure_kinds(v))
    return {c: counts[c] for c in CATEGORIES if c in counts}


def failure_markdown(verdicts: Iterable[Verdict]) -> str:
    """A markdown table: per category, the share of its images that show each failure kind (kinds
    no image shows are left out)."""
    counts = failure_counts(verdicts)
    kinds = [k for k in FAILURE_KINDS if any(c[k] for c in counts.values())]
    lines = ["| category | images | " + " | ".join(kinds) + " |", "|---|---|" + "---|" * len(kinds)]
    for name, c in counts.items():
        cells = [f"{c[k] / c['images']:.2f}" if c[k] else "" for k in kinds]
        lines.append(f"| {name} | {c['images']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# aggregation


def wilson_interval(successes: int, n: int, *, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval for a binomial proportion (95% by default); (0, 1) when n = 0."""
    if n == 0:
        return 0.0, 1.0
    if not 0 <= successes <= n:
        raise ValueError(f"successes must lie in [0, n={n}], got {successes}")
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class CategoryStats:
    """Accuracy of one category: ``correct`` verdicts True out of ``n`` (undecidable ones count as
    not correct), with the 95% Wilson interval, and how many were undecidable."""

    n: int
    correct: int
    undecidable: int
    mean_score: float

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else float("nan")

    @property
    def interval(self) -> tuple[float, float]:
        return wilson_interval(self.correct, self.n)


@dataclass(frozen=True)
class Report:
    """Verdicts of many images, per category (in ``CATEGORIES`` order, those present) and overall."""

    verdicts: list[Verdict]
    per_category: dict[str, CategoryStats] = field(init=False)
    overall: CategoryStats = field(init=False)

    def __post_init__(self) -> None:
        by_category: dict[str, list[Verdict]] = {}
        for v in self.verdicts:
            by_category.setdefault(v.category, []).append(v)
        stats = {c: _stats(by_category[c]) for c in CATEGORIES if c in by_category}
        object.__setattr__(self, "per_category", stats)
        object.__setattr__(self, "overall", _stats(self.verdicts))

    @property
    def category_mean(self) -> float:
        """The mean of the per-category accuracies: GenEval's overall score, where every category
        weighs the same whatever its number of images (``overall`` weighs every image the same)."""
        return sum(s.accuracy for s in self.per_category.values()) / len(self.per_category)

    def to_markdown(self) -> str:
        """A markdown table: one row per category, one overall and the category mean."""
        lines = [
            "| category | n | accuracy | 95% CI | undecidable | mean score |",
            "|---|---|---|---|---|---|",
        ]
        for name, s in [*self.per_category.items(), ("overall", self.overall)]:
            lo, hi = s.interval
            cells = [
                name,
                s.n,
                f"{s.accuracy:.3f}",
                f"[{lo:.3f}, {hi:.3f}]",
                s.undecidable,
                f"{s.mean_score:.3f}",
            ]
            lines.append("| " + " | ".join(map(str, cells)) + " |")
        lines.append(f"| category mean | | {self.category_mean:.3f} | | | |")
        return "\n".join(lines)


def _stats(verdicts: Sequence[Verdict]) -> CategoryStats:
    n = len(verdicts)
    return CategoryStats(
        n=n,
        correct=sum(v.correct is True for v in verdicts),
        undecidable=sum(v.correct is None for v in verdicts),
        mean_score=sum(v.score for v in verdicts) / n if n else float("nan"),
    )


def judge_many(images: Iterable[Image.Image | np.ndarray], specs: Iterable[SceneSpec | str]) -> Report:
    """Judge images against their scenes or prompts, pairwise, and aggregate per category."""
    images, specs = list(images), list(specs)
    if len(images) != len(specs):
        raise ValueError(
            f"judge_many needs one scene per image, got {len(images)} images and {len(specs)} scenes"
        )
    return Report([judge(image, spec) for image, spec in zip(images, specs, strict=True)])


@dataclass(frozen=True)
class WinTieLoss:
    """Per-prompt comparison of two systems by verdict score."""

    wins: int
    ties: int
    losses: int

    @property
    def total(self) -> int:
        return self.wins + self.ties + self.losses


def outcome(a: Verdict, b: Verdict) -> str:
    """``"win"``, ``"tie"`` or ``"loss"`` of verdict ``a`` against ``b`` by score."""
    return "win" if a.score > b.score else "loss" if a.score < b.score else "tie"


def win_tie_loss(verdicts_a: Sequence[Verdict], verdicts_b: Sequence[Verdict]) -> WinTieLoss:
    """Count prompts where system A scores higher than B (win), the same (tie) or lower (loss).
    The two lists pair up by position and must be about the same scenes."""
    if len(verdicts_a) != len(verdicts_b):
        raise ValueError(
            f"win_tie_loss needs equal lists, got {len(verdicts_a)} and {len(verdicts_b)} verdicts"
        )
    outcomes: Counter[str] = Counter()
    for i, (a, b) in enumerate(zip(verdicts_a, verdicts_b, strict=True)):
        if a.spec != b.spec:
            raise ValueError(f"verdict {i} is about {describe(a.spec)!r} in A but {describe(b.spec)!r} in B")
        outcomes[outcome(a, b)] += 1
    return WinTieLoss(outcomes["win"], outcomes["tie"], outcomes["loss"])
