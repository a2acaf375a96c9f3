"""blip-vqa, T2I-CompBench's BLIP-VQA: a tiny random BlipForQuestionAnswering scored by the scorer and
compared with the reference's computation written out here one question at a time (PIL's bicubic resize
to a square, CLIP normalisation; the question through BLIP's pre_question, [ENC] for its first token;
the vision encoder, the text encoder, one decoder step from [DEC]; the softmax over the vocabulary and
P(yes) / (P(yes) + P(no)); the product over the prompt's noun phrases), the rule-based noun phrase
splitter on T2I-CompBench's prompt forms, and the errors."""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from img_guidance.eval import scorers
from img_guidance.eval.scorers import blip_question, load_scorer, split_noun_phrases
from img_guidance.testing.blip_vqa import IMAGE_SIZE, blip_vqa_tokenizer, make_tiny_blip_vqa

MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)


@pytest.fixture(scope="module")
def blip(tmp_path_factory):
    return make_tiny_blip_vqa(tmp_path_factory.mktemp("blip-vqa") / "blip")


@pytest.fixture(scope="module")
def scorer(blip):
    return load_scorer("blip-vqa", weights=str(blip))


def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)),  # squashed, not cropped
        Image.fromarray(rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)),  # no resize
        Image.fromarray(rng.integers(0, 256, (64, 21), dtype=np.uint8)),  # grey: converted to RGB
        Image.fromarray(rng.integers(0, 256, (33, 90, 3), dtype=np.uint8)),
    ]


# T2I-CompBench prompts (color_val.txt, texture_val.txt) with the noun phrases spaCy's noun chunks give
PROMPTS = {
    "a green bench and a red car": ["a green bench", "a red car"],
    "a blue car, a red dog and a brown cat": ["a blue car", "a red dog", "a brown cat"],
    "fluffy clouds": ["fluffy clouds"],
    "A bathroom with white tile and a beige toilet.": ["A bathroom", "white tile", "a beige toilet"],
}


def reference_answer(model, image: Image.Image, phrase: str) -> float:
    """T2I-CompBench's vqa_prob for one question on its own (no padding): the image resized to S x S
    by PIL's bicubic (torchvision's Resize((S, S)) on a PIL image), [0, 1], CLIP mean and std; the
    question f"{phrase}?" lower-cased (pre_question; the phrases here have nothing else it removes),
    tokenized with [CLS] replaced by [ENC]; the ViT, the text encoder cross-attending to every image
    token, one decoder step from [DEC]; the softmax over the vocabulary; P(yes) / (P(yes) + P(no))."""
    tokenizer = blip_vqa_tokenizer()
    dec, enc = len(tokenizer), len(tokenizer) + 1  # BLIP's layout: [DEC] and [ENC] after the vocabulary
    yes, no = tokenizer.convert_tokens_to_ids("yes"), tokenizer.convert_tokens_to_ids("no")
    resized = image.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC)
    pixels = torch.from_numpy(np.array(resized)).permute(2, 0, 1).float() / 255  # [3, S, S]
    pixels = ((pixels - MEAN) / STD)[None]
    tokens = tokenizer(phrase.lower() + "?", return_tensors="pt")
    input_ids = tokens["input_ids"].clone()
    assert input_ids[0, 0] == tokenizer.cls_token_id
    input_ids[0, 0] = enc
    with torch.no_grad():
        image_states = model.vision_model(pixel_values=pixels).last_hidden_state  # [1, 1 + 25, D]
        question_states = model.text_encoder(
            input_ids=input_ids,
            attention_mask=tokens["attention_mask"],
            encoder_hidden_states=image_states,
            encoder_attention_mask=torch.ones(image_states.shape[:-1], dtype=torch.long),
        ).last_hidden_state  # [1, T, H]
        logits = model.text_decoder(
            input_ids=torch.tensor([[dec]]),
            encoder_hidden_states=question_states,
            encoder_attention_mask=tokens["attention_mask"],
        ).logits[0, 0]  # [V]
    probs = logits.softmax(-1)
    return float(probs[yes] / (probs[yes] + probs[no]))


def test_blip_vqa_follows_the_reference(blip, scorer):
    from transformers import BlipForQuestionAnswering

    model = BlipForQuestionAnswering.from_pretrained(blip).eval()
    ims, prompts = images(), list(PROMPTS)
    got = scorer.score(ims, prompts)

    answers = [
        [reference_answer(model, im, p) for p in PROMPTS[prompt]]
        for im, prompt in zip(ims, prompts, strict=True)
    ]
    expected = torch.tensor([float(np.prod(a)) for a in answers])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-8)
    assert got.dtype == torch.float32 and got.shape == (4,)
    # the random model's answers differ from question to question, so a wrong token, mask or image shows
    flat = [a for row in answers for a in row]
    assert max(flat) > 5 * min(flat) and len({round(a, 5) for a in flat}) == len(flat)


