"""benchmarks/shapes_adapter_probe.py runs end to end on a tiny UNet and reports every row."""

import json
from pathlib import Path

import torch


def load_probe():
    from benchmarks import shapes_adapter_probe

    return shapes_adapter_probe


def test_the_probe_trains_jointly_and_reports_the_oracle_rows(tmp_path):
    probe = load_probe()
    out = tmp_path / "probe"
    args = ["--out", str(out), "--tiny", "--steps", "2", "--encoder-steps", "2", "--batch", "4"]
    args += ["--eval-scenes", "3", "--sampling-steps", "2", "--spatial", "--coords", "--train-encoder"]
    args += ["--snr-gamma", "none"]
    report = probe.main(args)
    assert json.loads(Path(f"{out}.json").read_text()) == json.loads(json.dumps(report))
    assert set(report["rows"]) == {
        "base",
        "oracle, empty prompt, IP 1.0",
        "oracle + prompt, IP 0.5",
        "oracle + prompt, IP 1.0",
        "mean8 + prompt, IP 0.5",
        "mean8 + prompt, IP 1.0",
    }
    assert all(0 <= row["accuracy"] <= 1 for row in report["rows"].values())
    state = torch.load(f"{out}.pt", weights_only=True)
    assert state["unet"]["conv_in.weight"].shape[1] == 5  # RGB + the two coordinate channels
    assert state["image_projection"]["position"].shape == (16, 64)  # one token per cell of a 4 x 4 map


def test_coordinate_channels():
    from img_guidance.shapes.models import with_coordinates

    x = with_coordinates(torch.zeros(2, 3, 4, 5))
    assert x.shape == (2, 5, 4, 5)
    torch.testing.assert_close(x[0, 3, 0], torch.linspace(-1, 1, 5))  # x runs along the width
    torch.testing.assert_close(x[1, 4, :, 0], torch.linspace(-1, 1, 4))  # y runs down
