"""benchmarks/gpu_realsize.py: the whole script on the tiny models (CPU), and its real-size builders
on the meta device against the published sizes (the GPU run itself happens outside the suite)."""

from __future__ import annotations

import json

import pytest
import torch

from img_guidance.pipeline import STAGES


@pytest.fixture(scope="module")
def realsize():
    from benchmarks import gpu_realsize

    return gpu_realsize


@pytest.fixture(scope="module")
def tiny_run(realsize, tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_realsize") / "tiny.json"
    report = realsize.main(["--tiny", "--json", str(out)])
    return report, out


def test_the_tiny_run_measures_every_cell_of_both_pipelines(realsize, tiny_run):
    report, out = tiny_run
    assert json.loads(out.read_text()) == json.loads(json.dumps(report, default=str))
    assert report["sizes"] == "tiny" and report["dtype"] == "float32"
    for name, paper in (("sdxl", 2), ("flux", 2)):
        data = report["pipelines"][name]
        planned = realsize.plan(name, paper, 1, (1, 4), realsize.LEVERS)
        assert [(c["offload"], c["batch"], c["steps"], c["lever"]) for c in data["cells"]] == [
            (c.offload, c.batch, c.steps, c.lever) for c in planned if c.offload != "sequential"
        ]
        # on a CPU the sequential cells are listed, not run (diffusers offloads to "cpu:0", which
        # accelerate's hooks fail on; on a GPU this is the ordinary path)
        assert [(c["offload"], c["reason"]) for c in data["skipped"]] == [
            ("sequential", "sequential offload needs a GPU")
        ] * sum(c.offload == "sequential" for c in planned)
        assert data["guidance_tokens"] > 4  # system text + the image's tokens + the question
        for cell in data["cells"]:
            result = cell["result"]
            assert set(result["stages_s"]) == set(STAGES)
            assert all(seconds > 0 for seconds in result["stages_s"].values()), cell
            assert result["img_s"] == pytest.approx(sum(result["stages_s"].values()))
            assert result["img_over_base"] == pytest.approx(result["img_s"] / result["base_s"])
            assert 0 < result["mllm_share"] < 1
            assert result["img_peak"] == {"peak_allocated_gib": None, "peak_reserved_gib": None}  # no GPU
            lever_or_kept = cell["lever"] != "default"
            assert ("vs_reference" in result) == lever_or_kept
            assert ("compile_s" in result) == (cell["lever"] == "compile")


def test_the_tiny_run_prints_its_tables_and_the_goals(realsize, tiny_run, capsys):
    report, _ = tiny_run
    realsize.print_tables(report)
    printed = capsys.readouterr().out
    assert "## sdxl" in printed and "## flux" in printed and "## Goals" in printed
    assert "| none | 1 | 1 | compile |" in printed
    goals = {row["goal"]: row for row in report["goals"]}
    assert goals["SDXL: IMG / base time <= 2.1"]["measured"] is not None
    assert goals["FLUX.1-dev: IMG / base time <= 2.1"]["measured"] is not None
    # no GPU memory on a CPU: the memory goals say so rather than pass or fail
    memory = [row for row in report["goals"] if "GB" in row["goal"]]
    assert len(memory) == 2 and all(row["met"] is None and row["measured"] is None for row in memory)
    assert "none of these figures is a goal's" in printed


def test_cells_past_the_budget_are_listed_as_skipped(realsize):
    report = realsize.main(["--tiny", "--pipelines", "sdxl", "--levers", "", "--budget-sdxl", "0"])
    data = report["pipelines"]["sdxl"]
    assert len(data["cells"]) == 1 and data["cells"][0]["steps"] == 2  # the headline always runs
    assert len(data["skipped"]) == len(realsize.plan("sdxl", 2, 1, (1, 4), ())) - 1
    reasons = {cell["reason"] for cell in data["skipped"] if cell["offload"] != "sequential"}
    assert reasons == {"past the 0 s budget"}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--tiny", "--pipelines", "sdxl,sd3"], "unknown pipeline or lever 'sd3'"),
        (["--tiny", "--levers", "xformers"], "unknown pipeline or lever 'xformers'"),
        (["--tiny", "--batches", "1,0"], "batches must be positive"),
    ],
)
def test_bad_arguments_are_named_in_one_line(realsize, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        realsize.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_the_real_sizes_need_a_gpu(realsize, capsys):
    with pytest.raises(SystemExit):
        realsize.main([])
    assert "no CUDA GPU here" in capsys.readouterr().err


def test_the_real_builders_make_the_published_sizes(realsize):
    """The script's real-size builders, on the meta device: the same config values as
    pipeline_cost.py (one source), the published parameter counts."""
    from benchmarks import configs, pipeline_cost

    assert realsize.SDXL_UNET is configs.SDXL_UNET is pipeline_cost.SDXL_UNET
    assert realsize.FLUX_TRANSFORMER is configs.FLUX_TRANSFORMER is pipeline_cost.FLUX_TRANSFORMER
    assert realsize.LLAVA_TEXT is configs.LLAVA_TEXT
    published = configs.PUBLISHED_PARAMS
    sizes = realsize.real_sizes()
    dtype = torch.bfloat16
    with realsize.building("meta", dtype):
        sdxl = sizes.sdxl_parts(dtype)
        flux = sizes.flux_parts(dtype)
    from img_guidance.shapes.detector import world_tokenizer

    with realsize.building("meta", dtype):
        llava = sizes.llava(world_tokenizer(), dtype)
    count = realsize.parameters
    for module, key in (
        (sdxl["unet"], "sdxl_unet"),
        (flux["transformer"], "flux_transformer"),
        (flux["text_encoder_2"], "t5_xxl"),
        (llava, "llava_13b"),
    ):
        assert next(module.parameters()).dtype == dtype
        assert count(module) == pytest.approx(published[key][0], rel=0.005), key
    for image_dim, key in ((2048, "aligner_sdxl"), (4096, "aligner_flux")):
        aligner = realsize.build_aligner(sizes, 5120, image_dim, torch.device("meta"), dtype)
        assert count(aligner) == published[key][0]
    assert sdxl["tokenizer"].model_max_length == 77
    assert flux["tokenizer_2"].model_max_length == configs.FLUX_T5_TOKENS
