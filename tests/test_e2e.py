"""IMG end to end on tiny real models: SDXL / FLUX + IP-Adapter, LLaVA, an aligner; pipeline and CLI."""

import json

import pytest
import torch
from typer.testing import CliRunner

from img_guidance import ImplicitAligner
from img_guidance.cli import app
from img_guidance.pipeline import IMGPipeline
from img_guidance.testing.flux import make_tiny_flux
from img_guidance.testing.llava import HIDDEN_SIZE, make_tiny_llava
from img_guidance.testing.sdxl import make_tiny_sdxl

SAMPLING = dict(steps=2, height=32, width=32)


def _aligner(folder, image_dim, guidance_dim=HIDDEN_SIZE):
    torch.manual_seed(3)
    aligner = ImplicitAligner(guidance_dim=guidance_dim, image_dim=image_dim, depth=1, heads=1, head_dim=64)
    torch.nn.init.normal_(aligner.zero_linear.weight, std=0.5)  # trained-looking: not the identity
    aligner.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    sdxl = make_tiny_sdxl(root / "sdxl")
    return {
        "sdxl": sdxl,
        "llava": str(make_tiny_llava(root / "llava")),
        "aligner": _aligner(root / "aligner", sdxl["token_shape"][1]),
        "root": root,
    }


@pytest.fixture(scope="module")
def sdxl_pipe(tiny):
    return IMGPipeline.from_pretrained(
        tiny["sdxl"]["model"],
        mllm=tiny["llava"],
        aligner=tiny["aligner"],
        ip_adapter=tiny["sdxl"]["ip_adapter"],
        image_encoder=tiny["sdxl"]["image_encoder"],
        device="cpu",
        torch_dtype=torch.float32,
    )


def test_sdxl_pipeline_end_to_end(sdxl_pipe):
    projection = sdxl_pipe.backend.image_projection
    calls = []
    handle = projection.register_forward_hook(lambda *_: calls.append(1))
    try:
        out = sdxl_pipe(
            ["a red circle left of a blue square", "two green triangles"], seeds=[1, 2], **SAMPLING
        )
    finally:
        handle.remove()
    # the resampler ran for the batch's image tokens and the cached negative tokens, never per step
    assert len(calls) <= 2
    assert [im.size for im in out.initial + out.calibrated] == [(32, 32)] * 4
    pixels = [torch.tensor(list(im.getdata()), dtype=torch.float32) for im in out.initial + out.calibrated]
    assert (pixels[0] - pixels[2]).abs().mean() > 1  # calibration changed the image
    meta = out.metadata[0]
    assert (
        meta["models"]["backend"]["family"] == "sdxl"
        and meta["models"]["guidance"]["prompt_format"] == "llava_v0"
    )
    assert "a red circle left of a blue square" in meta["questions"][0]
    assert set(meta["seconds_per_round"][0]) == {"generate", "guide", "encode", "align", "regenerate"}

    # same seeds: the same questions and the same images (exactly for the same batch; a batch of one
    # differs from a batch of two only by matmul rounding)
    again = sdxl_pipe(["a red circle left of a blue square", "two green triangles"], seeds=[1, 2], **SAMPLING)
    assert [list(im.getdata()) for im in again.calibrated] == [list(im.getdata()) for im in out.calibrated]
    alone = sdxl_pipe(["a red circle left of a blue square"], seeds=[1], **SAMPLING)
    assert alone.rounds[0].questions[0] == out.rounds[0].questions[0]
    single = torch.tensor(list(alone.calibrated[0].getdata()), dtype=torch.float32)
    assert (single - pixels[2]).abs().max() <= 3


def test_two_rounds_and_passes(sdxl_pipe):
    out = sdxl_pipe(["a yellow star"], seeds=4, rounds=2, passes=1, **SAMPLING)
    assert len(out.rounds) == 2 and out.rounds[1].inputs == out.rounds[0].calibrated
    zero = sdxl_pipe(["a yellow star"], seeds=4, passes=0, ip_scale=0.0, **SAMPLING)
    # no passes and IP scale 0: the re-generation is the plain generation with the same seed
    assert list(zero.calibrated[0].getdata()) == list(zero.initial[0].getdata())


def test_mismatched_aligner_is_refused_before_generation(tiny, tmp_path):
    wrong = _aligner(tmp_path / "wrong", image_dim=32)
    with pytest.raises(ValueError, match="width 32 but the sdxl backend makes 4 tokens of width 64"):
        IMGPipeline.from_pretrained(
            tiny["sdxl"]["model"],
            mllm=tiny["llava"],
            aligner=wrong,
            ip_adapter=tiny["sdxl"]["ip_adapter"],
            image_encoder=tiny["sdxl"]["image_encoder"],
            device="cpu",
        )
    # a preset MLLM's width is known before anything large loads (qwen2.5-vl-7b: 3584, not 32)
    with pytest.raises(ValueError, match=r"guidance of width 32 but the guidance model 'qwen2\.5-vl-7b' has"):
        IMGPipeline.from_pretrained(tiny["sdxl"]["model"], mllm="qwen2.5-vl-7b", aligner=tiny["aligner"])
    with pytest.raises(ValueError, match="no released aligner is known"):
        IMGPipeline.from_pretrained(tiny["sdxl"]["model"], mllm=tiny["llava"])


