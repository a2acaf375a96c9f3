"""The scene grammar of ShapesWorld: what a prompt can say, and how scenes relate to one another.

A scene is one or two *groups* of identical objects (a shape, a colour and a count) and, between
two single objects, an optional spatial relation. Every scene has one canonical prompt
(:func:`describe`) and every prompt the grammar can say parses back (:func:`parse`)::

    a red circle                                  two green triangles
    a red circle and a blue square                two red circles and a yellow square
    a red circle to the left of a blue square     a yellow triangle above a green circle

The world's rules, checked when a :class:`SceneSpec` is built:

- shapes: circle, square, triangle; colours: red, green, blue, yellow; counts 1-3 per group;
- at most :data:`MAX_OBJECTS` (3) objects in a scene, so "three blue squares" has one group;
- the two groups of a scene differ in shape or colour ("a red circle and a red circle" is
  "two red circles");
- a relation ("left of", "right of", "above", "below") only between two groups of one object each.

Prompts are *exact*: "a red circle" means one red circle and nothing else (see ``judge.py``).

Categories, after GenEval's, each testing one skill (:func:`category`):

=============== ================================================================================
single_object   one object ("a red circle"): draw the right shape in the right colour.
counting        some group has two or three objects ("three blue squares", "two red circles and a
                yellow square"): draw exactly that many.
two_object      two single objects of one colour and different shapes ("a red circle and a red
                square"): draw two different objects; colour binding is not at stake.
colors          two single objects of one shape and different colours ("a red circle and a blue
                circle"): draw both colours on the same kind of object.
color_attr      two single objects that differ in shape and colour ("a red circle and a blue
                square"): bind each colour to its shape (a blue circle and a red square fails).
position        two single objects and a relation ("a red circle to the left of a blue square").
=============== ================================================================================

The categories partition the scenes: every scene is in exactly one.

Edits (:func:`edit_instruction`) say in short templated English what turns one scene into another
("make the red circle blue", "add a green square", "remove one blue triangle"); :func:`near_misses`
lists the scenes one edit away that do *not* satisfy a prompt (wrong answers for tests and
preference pairs).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np

SHAPES = ("circle", "square", "triangle")
COLOURS = ("red", "green", "blue", "yellow")
RELATIONS = ("left of", "right of", "above", "below")
CATEGORIES = ("single_object", "counting", "two_object", "colors", "color_attr", "position")
MAX_COUNT = 3
MAX_OBJECTS = 3

NO_CHANGE = "no change"

COUNT_WORDS = {1: "a", 2: "two", 3: "three"}
_COUNT_PARSE = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3}
_PLURALS = {shape: shape + "s" for shape in SHAPES}
_SINGULARS = {plural: shape for shape, plural in _PLURALS.items()}
RELATION_PHRASES = {
    "left of": "to the left of",
    "right of": "to the right of",
    "above": "above",
    "below": "below",
}
INVERSE_RELATIONS = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


@dataclass(frozen=True)
class ObjectSpec:
    """A group of ``count`` identical objects: a shape in a colour."""

    shape: str
    colour: str
    count: int = 1

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}: expected one of {SHAPES}")
        if self.colour not in COLOURS:
            raise ValueError(f"unknown colour {self.colour!r}: expected one of {COLOURS}")
        if not isinstance(self.count, int) or not 1 <= self.count <= MAX_COUNT:
            raise ValueError(f"count must be an integer from 1 to {MAX_COUNT}, got {self.count!r}")

    @property
    def noun(self) -> str:
        """The shape as the count wants it: "circle" or "circles"."""
        return self.shape if self.count == 1 else _PLURALS[self.shape]

    def phrase(self) -> str:
        """The group as an indefinite noun phrase: "a red circle", "two green triangles"."""
        return f"{COUNT_WORDS[self.count]} {self.colour} {self.noun}"

    def ref(self) -> str:
        """The group as a definite noun phrase: "the red circle", "the green triangles"."""
        return f"the {self.colour} {self.noun}"


@dataclass(frozen=True)
class SceneSpec:
    """One or two object groups and, between two single objects, an optional relation.

    ``SceneSpec((a, b), "left of")`` reads "a to the left of b". Lists are accepted for ``objects``
    and stored as a tuple.
    """

    objects: tuple[ObjectSpec, ...]
    relation: str | None = None

    def __post_init__(self) -> None:
        objects = tuple(self.objects)
        object.__setattr__(self, "objects", objects)
        if not 1 <= len(objects) <= 2:
            raise ValueError(f"a scene has one or two object groups, got {len(objects)}")
        if not all(isinstance(o, ObjectSpec) for o in objects):
            raise ValueError(f"scene objects must be ObjectSpec, got {objects!r}")
        total = sum(o.count for o in objects)
        said = " and ".join(repr(o.phrase()) for o in objects)
        if total > MAX_OBJECTS:
            raise ValueError(f"a scene holds at most {MAX_OBJECTS} objects, got {total} in {said}")
        kinds = {(o.shape, o.colour) for o in objects}
        if len(kinds) < len(objects):
            raise ValueError(
                f"the two groups must differ in shape or colour, got {said} (one group with a count says it)"
            )
        if self.relation is not None:
            if self.relation not in RELATIONS:
                raise ValueError(f"unknown relation {self.relation!r}: expected one of {RELATIONS}")
            if len(objects) != 2 or total != 2:
                raise ValueError(
                    f"a relation ({self.relation!r}) needs two groups of one object each, got {said}"
                )

    @property
    def num_objects(self) -> int:
        return sum(o.count for o in self.objects)


# ---------------------------------------------------------------------------------------------
# prompts


def describe(spec: SceneSpec) -> str:
    """The canonical prompt of a scene: "a red circle to the left of a blue square"."""
    phrases = [o.phrase() for o in spec.objects]
    if len(phrases) == 1:
        return phrases[0]
    joint = "and" if spec.relation is None else RELATION_PHRASES[spec.relation]
    return f"{phrases[0]} {joint} {phrases[1]}"


def parse(prompt: str) -> SceneSpec:
    """Read a prompt of the grammar back into its scene; ``parse(describe(s)) == s``.

    Case, extra whitespace and a trailing period are ignored; "a", "an" and "one" all mean one;
    relations may be said with or without "to the" ("left of", "to the left of"). Anything else
    raises a ValueError that names the offending word and the prompt.
    """
    if not isinstance(prompt, str):
        raise ValueError(f"a prompt must be a string, got {type(prompt).__name__}")
    words = prompt.strip().rstrip(".").lower().split()
    if not words:
        raise ValueError(f"empty prompt {prompt!r}")
    pos = 0

    def fail(expected: str) -> ValueError:
        if pos >= len(words):
            return ValueError(f"prompt {prompt!r} ends too early: expected {expected}")
        return ValueError(f"unexpected word {words[pos]!r} in prompt {prompt!r}: expected {expected}")

    def take_group() -> ObjectSpec:
        nonlocal pos
        if pos >= len(words) or words[pos] not in _COUNT_PARSE:
            raise fail("a count (a, an, one, two, three)")
        count = _COUNT_PARSE[words[pos]]
        pos += 1
        if pos >= len(words) or words[pos] not in COLOURS:
            raise fail(f"a colour ({', '.join(COLOURS)})")
        colour = words[pos]
        pos += 1
        nouns = SHAPES if count == 1 else tuple(_SINGULARS)
        if pos >= len(words) or words[pos] not in nouns:
            number = "singular" if count == 1 else "plural"
            raise fail(f"a {number} shape ({', '.join(nouns)})")
        shape = words[pos] if count == 1 else _SINGULARS[words[pos]]
        pos += 1
        return ObjectSpec(shape, colour, count)

    def take_relation() -> str | None:
        nonlocal pos
        if words[pos] == "and":
            pos += 1
            return None
        if words[pos] in ("above", "below"):
            pos += 1
            return words[pos - 1]
        if words[pos : pos + 2] == ["to", "the"]:
            pos += 2
        if pos + 1 < len(words) and words[pos] in ("left", "right") and words[pos + 1] == "of":
            pos += 2
            return f"{words[pos - 2]} of"
        raise fail("'and' or a relation (to the left of, to the right of, above, below)")

    groups = [take_group()]
    relation = None
    if pos < len(words):
        relation = take_relation()
        groups.append(take_group())
    if pos < len(words):
        raise fail("the end of the prompt")
    try:
        return SceneSpec(tuple(groups), relation)
    except ValueError as err:
        raise ValueError(f"prompt {prompt!r} breaks a rule of the world: {err}") from None


def as_scene(spec_or_prompt: SceneSpec | str) -> SceneSpec:
    """A scene from a scene or a prompt (parsed)."""
    if isinstance(spec_or_prompt, SceneSpec):
        return spec_or_prompt
    return parse(spec_or_prompt)


# ---------------------------------------------------------------------------------------------
# the whole grammar


def category(spec: SceneSpec) -> str:
    """The GenEval-style category of a scene (see the module docstring for what each tests)."""
    if spec.relation is not None:
        return "position"
    if any(o.count > 1 for o in spec.objects):
        return "counting"
    if len(spec.objects) == 1:
        return "single_object"
    a, b = spec.objects
    if a.colour == b.colour:
        return "two_object"
    if a.shape == b.shape:
        return "colors"
    return "color_attr"


@functools.cache
def _all_scenes() -> tuple[SceneSpec, ...]:
    singles = [ObjectSpec(s, c) for s in SHAPES for c in COLOURS]
    scenes = [replace(o, count=n) for n in range(1, MAX_COUNT + 1) for o in singles]
    scenes = [SceneSpec((o,)) for o in scenes]
    for a, b in itertools.permutations(singles, 2):
        for na, nb in itertools.product(range(1, MAX_COUNT + 1), repeat=2):
            if na + nb <= MAX_OBJECTS:
                scenes.append(SceneSpec((replace(a, count=na), replace(b, count=nb))))
        scenes.extend(SceneSpec((a, b), r) for r in RELATIONS)
    return tuple(scenes)


def all_scenes() -> list[SceneSpec]:
    """Every scene of the grammar (960), in a fixed order: single groups by count, shape and
    colour, then ordered pairs of groups with their counts and relations. Both orders of a pair are
    listed ("a red circle and a blue square", "a blue square and a red circle"): each is a prompt
    of its own, though they describe the same scenes."""
    return list(_all_scenes())


@functools.cache
def _scenes_by_category() -> dict[str, tuple[SceneSpec, ...]]:
    return {c: tuple(s for s in _all_scenes() if category(s) == c) for c in CATEGORIES}


def sample_scene(rng: np.random.Generator, *, categories: Sequence[str] | None = None) -> SceneSpec:
    """A random scene: a category drawn uniformly from ``categories`` (all six by default), then a
    scene drawn uniformly from that category. Deterministic given the generator's state."""
    names = CATEGORIES if categories is None else tuple(categories)
    unknown = [c for c in names if c not in CATEGORIES]
    if unknown or not names:
        raise ValueError(f"categories must be a non-empty list from {CATEGORIES}, got {list(names)}")
    pool = _scenes_by_category()[names[int(rng.integers(len(names)))]]
    return pool[int(rng.integers(len(pool)))]


