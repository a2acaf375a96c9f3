import pytest
import torch
from PIL import Image

from img_guidance.guidance import QwenGuidance, load_guidance
from img_guidance.guidance.prompts import build_example, build_prompt
from img_guidance.guidance.qwen import QwenImageTextProcessor
from img_guidance.testing.qwen import HIDDEN_SIZE, SQUARE_IMAGE_TOKENS, make_tiny_qwen

QUESTION = "How should this image change to match the intended prompt: two blue spheres?"
OTHER = "What is wrong?"


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def qwen(request, tmp_path_factory):
    folder = make_tiny_qwen(tmp_path_factory.mktemp(request.param) / "tiny", family=request.param)
    return request.param, folder, QwenGuidance.from_pretrained(folder)


def picture(width, height, seed):
    gen = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=gen, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy(), "RGB")


def test_chat_prompt_is_the_models_template(qwen):
    _, _, guidance = qwen
    text = build_prompt("chat", QUESTION, guidance.processor)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        f"<|vision_start|><|image_pad|><|vision_end|>{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
    )
    prompt, target = build_example("chat", QUESTION, "Make them blue.", guidance.processor)
    assert prompt == text and target == "Make them blue.<|im_end|>\n"


def test_image_tokens_follow_each_images_grid(qwen):
    _, _, guidance = qwen
    processor = guidance.processor
    texts = [build_prompt("chat", q, processor) for q in (OTHER, QUESTION)]
    inputs = processor([picture(28, 28, 0), picture(60, 40, 1)], texts)
    image_tokens = (inputs["input_ids"] == processor.image_token_id).sum(dim=1)
    # 28 x 28 is scaled up to the 56 x 56 budget: 4 x 4 patches; 60 x 40 becomes 84 x 56: 6 x 4
    assert image_tokens.tolist() == [SQUARE_IMAGE_TOKENS, 6]
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 4], [1, 4, 6]]
    assert torch.equal(inputs["mm_token_type_ids"], (inputs["input_ids"] == processor.image_token_id).long())
    text_tokens = [len(processor.tokenizer(t)["input_ids"]) - 1 for t in texts]
    assert inputs["attention_mask"].sum(dim=1).tolist() == [
        n + k for n, k in zip(text_tokens, image_tokens.tolist(), strict=True)
    ]


def test_features_shape_mask_and_batch_equals_single(qwen):
    family, _, guidance = qwen
    assert guidance.family == family and guidance.hidden_size == HIDDEN_SIZE
    images, questions = [picture(28, 28, 2), picture(60, 40, 3)], [OTHER, QUESTION]
    out = guidance.guide(images, questions)
    singles = [guidance.guide([image], [q]) for image, q in zip(images, questions, strict=True)]
    lengths = [s.hidden_states.shape[1] for s in singles]
    assert lengths[0] < lengths[1]
    assert out.hidden_states.shape == (2, max(lengths), HIDDEN_SIZE)
    assert out.attention_mask.dtype == torch.bool
    assert out.attention_mask.sum(dim=1).tolist() == lengths
    assert out.attention_mask[0, : lengths[0]].all() and not out.attention_mask[0, lengths[0] :].any()
    assert (out.hidden_states[0, lengths[0] :] == 0).all()
    for row, single in enumerate(singles):
        torch.testing.assert_close(
            out.hidden_states[row, : lengths[row]], single.hidden_states[0], atol=1e-5, rtol=1e-5
        )
    assert torch.equal(out.hidden_states, guidance.guide(images, questions).hidden_states)


def test_load_guidance_reads_the_family_from_the_config(qwen, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    family, folder, _ = qwen
    model = load_guidance(str(folder))
    assert isinstance(model, QwenGuidance)
    assert model.describe() == {"family": family, "model": str(folder), "prompt_format": "chat"}
    with pytest.raises(ValueError, match="read with the 'chat' prompt format, got 'llava_v0'"):
        load_guidance(str(folder), prompt_format="llava_v0")


def test_processor_needs_exactly_one_image_token(qwen):
    _, _, guidance = qwen
    processor: QwenImageTextProcessor = guidance.processor
    with pytest.raises(ValueError, match="exactly once, found 2"):
        processor([picture(28, 28, 0)], ["<|image_pad|><|image_pad|>hi"])
    with pytest.raises(ValueError, match="exactly once, found 0"):
        processor([picture(28, 28, 0)], ["no image"])