def test_an_image_scores_the_product_over_its_noun_phrases(scorer):
    im = images()[0]
    whole = scorer.score([im], ["a green bench and a red car"])
    parts = scorer.score([im, im], ["a green bench", "a red car"])
    torch.testing.assert_close(whole, parts.prod().view(1), rtol=1e-5, atol=1e-8)
    assert 0 < whole.item() < parts.min().item()


def test_batches_score_as_one_image_at_a_time(scorer):
    ims, prompts = images(), list(PROMPTS)
    batched = scorer.score(ims, prompts)  # nine questions of 10 to 15 tokens, padded to 15
    alone = torch.cat([scorer.score([im], [p]) for im, p in zip(ims, prompts, strict=True)])
    reversed_ = scorer.score(ims[::-1], prompts[::-1]).flip(0)
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(batched, reversed_, rtol=1e-5, atol=1e-8)


def test_other_dtypes_score_near_float32(blip, scorer):
    ims, prompts = images()[:2], ["a red car", "fluffy clouds"]
    full = scorer.score(ims, prompts)
    double = load_scorer("blip-vqa", weights=str(blip), dtype=torch.float64)
    torch.testing.assert_close(double.score(ims, prompts), full, rtol=1e-5, atol=1e-6)
    half = load_scorer("blip-vqa", weights=str(blip), dtype=torch.bfloat16)
    assert half.model.vision_model.embeddings.patch_embedding.weight.dtype == torch.bfloat16
    low = half.score(ims, prompts)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, full, rtol=0.2, atol=0)  # bfloat16's 8 bits: a few % off


@pytest.mark.parametrize(
    ("prompt", "phrases"),
    [
        *PROMPTS.items(),
        ("a red apple and yellow bananas", ["a red apple", "yellow bananas"]),
        ("rubber sole shoes and a metallic key", ["rubber sole shoes", "a metallic key"]),
        (
            "two white sheep, a black goat and a white goat in a field",
            ["two white sheep", "a black goat", "a white goat", "a field"],
        ),
        (
            "a triangular slice of cheese and a rectangular cheese board",
            ["a triangular slice", "cheese", "a rectangular cheese board"],
        ),
        (
            "A kitchen with white tile floor and blue sloped ceiling.",
            ["A kitchen", "white tile floor", "blue sloped ceiling"],
        ),
        ("a horse on the right of a car", ["a horse", "the right", "a car"]),
        (
            "A small bathroom with a small brown toilet next to a white sink.",
            ["A small bathroom", "a small brown toilet", "a white sink"],
        ),
        ("a round cookie and a square container.", ["a round cookie", "a square container"]),
        # documented limits: coordinated adjectives are cut, verbs stay in their piece
        ("A black and white cat", ["A black", "white cat"]),
        (
            "The round knob and the square plate were attached",
            ["The round knob", "the square plate were attached"],
        ),
        ("", []),
        (" and ", []),
    ],
)
def test_the_rule_based_splitter_on_compbench_prompts(prompt, phrases):
    assert split_noun_phrases(prompt) == phrases


def test_questions_are_the_first_eight_phrases_through_pre_question(scorer):
    assert blip_question('A "Red" Car (big);') == "a red car big?"
    assert blip_question("a cubic Rubik's cube") == "a cubic rubik's cube?"
    assert blip_question(" ".join(["word"] * 60)) == " ".join(["word"] * 50)  # cut at 50 words, "?" too
    letters = ", ".join("abcdefghij")  # ten phrases: only the first eight are asked
    questions, owners = scorer.questions(["a red car", letters])
    assert questions == ["a red car?", *(f"{c}?" for c in "abcdefgh")]
    assert owners == [0] + [1] * 8


def test_a_prompt_without_noun_phrases_scores_one(scorer):
    ims = images()[:3]
    got = scorer.score(ims, ["", "a red car", " , and "])
    assert got[0] == 1 and got[2] == 1 and 0 < got[1] < 1
    assert scorer.score(ims[:1], [""]).tolist() == [1.0]


