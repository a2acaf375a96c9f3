import dataclasses
import json
import os

import torch
from typer.testing import CliRunner

from img_guidance import load_aligner
from img_guidance.cli import app
from tests.helpers import official_state_dict

runner = CliRunner()


def test_convert_official_file_to_a_pretrained_folder(tmp_path, tiny_config):
    sd = official_state_dict(tiny_config)
    torch.save(sd, tmp_path / "aligner_flux.pth")
    dest = tmp_path / "converted"
    result = runner.invoke(app, ["convert", str(tmp_path / "aligner_flux.pth"), str(dest)])
    assert result.exit_code == 0, result.output
    assert "guidance_dim=24 image_dim=16 depth=2 heads=2 head_dim=64" in result.output
    assert {"config.json", "model.safetensors"} <= {p.name for p in dest.iterdir()}
    assert json.loads((dest / "config.json").read_text()) == tiny_config
    loaded = load_aligner(dest)
    for key, value in sd.items():
        assert torch.equal(loaded.state_dict()[key.removeprefix("module.")], value)
    # nothing but DEST is left beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["aligner_flux.pth", "converted"]


def test_convert_casts_and_never_clobbers(tmp_path, tiny_config):
    torch.save(official_state_dict(tiny_config), tmp_path / "a.pth")
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "keep.txt").write_text("precious")
    result = runner.invoke(app, ["convert", str(tmp_path / "a.pth"), str(dest)])
    assert result.exit_code == 1
    assert "already holds files" in result.output
    assert (dest / "keep.txt").read_text() == "precious"

    result = runner.invoke(
        app, ["convert", str(tmp_path / "a.pth"), str(dest), "--overwrite", "--dtype", "bfloat16"]
    )
    assert result.exit_code == 0, result.output
    assert not (dest / "keep.txt").exists()
    assert {p.dtype for p in load_aligner(dest).parameters()} == {torch.bfloat16}


