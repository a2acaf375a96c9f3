"""ShapesWorld's data in the real datasets' schemas, read back by the project's own readers, and
the world's tiny LLaVA read as guidance."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from img_guidance.data.pairs import PairStats, iter_pairs
from img_guidance.data.triplets import iter_triplets
from img_guidance.shapes import data as shapes_data
from img_guidance.shapes.data import (
    CorrectionCounts,
    PairCounts,
    label_pair,
    make_correction_pairs,
    make_pairs,
    make_render_pairs,
    make_triplets,
    png_bytes,
    write_pairs,
    write_triplets,
)
from img_guidance.shapes.grammar import NO_CHANGE, implies, parse
from img_guidance.shapes.judge import judge
from img_guidance.shapes.render import render


def test_triplets_round_trip_through_the_instructpix2pix_reader(tmp_path):
    targets = [parse("a red circle"), parse("two blue squares"), parse("a green triangle above a red circle")]
    rows = make_triplets(targets, count=40, seed=3)
    assert rows == make_triplets(targets, count=40, seed=3)  # deterministic
    path = write_triplets(tmp_path / "triplets.parquet", rows)
    triplets = list(iter_triplets(path))
    assert len(triplets) == 40
    for row, triplet in zip(rows, triplets, strict=True):
        target, source = parse(triplet.prompt), parse(row["original_prompt"])
        assert target in targets and triplet.instruction == row["edit_prompt"]
        # the image is a render of the source scene, and "no change" exactly when it already fits
        assert judge(triplet.image, source).correct is True
        assert (triplet.instruction == NO_CHANGE) == implies(source, target)
    kinds = {t.instruction.split()[0] for t in triplets}
    assert NO_CHANGE.split()[0] in kinds and len(kinds) >= 3


class FakeGenerator:
    """A stand-in generator that draws, for each seed, the scene ``draws`` gives it (rendered with
    that seed), and records its calls."""

    def __init__(self, draws: dict[int, str]):
        self.draws, self.calls = draws, []

    def __call__(self, prompts: list[str], seeds: list[int]) -> list[Image.Image]:
        self.calls.append((list(prompts), list(seeds)))
        return [render(parse(self.draws[s]), seed=s) for s in seeds]


# Four scenes of four generations; scene i draws seeds 100 + 4 * i + k. The judge scores a draw
# against its scene's prompt: the prompt itself 1, a near miss 2/3 (the red circle with an extra blue
# square; one blue square for two), an unrelated scene 0.
PAIR_SCENES = ["a red circle", "two blue squares", "a green triangle", "a yellow circle"]
PAIR_DRAWS = [
    # best: 1 (first of the two 1s), worst: 2 -> jpg_0 preferred
    ["a red circle to the left of a blue square", "a red circle", "a green triangle", "a red circle"],
    # best: 3, worst: 0 (first of the two 0s) -> jpg_1 preferred
    ["a red circle", "a blue square", "a red circle", "two blue squares"],
    # all right: a tie, dropped
    ["a green triangle"] * 4,
    # all wrong: a tie, dropped
    ["a red square", "two blue circles", "a green triangle", "a blue square"],
]


def pair_seeds(i: int) -> list[int]:
    return [100 + 4 * i + k for k in range(4)]


def test_pairs_are_best_against_worst_read_by_the_pickapic_reader(tmp_path):
    scenes = [parse(p) for p in PAIR_SCENES]
    draws = {seed: scene for i in range(4) for seed, scene in zip(pair_seeds(i), PAIR_DRAWS[i], strict=True)}
    generate, done = FakeGenerator(draws), []
    rows, counts = make_pairs(
        generate, scenes, generations=4, seeds=pair_seeds, batch_size=3, progress=lambda *a: done.append(a)
    )
    # one generate call per generation index per chunk of scenes, with scene i's k-th seed
    chunks = [range(0, 3), range(3, 4)]
    assert generate.calls == [
        ([PAIR_SCENES[i] for i in chunk], [pair_seeds(i)[k] for i in chunk])
        for chunk in chunks
        for k in range(4)
    ]
    assert done == [(3, 4), (4, 4)]
    assert counts == PairCounts(prompts=4, images=16, pairs=2, ties_dropped=2)
    # best and worst in generation order, the lowest index taken among equal scores
    assert [r["ranking_id"] for r in rows] == [0, 1]
    assert [(r["label_0"], r["label_1"]) for r in rows] == [(1.0, 0.0), (0.0, 1.0)]
    drawn = {s: png_bytes(render(parse(draws[s]), seed=s)) for s in draws}
    assert (rows[0]["jpg_0"], rows[0]["jpg_1"]) == (drawn[101], drawn[102])
    assert (rows[1]["jpg_0"], rows[1]["jpg_1"]) == (drawn[104], drawn[107])
    assert drawn[101] != drawn[103] and drawn[104] != drawn[106]  # the tie-break is visible
    again, _ = make_pairs(FakeGenerator(draws), scenes, generations=4, seeds=pair_seeds, batch_size=3)
    assert again == rows
    # the real reader: captions, the preferred image right, the unpreferred one wrong, nothing dropped
    stats = PairStats()
    pairs = list(iter_pairs(write_pairs(tmp_path / "pairs.parquet", rows), stats=stats))
    assert [p.prompt for p in pairs] == ["a red circle", "two blue squares"]
    assert (stats.rows, stats.pairs, stats.ties, stats.unlabeled) == (2, 2, 0, 0)
    for pair, scene in zip(pairs, scenes[:2], strict=True):
        assert judge(pair.preferred, scene).score == 1.0 and judge(pair.unpreferred, scene).score == 0.0
    assert label_pair(0.5, 1.0) == (0.0, 1.0) and label_pair(0.5, 0.5) == (0.5, 0.5)


def test_pairs_of_a_scene_drawn_alike_are_dropped():
    generate = FakeGenerator({1: "a red circle", 2: "a red circle"})
    rows, counts = make_pairs(generate, [parse("a red circle")], generations=2, seeds=(1, 2))
    assert rows == [] and counts == PairCounts(prompts=1, images=2, pairs=0, ties_dropped=1)
    assert generate.calls == [(["a red circle"], [1]), (["a red circle"], [2])]


def test_correction_pairs_put_every_wrong_image_against_its_fix(tmp_path):
    """Scene i draws seeds 100 + 4 * i + k: every draw that is not its scene gives a row whose
    preferred image is judged right and keeps the wrong image's right objects where they were."""
    scenes = [parse(p) for p in PAIR_SCENES]
    draws = {seed: scene for i in range(4) for seed, scene in zip(pair_seeds(i), PAIR_DRAWS[i], strict=True)}
    generate, done = FakeGenerator(draws), []
    rows, counts = make_correction_pairs(
        generate,
        scenes,
        generations=4,
        seeds=pair_seeds,
        seed=5,
        batch_size=3,
        progress=lambda *a: done.append(a),
    )
    assert done == [(3, 4), (4, 4)] and len(generate.calls) == 8
    wrong = [(i, k) for i in range(4) for k in range(4) if PAIR_DRAWS[i][k] != PAIR_SCENES[i]]
    assert counts.prompts == 4 and counts.images == 16
    assert counts.pairs == len(rows) == len(wrong) and counts.right == 16 - len(wrong)
    assert [r["ranking_id"] for r in rows] == [i for i, _ in wrong]
    assert {(r["label_0"], r["label_1"]) for r in rows} == {(1.0, 0.0), (0.0, 1.0)}  # both sides occur
    again, again_counts = make_correction_pairs(
        FakeGenerator(draws), scenes, generations=4, seeds=pair_seeds, seed=5
    )
    assert again == rows and again_counts == counts
    other, _ = make_correction_pairs(FakeGenerator(draws), scenes, generations=4, seeds=pair_seeds, seed=6)
    assert [(r["label_0"], r["jpg_0"]) for r in other] != [(r["label_0"], r["jpg_0"]) for r in rows]
    # read back by the real reader: the unpreferred image is the generation, the preferred one right
    pairs = list(iter_pairs(write_pairs(tmp_path / "pairs.parquet", rows)))
    for pair, (i, k) in zip(pairs, wrong, strict=True):
        seed = pair_seeds(i)[k]
        assert png_bytes(pair.unpreferred) == png_bytes(render(parse(draws[seed]), seed=seed))
        assert judge(pair.preferred, scenes[i]).correct is True
    # scene 0's generation 1, "a red circle to the left of a blue square": the red circle stays
    i = wrong.index((0, 0))
    red = [o for o in judge(pairs[i].unpreferred, scenes[0]).objects if o.colour == "red"]
    fixed = judge(pairs[i].preferred, scenes[0]).objects
    assert len(fixed) == 1 and abs(fixed[0].cx - red[0].cx) < 1 and abs(fixed[0].cy - red[0].cy) < 1
    assert counts.kept_objects >= 1


