"""ShapesWorld: the grammar, the renderer and the oracle judge (numpy + PIL only, a few seconds)."""

import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from img_guidance.shapes import (
    BACKGROUND,
    CATEGORIES,
    NO_CHANGE,
    PALETTE,
    ObjectSpec,
    PlacedObject,
    SceneSpec,
    all_scenes,
    category,
    degrade,
    describe,
    detect,
    draw,
    edit_instruction,
    implies,
    judge_many,
    judge_objects,
    layout,
    near_misses,
    parse,
    render_with_layout,
    sample_scene,
    wilson_interval,
    win_tie_loss,
)
from img_guidance.shapes.judge import judge
from img_guidance.shapes.render import GAP, MAX_SIZE, MIN_SIZE, relation_holds, render

SCENES = all_scenes()
# a third of the grammar, every category in it: 320 scenes
SAMPLE = SCENES[::3]


def blank(size: int = 32) -> np.ndarray:
    return np.full((size, size, 3), BACKGROUND, dtype=np.uint8)


# ---------------------------------------------------------------------------------------------
# grammar


def test_all_scenes_round_trip_through_their_prompts():
    prompts = [describe(s) for s in SCENES]
    assert len(SCENES) == 960 and len(set(prompts)) == len(prompts)
    assert [parse(p) for p in prompts] == SCENES
    assert all_scenes() == SCENES  # a fixed order


def test_categories_partition_the_grammar():
    counts = Counter(category(s) for s in SCENES)
    assert counts == {
        "single_object": 12,
        "counting": 288,
        "two_object": 24,
        "colors": 36,
        "color_attr": 72,
        "position": 528,
    }
    examples = {
        "a red circle": "single_object",
        "three blue squares": "counting",
        "two red circles and a yellow square": "counting",
        "a red circle and a red square": "two_object",
        "a red circle and a blue circle": "colors",
        "a red circle and a blue square": "color_attr",
        "a yellow triangle above a green circle": "position",
    }
    assert {p: category(parse(p)) for p in examples} == examples


@pytest.mark.parametrize(
    ("prompt", "canonical"),
    [
        ("A Red Circle.", "a red circle"),
        ("  two   GREEN triangles  ", "two green triangles"),
        ("one blue square", "a blue square"),
        ("an yellow circle.", "a yellow circle"),
        ("a red circle left of a blue square", "a red circle to the left of a blue square"),
        ("A yellow triangle Above a green circle.", "a yellow triangle above a green circle"),
    ],
)
def test_parse_is_tolerant(prompt, canonical):
    assert describe(parse(prompt)) == canonical


@pytest.mark.parametrize(
    ("prompt", "named"),
    [
        ("a purple circle", "'purple'"),
        ("a red hexagon", "'hexagon'"),
        ("two red circle", "'circle'"),
        ("a red circles", "'circles'"),
        ("four red circles", "'four'"),
        ("a red circle next to a blue square", "'next'"),
        ("a red circle and a blue square please", "'please'"),
        ("a red circle and", "ends too early"),
        ("", "empty prompt"),
        ("a red circle and a red circle", "differ in shape or colour"),
        ("two red circles to the left of a blue square", "two groups of one object each"),
        ("three red circles and a blue square", "at most 3 objects"),
    ],
)
def test_parse_errors_name_the_offending_word(prompt, named):
    with pytest.raises(ValueError, match="prompt") as err:
        parse(prompt)
    assert named in str(err.value)


def test_specs_check_their_values():
    with pytest.raises(ValueError, match="'hexagon'"):
        ObjectSpec("hexagon", "red")
    with pytest.raises(ValueError, match="'purple'"):
        ObjectSpec("circle", "purple")
    with pytest.raises(ValueError, match="got 4"):
        ObjectSpec("circle", "red", 4)
    with pytest.raises(ValueError, match="'next to'"):
        SceneSpec((ObjectSpec("circle", "red"), ObjectSpec("square", "red")), "next to")
    assert SceneSpec([ObjectSpec("circle", "red")]).objects == (ObjectSpec("circle", "red"),)


def test_sample_scene_is_seeded_and_keeps_to_its_categories():
    draws = [sample_scene(np.random.default_rng(3)) for _ in range(2)]
    assert draws[0] == draws[1]
    rng = np.random.default_rng(0)
    picked = [sample_scene(rng, categories=["colors", "position"]) for _ in range(200)]
    assert {category(s) for s in picked} == {"colors", "position"}
    everything = Counter(category(sample_scene(rng)) for _ in range(600))
    assert set(everything) == set(CATEGORIES) and min(everything.values()) > 60  # uniform over categories
    with pytest.raises(ValueError, match="counting_objects"):
        sample_scene(rng, categories=["counting_objects"])


