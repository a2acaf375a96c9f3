import importlib.util
import json
import re
import shutil

import pytest
import torch
from PIL import Image

from img_guidance.guidance import DETECTOR_INFO, LlavaGuidance, load_guidance
from img_guidance.guidance.llava import expand_to_square, loading_kwargs, mean_colour
from img_guidance.guidance.prompts import (
    LLAVA_V0_SYSTEM,
    LLAVA_V1_SYSTEM,
    build_example,
    build_prompt,
    clean_answer,
)
from img_guidance.presets import GUIDANCE_PRESETS, GuidancePreset
from img_guidance.testing.llava import HIDDEN_SIZE, IMAGE_TOKENS, make_tiny_llava

QUESTION = "How should this image change to match the intended prompt: a red cube?"
OTHER = "What is wrong?"


@pytest.fixture(scope="module")
def llava_folder(tmp_path_factory):
    return make_tiny_llava(tmp_path_factory.mktemp("llava") / "tiny-llava")


@pytest.fixture(scope="module")
def guidance(llava_folder):
    return LlavaGuidance.from_pretrained(llava_folder)


def picture(width, height, seed):
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=gen, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy(), "RGB")


# -- prompt formats ---------------------------------------------------------------------------------


def test_llava_prompt_strings_are_exact():
    v0 = (
        "A chat between a curious human and an artificial intelligence assistant. The assistant gives "
        "helpful, detailed, and polite answers to the human's questions.###Human: <image>\nWhat?###Assistant:"
    )
    v1 = (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
        "helpful, detailed, and polite answers to the user's questions. USER: <image>\nWhat? ASSISTANT:"
    )
    assert build_prompt("llava_v0", "What?") == v0
    assert build_prompt("llava_v1", "What?") == v1
    assert v0.startswith(LLAVA_V0_SYSTEM) and v1.startswith(LLAVA_V1_SYSTEM)


def test_training_examples_continue_the_prompt():
    assert build_example("llava_v0", "What?", "Make it red.") == (
        build_prompt("llava_v0", "What?"),
        " Make it red.###",
    )
    assert build_example("llava_v1", "What?", "Make it red.")[1] == " Make it red.</s>"


def test_prompt_format_errors(llava_folder):
    with pytest.raises(
        ValueError, match="unknown prompt format 'llava_v2'; valid formats: llava_v0, llava_v1, chat"
    ):
        build_prompt("llava_v2", "What?")
    with pytest.raises(ValueError, match="needs a processor"):
        build_prompt("chat", "What?")
    with pytest.raises(ValueError, match="image placeholder"):
        build_prompt("llava_v0", "What is <image> about?")
    with pytest.raises(ValueError, match="unknown prompt format 'vicuna'"):
        LlavaGuidance.from_pretrained(llava_folder, prompt_format="vicuna")
    with pytest.raises(ValueError, match="unknown prompt format 'vicuna'"):
        load_guidance(str(llava_folder), prompt_format="vicuna")