# ---------------------------------------------------------------------------------------------
# relations between scenes


def _meaning(spec: SceneSpec) -> tuple[frozenset[ObjectSpec], tuple[ObjectSpec, str, ObjectSpec] | None]:
    """What a scene asks of an image, independent of word order: its groups, and its relation
    stated as left-of or above (so "b right of a" and "a left of b" are one meaning)."""
    relation = None
    if spec.relation is not None:
        a, b = spec.objects
        relation = (a, spec.relation, b)
        if spec.relation in ("right of", "below"):
            relation = (b, INVERSE_RELATIONS[spec.relation], a)
    return frozenset(spec.objects), relation


def implies(source: SceneSpec, target: SceneSpec) -> bool:
    """Whether every image of ``source`` is an image of ``target``: the same groups, and ``target``
    has no relation or the same one (in either word order). "a red circle left of a blue square"
    implies "a blue square and a red circle" but not the other way round."""
    groups_s, relation_s = _meaning(source)
    groups_t, relation_t = _meaning(target)
    return groups_s == groups_t and (relation_t is None or relation_t == relation_s)


def _scene(objects: Sequence[ObjectSpec], relation: str | None = None) -> SceneSpec | None:
    try:
        return SceneSpec(tuple(objects), relation)
    except ValueError:
        return None