def test_spacy_noun_chunks_are_used_where_importable(blip, monkeypatch):
    """A stand-in spaCy whose en_core_web_sm returns fixed chunks: the scorer asks those and names the
    splitter; a spaCy without the model falls back to the rule-based splitter."""
    seen = []

    def nlp(text):
        seen.append(text)
        return types.SimpleNamespace(noun_chunks=[types.SimpleNamespace(text="a green bench")])

    nlp.meta = {"version": "3.8.0"}

    def load(name):
        assert name == "en_core_web_sm"
        return nlp

    monkeypatch.setitem(sys.modules, "spacy", types.SimpleNamespace(__version__="3.8.2", load=load))
    scorer = load_scorer("blip-vqa", weights=str(blip))
    assert scorer.describe()["noun_phrases"] == "spaCy 3.8.2 en_core_web_sm 3.8.0 noun_chunks"
    assert scorer.questions(["a green bench and a red car"]) == (["a green bench?"], [0])
    assert seen == ["a green bench and a red car"]

    def missing(name):
        raise OSError(f"[E050] Can't find model '{name}'")

    monkeypatch.setitem(sys.modules, "spacy", types.SimpleNamespace(__version__="3.8.2", load=missing))
    scorer = load_scorer("blip-vqa", weights=str(blip))
    assert scorer.describe()["noun_phrases"].startswith("rule-based")
    assert scorer.questions(["a green bench and a red car"])[0] == ["a green bench?", "a red car?"]


def test_blip_vqa_is_registered(blip, scorer):
    assert "blip-vqa" in scorers.SCORERS
    assert scorers.DEFAULT_WEIGHTS["blip-vqa"] == ("Salesforce/blip-vqa-capfilt-large",) * 2
    described = scorer.describe()
    assert described | {"noun_phrases": "?"} == {
        "name": "blip-vqa",
        "model": str(blip),
        "processor": str(blip),
        "noun_phrases": "?",
    }
    assert described["noun_phrases"].startswith(("rule-based", "spaCy"))


def test_bad_input_and_bad_parts_fail_in_one_line(blip, scorer, tmp_path):
    from transformers import BlipImageProcessorPil, BlipProcessor

    from img_guidance.testing.tokenizers import bert_tokenizer

    with pytest.raises(ValueError, match=r"one prompt per image: got 2 images and 1 prompts") as raised:
        scorer.score(images()[:2], ["a red car"])
    assert "\n" not in str(raised.value)

    no_yes = tmp_path / "no-yes"
    pil = BlipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    BlipProcessor(image_processor=pil, tokenizer=bert_tokenizer()).save_pretrained(no_yes)
    wrong_size = tmp_path / "wrong-size"
    big = BlipImageProcessorPil(size={"height": 2 * IMAGE_SIZE, "width": 2 * IMAGE_SIZE})
    BlipProcessor(image_processor=big, tokenizer=blip_vqa_tokenizer()).save_pretrained(wrong_size)
    cases = [
        (no_yes, r"blip-vqa: the tokenizer of .*no-yes has no token 'yes': not BLIP's BERT tokenizer"),
        (
            wrong_size,
            r"blip-vqa: the processor of .*wrong-size resizes to 60 x 60 but the model takes 30 x 30",
        ),
    ]
    for processor, message in cases:
        with pytest.raises(ValueError, match=message) as raised:
            load_scorer("blip-vqa", weights=str(blip), processor=str(processor))
        assert "\n" not in str(raised.value)
    with pytest.raises(FileNotFoundError, match=r"blip-vqa: .*no BLIP VQA model"):
        load_scorer("blip-vqa", weights=str(no_yes))  # a processor folder without a model


def test_eval_score_takes_blip_vqa_weights_from_the_command_line(blip, tmp_path):
    from img_guidance.cli import app

    folder = tmp_path / "images"
    folder.mkdir()
    lines = []
    for i, (color, prompt) in enumerate(
        [((200, 20, 20), "a red car and a green bench"), ((20, 20, 200), "a blue cup")]
    ):
        Image.new("RGB", (48, 40), color).save(folder / f"{i}.png")
        lines.append(json.dumps({"file": f"{i}.png", "prompt": prompt, "system": "base"}) + "\n")
    (folder / "images.jsonl").write_text("".join(lines))
    args = ["eval", "score", str(folder), "--scorers", "blip-vqa", "--device", "cpu"]
    result = CliRunner().invoke(app, [*args, "--scorer-weights", f"blip-vqa={blip}"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (folder / "eval" / "scores.jsonl").read_text().splitlines()]
    scorer = load_scorer("blip-vqa", weights=str(blip))
    with Image.open(folder / "0.png") as a, Image.open(folder / "1.png") as b:
        expected = scorer.score(
            [a.convert("RGB"), b.convert("RGB")], ["a red car and a green bench", "a blue cup"]
        )
    assert [row["blip-vqa"] for row in rows] == pytest.approx(expected.tolist(), rel=1e-6)