@pytest.mark.parametrize("prompt_format", ["llava_v0", "llava_v1"])
def test_one_row_per_text_token_and_image_token(llava_folder, guidance, prompt_format):
    model = LlavaGuidance(model=guidance.model, processor=guidance.processor, prompt_format=prompt_format)
    out = model.guide([picture(28, 28, 0)], [QUESTION])
    text = build_prompt(prompt_format, QUESTION)
    assert out.texts == [text]
    text_tokens = len(guidance.processor.tokenizer(text)["input_ids"])  # <image> counts as one token
    assert out.hidden_states.shape == (1, text_tokens - 1 + IMAGE_TOKENS, HIDDEN_SIZE)
    config = json.loads((llava_folder / "processor_config.json").read_text())
    assert (config["image_processor"]["crop_size"]["height"] // config["patch_size"]) ** 2 == IMAGE_TOKENS


# -- features ---------------------------------------------------------------------------------------


def test_batch_shape_mask_and_padding(guidance):
    images = [picture(28, 28, 1), picture(40, 24, 2)]
    out = guidance.guide(images, [OTHER, QUESTION])
    singles = [guidance.guide([image], [q]) for image, q in zip(images, [OTHER, QUESTION], strict=True)]
    lengths = [s.hidden_states.shape[1] for s in singles]
    assert lengths[0] < lengths[1]
    assert guidance.hidden_size == HIDDEN_SIZE
    assert out.hidden_states.shape == (2, max(lengths), HIDDEN_SIZE)
    assert out.attention_mask.dtype == torch.bool
    assert out.attention_mask.sum(dim=1).tolist() == lengths
    assert out.attention_mask[0, : lengths[0]].all() and not out.attention_mask[0, lengths[0] :].any()
    assert (out.hidden_states[0, lengths[0] :] == 0).all()
    for row, single in enumerate(singles):
        torch.testing.assert_close(
            out.hidden_states[row, : lengths[row]], single.hidden_states[0], atol=1e-5, rtol=1e-5
        )


def test_features_are_the_last_layer_after_the_final_norm(guidance):
    image = picture(28, 28, 8)
    out = guidance.guide([image], [QUESTION])
    inputs = guidance.processor(images=[image], text=out.texts, return_tensors="pt")
    with torch.no_grad():
        base = guidance.model.model(**inputs)  # LlavaModel: last_hidden_state is after the norm
    torch.testing.assert_close(out.hidden_states, base.last_hidden_state)
    norm = guidance.model.model.language_model.norm
    assert not torch.allclose(norm.weight, torch.ones_like(norm.weight))  # the norm is not a no-op


def test_another_hidden_layer_is_read_when_named(llava_folder, guidance, tmp_path):
    """``hidden_layer`` picks one of the language model's hidden states (0: the input embeddings, 1:
    the first layer's output; the default -1: the last, after the norm); a bad one is refused by
    name before any weights load; a detector folder's DETECTOR_INFO names its own; an argument wins."""
    image = picture(28, 28, 8)
    out = guidance.guide([image], [QUESTION])
    inputs = guidance.processor(images=[image], text=out.texts, return_tensors="pt")
    with torch.no_grad():
        states = guidance.model(**inputs, output_hidden_states=True).hidden_states
    assert len(states) == 3 and not torch.allclose(states[1], states[-1])
    first = LlavaGuidance.from_pretrained(llava_folder, hidden_layer=1)
    torch.testing.assert_close(first.guide([image], [QUESTION]).hidden_states, states[1])
    assert first.describe()["hidden_layer"] == 1 and "hidden_layer" not in guidance.describe()

    named = tmp_path / "detector"  # as the detector recipe (and ShapesWorld's stage) writes it
    shutil.copytree(llava_folder, named)
    (named / DETECTOR_INFO).write_text(json.dumps({"prompt_format": "llava_v0", "hidden_layer": 0}))
    assert load_guidance(named).hidden_layer == 0
    assert load_guidance(named, hidden_layer=-1).hidden_layer == -1

    for weights in named.glob("*.safetensors"):  # no weights: only a check before loading can answer
        weights.unlink()
    for bad in (3, -4, True, 1.0):
        with pytest.raises(ValueError, match=re.escape(f"got {bad!r}")):
            load_guidance(named, hidden_layer=bad)
    (named / DETECTOR_INFO).write_text(json.dumps({"prompt_format": "llava_v0", "hidden_layer": 5}))
    with pytest.raises(ValueError, match=r"hidden_layer must name one of the 3 hidden states .* got 5"):
        load_guidance(named)


def test_right_padding_even_when_the_tokenizer_pads_left(guidance):
    images, questions = [picture(28, 28, 1), picture(28, 28, 2)], [OTHER, QUESTION]
    expected = guidance.guide(images, questions)
    tokenizer = guidance.processor.tokenizer
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        out = guidance.guide(images, questions)
    finally:
        tokenizer.padding_side = side
    assert out.attention_mask[0, 0] and not out.attention_mask[0, -1]
    torch.testing.assert_close(out.hidden_states, expected.hidden_states)


def test_deterministic_across_calls_and_loads(llava_folder, guidance):
    images, questions = [picture(30, 20, 3)], [QUESTION]
    first = guidance.guide(images, questions).hidden_states
    assert torch.equal(first, guidance.guide(images, questions).hidden_states)
    again = LlavaGuidance.from_pretrained(llava_folder)
    assert torch.equal(first, again.guide(images, questions).hidden_states)


def test_non_square_images_are_padded_with_the_mean_colour(guidance):
    fill = mean_colour(guidance.processor.image_processor.image_mean)
    assert fill == (122, 116, 104)  # int(255 * OpenAI CLIP mean), as LLaVA-1.5 computes it
    wide = picture(40, 20, 4)
    square = expand_to_square(wide, fill)
    assert square.size == (40, 40)
    assert square.getpixel((0, 0)) == fill and square.getpixel((39, 39)) == fill
    assert square.crop((0, 10, 40, 30)).tobytes() == wide.tobytes()  # centred
    tall = expand_to_square(picture(10, 30, 5), fill)
    assert tall.size == (30, 30) and tall.getpixel((0, 15)) == fill and tall.getpixel((29, 15)) == fill
    out = guidance.guide([wide], [QUESTION]).hidden_states
    assert torch.equal(out, guidance.guide([square], [QUESTION]).hidden_states)
    black = expand_to_square(wide, (0, 0, 0))
    assert not torch.allclose(out, guidance.guide([black], [QUESTION]).hidden_states)


def test_guide_input_errors(guidance):
    with pytest.raises(ValueError, match="2 images, 1 questions"):
        guidance.guide([picture(28, 28, 0)] * 2, [QUESTION])
    with pytest.raises(ValueError, match="empty"):
        guidance.guide([], [])
    with pytest.raises(TypeError, match="image 0 is a Tensor"):
        guidance.guide([torch.zeros(3, 28, 28)], [QUESTION])


# -- answers ----------------------------------------------------------------------------------------


def test_answer_is_greedy_generation_decoded(guidance):
    images, questions = [picture(28, 28, 1), picture(40, 24, 2)], [OTHER, QUESTION]
    answers = guidance.answer(images, questions, max_new_tokens=12)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    assert all(answers) and answers[0] != answers[1]
    assert guidance.answer(images, questions, max_new_tokens=12) == answers
    # by hand, one sample at a time (no padding): the batch is left-padded, so it changes nothing
    tokenizer = guidance.processor.tokenizer
    for image, question, answer in zip(images, questions, answers, strict=True):
        square = expand_to_square(image, mean_colour(guidance.processor.image_processor.image_mean))
        text = build_prompt(guidance.prompt_format, question, guidance.processor)
        inputs = guidance.processor(images=[square], text=[text], return_tensors="pt")
        with torch.no_grad():
            output = guidance.model.generate(
                **inputs,
                max_new_tokens=12,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        new = output[0, inputs["input_ids"].shape[1] :]
        assert answer == clean_answer(guidance.prompt_format, tokenizer.decode(new, skip_special_tokens=True))
    assert len(guidance.answer(images[:1], questions[:1], max_new_tokens=1)[0]) < len(answers[0])


def test_answer_input_errors(guidance):
    with pytest.raises(ValueError, match="max_new_tokens must be a positive integer, got 0"):
        guidance.answer([picture(28, 28, 0)], [QUESTION], max_new_tokens=0)
    with pytest.raises(ValueError, match="2 images, 1 questions"):
        guidance.answer([picture(28, 28, 0)] * 2, [QUESTION])


# -- loading ----------------------------------------------------------------------------------------


def test_load_guidance_from_a_folder_offline(llava_folder, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = load_guidance(str(llava_folder))
    assert isinstance(model, LlavaGuidance)
    assert model.hidden_size == HIDDEN_SIZE
    assert model.describe() == {"family": "llava", "model": str(llava_folder), "prompt_format": "llava_v0"}
    v1 = load_guidance(llava_folder, prompt_format="llava_v1")
    assert v1.guide([picture(28, 28, 0)], ["Why?"]).texts[0].endswith(" ASSISTANT:")


def test_load_guidance_from_a_preset(llava_folder, monkeypatch):
    preset = GuidancePreset(family="llava", model=str(llava_folder), prompt_format="llava_v1", hidden_size=32)
    monkeypatch.setitem(GUIDANCE_PRESETS, "tiny-llava", preset)
    model = load_guidance("tiny-llava")
    assert model.describe()["prompt_format"] == "llava_v1"


def test_original_layout_is_refused_with_the_conversion_command(tmp_path):
    config = {"architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava", "mm_vision_tower": "x"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="img-guidance convert-llava") as info:
        load_guidance(str(tmp_path), convert_original=False)
    assert str(tmp_path) in str(info.value)


def test_unknown_family_and_missing_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="type 'bert'"):
        load_guidance(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="nothing-here' does not exist locally"):
        load_guidance(str(tmp_path / "nothing-here"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty has no config\.json"):
        load_guidance(str(tmp_path / "empty"))


def test_quantization_options():
    with pytest.raises(ValueError, match="unknown quantization '3bit'"):
        loading_kwargs(torch_dtype=None, device=None, quantization="3bit")
    with pytest.raises(ValueError, match="unknown dtype 'half'"):
        loading_kwargs(torch_dtype="half", device=None, quantization=None)
    assert loading_kwargs(torch_dtype="bfloat16", device=None, quantization=None) == {"dtype": torch.bfloat16}
    if importlib.util.find_spec("bitsandbytes") is None:
        with pytest.raises(ImportError, match="needs the bitsandbytes package"):
            loading_kwargs(torch_dtype=None, device=None, quantization="8bit")


# -- offload ----------------------------------------------------------------------------------------


def test_offload_modes_give_the_same_features(llava_folder):
    model = LlavaGuidance.from_pretrained(llava_folder)
    images, questions = [picture(28, 28, 6), picture(28, 28, 7)], [QUESTION, OTHER]
    expected = model.guide(images, questions).hidden_states
    with pytest.raises(ValueError, match="unknown offload mode 'disk'; valid modes: none, model, sequential"):
        model.set_offload("disk", "cpu")
    model.set_offload("model", "cpu")
    torch.testing.assert_close(model.guide(images, questions).hidden_states, expected)
    assert next(model.model.parameters()).device.type == "cpu"
    model.set_offload("sequential", "cpu")
    assert hasattr(model.model, "_hf_hook")
    torch.testing.assert_close(model.guide(images, questions).hidden_states, expected)
    model.set_offload("none", "cpu")
    assert not hasattr(model.model, "_hf_hook")
    assert all(p.device.type == "cpu" for p in model.model.parameters())
    torch.testing.assert_close(model.guide(images, questions).hidden_states, expected)
    model._quantized = True  # as for a bitsandbytes model, whose weights cannot move
    with pytest.raises(ValueError, match="quantized model cannot be offloaded"):
        model.set_offload("sequential", "cpu")
