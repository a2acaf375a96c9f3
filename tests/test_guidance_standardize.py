"""Per-dimension standardization of guidance hidden states: fitted on real tokens only, applied by
the guidance model, named by a detector folder's record and checked before any weights load."""

import json
import re
import shutil

import pytest
import torch
from PIL import Image

from img_guidance.guidance import DETECTOR_INFO, LlavaGuidance, load_guidance
from img_guidance.guidance.standardize import (
    STATS_FILE,
    check_standardization,
    fingerprint,
    fit_standardization,
    save_standardization,
)
from img_guidance.testing.llava import HIDDEN_SIZE, make_tiny_llava

QUESTIONS = ["What is wrong?", "How should this image change to match the intended prompt: a red cube?"]


@pytest.fixture(scope="module")
def llava_folder(tmp_path_factory):
    return make_tiny_llava(tmp_path_factory.mktemp("llava") / "tiny-llava")


def picture(seed):
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (28, 28, 3), generator=gen, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy(), "RGB")


def test_the_statistics_are_those_of_the_real_tokens_and_applied_per_dimension(llava_folder):
    guidance = LlavaGuidance.from_pretrained(llava_folder, hidden_layer=1)
    images = [picture(i) for i in range(3)]
    questions = [QUESTIONS[i % 2] for i in range(3)]  # two lengths: the shorter rows are padded
    plain = guidance.guide(images, questions)
    assert not plain.attention_mask.all()
    tokens = plain.hidden_states[plain.attention_mask].double()
    stats = fit_standardization(guidance, images, questions, batch_size=2)  # two batches
    torch.testing.assert_close(stats["mean"], tokens.mean(0).float())
    torch.testing.assert_close(stats["std"], tokens.std(0).float())
    assert guidance.standardize is None  # fitting leaves the model as it was

    guidance.standardize = stats
    out = guidance.guide(images, questions)
    mask = out.attention_mask
    expected = (plain.hidden_states.float() - stats["mean"]) / stats["std"]
    torch.testing.assert_close(out.hidden_states[mask], expected[mask])
    assert not out.hidden_states[~mask].any()  # padded rows stay zero
    real = out.hidden_states[mask]
    torch.testing.assert_close(real.mean(0), torch.zeros(HIDDEN_SIZE), atol=1e-4, rtol=0)
    torch.testing.assert_close(real.std(0), torch.ones(HIDDEN_SIZE), atol=1e-4, rtol=0)
    # a feature cache made with other statistics does not match this model
    assert guidance.describe()["standardize"] == fingerprint(stats)
    other = {"mean": stats["mean"] + 1, "std": stats["std"]}
    assert fingerprint(other) != fingerprint(stats)
    refit = fit_standardization(guidance, images, questions)  # measured as read, not as standardized
    torch.testing.assert_close(refit["mean"], stats["mean"])
    assert guidance.standardize is stats


def test_a_detector_folder_names_its_statistics_and_a_bad_record_is_refused_before_loading(
    llava_folder, tmp_path
):
    named = tmp_path / "detector"
    shutil.copytree(llava_folder, named)
    stats = {"mean": torch.linspace(-1, 1, HIDDEN_SIZE), "std": torch.full((HIDDEN_SIZE,), 2.0)}
    save_standardization(stats, named / STATS_FILE)
    assert not list(named.glob("*.tmp"))
    (named / DETECTOR_INFO).write_text(json.dumps({"prompt_format": "llava_v0", "standardize": STATS_FILE}))
    loaded = load_guidance(named)
    torch.testing.assert_close(loaded.standardize["mean"], stats["mean"])
    plain = load_guidance(llava_folder)
    assert plain.standardize is None and "standardize" not in plain.describe()
    image = picture(5)
    torch.testing.assert_close(
        loaded.guide([image], QUESTIONS[:1]).hidden_states,
        (plain.guide([image], QUESTIONS[:1]).hidden_states - stats["mean"]) / 2,
    )

    for weights in named.glob("model*.safetensors"):  # no weights: only a check before loading answers
        weights.unlink()
    (named / STATS_FILE).unlink()
    missing = f"names standardize '{STATS_FILE}', which is missing"
    with pytest.raises(FileNotFoundError, match=re.escape(missing)):
        load_guidance(named)
    for bad in ("/etc/passwd", "../stats.safetensors", "", 3):
        (named / DETECTOR_INFO).write_text(json.dumps({"prompt_format": "llava_v0", "standardize": bad}))
        refused = f"standardize must name a file of the folder, got {bad!r}"
        with pytest.raises(ValueError, match=re.escape(refused)):
            load_guidance(named)


def test_statistics_of_another_size_or_not_finite_are_refused():
    good = {"mean": torch.zeros(4), "std": torch.ones(4)}
    check_standardization(good, 4)
    with pytest.raises(ValueError, match=r"mean has shape \(4,\), the model's hidden states have 8"):
        check_standardization(good, 8, "x")
    with pytest.raises(ValueError, match=r"exactly 'mean' and 'std', got \['mean'\]"):
        check_standardization({"mean": torch.zeros(4)}, 4)
    with pytest.raises(ValueError, match="std must be positive"):
        check_standardization({"mean": torch.zeros(4), "std": torch.zeros(4)}, 4)
    with pytest.raises(ValueError, match="mean is not finite"):
        check_standardization({"mean": torch.full((4,), float("nan")), "std": torch.ones(4)}, 4)