def _edits(source: SceneSpec) -> Iterator[tuple[str, str, SceneSpec]]:
    """Every single edit of a scene as (kind, instruction, edited scene), in a fixed order: the
    kinds as :func:`edit_instruction` lists them, each over the groups in order. Edits that break a
    rule of the world are skipped."""
    objs = source.objects

    def with_group(i: int, new: ObjectSpec, relation: str | None = source.relation) -> SceneSpec | None:
        return _scene((*objs[:i], new, *objs[i + 1 :]), relation)

    for g_index, g in enumerate(objs):
        for c in COLOURS:
            if c != g.colour and (s := with_group(g_index, replace(g, colour=c))) is not None:
                yield "recolour", f"make {g.ref()} {c}", s
    for g_index, g in enumerate(objs):
        for shape in SHAPES:
            new = replace(g, shape=shape)
            if shape != g.shape and (s := with_group(g_index, new)) is not None:
                into = f"a {shape}" if g.count == 1 else new.noun
                yield "reshape", f"change {g.ref()} into {into}", s
    for g_index, g in enumerate(objs):
        for n in range(1, MAX_COUNT + 1):
            # more or fewer objects leave no room for a relation (it needs single objects)
            if n == g.count or (s := with_group(g_index, replace(g, count=n), None)) is None:
                continue
            delta = replace(g, count=abs(n - g.count))
            word = "one" if delta.count == 1 else COUNT_WORDS[delta.count]
            verb = "add" if n > g.count else "remove"
            more = " more" if n > g.count else ""
            yield "count", f"{verb} {word}{more} {g.colour} {delta.noun}", s
    if len(objs) == 1:
        (g,) = objs
        for shape, c, n in itertools.product(SHAPES, COLOURS, range(1, MAX_COUNT + 1)):
            new = ObjectSpec(shape, c, n)
            if (s := _scene((g, new))) is not None:
                yield "add", f"add {new.phrase()}", s
            for r in RELATIONS:
                if (s := _scene((new, g), r)) is not None:
                    yield "add", f"add {new.phrase()} {RELATION_PHRASES[r]} {g.ref()}", s
    if len(objs) == 2:
        for g_index, g in enumerate(objs):
            yield "remove", f"remove {g.ref()}", SceneSpec((objs[1 - g_index],))
        for a, b in (objs, objs[::-1]):
            for r in RELATIONS:
                if (s := _scene((a, b), r)) is not None and not implies(source, s):
                    yield "move", f"move {a.ref()} {RELATION_PHRASES[r]} {b.ref()}", s
    for g_index, g in enumerate(objs):
        for shape, c in itertools.product(SHAPES, COLOURS):
            new = ObjectSpec(shape, c, g.count)
            if shape != g.shape and c != g.colour and (s := with_group(g_index, new)) is not None:
                yield "replace", f"replace {g.ref()} with {new.phrase()}", s