def test_flux_pipeline_end_to_end(tiny, tmp_path):
    flux = make_tiny_flux(tmp_path / "flux")
    pipe = IMGPipeline.from_pretrained(
        flux["model"],
        mllm=tiny["llava"],
        aligner=_aligner(tmp_path / "aligner", flux["token_shape"][1]),
        ip_adapter=flux["ip_adapter"],
        image_encoder=flux["image_encoder"],
        device="cpu",
        torch_dtype=torch.float32,
    )
    out = pipe(["a blue circle"], seeds=[5], **SAMPLING)
    assert out.calibrated[0].size == (32, 32)
    assert list(out.calibrated[0].getdata()) != list(out.initial[0].getdata())
    assert out.metadata[0]["models"]["backend"]["family"] == "flux"


# -- the CLI -----------------------------------------------------------------------------------------

runner = CliRunner()


def _cli_args(tiny, out, *extra):
    return [
        "generate",
        "--model", tiny["sdxl"]["model"],
        "--ip-adapter", tiny["sdxl"]["ip_adapter"],
        "--image-encoder", tiny["sdxl"]["image_encoder"],
        "--mllm", tiny["llava"],
        "--aligner", tiny["aligner"],
        "--steps", "2", "--height", "32", "--width", "32",
        "--device", "cpu",
        "--out", str(out),
        *extra,
    ]  # fmt: skip


def test_cli_generate_writes_the_folder_and_resumes(tiny, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a red circle", "seed": 9}\n{"prompt": "two blue squares"}\n')
    out = tmp_path / "out"
    result = runner.invoke(app, _cli_args(tiny, out, "--prompts", str(prompts), "--batch-size", "2"))
    assert result.exit_code == 0, result.output
    lines = [json.loads(x) for x in (out / "metadata.jsonl").read_text().splitlines()]
    assert [(x["prompt"], x["seed"]) for x in lines] == [("a red circle", 9), ("two blue squares", 0)]
    for line in lines:
        assert set(line["files"]) == {"initial", "calibrated", "compare"}
        assert all((out / f).is_file() for f in line["files"].values())
        assert line["questions"][0].count(line["prompt"]) == 1
        assert line["models"]["aligner"]["image_dim"] == 64
    assert len(list((out / "compare").iterdir())) == 2

    # a rerun skips what is finished; a new prompt is the only work done
    result = runner.invoke(app, _cli_args(tiny, out, "--prompts", str(prompts)))
    assert result.exit_code == 0 and "already" in result.output
    result = runner.invoke(app, _cli_args(tiny, out, "--prompts", str(prompts), "--prompt", "a green star"))
    assert result.exit_code == 0, result.output
    lines = (out / "metadata.jsonl").read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[-1])["prompt"] == "a green star"


def test_cli_generate_compiles_the_denoiser_on_request(tiny, tmp_path, monkeypatch):
    """--compile hands the UNet (and nothing else) to torch.compile, in place, before generating;
    torch.compile itself is replaced by a recorder (compiling on the CPU takes a C++ compiler and
    minutes)."""
    from diffusers import UNet2DConditionModel

    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda module, **kwargs: compiled.append(module))
    result = runner.invoke(app, _cli_args(tiny, tmp_path / "plain", "--prompt", "a red circle"))
    assert result.exit_code == 0, result.output
    assert compiled == []
    result = runner.invoke(app, _cli_args(tiny, tmp_path / "out", "--prompt", "a red circle", "--compile"))
    assert result.exit_code == 0, result.output
    assert len(compiled) == 1 and isinstance(compiled[0], UNet2DConditionModel)
    assert (tmp_path / "out" / "metadata.jsonl").read_text().count("\n") == 1


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda p: p.write_text("\n\n"), "holds no prompts"),
        (lambda p: p.write_text('"a cat"\n{"prompt": "a dog"}\n'), "mixes plain strings"),
        (None, "prompt file not found"),
    ],
)
def test_cli_bad_prompt_files_fail_before_any_output(tiny, tmp_path, setup, message):
    prompts = tmp_path / "prompts.jsonl"
    if setup:
        setup(prompts)
    out = tmp_path / "out"
    result = runner.invoke(app, _cli_args(tiny, out, "--prompts", str(prompts)))
    assert result.exit_code == 1
    assert message in result.output
    assert not out.exists()


def test_cli_bad_models_fail_cleanly(tiny, tmp_path):
    out = tmp_path / "out"
    args = _cli_args(tiny, out, "--prompt", "a cat")
    args[args.index("--mllm") + 1] = str(tmp_path / "no-such-mllm")
    result = runner.invoke(app, args)
    assert result.exit_code == 1 and "no-such-mllm" in result.output
    assert not out.exists()
    result = runner.invoke(app, [*_cli_args(tiny, out, "--prompt", "a cat"), "--offload", "gpu"])
    assert result.exit_code == 1 and "'gpu'" in result.output
    result = runner.invoke(app, _cli_args(tiny, out))
    assert result.exit_code == 1 and "no prompts" in result.output


def test_serve_calibrates_one_prompt(sdxl_pipe):
    from img_guidance.serve import calibrate

    initial, calibrated, note = calibrate(sdxl_pipe, "a red circle", 3, **SAMPLING)
    assert initial.size == calibrated.size and list(initial.getdata()) != list(calibrated.getdata())
    assert "a red circle" in note and "regenerate" in note
    with pytest.raises(ValueError, match="enter a prompt"):
        calibrate(sdxl_pipe, "   ", 0)


def test_serve_page_builds(sdxl_pipe):
    from img_guidance.serve import build_app

    gradio = pytest.importorskip("gradio")  # the optional [serve] extra: built where it is installed
    assert isinstance(build_app(sdxl_pipe), gradio.Blocks)