def test_implies_reads_relations_in_either_order():
    left = parse("a red circle to the left of a blue square")
    assert implies(left, parse("a blue square to the right of a red circle"))
    assert implies(left, parse("a blue square and a red circle"))
    assert not implies(parse("a red circle and a blue square"), left)
    assert not implies(left, parse("a red circle above a blue square"))


@pytest.mark.parametrize(
    ("source", "target", "instruction"),
    [
        ("a red circle", "a blue circle", "make the red circle blue"),
        ("two red squares", "two red triangles", "change the red squares into triangles"),
        ("a red square", "a red triangle", "change the red square into a triangle"),
        ("a green square", "three green squares", "add two more green squares"),
        ("three blue triangles", "two blue triangles", "remove one blue triangle"),
        ("a red circle", "a red circle and a green square", "add a green square"),
        (
            "a red circle",
            "a green square to the left of a red circle",
            "add a green square to the left of the red circle",
        ),
        ("a red circle and a green square", "a green square", "remove the red circle"),
        (
            "a red circle and a blue square",
            "a red circle to the left of a blue square",
            "move the red circle to the left of the blue square",
        ),
        (
            "a red circle above a blue square",
            "a blue square above a red circle",
            "move the blue square above the red circle",
        ),
        (
            "a red circle to the left of a blue square",
            "a green circle to the left of a blue square",
            "make the red circle green",
        ),
        (
            "a red circle to the left of a blue square",
            "a blue square to the right of a red circle",
            NO_CHANGE,
        ),
        ("a red circle to the left of a blue square", "a red circle and a blue square", NO_CHANGE),
        ("a red circle", "a blue square", "replace the red circle with a blue square"),
        (
            "a red circle and a blue square",
            "two yellow triangles",
            "replace the red circle and the blue square with two yellow triangles",
        ),
    ],
)
def test_edit_instruction_examples(source, target, instruction):
    assert edit_instruction(parse(source), parse(target)) == instruction


def test_near_misses_are_one_edit_away_and_wrong():
    spec = parse("a red circle to the left of a blue square")
    misses = near_misses(spec)
    prompts = {describe(m) for m in misses}
    assert {
        "a blue circle to the left of a blue square",
        "a red circle to the right of a blue square",
    } <= prompts
    assert {
        "two red circles and a blue square",
        "a red circle",
        "a red square to the left of a blue square",
    } <= prompts
    assert "a blue square to the right of a red circle" not in prompts  # the same scene, said the other way
    for m in misses:
        assert edit_instruction(m, spec) != NO_CHANGE
    for spec in SAMPLE:
        for m in near_misses(spec):
            assert not implies(m, spec) and not implies(spec, m), (describe(spec), describe(m))
            # and a render of a scene without a relation cannot satisfy one by chance
            assert spec.relation is not None or set(spec.objects) != set(m.objects)


# ---------------------------------------------------------------------------------------------
# renderer


def test_render_is_deterministic_and_sized():
    spec = parse("two green triangles and a red square")
    first = render(spec, seed=7)
    assert first.mode == "RGB" and first.size == (32, 32)
    assert np.array_equal(np.asarray(first), np.asarray(render(describe(spec), seed=7)))
    assert np.array_equal(np.asarray(first), np.asarray(render(spec, seed=np.random.default_rng(7))))
    assert not np.array_equal(np.asarray(first), np.asarray(render(spec, seed=8)))
    assert render(spec, seed=7, size=48).size == (48, 48)
    with pytest.raises(ValueError, match="at least 16"):
        render(spec, seed=0, size=8)


def test_same_seed_keeps_the_layout_when_only_colours_or_shapes_change():
    """Renders of a scene and of its recoloured or reshaped edit differ only where the edit is."""
    a = layout(parse("a red circle to the left of a blue square"), seed=5)
    b = layout(parse("a green triangle to the left of a blue square"), seed=5)
    assert [(o.cx, o.cy, o.size) for o in a] == [(o.cx, o.cy, o.size) for o in b]


