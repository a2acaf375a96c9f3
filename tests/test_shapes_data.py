"""ShapesWorld's data in the real datasets' schemas, read back by the project's own readers, and
the world's tiny LLaVA read as guidance."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from img_guidance.data.pairs import PairStats, iter_pairs
from img_guidance.data.triplets import iter_triplets
from img_guidance.shapes.data import label_pair, make_pairs, make_triplets, write_pairs, write_triplets
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


def test_pairs_are_labelled_by_the_judge_and_read_by_the_pickapic_reader(tmp_path):
    scenes = [parse("a red circle"), parse("a blue square"), parse("two yellow triangles")]

    def generate(prompts: list[str], seeds: list[int]) -> list[Image.Image]:
        # a stand-in generator: odd seeds draw the prompt, even seeds a wrong scene
        wrong = parse("a green circle")
        return [render(parse(p) if s % 2 else wrong, seed=s) for p, s in zip(prompts, seeds, strict=True)]

    rows = make_pairs(generate, scenes, seeds=lambda i: (2 * i + 1, 2 * i + 2), batch_size=2)
    assert [(r["label_0"], r["label_1"]) for r in rows] == [(1.0, 0.0)] * 3
    stats = PairStats()
    pairs = list(iter_pairs(write_pairs(tmp_path / "pairs.parquet", rows), stats=stats))
    assert [p.prompt for p in pairs] == ["a red circle", "a blue square", "two yellow triangles"]
    assert judge(pairs[0].preferred, scenes[0]).correct and not judge(pairs[0].unpreferred, scenes[0]).correct
    # equal scores tie, and the reader drops ties
    ties = make_pairs(lambda p, s: [render(parse(x), seed=0) for x in p], scenes[:1], seeds=(1, 2))
    assert (ties[0]["label_0"], ties[0]["label_1"]) == (0.5, 0.5)
    stats = PairStats()
    assert list(iter_pairs(write_pairs(tmp_path / "ties.parquet", ties), stats=stats)) == []
    assert stats.ties == 1
    assert label_pair(0.5, 1.0) == (0.0, 1.0)


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
    from img_guidance.shapes.scoring import judge_output_folder

    image = render("a red circle", seed=0)
    _output_folder(tmp_path, [("a purple hexagon", 0, image, image)])
    with pytest.raises(ValueError, match="'a purple hexagon'"):
        judge_output_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"metadata\.jsonl"):
        judge_output_folder(tmp_path / "nothing")
