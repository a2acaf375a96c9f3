"""The IMG loop with stand-in parts that record what they are given (real tiny models: test_e2e)."""

import hashlib

import pytest
import torch
from PIL import Image

from img_guidance import ImplicitAligner
from img_guidance.backends.base import DiffusionBackend, GenerationDefaults
from img_guidance.guidance.base import GuidanceModel, GuidanceOutput
from img_guidance.guidance.questions import QUESTIONS, choose_question, fill
from img_guidance.pipeline import STAGES, IMGPipeline

TOKENS, WIDTH, HIDDEN = 3, 16, 24


def _colour(*parts) -> tuple[int, int, int]:
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return digest[0], digest[1], digest[2]


class RecordingBackend(DiffusionBackend):
    """Images are flat colours determined by (prompt, seed, rounded tokens); tokens by colour."""

    family = "fake"
    defaults = GenerationDefaults(steps=2, guidance_scale=1.0, height=8, width=8)

    def __init__(self, width=WIDTH):
        self.width = width
        self.calls = []

    @property
    def token_shape(self):
        return (TOKENS, self.width)

    @property
    def device(self):
        return torch.device("cpu")

    def encode_image(self, images):
        self.calls.append(("encode", len(images)))
        rows = []
        for im in images:
            r, g, b = im.getpixel((0, 0))
            gen = torch.Generator().manual_seed(r * 65536 + g * 256 + b)
            rows.append(torch.randn(TOKENS, self.width, generator=gen))
        return torch.stack(rows)

    def negative_image_tokens(self):
        return torch.zeros(1, TOKENS, self.width)

    def generate(self, prompts, seeds, *, image_tokens=None, ip_scale=0.2, **sampling):
        self.calls.append(("generate", list(prompts), list(seeds), image_tokens, ip_scale, sampling))
        out = []
        for i, (p, s) in enumerate(zip(prompts, seeds, strict=True)):
            key = (
                None if image_tokens is None else tuple(image_tokens[i].flatten().round(decimals=4).tolist())
            )
            out.append(Image.new("RGB", (8, 8), _colour(p, s, key)))
        return out


class RecordingGuidance(GuidanceModel):
    """Guidance rows depend on the image colour and the question; lengths vary with the question."""

    hidden_size = HIDDEN

    def __init__(self):
        self.calls = []

    @property
    def device(self):
        return torch.device("cpu")

    def guide(self, images, questions):
        self.calls.append((list(images), list(questions)))
        lengths = [4 + len(q) % 5 for q in questions]
        hidden = torch.zeros(len(images), max(lengths), HIDDEN)
        mask = torch.zeros(len(images), max(lengths), dtype=torch.bool)
        for b, (im, q) in enumerate(zip(images, questions, strict=True)):
            gen = torch.Generator().manual_seed(sum(im.getpixel((0, 0))) + len(q))
            hidden[b, : lengths[b]] = torch.randn(lengths[b], HIDDEN, generator=gen)
            mask[b, : lengths[b]] = True
        return GuidanceOutput(hidden_states=hidden, attention_mask=mask, texts=list(questions))


def make_aligner(guidance_dim=HIDDEN, image_dim=WIDTH):
    torch.manual_seed(0)
    aligner = ImplicitAligner(guidance_dim=guidance_dim, image_dim=image_dim, depth=1, heads=2, head_dim=8)
    torch.nn.init.normal_(aligner.zero_linear.weight, std=0.5)
    return aligner


def test_one_round_flows_through_every_stage_in_order():
    backend, guidance, aligner = RecordingBackend(), RecordingGuidance(), make_aligner()
    pipe = IMGPipeline(backend=backend, guidance=guidance, aligner=aligner)
    prompts = ["a red circle", "two blue squares"]
    out = pipe(prompts, seeds=[7, 11], passes=3, ip_scale=0.3, steps=5)

    gen_initial, encode, gen_final = backend.calls
    assert gen_initial[0] == "generate" and gen_initial[1:3] == (prompts, [7, 11]) and gen_initial[3] is None
    assert encode == ("encode", 2)
    assert gen_final[0] == "generate" and gen_final[4] == 0.3 and gen_final[5]["steps"] == 5

    # the guidance saw the initial images and the seeded questions
    images_seen, questions_seen = guidance.calls[0]
    assert images_seen == out.initial
    expected_questions = [
        fill(choose_question(s, index=0, questions=QUESTIONS), p)
        for p, s in zip(prompts, [7, 11], strict=True)
    ]
    assert questions_seen == expected_questions == out.rounds[0].questions

    # the tokens given to the re-generation are exactly aligner.align(guidance, tokens, 3, mask)
    guided = guidance.guide(out.initial, expected_questions)
    with torch.no_grad():
        expected = aligner.align(
            guided.hidden_states, backend.encode_image(out.initial), 3, guided.attention_mask
        )
    torch.testing.assert_close(gen_final[3], expected)
    assert not torch.allclose(expected, backend.encode_image(out.initial))  # the aligner did something
    assert out.calibrated != out.initial
    assert set(out.rounds[0].seconds) == set(STAGES)
    meta = out.metadata[1]
    assert meta["prompt"] == "two blue squares" and meta["seed"] == 11
    assert meta["questions"] == [expected_questions[1]]
    assert meta["passes"] == 3 and meta["ip_scale"] == 0.3 and meta["sampling"] == {"steps": 5}
    assert meta["models"]["aligner"]["image_dim"] == WIDTH and meta["peak_memory_bytes"] > 0