def test_layouts_keep_relations_gaps_sizes_and_counts():
    for i, spec in enumerate(SAMPLE):
        for size in (32, 40):
            _, objects = render_with_layout(spec, seed=i, size=size)
            assert Counter((o.shape, o.colour) for o in objects) == Counter(
                {(g.shape, g.colour): g.count for g in spec.objects}
            )
            for o in objects:
                assert MIN_SIZE * size <= o.size <= MAX_SIZE * size
                assert o.cx - o.size / 2 >= 1 and o.cx + o.size / 2 <= size - 1
                assert o.cy - o.size / 2 >= 1 and o.cy + o.size / 2 <= size - 1
            for j, p in enumerate(objects):
                for q in objects[j + 1 :]:
                    reach = (p.size + q.size) / 2 + GAP * size - 1e-9
                    assert abs(p.cx - q.cx) >= reach or abs(p.cy - q.cy) >= reach, (describe(spec), p, q)
            if spec.relation is not None:
                assert relation_holds(objects[0], objects[1], spec.relation), (describe(spec), objects)


def test_draw_paints_palette_colours_on_the_background():
    image = np.asarray(draw([PlacedObject("square", "blue", 16.0, 16.0, 10.0)], size=32))
    assert tuple(image[0, 0]) == BACKGROUND
    assert tuple(image[16, 16]) == PALETTE["blue"]
    assert (np.all(image == PALETTE["blue"], axis=-1)).sum() == 100  # a 10 px square on the pixel grid


# ---------------------------------------------------------------------------------------------
# judge


def test_judge_is_right_about_renders():
    clean = [judge(render(s, seed=i), s) for i, s in enumerate(SAMPLE)]
    assert sum(v.correct is True for v in clean) >= 0.99 * len(SAMPLE)
    assert not any(v.correct is False for v in clean)
    assert all(v.score == 1.0 for v in clean if v.correct)
    rng = np.random.default_rng(0)
    noisy = [
        judge(degrade(render(s, seed=i), rng=rng, noise=15, blur=0.8), s) for i, s in enumerate(SAMPLE[::2])
    ]
    assert sum(v.correct is True for v in noisy) >= 0.97 * len(noisy)
    assert not any(v.correct is False for v in noisy)


def test_judge_reads_objects_where_the_renderer_put_them():
    image, placed = render_with_layout(parse("a red circle to the left of a blue square"), seed=3)
    found = detect(image)
    assert [(o.colour, o.shape) for o in sorted(found, key=lambda o: o.cx)] == [
        ("red", "circle"),
        ("blue", "square"),
    ]
    for o in found:
        p = next(p for p in placed if p.colour == o.colour)
        assert abs(o.cx - p.cx) < 0.5 and abs(o.cy - p.cy) < 0.5


@pytest.mark.parametrize(
    ("rendered", "prompt", "failing"),
    [
        ("a red circle", "a blue circle", "blue circle present"),  # colour swap
        ("a red circle", "a red square", "red square present"),  # shape swap
        ("two red circles", "three red circles", "red circle count == 3"),  # one too few
        ("three red circles", "two red circles", "red circle count == 2"),  # one too many
        (
            "a red circle and a blue square",
            "a blue circle and a red square",
            "blue circle present",
        ),  # binding
        ("a red circle to the left of a blue square", "a red circle to the right of a blue square", None),
        ("a yellow triangle above a green circle", "a yellow triangle below a green circle", None),
        ("a red circle and a blue square", "a red circle", "nothing else"),  # an extra object
        ("a red circle", "a red circle and a blue square", "blue square present"),  # a missing object
    ],
)
def test_judge_rejects_mismatched_prompts(rendered, prompt, failing):
    for seed in range(5):
        verdict = judge(render(rendered, seed=seed), prompt)
        assert verdict.correct is False and verdict.score < 1
        if failing is None:  # the relation's check
            failing = next(name for name in verdict.checks if parse(prompt).relation in name)
        assert verdict.checks[failing] is False


def test_judge_never_accepts_a_near_miss():
    accepted = []
    for i, spec in enumerate(SAMPLE[::4]):
        image = render(spec, seed=i)
        objects = detect(image)
        for miss in near_misses(spec):
            if judge_objects(objects, miss, image_size=32).correct is not False:
                accepted.append((describe(spec), describe(miss)))
    assert accepted == []


def test_unreadable_image_is_undecidable():
    verdict = judge(Image.new("RGB", (32, 32), (128, 128, 128)), "a red circle")
    assert verdict.readable is False and verdict.correct is None and verdict.score == 0
    assert set(verdict.checks.values()) == {None}