def test_render_pairs_put_a_render_of_a_near_miss_against_its_fix(tmp_path, monkeypatch):
    """Rows from renders: every preferred image is judged right for the row's prompt, the other is
    of the prompt or of a near miss (judged wrong), made the same whatever the number of workers."""
    monkeypatch.setattr(shapes_data, "RENDER_CHUNK", 40)
    targets = [parse(p) for p in PAIR_SCENES]
    count = 100  # three random streams
    rows, counts = make_render_pairs(targets, count=count, seed=3, first_id=10, right=0.3)
    assert counts.rows == len(rows) == count and counts.right + counts.wrong == count
    assert 0.15 < counts.right / count < 0.45  # right images drawn with probability 0.3
    assert [r["ranking_id"] for r in rows] == list(range(10, 10 + count))
    assert {r["caption"] for r in rows} <= set(PAIR_SCENES)
    assert {(r["label_0"], r["label_1"]) for r in rows} == {(1.0, 0.0), (0.0, 1.0)}
    pairs = list(iter_pairs(write_pairs(tmp_path / "pairs.parquet", rows)))
    verdicts = [judge(pair.unpreferred, pair.prompt).correct for pair in pairs]
    assert all(judge(pair.preferred, pair.prompt).correct is True for pair in pairs)
    assert True in verdicts and False in verdicts
    parallel, parallel_counts = make_render_pairs(
        targets, count=count, seed=3, first_id=10, right=0.3, workers=2
    )
    assert parallel == rows and parallel_counts == counts
    other, _ = make_render_pairs(targets, count=40, seed=4, right=0.3)
    assert [r["jpg_0"] for r in other] != [r["jpg_0"] for r in rows[:40]]