def test_rounds_feed_each_calibrated_image_back():
    backend, guidance = RecordingBackend(), RecordingGuidance()
    pipe = IMGPipeline(backend=backend, guidance=guidance, aligner=make_aligner())
    out = pipe(["a green triangle"], seeds=3, rounds=3)
    assert len(out.rounds) == 3
    assert [c[0] for c in backend.calls] == ["generate"] + ["encode", "generate"] * 3
    assert guidance.calls[0][0] == out.initial
    assert guidance.calls[1][0] == out.rounds[0].calibrated
    assert guidance.calls[2][0] == out.rounds[1].calibrated
    assert out.rounds[1].inputs == out.rounds[0].calibrated
    assert out.calibrated == out.rounds[2].calibrated
    # each round asks its own seeded question
    assert [q for _, (q,) in guidance.calls] == [
        fill(choose_question(3, index=r), "a green triangle") for r in range(3)
    ]
    assert "generate" in out.rounds[0].seconds and "generate" not in out.rounds[1].seconds


def test_same_seed_same_result_and_an_int_seed_serves_every_prompt():
    runs = []
    for _ in range(2):
        pipe = IMGPipeline(backend=RecordingBackend(), guidance=RecordingGuidance(), aligner=make_aligner())
        runs.append(pipe(["one", "two", "three"], seeds=5))
    a, b = runs
    assert a.seeds == [5, 5, 5]
    assert [im.getpixel((0, 0)) for im in a.calibrated] == [im.getpixel((0, 0)) for im in b.calibrated]
    assert a.rounds[0].questions == b.rounds[0].questions


def test_initial_images_skip_the_first_generation():
    backend = RecordingBackend()
    pipe = IMGPipeline(backend=backend, guidance=RecordingGuidance(), aligner=make_aligner())
    start = [Image.new("RGB", (8, 8), (1, 2, 3))]
    out = pipe("a prompt", initial_images=start)
    assert out.initial == start
    assert [c[0] for c in backend.calls] == ["encode", "generate"]


def test_dimensions_are_checked_before_any_generation():
    backend = RecordingBackend(width=32)
    with pytest.raises(
        ValueError, match="image tokens of width 16 but the fake backend makes 3 tokens of width 32"
    ):
        IMGPipeline(backend=backend, guidance=RecordingGuidance(), aligner=make_aligner())
    with pytest.raises(ValueError, match="guidance of width 40 but the guidance model's hidden size is 24"):
        IMGPipeline(
            backend=RecordingBackend(), guidance=RecordingGuidance(), aligner=make_aligner(guidance_dim=40)
        )
    assert backend.calls == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(prompts=[]), "no prompts"),
        (dict(prompts=["ok", "  "]), "non-empty string"),
        (dict(prompts=["a", "b"], seeds=[1]), "one integer seed per prompt"),
        (dict(prompts=["a"], rounds=0), "rounds must be a positive integer"),
        (dict(prompts=["a"], ip_scale=-1.0), "ip_scale must be >= 0"),
        (dict(prompts=["a"], passes=-2), "passes must be a non-negative integer"),
    ],
)
def test_bad_calls_are_refused_before_work(kwargs, message):
    backend = RecordingBackend()
    pipe = IMGPipeline(backend=backend, guidance=RecordingGuidance(), aligner=make_aligner())
    with pytest.raises(ValueError, match=message):
        pipe(**kwargs)
    assert backend.calls == []


def test_empty_questions_are_refused():
    with pytest.raises(ValueError, match="question list is empty"):
        IMGPipeline(
            backend=RecordingBackend(), guidance=RecordingGuidance(), aligner=make_aligner(), questions=[]
        )
