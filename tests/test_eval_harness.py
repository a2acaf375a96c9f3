"""img-guidance eval: scorers (against their formulas written out here), folders, summaries, win rates
with intervals, and the CLI, on tiny models and ShapesWorld renders."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from img_guidance.cli import app
from img_guidance.eval.harness import compare, read_folder, score_folder, summarize
from img_guidance.eval.scorers import SCORERS, load_scorer
from img_guidance.eval.stats import bootstrap_mean_interval
from img_guidance.shapes.render import render
from img_guidance.testing.clip import make_tiny_clip

runner = CliRunner()
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711])


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("clip") / "clip")


def reference_clip_cosine(folder, image: Image.Image, prompt: str) -> float:
    """CLIP's cosine written out: shortest side to 30 px (bicubic), centre crop, [0, 1], CLIP mean and
    std; the text's tokens; both projected and normalised."""
    from transformers import CLIPModel, CLIPTokenizer

    model = CLIPModel.from_pretrained(folder).eval()
    w, h = image.size
    scale = 30 / min(w, h)
    resized = image.convert("RGB").resize((round(w * scale), round(h * scale)), Image.BICUBIC)
    left, top = (resized.width - 30) // 2, (resized.height - 30) // 2
    crop = np.asarray(resized.crop((left, top, left + 30, top + 30)), dtype=np.float64) / 255
    pixels = torch.tensor(((crop - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1)[None], dtype=torch.float32)
    ids = CLIPTokenizer.from_pretrained(folder)(prompt, return_tensors="pt")
    with torch.no_grad():
        image_features = model.get_image_features(pixel_values=pixels).pooler_output[0]
        text_features = model.get_text_features(**ids).pooler_output[0]
    return float(image_features @ text_features / (image_features.norm() * text_features.norm()))


def test_clip_scorers_follow_their_formulas(clip):
    images = [render("a red circle", seed=0).resize((40, 36)), render("two blue squares", seed=1)]
    prompts = ["a red circle", "two blue squares"]
    cosines = [reference_clip_cosine(clip, im, p) for im, p in zip(images, prompts, strict=True)]
    clip_score = load_scorer("clip-score", weights=str(clip)).score(images, prompts)
    torch.testing.assert_close(
        clip_score, torch.tensor([100 * max(c, 0.0) for c in cosines]), atol=1e-3, rtol=1e-4
    )
    pick = load_scorer("pickscore", weights=str(clip))
    scale = float(pick.model.logit_scale.exp())
    torch.testing.assert_close(
        pick.score(images, prompts), torch.tensor([scale * c for c in cosines]), atol=1e-4, rtol=1e-4
    )
    with pytest.raises(ValueError, match="one prompt per image"):
        pick.score(images, prompts[:1])
    b32 = load_scorer("clip-b32", weights=str(clip)).score(images, prompts)
    torch.testing.assert_close(b32, torch.tensor(cosines), atol=1e-5, rtol=1e-4)


def test_unknown_scorers_list_the_valid_ones(tmp_path):
    with pytest.raises(ValueError, match=r"unknown scorer 'hps'; choose from shapes-judge, shapes-checks"):
        load_scorer("hps")
    with pytest.raises(FileNotFoundError, match=r"clip-score: .*nothing-here"):
        load_scorer("clip-score", weights=str(tmp_path / "nothing-here"))


def shapes_folder(folder, *, system_images):
    """A folder with images.jsonl: system -> list of (prompt, seed, image)."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for system, entries in system_images.items():
        for prompt, seed, image in entries:
            name = f"{system}-{len(lines)}.png"
            image.save(folder / name)
            lines.append({"file": name, "prompt": prompt, "seed": seed, "system": system, "category": "c"})
    (folder / "images.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return folder


def test_score_folder_with_the_judge_and_the_summary(tmp_path):
    from img_guidance.shapes.grammar import near_misses, parse

    prompts = ["a red circle", "two blue squares", "a green triangle above a yellow square"]
    right = [(p, i, render(p, seed=i)) for i, p in enumerate(prompts)]
    wrong = [(p, i, render(near_misses(parse(p))[0], seed=i)) for i, p in enumerate(prompts)]
    folder = shapes_folder(tmp_path / "f", system_images={"good": right, "bad": wrong[:2] + right[2:]})
    scorers = [load_scorer("shapes-judge"), load_scorer("shapes-checks")]
    summary = score_folder(folder, scorers)
    assert summary["systems"]["good"]["shapes-judge"]["mean"] == 1.0
    assert summary["systems"]["bad"]["shapes-judge"]["mean"] == pytest.approx(1 / 3)
    assert summary["systems"]["bad"]["shapes-checks"]["per_category"]["c"] < 1.0
    lines = [json.loads(x) for x in (folder / "eval" / "scores.jsonl").read_text().splitlines()]
    assert len(lines) == 6 and set(lines[0]) == {
        "file",
        "prompt",
        "seed",
        "system",
        "category",
        *(s.name for s in scorers),
    }
    assert json.loads((folder / "eval" / "summary.json").read_text())["systems"] == summary["systems"]


def test_compare_counts_wins_per_prompt_with_intervals():
    rows = []
    for i in range(40):  # system b beats a on 30 prompts, ties 4, loses 6; two seeds per prompt
        for seed in (0, 1):
            a = 0.5
            b = 0.7 if i < 30 else 0.5 if i < 34 else 0.3
            rows += [
                {"prompt": f"p{i}", "seed": seed, "system": "a", "category": "all", "s": a},
                {"prompt": f"p{i}", "seed": seed, "system": "b", "category": "all", "s": b},
            ]
    result = compare(rows, ["s"], resamples=2000)
    entry = result["scorers"]["s"]["b"]
    assert (entry["prompts"], entry["wins"], entry["ties"], entry["losses"]) == (40, 30, 4, 6)
    assert entry["win_rate"] == 0.75 and entry["win_rate_ci95"][0] < 0.75 < entry["win_rate_ci95"][1]
    assert entry["mean_difference"] == pytest.approx((30 * 0.2 - 6 * 0.2) / 40)
    # the sign test on 30 wins against 6 losses, by hand: 2 * P(X <= 6), X ~ Binomial(36, 1/2)
    assert entry["sign_test_p"] == pytest.approx(2 * sum(math.comb(36, k) for k in range(7)) / 2**36)
    assert summarize(rows, ["s"])["systems"]["b"]["s"]["n"] == 80
    with pytest.raises(ValueError, match="at least two systems"):
        compare([r for r in rows if r["system"] == "a"], ["s"])


def test_bootstrap_mean_interval_by_hand():
    assert bootstrap_mean_interval([1.0] * 10) == (1.0, 1.0)
    low, high = bootstrap_mean_interval([0.0, 1.0] * 200, resamples=4000)
    # the mean of 400 fair coin flips: 0.5 +- 1.96 * 0.5 / 20
    assert low == pytest.approx(0.5 - 0.049, abs=0.01) and high == pytest.approx(0.5 + 0.049, abs=0.01)
    assert all(math.isnan(x) for x in bootstrap_mean_interval([]))


def test_a_generate_folder_scores_as_initial_and_calibrated_and_matches_shapes_judge(tmp_path):
    out = tmp_path / "gen"
    result = runner.invoke(
        app,
        [
            "generate",
            "a red circle",
            "two blue squares",
            "--model",
            "shapes",
            "--steps",
            "3",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    images = read_folder(out)
    assert [im.system for im in images] == ["initial", "calibrated"] * 2
    scored = runner.invoke(app, ["eval", "score", str(out), "--scorers", "shapes-judge,shapes-checks"])
    assert scored.exit_code == 0, scored.output
    judged = runner.invoke(app, ["shapes", "judge", str(out)])
    assert judged.exit_code == 0, judged.output
    summary = json.loads((out / "eval" / "summary.json").read_text())["systems"]
    report = json.loads((out / "judge.json").read_text())
    for system in ("initial", "calibrated"):
        assert summary[system]["shapes-judge"]["mean"] == report[system]["overall"]["accuracy"]
    compared = runner.invoke(app, ["eval", "compare", str(out)])
    assert compared.exit_code == 0, compared.output
    comparison = json.loads((out / "eval" / "comparison.json").read_text())["comparison"]
    outcome = comparison["scorers"]["shapes-checks"]["calibrated"]
    assert (outcome["wins"], outcome["ties"], outcome["losses"]) == tuple(
        report["img_vs_initial"][k] for k in ("wins", "ties", "losses")
    )
    assert "| calibrated |" in (out / "eval" / "report.md").read_text()
    for name in ("shapes-judge.png", "shapes-judge-win-rate.png", "shapes-checks.png", "gallery.html"):
        assert (out / "eval" / name).is_file(), name
    assert Image.open(out / "eval" / "shapes-judge.png").format == "PNG"
    page = (out / "eval" / "gallery.html").read_text()
    assert "<img src='../" in page and "a red circle" in page
    intervals = json.loads((out / "eval" / "comparison.json").read_text())["intervals"]["shapes-judge"]
    overall = intervals["initial"]["overall"]
    assert overall["prompts"] == 2 and overall["ci95"][0] <= overall["mean"] <= overall["ci95"][1]


def test_eval_cli_bad_input_is_one_line(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "a.png")
    for args, needle in [
        (["eval", "score", str(folder), "--scorers", "hps"], "unknown scorer 'hps'"),
        (["eval", "score", str(folder), "--scorers", "shapes-judge"], "images.jsonl"),
        (["eval", "score", str(tmp_path / "nope"), "--scorers", "shapes-judge"], "does not exist"),
        (["eval", "score", str(folder), "--scorers", "shapes-judge", "--scorer-weights", "x"], "NAME=PATH"),
        (["eval", "compare", str(folder)], "eval score"),
    ]:
        result = runner.invoke(app, args)
        assert result.exit_code == 1, (args, result.output)
        lines = [x for x in result.stderr.splitlines() if x.startswith("error:")]
        assert len(lines) == 1 and needle in lines[0], (args, result.stderr)
    (folder / "images.jsonl").write_text('{"file": "a.png", "prompt": "x", "steps": 3}\n')
    result = runner.invoke(app, ["eval", "score", str(folder), "--scorers", "shapes-judge"])
    assert "unknown keys ['steps']" in result.stderr and "images.jsonl:1" in result.stderr


def test_every_scorer_is_listed():
    result = runner.invoke(app, ["eval", "scorers"])
    assert result.exit_code == 0 and all(name in result.output for name in SCORERS)


def test_export_writes_the_geneval_and_dpg_layouts(tmp_path):
    from img_guidance.eval.export import export

    prompts = ["a red circle", "two blue squares"]
    entries = [(p, seed, render(p, seed=seed)) for p in prompts for seed in (3, 1, 2, 0)]
    folder = shapes_folder(tmp_path / "f", system_images={"mine": entries})
    metadata = tmp_path / "evaluation_metadata.jsonl"
    lines = [
        {"tag": "single_object", "include": [{"class": "x", "count": 1}], "prompt": "a green triangle"},
        {"tag": "counting", "include": [{"class": "square", "count": 2}], "prompt": "two blue squares"},
        {"tag": "colors", "include": [{"class": "circle", "count": 1}], "prompt": "a red circle"},
    ]
    metadata.write_text("".join(json.dumps(x) + "\n" for x in lines))
    counts = export(folder, tmp_path / "geneval", format="geneval", benchmark_files=metadata)
    assert counts == {"prompts": 2, "images": 8}
    root = tmp_path / "geneval"
    assert sorted(p.name for p in root.iterdir()) == ["00001", "00002"]
    assert json.loads((root / "00002" / "metadata.jsonl").read_text()) == lines[2]
    assert sorted(p.name for p in (root / "00001" / "samples").iterdir()) == [
        f"{k:04d}.png" for k in range(4)
    ]
    # samples in seed order: 0000.png is seed 0's image
    first = Image.open(root / "00002" / "samples" / "0000.png")
    assert list(first.getdata()) == list(render("a red circle", seed=0).getdata())

    dpg = tmp_path / "dpg_prompts"
    dpg.mkdir()
    (dpg / "item_a.txt").write_text("a red circle\n")
    (dpg / "item_b.txt").write_text("two blue squares")
    counts = export(folder, tmp_path / "dpg", format="dpg", benchmark_files=dpg)
    assert sorted(p.name for p in (tmp_path / "dpg").iterdir()) == ["item_a.png", "item_b.png"]
    grid = Image.open(tmp_path / "dpg" / "item_b.png")
    assert grid.size == (64, 64)
    tile = grid.crop((32, 0, 64, 32))  # top right: the second seed (1)
    assert list(tile.getdata()) == list(render("two blue squares", seed=1).getdata())

    (dpg / "item_b.txt").unlink()
    result = runner.invoke(
        app,
        [
            "eval",
            "export",
            str(folder),
            str(tmp_path / "d2"),
            "--format",
            "dpg",
            "--benchmark-files",
            str(dpg),
        ],
    )
    assert result.exit_code == 1 and "1 prompts are not in" in result.stderr
    assert not (tmp_path / "d2").exists()
    result = runner.invoke(
        app,
        [
            "eval",
            "export",
            str(folder),
            str(tmp_path / "dpg"),
            "--format",
            "dpg",
            "--benchmark-files",
            str(dpg),
        ],
    )
    assert result.exit_code == 1 and "--overwrite" in result.stderr


def test_eval_run_shapes_generates_scores_and_equals_shapes_judge(tmp_path):
    from img_guidance.eval.benchmarks import get_benchmark

    bench = get_benchmark("shapes")
    prompts = bench.prompts()
    assert len(prompts) == 211 and {c for _, c in prompts} >= {"single_object", "position"}
    out = tmp_path / "run"
    args = ["eval", "run", "shapes", "--model", "shapes", "--out", str(out), "--limit", "3"]
    result = runner.invoke(app, [*args, "--images-per-prompt", "2", "--steps", "2"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(x) for x in (out / "eval" / "scores.jsonl").read_text().splitlines()]
    assert len(lines) == 3 * 2 * 2  # prompts x seeds x (initial, calibrated)
    assert [x["category"] for x in lines[::4]] == [c for _, c in prompts[:3]]
    assert {x["seed"] for x in lines} == {0, 1}
    judged = runner.invoke(app, ["shapes", "judge", str(out)])
    assert judged.exit_code == 0, judged.output
    report = json.loads((out / "judge.json").read_text())
    summary = json.loads((out / "eval" / "summary.json").read_text())["systems"]
    for system in ("initial", "calibrated"):
        assert summary[system]["shapes-judge"]["mean"] == report[system]["overall"]["accuracy"]
        for cat, value in summary[system]["shapes-judge"]["per_category"].items():
            assert value == report[system]["per_category"][cat]["accuracy"]
    # a rerun finds everything done; an unknown benchmark lists the valid ones
    again = runner.invoke(app, [*args, "--images-per-prompt", "2", "--steps", "2"])
    assert again.exit_code == 0 and "already" in again.output
    bad = runner.invoke(app, ["eval", "run", "hps", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 1 and "unknown benchmark 'hps'; choose from shapes, hpd" in bad.stderr


def test_benchmark_readers_read_each_source_format(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from img_guidance.eval.benchmarks import BENCHMARKS, COMPBENCH_CATEGORIES, get_benchmark

    hpd = tmp_path / "hpd"
    hpd.mkdir()
    for style in ("anime", "concept-art", "paintings", "photo"):
        (hpd / f"{style}.json").write_text(json.dumps([f"{style} one", f"{style} two"]))
    assert get_benchmark("hpd").prompts(hpd)[:3] == [
        ("anime one", "anime"),
        ("anime two", "anime"),
        ("concept-art one", "concept-art"),
    ]

    parti = tmp_path / "PartiPrompts.tsv"
    parti.write_text(
        "Prompt\tCategory\tChallenge\tNote\nbond\tAbstract\tBasic\t\na cat\tAnimals\tBasic\tnote\n"
    )
    assert get_benchmark("parti").prompts(parti) == [("bond", "Abstract"), ("a cat", "Animals")]

    pick = tmp_path / "test_unique.parquet"
    pq.write_table(
        pa.table({"caption": ["a dog", "a dog", "a tree"], "best_image_uid": ["1", "2", "3"]}), pick
    )
    assert get_benchmark("pickapic-test").prompts(pick) == [("a dog", "all"), ("a tree", "all")]

    comp = tmp_path / "compbench"
    comp.mkdir()
    for name in COMPBENCH_CATEGORIES:
        (comp / f"{name}_val.txt").write_text(f"a {name} prompt\n\nanother {name}\n")
    prompts = get_benchmark("t2i-compbench").prompts(comp)
    assert len(prompts) == 12 and prompts[0] == ("a color prompt", "color") and prompts[-1][1] == "complex"
    items = get_benchmark("t2i-compbench").items(comp, limit=2)
    assert (
        len(items) == 20 and items[0].seed == 0 and items[9].seed == 9 and items[10].prompt == "another color"
    )

    geneval = tmp_path / "evaluation_metadata.jsonl"
    geneval.write_text('{"tag": "counting", "include": [], "prompt": "two cats"}\n')
    assert get_benchmark("geneval").prompts(geneval) == [("two cats", "counting")]
    geneval.write_text('{"tag": "counting"}\n')
    with pytest.raises(ValueError, match=r"evaluation_metadata.jsonl:1 is not a GenEval metadata line"):
        get_benchmark("geneval").prompts(geneval)

    dpg = tmp_path / "dpg"
    dpg.mkdir()
    (dpg / "b.txt").write_text("second\n")
    (dpg / "a.txt").write_text("first")
    assert get_benchmark("dpg").prompts(dpg) == [("first", "all"), ("second", "all")]

    with pytest.raises(ValueError, match="give --prompts-file"):
        get_benchmark("parti").prompts()
    with pytest.raises(FileNotFoundError, match=r"nothing\.tsv does not exist"):
        get_benchmark("parti").prompts(tmp_path / "nothing.tsv")
    assert set(BENCHMARKS) == {"shapes", "hpd", "parti", "pickapic-test", "t2i-compbench", "geneval", "dpg"}
    # without --prompts-file, eval run fetches the file: tests/test_eval_fetch.py