@pytest.mark.parametrize(
    "options, match",
    [
        ({"count": -1}, "count must be"),
        ({"right": 1.5}, "right and second_edit"),
        ({"workers": 0}, "workers"),
    ],
)
def test_make_render_pairs_checks_its_settings(options, match):
    with pytest.raises(ValueError, match=match):
        make_render_pairs([parse("a red circle")], **{"count": 4, "seed": 0, **options})
    with pytest.raises(ValueError, match="at least one target"):
        make_render_pairs([], count=4, seed=0)


def test_correction_pairs_of_right_images_are_empty():
    generate = FakeGenerator({1: "a red circle"})
    rows, counts = make_correction_pairs(generate, [parse("a red circle")], generations=1, seeds=(1,))
    assert rows == [] and counts == CorrectionCounts(prompts=1, images=1, right=1)


def test_redraw_right_puts_every_right_image_against_its_own_redraw(tmp_path):
    """With ``redraw_right`` the wrong images give the same rows as without it, and every right
    image one more: against the render of the scene it shows, every object where it was."""
    scenes = [parse(p) for p in PAIR_SCENES]
    draws = {seed: scene for i in range(4) for seed, scene in zip(pair_seeds(i), PAIR_DRAWS[i], strict=True)}
    plain, plain_counts = make_correction_pairs(FakeGenerator(draws), scenes, generations=4, seeds=pair_seeds)
    rows, counts = make_correction_pairs(
        FakeGenerator(draws), scenes, generations=4, seeds=pair_seeds, redraw_right=True
    )
    assert counts.redraws == counts.right == plain_counts.right > 0 and plain_counts.redraws == 0
    assert counts.pairs == plain_counts.pairs and len(rows) == counts.pairs + counts.redraws
    assert [r for r in rows if r in plain] == plain  # the corrections unchanged, in order
    pairs = iter_pairs(write_pairs(tmp_path / "pairs.parquet", rows))
    redraws = [pair for pair in pairs if judge(pair.unpreferred, pair.prompt).correct]
    assert len(redraws) == counts.redraws
    for pair in redraws:
        before, after = judge(pair.unpreferred, pair.prompt), judge(pair.preferred, pair.prompt)
        assert after.correct is True and len(after.objects) == len(before.objects)
        for old, new in zip(
            sorted(before.objects, key=lambda o: o.cx), sorted(after.objects, key=lambda o: o.cx), strict=True
        ):
            assert (old.shape, old.colour) == (new.shape, new.colour)
            assert abs(old.cx - new.cx) < 1.5 and abs(old.cy - new.cy) < 1.5


