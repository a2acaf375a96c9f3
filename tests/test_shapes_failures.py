"""Failure kinds: why the judge found an image wrong, per image and per category."""

from __future__ import annotations

import pytest

from img_guidance.shapes.judge import (
    DetectedObject,
    failure_counts,
    failure_kinds,
    failure_markdown,
    judge,
    judge_objects,
)
from img_guidance.shapes.render import render


def obj(colour, shape, cx=8.0, cy=16.0):
    return DetectedObject(shape=shape, colour=colour, cx=cx, cy=cy, area=40)


@pytest.mark.parametrize(
    ("prompt", "objects", "kinds"),
    [
        ("a red circle", [obj("red", "circle")], ()),
        ("a red circle", [], ("missing object",)),
        ("a red circle", [obj("blue", "circle")], ("wrong colour",)),
        ("a red circle", [obj("red", "square")], ("wrong shape",)),
        ("a red circle", [obj("red", "circle"), obj("blue", "square", cx=24)], ("extra object",)),
        ("three red circles", [obj("red", "circle"), obj("red", "circle", cx=24)], ("wrong count",)),
        ("two red circles", [obj("red", "circle", cx=x) for x in (4, 14, 24)], ("wrong count",)),
        # the blue circle is accounted for as the red circle in the wrong colour, not as an extra object
        (
            "a red circle and a green square",
            [obj("blue", "circle"), obj("green", "square", cx=24)],
            ("wrong colour",),
        ),
        (
            "a red circle to the left of a green square",
            [obj("red", "circle", cx=24), obj("green", "square", cx=6)],
            ("swapped relation",),
        ),
        (
            "a red circle to the left of a green square",
            [obj("red", "circle", cx=16, cy=4), obj("green", "square", cx=16, cy=26)],
            ("wrong relation",),
        ),
        (
            "a red circle to the left of a green square",
            [obj("red", "circle", cx=6), obj("yellow", "triangle", cx=26)],
            ("missing object", "extra object"),
        ),
    ],
)
def test_failure_kinds_name_what_is_wrong(prompt, objects, kinds):
    verdict = judge_objects(objects, prompt, image_size=32)
    assert failure_kinds(verdict) == kinds
    assert (verdict.correct is True) == (kinds == ())


def test_an_unreadable_or_undecidable_image_says_so():
    assert failure_kinds(judge_objects(None, "a red circle", image_size=32)) == ("unreadable",)
    undecided = DetectedObject(shape=None, colour="red", cx=8, cy=16, area=40)  # a red circle or not
    verdict = judge_objects([undecided], "a red circle", image_size=32)
    assert verdict.correct is None and failure_kinds(verdict) == ("undecidable",)


def test_failure_counts_per_category_on_real_renders():
    from img_guidance.shapes.grammar import parse

    right = judge(render(parse("a red circle"), seed=0), "a red circle")
    colour = judge(render(parse("a blue circle"), seed=0), "a red circle")
    count = judge(render(parse("two red circles"), seed=1), "three red circles")
    counts = failure_counts([right, colour, count])
    assert list(counts) == ["single_object", "counting"]
    assert counts["single_object"]["images"] == 2 and counts["single_object"]["wrong colour"] == 1
    assert counts["counting"]["images"] == 1 and counts["counting"]["wrong count"] == 1
    table = failure_markdown([right, colour, count])
    assert table.splitlines()[0] == "| category | images | wrong colour | wrong count |"
    assert "| single_object | 2 | 0.50 |  |" in table
