"""The training path through the CLI, end to end on tiny models: pairs -> features -> train -> generate."""

import json

import pytest
import yaml
from typer.testing import CliRunner

from img_guidance import load_aligner
from img_guidance.cli import app
from img_guidance.testing.llava import HIDDEN_SIZE, make_tiny_llava
from img_guidance.testing.pairs import TIE, PickapicRow, write_pickapic_parquet
from img_guidance.testing.sdxl import make_tiny_sdxl

runner = CliRunner()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"sdxl": make_tiny_sdxl(root / "sdxl"), "llava": str(make_tiny_llava(root / "llava"))}


def test_features_train_generate(models, tmp_path):
    rows = [PickapicRow(f"a {c} circle", colours=(c, "grey")) for c in ("red", "blue", "green", "yellow")] * 3
    rows += [PickapicRow("a tie", labels=TIE), PickapicRow("broken", broken=1)]
    write_pickapic_parquet(tmp_path / "pairs" / "train-0000.parquet", rows)
    sdxl = models["sdxl"]
    model_args = [
        "--model", sdxl["model"],
        "--ip-adapter", sdxl["ip_adapter"],
        "--image-encoder", sdxl["image_encoder"],
        "--mllm", models["llava"],
        "--device", "cpu",
    ]  # fmt: skip
    cache = tmp_path / "cache"
    args = ["features", "--pairs", str(tmp_path / "pairs"), "--out", str(cache), "--rows-per-shard", "5"]
    result = runner.invoke(app, [*args, *model_args, "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    assert "12 samples from 14 rows (ties 1, unlabeled 0, undecodable 1)" in result.output
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["dims"] == {"guidance_dim": HIDDEN_SIZE, "num_tokens": 4, "image_dim": 64}
    assert len(manifest["shards"]) == 3

    config = tmp_path / "train.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "cache_dir": str(cache),
                "output_dir": str(tmp_path / "run"),
                "max_steps": 4,
                "batch_size": 4,
                "depth": 1,
                "heads": 1,
                "checkpoint_every": 2,
                "validate_every": 2,
                "log_every": 1,
                "num_workers": 0,
            }
        )
    )
    result = runner.invoke(app, ["train", str(config), "lr=1e-3", "k=2"])
    assert result.exit_code == 0, result.output
    aligner = load_aligner(tmp_path / "run" / "final")
    assert (aligner.config.guidance_dim, aligner.config.image_dim) == (HIDDEN_SIZE, 64)
    result = runner.invoke(app, ["train", str(config), "lr=1e-3", "k=2", "max_steps=6", "--resume"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "checkpoints" / "step_00000006").is_dir()
    result = runner.invoke(app, ["train", str(config), "no_such_key=1"])
    assert result.exit_code == 2 and "no_such_key" in result.output

    out = tmp_path / "images"
    final = str(tmp_path / "run" / "final")
    sampling = ["--steps", "2", "--height", "32", "--width", "32"]
    result = runner.invoke(
        app, ["generate", "a red circle", *model_args, "--aligner", final, "--out", str(out), *sampling]
    )
    assert result.exit_code == 0, result.output
    assert len(list((out / "calibrated").iterdir())) == 1


def test_features_bad_input_fails_before_models_load(models, tmp_path):
    result = runner.invoke(app, ["features", "--pairs", str(tmp_path / "nope"), "--out", str(tmp_path / "c")])
    assert result.exit_code == 1 and "nope" in result.output
    assert not (tmp_path / "c").exists()