def test_blank_image_is_a_decided_no():
    verdict = judge(blank(), "a red circle")
    assert verdict.readable and verdict.objects == ()
    assert verdict.correct is False and verdict.checks["red circle present"] is False


def test_ambiguous_blobs_leave_checks_undecided_not_guessed():
    rectangle = blank()
    rectangle[10:16, 4:20] = PALETTE["red"]  # 2:1, neither circle, square nor triangle
    (blob,) = detect(rectangle)
    assert blob.colour == "red" and blob.shape is None
    maybe = judge(rectangle, "a red square")
    assert maybe.correct is None and maybe.checks["red square present"] is None
    assert judge(rectangle, "a blue square").correct is False  # whatever its shape, it is not blue

    orange = blank()
    orange[8:18, 8:18] = (230, 130, 40)  # between red and yellow
    (blob,) = detect(orange)
    assert blob.colour is None and blob.shape == "square"
    assert judge(orange, "a red square").correct is None
    assert judge(orange, "a red circle").correct is False  # whatever its colour, it is not a circle

    touching = draw([PlacedObject("circle", "red", 10, 16, 10), PlacedObject("circle", "red", 19.5, 16, 10)])
    (blob,) = detect(touching)
    assert blob.shape is None  # one blob is one object at most
    assert judge(touching, "two red circles").checks["red circle count == 2"] is False


def test_judge_checks_its_input():
    with pytest.raises(ValueError, match=r"uint8 \[H, W, 3\]"):
        judge(np.zeros((32, 32, 3), dtype=np.float32), "a red circle")
    with pytest.raises(ValueError, match="'purple'"):
        judge(blank(), "a purple circle")


def test_wilson_interval_on_known_numbers():
    """8 of 10, z = 1.96: centre (0.8 + 1.9208/10) / 1.38416 = 0.71674, half width
    1.96 / 1.38416 * sqrt(0.016 + 3.8416/400) = 0.22658, so [0.4902, 0.9433]. 10 of 10: the upper
    end is 1 and the lower 0.72248."""
    assert wilson_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.72248, 1.0), abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError, match="11"):
        wilson_interval(11, 10)


def test_judge_many_reports_per_category():
    specs = [parse("a red circle"), parse("two blue squares"), parse("a green circle above a red square")]
    images = [render(s, seed=1) for s in specs] + [
        render(specs[0], seed=2),
        Image.new("RGB", (32, 32), "grey"),
    ]
    report = judge_many(images, [*specs, parse("a blue circle"), specs[0]])
    assert list(report.per_category) == ["single_object", "counting", "position"]
    single = report.per_category["single_object"]
    assert (single.n, single.correct, single.undecidable) == (3, 1, 1)
    assert single.interval == wilson_interval(1, 3)
    assert (report.overall.n, report.overall.correct) == (5, 3)
    assert "| single_object | 3 | 0.333 |" in report.to_markdown()
    # GenEval's overall: each category weighs the same (1/3, 1/1, 1/1), unlike the per-image 3/5
    assert report.category_mean == pytest.approx((1 / 3 + 1 + 1) / 3)
    assert "| category mean | | 0.778 |" in report.to_markdown()
    with pytest.raises(ValueError, match="2 images and 1 scenes"):
        judge_many(images[:2], specs[:1])


def test_win_tie_loss_compares_scores_per_prompt():
    specs = [parse("a red circle"), parse("two blue squares"), parse("a green circle above a red square")]
    good = [judge(render(s, seed=0), s) for s in specs]
    bad = [
        judge(render(m, seed=0), s)
        for s, m in zip(specs, ["a red square", "two blue squares", "a red circle"], strict=True)
    ]
    result = win_tie_loss(good, bad)
    assert (result.wins, result.ties, result.losses, result.total) == (2, 1, 0, 3)
    assert win_tie_loss(bad, good).losses == 2
    with pytest.raises(ValueError, match="verdict 0"):
        win_tie_loss(good[:1], good[1:2])


def test_degrade_is_seeded():
    image = render("a red circle", seed=0)
    a = degrade(image, rng=np.random.default_rng(1), noise=15, blur=0.8, tint=10)
    b = degrade(image, rng=np.random.default_rng(1), noise=15, blur=0.8, tint=10)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(image))


def test_import_stays_light():
    code = "import sys, img_guidance.shapes; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