@pytest.mark.parametrize(
    ("generations", "seeds", "match"),
    [
        (1, (1,), "generations >= 2.*got 1"),
        (0, (), "generations >= 2.*got 0"),
        (4, (1, 2, 3), r"generations=4 needs 4 seeds.*scene 0 \('a red circle'\) has 3: \[1, 2, 3\]"),
        (2, lambda i: [1, 2] if i == 0 else [3], r"scene 1 \('a blue square'\) has 1: \[3\]"),
    ],
)
def test_make_pairs_checks_generations_and_seeds_before_generating(generations, seeds, match):
    generate = FakeGenerator({})
    with pytest.raises(ValueError, match=match):
        make_pairs(
            generate, [parse("a red circle"), parse("a blue square")], generations=generations, seeds=seeds
        )
    assert generate.calls == []


def test_the_world_llava_reads_world_texts_without_unknown_words(tmp_path):
    from img_guidance.guidance import load_guidance
    from img_guidance.guidance.questions import QUESTIONS, fill
    from img_guidance.shapes.detector import make_detector_base, world_tokenizer

    tokenizer = world_tokenizer()
    text = fill(QUESTIONS[7], "two red circles to the left of a blue square") + " make the red circle blue###"
    assert tokenizer.unk_token_id not in tokenizer(text).input_ids
    detector = load_guidance(make_detector_base(tmp_path / "llava"))
    out = detector.guide([render("a red circle", seed=0)], [fill(QUESTIONS[0], "a red circle")])
    assert out.hidden_states.shape[-1] == 64 and torch.isfinite(out.hidden_states).all()
    assert detector.prompt_format == "llava_v0"


@pytest.mark.parametrize("bad", [[], None])
def test_make_triplets_needs_targets(bad):
    with pytest.raises((ValueError, TypeError)):
        make_triplets(bad, count=1, seed=0)


def _output_folder(root, entries):
    from img_guidance.outputs import OutputFolder, entry_name

    out = OutputFolder(root)
    for prompt, seed, initial, calibrated in entries:
        out.write(entry_name(prompt, seed), initial, [calibrated], {"prompt": prompt, "seed": seed})


def test_judge_scores_a_generate_folder_into_judge_json(tmp_path):
    import json

    from typer.testing import CliRunner

    from img_guidance.cli import app

    red, wrong = (
        parse("a red circle to the left of a blue square"),
        parse("a blue circle to the left of a red square"),
    )
    _output_folder(
        tmp_path,
        [
            # IMG fixes the first, breaks the second, leaves the third right
            ("a red circle to the left of a blue square", 0, render(wrong, seed=0), render(red, seed=0)),
            (
                "two green triangles",
                1,
                render("two green triangles", seed=1),
                render("a green triangle", seed=1),
            ),
            ("a yellow square", 2, render("a yellow square", seed=2), render("a yellow square", seed=3)),
        ],
    )
    result = CliRunner().invoke(app, ["shapes", "judge", str(tmp_path)])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "judge.json").read_text())
    assert [p["img"] for p in report["prompts"]] == ["win", "loss", "tie"]
    assert report["img_vs_initial"] == {"wins": 1, "ties": 1, "losses": 1}
    assert report["initial"]["per_category"]["position"]["accuracy"] == 0.0
    assert report["calibrated"]["per_category"]["position"]["accuracy"] == 1.0
    assert report["calibrated"]["overall"]["correct"] == 2 and report["initial"]["overall"]["correct"] == 2
    assert "position" in result.output


def test_judge_names_a_prompt_outside_the_grammar(tmp_path):
    from img_guidance.eval.shapes import judge_output_folder

    image = render("a red circle", seed=0)
    _output_folder(tmp_path, [("a purple hexagon", 0, image, image)])
    with pytest.raises(ValueError, match="'a purple hexagon'"):
        judge_output_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"nothing does not exist"):
        judge_output_folder(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty has no metadata\.jsonl"):
        judge_output_folder(tmp_path / "empty")