def test_convert_errors_exit_non_zero_and_write_nothing(tmp_path, tiny_config):
    result = runner.invoke(app, ["convert", str(tmp_path / "missing.pth"), str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "missing.pth" in result.output
    bad = official_state_dict(tiny_config, prefix="")
    bad["proj_out.weight"] = torch.zeros(3, 3)
    torch.save(bad, tmp_path / "bad.pth")
    result = runner.invoke(app, ["convert", str(tmp_path / "bad.pth"), str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "'proj_out.weight' has shape (3, 3)" in result.output
    result = runner.invoke(
        app, ["convert", str(tmp_path / "bad.pth"), str(tmp_path / "out"), "--dtype", "int8"]
    )
    assert result.exit_code == 1 and "int8" in result.output
    assert not (tmp_path / "out").exists()


def test_demo_runs_img_on_shapesworld_with_the_shipped_models(tmp_path):
    from PIL import Image

    result = runner.invoke(app, ["demo", "--out", str(tmp_path / "demo")])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "demo" / "demo.json").read_text())
    rows = data["prompts"]
    assert len(rows) == 16 and {r["img"] for r in rows} <= {"win", "tie", "loss"}
    assert data["initial_correct"] == sum(r["initial"]["correct"] is True for r in rows)
    assert data["calibrated_correct"] == sum(r["calibrated"]["correct"] is True for r in rows)
    outcomes = data["img_vs_initial"]
    assert outcomes["wins"] + outcomes["ties"] + outcomes["losses"] == 16
    assert outcomes["wins"] == sum(r["img"] == "win" for r in rows)
    # the IP scale the shipped run chose on validation
    from img_guidance.recipes.train_shapes import WEIGHTS

    chosen = json.loads((WEIGHTS / "generator" / "ip_scale.json").read_text())["ip_scale"]
    assert set(data["models"]) == {"backend", "guidance", "aligner"} and data["ip_scale"] == chosen
    # a wrong image says why, a right one has no failure kind
    for r in rows:
        for side in ("initial", "calibrated"):
            assert (r[side]["failures"] == []) == (r[side]["correct"] is True), r[side]
    # the detector's greedy answer about each initial image, to the question IMG asked of it
    assert all(isinstance(r["detector_answer"], str) for r in rows)
    assert any(r["detector_answer"] for r in rows)
    assert all(r["prompt"] in r["question"] for r in rows)
    assert f"detector: {rows[0]['detector_answer']!r}" in result.output
    grid = Image.open(tmp_path / "demo" / "demo.png")
    assert grid.height > 16 * 128  # a row per prompt and seed, images enlarged 4x
    assert f"judge: {data['initial_correct']}/16 initial images right" in result.output


def test_demo_grid_wraps_the_detector_answer_beside_the_images():
    import numpy as np
    from PIL import Image

    from img_guidance.demo import demo_grid

    verdict = {"correct": True, "score": 1.0}
    row = {
        "prompt": "a red circle",
        "seed": 0,
        "question": "What would you edit so that the image shows exactly a red circle?",
        "initial": verdict,
        "calibrated": verdict,
        "initial_image": Image.new("RGB", (32, 32), "red"),
        "calibrated_image": Image.new("RGB", (32, 32), "blue"),
    }
    rows = [{**row, "detector_answer": "remove the red circle"}, {**row, "detector_answer": "blue " * 300}]
    grid = demo_grid(rows).convert("L")
    label, cell, step = 360, 128, 128 + 26 + 8  # text column, enlarged image, row height (2 caption lines)
    assert grid.size == (label + 2 * (cell + 8), 24 + 2 * step)
    assert grid.getpixel((label + 1, 24 + 1)) < 255  # the initial image, right of the text

    def ink(top, bottom):  # dark pixels in the text column between two heights
        return int((np.asarray(grid.crop((0, top, label, bottom))) < 128).sum())

    short, long = ink(24, 24 + step), ink(24 + step, 24 + 2 * step)
    assert 0 < short < long  # the long answer wraps onto more lines ...
    assert ink(24 + step + cell + 26, 24 + 2 * step) == 0  # ... and is cut before the next row

    # a wrong image says why under it (its failure kinds); a right one has one caption line
    wrong = {"correct": False, "score": 0.5, "failures": ["wrong colour", "extra object"]}
    grid = demo_grid([{**rows[0], "calibrated": wrong}]).convert("L")
    second_line = [(x, 24 + cell + 1 + 12, x + cell, 24 + cell + 1 + 24) for x in (label, label + cell + 8)]
    initial_why, calibrated_why = ((np.asarray(grid.crop(box)) < 200).sum() for box in second_line)
    assert initial_why == 0 and calibrated_why > 0


def test_the_shipped_models_are_what_train_all_makes():
    from img_guidance.recipes.train_shapes import WEIGHTS, ShapesRecipe, recorded_settings

    report = json.loads((WEIGHTS / "train_all.json").read_text())
    recipe = json.loads(json.dumps(dataclasses.asdict(ShapesRecipe())))
    assert recorded_settings(report["recipe"]) == recipe
    assert list(report["stages"]) == ["generator", "detector", "pairs", "features", "aligner", "ip_scale"]
    assert abs(report["total_seconds"] - sum(s["seconds"] for s in report["stages"].values())) < 1e-6
    # the IP scale the backend uses is the one the run chose on validation
    chosen = json.loads((WEIGHTS / "generator" / "ip_scale.json").read_text())
    assert chosen["ip_scale"] == report["stages"]["ip_scale"]["result"]["ip_scale"]

    def strings(value):
        if isinstance(value, dict):
            yield from (s for v in value.values() for s in strings(v))
        elif isinstance(value, list):
            yield from (s for v in value for s in strings(v))
        elif isinstance(value, str):
            yield value

    assert not [s for s in strings(report) if os.path.isabs(s)]  # no path of the training machine


def test_version_and_help():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.startswith("img-guidance ")
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "convert" in result.output and "demo" in result.output
