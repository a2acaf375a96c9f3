"""The nearest correct scene to a wrong image (shapes.correct) and the placement helpers it uses."""

from __future__ import annotations

import numpy as np
import pytest

from img_guidance.shapes.correct import CANONICAL_SEED, Correction, corrected_layout
from img_guidance.shapes.judge import detect, failure_kinds, judge
from img_guidance.shapes.render import PlacedObject, draw, fits, layout, place_object, relation_holds


def _fix(objects: list[PlacedObject], prompt: str):
    """The correction of an image drawn from ``objects``, and that image's verdict."""
    image = draw(objects)
    verdict = judge(image, prompt)
    return corrected_layout(detect(image), prompt), verdict


def _near(a: PlacedObject, b: PlacedObject, tol: float = 1.0) -> bool:
    return abs(a.cx - b.cx) <= tol and abs(a.cy - b.cy) <= tol


def test_a_wrong_colour_is_recoloured_in_place():
    drawn = [PlacedObject("circle", "blue", 9, 10, 10), PlacedObject("square", "green", 23, 21, 9)]
    fix, verdict = _fix(drawn, "a red circle and a green square")
    assert failure_kinds(verdict) == ("wrong colour",)
    assert fix.kept == 2
    by_shape = {o.shape: o for o in fix.objects}
    assert by_shape["circle"].colour == "red" and _near(by_shape["circle"], drawn[0])
    assert by_shape["square"].colour == "green" and _near(by_shape["square"], drawn[1])
    assert abs(by_shape["square"].size - 9) < 1.0  # a square's size is read back from its area


def test_a_swapped_relation_swaps_places():
    drawn = [PlacedObject("circle", "red", 24, 16, 9), PlacedObject("square", "blue", 8, 16, 9)]
    fix, verdict = _fix(drawn, "a red circle to the left of a blue square")
    assert failure_kinds(verdict) == ("swapped relation",)
    circle, square = fix.objects
    assert fix.kept == 2
    assert _near(circle, PlacedObject("circle", "red", 8, 16, 9)) and _near(square, drawn[0])
    assert relation_holds(circle, square, "left of")


def test_an_extra_object_goes_and_a_missing_one_is_added():
    triangle = PlacedObject("triangle", "green", 9, 10, 10)
    extra, verdict = _fix([triangle, PlacedObject("circle", "yellow", 24, 24, 8)], "a green triangle")
    assert failure_kinds(verdict) == ("extra object",)
    assert extra.kept == 1 and len(extra.objects) == 1 and _near(extra.objects[0], triangle)
    missing, verdict = _fix([triangle], "two green triangles")
    assert failure_kinds(verdict) == ("wrong count",)
    assert missing.kept == 1 and len(missing.objects) == 2
    assert all((o.shape, o.colour) == ("triangle", "green") for o in missing.objects)
    assert _near(missing.objects[0], triangle)  # the right triangle stays where it was


def test_an_object_of_no_group_becomes_the_one_that_is_missing_in_its_place():
    """Changing both attributes of an object in place is the smallest fix when one is missing."""
    drawn = [PlacedObject("triangle", "green", 9, 10, 10), PlacedObject("circle", "yellow", 24, 24, 8)]
    fix, _ = _fix(drawn, "two green triangles")
    assert fix.kept == 2 and all((o.shape, o.colour) == ("triangle", "green") for o in fix.objects)
    assert _near(fix.objects[0], PlacedObject("", "", 24, 24, 8), tol=1.5)


def test_an_unreadable_or_blank_image_gets_the_canonical_layout():
    canonical = layout("a red square", seed=CANONICAL_SEED)
    assert corrected_layout(None, "a red square") == Correction(canonical, 0)
    assert corrected_layout((), "a red square") == Correction(canonical, 0)


def test_a_relation_that_swapping_cannot_fix_keeps_one_place_and_moves_the_other():
    """The triangle sits far below-right of the square: swapped, the two would still be too far
    apart sideways for "above", and neither can go above or below the other where it is; so after the
    swap the square moves below the triangle, to the free place nearest where it was."""
    drawn = [PlacedObject("square", "red", 9, 10, 9), PlacedObject("triangle", "yellow", 26, 25, 9)]
    fix, verdict = _fix(drawn, "a yellow triangle above a red square")
    assert failure_kinds(verdict) == ("wrong relation",)
    triangle, square = fix.objects
    assert fix.kept == 1 and relation_holds(triangle, square, "above")
    assert _near(triangle, drawn[0], 1.5)  # on the square's old place
    expected = place_object(
        "square", "red", square.size, [triangle], rng=None, relation="above", anchor=triangle, near=(26, 25)
    )
    assert square == expected


@pytest.mark.parametrize("seed", range(12))
def test_every_correction_is_judged_right_and_deterministic(seed):
    """Wrong images made by drawing one scene's layout under another scene's kinds: whatever the
    correction keeps, the result satisfies the prompt, and the same image gives the same result."""
    rng = np.random.default_rng(seed)
    prompts = [
        "a red circle above a blue triangle",
        "three yellow squares",
        "a green circle and a red square",
    ]
    prompt = prompts[seed % 3]
    wrong_scene = ["a blue circle below a red triangle", "two yellow circles", "a green square"][
        (seed + 1) % 3
    ]
    image = draw(layout(wrong_scene, seed=rng))
    first = corrected_layout(detect(image), prompt)
    assert judge(draw(first.objects), prompt).correct is True
    assert corrected_layout(detect(image), prompt) == first


def test_place_object_keeps_the_rules_and_the_relation_either_way():
    rng = np.random.default_rng(0)
    for anchor_first, cy in ((True, 10), (False, 22)):  # "anchor above it" needs room below, and so on
        anchor = PlacedObject("square", "red", 16, cy, 9)
        for _ in range(20):
            o = place_object(
                "circle",
                "blue",
                9,
                [anchor],
                rng=rng,
                relation="above",
                anchor=anchor,
                anchor_first=anchor_first,
            )
            assert o is not None and fits(o, [anchor])
            first, second = (anchor, o) if anchor_first else (o, anchor)
            assert relation_holds(first, second, "above")
    # no room: nothing fits left of an object at the left edge
    wide = PlacedObject("square", "red", 6, 16, 8)
    assert (
        place_object(
            "circle", "blue", 11, [wide], rng=rng, relation="left of", anchor=wide, anchor_first=False
        )
        is None
    )


def test_place_object_without_rng_takes_the_free_place_nearest_the_point():
    a = PlacedObject("square", "red", 16, 16, 8)
    centre = place_object("circle", "blue", 8, [a], rng=None)
    corner = place_object("circle", "blue", 8, [a], rng=None, near=(0, 0))
    assert fits(centre, [a]) and fits(corner, [a])
    assert (corner.cx, corner.cy) == (5.0, 5.0)  # the corner: size / 2 + border from both edges
    assert abs(centre.cx - 16) + abs(centre.cy - 16) <= 11.5  # right next to the square in the middle
    assert place_object("circle", "blue", 8, [a], rng=None) == centre


def test_fits_checks_border_and_gap():
    assert fits(PlacedObject("square", "red", 16, 16, 10), [])
    assert not fits(PlacedObject("square", "red", 5, 16, 10), [])  # box edge at 0 < border 1
    a = PlacedObject("square", "red", 8, 16, 8)
    assert not fits(PlacedObject("square", "blue", 18, 16, 8), [a])  # boxes 2 px apart < gap 3
    assert fits(PlacedObject("square", "blue", 19, 16, 8), [a])
