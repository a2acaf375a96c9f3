import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

from img_guidance.guidance import LlavaGuidance, convert_llava, load_guidance
from img_guidance.guidance.llava_conversion import original_to_hub_name
from img_guidance.testing.llava import (
    HIDDEN_SIZE,
    IMAGE_TOKENS,
    clip_vision_config,
    llama_config,
    make_original_llava,
    make_tiny_clip_vision,
    make_tiny_llava,
)


def read_original(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of an original-layout folder, read directly from its files."""
    state = {}
    for path in sorted(folder.glob("*.safetensors")):
        state |= load_file(path)
    for path in sorted(folder.glob("*.bin")):
        state |= torch.load(path, weights_only=True)
    return state


def original_language_model(state: dict, vocab_size: int):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(llama_config(vocab_size=vocab_size))
    language = {k: v for k, v in state.items() if k.startswith("model.") and ".mm_projector." not in k}
    language = {k: v for k, v in language.items() if not k.startswith("model.vision_tower.")}
    model.load_state_dict(language | {"lm_head.weight": state["lm_head.weight"]}, strict=True)
    return model.eval()


def reference_image_features(tower, state: dict, pixel_values: torch.Tensor) -> torch.Tensor:
    """mm_projector (mlp2x_gelu) on CLIP layer -2 without CLS, from the original tensors."""
    with torch.no_grad():
        patches = tower(pixel_values, output_hidden_states=True).hidden_states[-2][:, 1:]
    hidden = F.gelu(patches @ state["model.mm_projector.0.weight"].T + state["model.mm_projector.0.bias"])
    return hidden @ state["model.mm_projector.2.weight"].T + state["model.mm_projector.2.bias"]


def tower_from_original(state: dict):
    from transformers import CLIPVisionModel

    prefix = "model.vision_tower.vision_tower."
    tower = CLIPVisionModel(clip_vision_config())
    weights = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    # the original names carry `vision_model.`; match whatever the installed CLIPVisionModel uses
    if not any(k.startswith("vision_model.") for k in tower.state_dict()):
        weights = {k.removeprefix("vision_model."): v for k, v in weights.items()}
    tower.load_state_dict(weights, strict=True)
    return tower.eval()


def converted_image_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=pixel_values).pooler_output
    return torch.stack(list(features))


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    return make_tiny_clip_vision(tmp_path_factory.mktemp("clip") / "clip", seed=11)


@pytest.fixture(scope="module")
def converted(tmp_path_factory, clip_folder):
    root = tmp_path_factory.mktemp("convert")
    src = make_original_llava(root / "original", clip_folder=clip_folder, weights="safetensors", shards=3)
    return src, convert_llava(src, root / "converted")


def test_converted_folder_loads_strictly(converted):
    from transformers import LlavaForConditionalGeneration

    _, dest = converted
    _, info = LlavaForConditionalGeneration.from_pretrained(dest, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert not [p for p in dest.parent.iterdir() if ".tmp-" in p.name]
    assert json.loads((dest / "model.safetensors.index.json").read_text())["weight_map"]


def test_language_model_logits_match_the_original_weights(converted):
    from transformers import LlavaForConditionalGeneration

    src, dest = converted
    state = read_original(src)
    vocab = state["model.embed_tokens.weight"].shape[0]
    reference = original_language_model(state, vocab)
    model = LlavaForConditionalGeneration.from_pretrained(dest).eval()
    input_ids = torch.tensor([[5, 17, 40, 9, 100, 3, 77]])
    with torch.no_grad():
        expected = reference(input_ids).logits
        logits = model(input_ids=input_ids).logits
    assert logits.shape[-1] == vocab + 1  # <image> added
    torch.testing.assert_close(logits[..., :vocab], expected, atol=1e-5, rtol=1e-5)


def test_image_features_use_the_checkpoints_own_tower(converted, clip_folder):
    from transformers import CLIPVisionModel, LlavaForConditionalGeneration

    src, dest = converted
    state = read_original(src)
    model = LlavaForConditionalGeneration.from_pretrained(dest).eval()
    pixel_values = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    features = converted_image_features(model, pixel_values)
    assert features.shape == (2, IMAGE_TOKENS, HIDDEN_SIZE)
    expected = reference_image_features(tower_from_original(state), state, pixel_values)
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=1e-5)
    # the mm_vision_tower folder has other weights: it gave the config only
    other = reference_image_features(CLIPVisionModel.from_pretrained(clip_folder).eval(), state, pixel_values)
    assert not torch.allclose(features, other, atol=1e-3)


def test_new_token_rows_are_the_mean_and_the_processor_expands_images(converted):
    from transformers import LlavaConfig, LlavaProcessor

    src, dest = converted
    state = read_original(src)
    converted_state = {}
    for path in dest.glob("*.safetensors"):
        converted_state |= load_file(path)
    for name, original in (("embed_tokens", "model.embed_tokens.weight"), ("lm_head", "lm_head.weight")):
        grown = converted_state[original_to_hub_name(original)]
        old = state[original]
        assert torch.equal(grown[: old.shape[0]], old), name
        torch.testing.assert_close(grown[old.shape[0] :], old.mean(dim=0, keepdim=True))

    config = LlavaConfig.from_pretrained(dest)
    processor = LlavaProcessor.from_pretrained(dest)
    assert (
        processor.tokenizer.convert_tokens_to_ids("<image>")
        == config.image_token_index
        == state["lm_head.weight"].shape[0]
    )
    assert (config.vision_feature_layer, config.vision_feature_select_strategy) == (-2, "default")
    assert processor.tokenizer.pad_token is not None
    inputs = processor(images=[Image.new("RGB", (28, 28))], text=["<image>\nhi"], return_tensors="pt")
    assert (inputs["input_ids"] == config.image_token_index).sum() == IMAGE_TOKENS == config.image_seq_length
    assert tuple(inputs["pixel_values"].shape[-2:]) == (28, 28)


def test_converted_folder_guides(converted, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _, dest = converted
    guidance = load_guidance(str(dest))
    assert isinstance(guidance, LlavaGuidance) and guidance.hidden_size == HIDDEN_SIZE
    out = guidance.guide([Image.new("RGB", (30, 20), (200, 30, 30))], ["What is wrong?"])
    assert out.hidden_states.shape[-1] == HIDDEN_SIZE and out.attention_mask.all()


def test_bin_shards_without_a_tower_take_it_from_vision_tower(tmp_path, clip_folder):
    from transformers import CLIPVisionModel, LlavaForConditionalGeneration

    src = make_original_llava(
        tmp_path / "original",
        clip_folder=tmp_path / "not-there",
        weights="bin",
        shards=2,
        with_vision_tower=False,
    )
    assert not any(k.startswith("model.vision_tower.") for k in read_original(src))
    with pytest.raises(FileNotFoundError, match="not-there"):
        convert_llava(src, tmp_path / "fails")
    dest = convert_llava(src, tmp_path / "converted", vision_tower=clip_folder, torch_dtype="bfloat16")
    _, info = LlavaForConditionalGeneration.from_pretrained(
        dest, output_loading_info=True, dtype=torch.float32
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    stored = {}
    for path in dest.glob("*.safetensors"):
        stored |= load_file(path)
    assert {t.dtype for t in stored.values()} == {torch.bfloat16}
    assert json.loads((dest / "config.json").read_text())["dtype"] == "bfloat16"
    tower = CLIPVisionModel.from_pretrained(clip_folder).eval()
    for name, tensor in tower.state_dict().items():
        key = "vision_tower.vision_model." + name.removeprefix("vision_model.")
        assert torch.equal(stored[key], tensor.to(torch.bfloat16)), key


def test_refuses_a_non_empty_destination_unless_overwrite(converted, tmp_path):
    src, _ = converted
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "stale.txt").write_text("old")
    with pytest.raises(FileExistsError, match="not empty; pass overwrite=True"):
        convert_llava(src, dest)
    assert (dest / "stale.txt").exists()
    convert_llava(src, dest, overwrite=True)
    assert not (dest / "stale.txt").exists() and (dest / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest"]


def _edit_first_shard(folder: Path, edit) -> None:
    path = sorted(folder.glob("*.safetensors"))[0]
    state = load_file(path)
    edit(state)
    save_file(state, path, metadata={"format": "pt"})


def test_missing_and_unexpected_keys_are_named(tmp_path, clip_folder):
    src = make_original_llava(tmp_path / "original", clip_folder=clip_folder, shards=1)
    _edit_first_shard(src, lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(KeyError, match=r"language_model\.model\.layers\.1\.mlp\.up_proj\.weight"):
        convert_llava(src, tmp_path / "a")
    _edit_first_shard(src, lambda s: s.update({"model.layers.1.mlp.up_proj.weight": torch.zeros(64, 32)}))
    _edit_first_shard(src, lambda s: s.update({"model.image_newline": torch.zeros(32)}))
    with pytest.raises(KeyError, match=r"unexpected key 'model\.image_newline'"):
        convert_llava(src, tmp_path / "b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["original"]  # nothing half-written


def test_unreachable_sources(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="could not get 'nobody/no-such-repo/llava'"):
        convert_llava("nobody/no-such-repo/llava", tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="does not exist locally"):
        convert_llava(tmp_path / "absent", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_refuses_folders_that_are_not_original_llava(tmp_path):
    folder = make_tiny_llava(tmp_path / "hf-llava")
    with pytest.raises(ValueError, match="not an original-layout LLaVA checkpoint"):
        convert_llava(folder, tmp_path / "out")
    config = json.loads((folder / "config.json").read_text())
    original = {"architectures": ["LlavaLlamaForCausalLM"], "mm_projector_type": "linear", **config}
    original["architectures"] = ["LlavaLlamaForCausalLM"]
    (folder / "config.json").write_text(json.dumps(original))
    with pytest.raises(ValueError, match="unsupported mm_projector_type 'linear'"):
        convert_llava(folder, tmp_path / "out")


def test_load_guidance_converts_an_original_checkpoint_once_into_the_cache(
    tmp_path, clip_folder, monkeypatch
):
    src = make_original_llava(tmp_path / "original", clip_folder=clip_folder, weights="safetensors", shards=1)
    monkeypatch.setenv("IMG_GUIDANCE_CACHE", str(tmp_path / "cache"))
    image = Image.new("RGB", (30, 20), (200, 10, 10))
    first = load_guidance(str(src)).guide([image], ["what should change?"])
    (converted_dir,) = (tmp_path / "cache" / "converted").iterdir()
    assert (converted_dir / "config.json").is_file()
    stamp = (converted_dir / "config.json").stat().st_mtime_ns
    second = load_guidance(str(src)).guide([image], ["what should change?"])
    assert (converted_dir / "config.json").stat().st_mtime_ns == stamp  # reused, not converted again
    torch.testing.assert_close(first.hidden_states, second.hidden_states)


def test_cli_convert_llava(tmp_path, clip_folder):
    from typer.testing import CliRunner

    from img_guidance.cli import app

    src = make_original_llava(tmp_path / "original", clip_folder=clip_folder, weights="safetensors", shards=1)
    runner = CliRunner()
    result = runner.invoke(app, ["convert-llava", str(src), str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert load_guidance(str(tmp_path / "out")).hidden_size == load_guidance(str(src)).hidden_size
    result = runner.invoke(app, ["convert-llava", str(src), str(tmp_path / "out")])
    assert result.exit_code == 1 and "--overwrite" in result.output
    result = runner.invoke(app, ["convert-llava", str(tmp_path / "missing"), str(tmp_path / "x")])
    assert result.exit_code == 1 and "missing" in result.output and not (tmp_path / "x").exists()