def edit_instruction(source: SceneSpec, target: SceneSpec) -> str:
    """Short templated English that turns scene ``source`` into scene ``target``.

    Single edits are tried in this order of kinds; the first kind with an edit whose result
    satisfies ``target`` (see :func:`implies`) wins, and within it the edit that gives ``target``
    word for word, else the first:

    - recolour: "make the red circle blue", "make the red circles blue"
    - reshape: "change the red square into a triangle", "change the red squares into triangles"
    - count: "add one more red circle", "remove two blue triangles" (a relation is dropped)
    - add a group: "add a green square", "add a green square to the left of the red circle"
    - remove a group: "remove the green square"
    - move: "move the red circle to the left of the blue square"
    - replace a group: "replace the red circle with a blue square"

    Objects of ``source`` are always named by colour and shape, which is unambiguous. When
    ``source`` already satisfies ``target`` the answer is :data:`NO_CHANGE`; when no single edit
    will do, "replace <the source's objects> with <target's prompt>".
    """
    if implies(source, target):
        return NO_CHANGE
    winning_kind, candidates = None, []
    for kind, text, edited in _edits(source):
        if winning_kind is not None and kind != winning_kind:
            break
        if implies(edited, target):
            winning_kind = kind
            candidates.append((text, edited))
    if candidates:
        exact = [text for text, edited in candidates if edited == target]
        return exact[0] if exact else candidates[0][0]
    refs = " and ".join(o.ref() for o in source.objects)
    return f"replace {refs} with {describe(target)}"


def near_misses(spec: SceneSpec) -> list[SceneSpec]:
    """The scenes one edit away from ``spec`` (recolour, reshape, count, add, remove or move a
    group) that differ from it in what they ask, in a fixed order, one scene per meaning ("a left of
    b" stands for "b right of a"). No render of ``spec`` satisfies any of them and no render of
    them satisfies ``spec``: a judge must reject both ways round.
    """
    seen: dict[object, SceneSpec] = {}
    for kind, _, edited in _edits(spec):
        if kind != "replace" and not implies(edited, spec):
            seen.setdefault(_meaning(edited), edited)
    return list(seen.values())
