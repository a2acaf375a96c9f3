"""ShapesWorld's whole training path at tiny settings: every stage through the project's own code,
then the models loading as a pipeline, generate and judge through the CLI."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, replace

import pytest
import torch
from typer.testing import CliRunner

from img_guidance.aligner import load_aligner
from img_guidance.data.pairs import iter_pairs
from img_guidance.guidance import DETECTOR_INFO, load_guidance
from img_guidance.guidance.standardize import STATS_FILE
from img_guidance.recipes.train_shapes import STAGES, ShapesRecipe, install, stage_settings, train_all


def render_or_miss(self, prompts, seeds, **kwargs):
    """A stand-in for a 4-step generator (whose images the judge scores all alike, so every pair
    would tie): odd seeds draw the prompt, even seeds a near miss of it."""
    from img_guidance.shapes.grammar import near_misses, parse
    from img_guidance.shapes.render import render

    return [
        render(parse(p) if s % 2 else near_misses(parse(p))[0], seed=s)
        for p, s in zip(prompts, seeds, strict=True)
    ]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from img_guidance.backends.shapes import ShapesBackend

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("shapes") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ShapesBackend, "generate", render_or_miss)
        train_all(out, recipe=ShapesRecipe.quick(), log=lambda line: None)
    return out


def test_every_stage_runs_and_records_its_time(run):
    report = json.loads((run / "train_all.json").read_text())
    assert list(report["stages"]) == list(STAGES)
    assert all(stage["seconds"] > 0 for stage in report["stages"].values())
    pairs = list(iter_pairs(run / "data" / "pairs.parquet"))
    counts = report["stages"]["pairs"]["result"]
    rendered = counts["rendered"]
    assert rendered["rows"] == 30 == rendered["right"] + rendered["wrong"]
    assert len(pairs) == counts["pairs"] + counts["redraws"] + rendered["rows"] and counts["prompts"] == 24
    detector = load_guidance(run / "detector")
    assert detector.prompt_format == "llava_v0" and detector.hidden_size == 64
    # the detector folder names the hidden state read as guidance, which every loader then reads
    assert detector.hidden_layer == ShapesRecipe.quick().detector_guidance_layer == 1
    assert report["stages"]["features"]["result"]["guidance_layer"] == 1
    # ... and no per-dimension statistics (detector_guidance_standardize is off by default)
    assert report["stages"]["features"]["result"]["guidance_standardized"] is False
    assert "standardize" not in json.loads((run / "detector" / DETECTOR_INFO).read_text())
    assert detector.standardize is None and not (run / "detector" / STATS_FILE).exists()
    aligner = load_aligner(run / "aligner")
    assert (aligner.config.guidance_dim, aligner.config.image_dim) == (64, 64)
    assert report["stages"]["features"]["result"]["samples"] == len(pairs)
    # the report ships with the models: no path of this machine in it
    assert report["stages"]["generator"]["result"]["folder"] == "generator"
    assert str(run) not in json.dumps(report) and str(run.resolve()) not in json.dumps(report)
    assert json.loads((run / "detector" / DETECTOR_INFO).read_text())["base_model"] == "detector_base"
    # a rerun skips every finished stage; other settings in the same folder are refused
    lines = []
    train_all(run, recipe=ShapesRecipe.quick(), log=lines.append)
    assert all("skipped" in line for line in lines)
    with pytest.raises(ValueError, match=r"other settings \(seed;"):
        train_all(run, recipe=ShapesRecipe.quick(seed=1), log=lambda line: None)


def test_reuse_reruns_only_the_stages_a_changed_setting_reaches(run, tmp_path):
    from img_guidance.recipes.train_shapes import set_detector_guidance, stage_settings

    settings = json.loads(json.dumps(asdict(ShapesRecipe())))
    assert set(stage_settings("aligner", settings)) >= {"aligner_lr", "detector_hidden", "pair_renders"}
    assert not set(stage_settings("pairs", settings)) & {"detector_hidden", "aligner_lr"}
    assert (
        not set(stage_settings("generator", settings))
        - {"seed"}
        - {k for k in settings if k.startswith("generator_")}
    )
    assert set().union(*(stage_settings(name, settings) for name in STAGES)) == set(settings)
    # the guidance layer is read by the features stage, not by the detector's finetuning
    assert "detector_guidance_layer" not in stage_settings("detector", settings)
    assert "detector_guidance_layer" in stage_settings("features", settings)
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    # an ablation aligner of shapes_eval, made with the old settings
    (copy / "ablations" / "lambda_2").mkdir(parents=True, exist_ok=True)
    before = json.loads((copy / "train_all.json").read_text())["stages"]
    recipe = replace(ShapesRecipe.quick(), aligner_steps=4, detector_hidden=32)
    with pytest.raises(ValueError, match=r"other settings \(aligner_steps, detector_hidden;"):
        train_all(copy, recipe=recipe, log=lambda line: None)
    lines = []
    after = train_all(copy, recipe=recipe, reuse=True, log=lines.append)["stages"]
    skipped = [
        name for name in STAGES if f"[{name}] done before ({before[name]['seconds']:.0f} s), skipped" in lines
    ]
    assert skipped == ["generator", "pairs"]
    assert "[detector] other settings (detector_hidden)" in lines
    assert "[aligner] other settings (detector_hidden, aligner_steps)" in lines
    assert after["generator"] == before["generator"] and after["pairs"] == before["pairs"]
    assert list(after) == list(STAGES)  # in the order the stages run, whichever ran again
    assert after["aligner"]["result"]["steps"] == 4 and load_guidance(copy / "detector").hidden_size == 32
    assert not (copy / "ablations").exists()
    assert json.loads((copy / "train_all.json").read_text())["recipe"] == asdict(recipe) | {
        "ip_scales": list(recipe.ip_scales),
        "aligner_terms": list(recipe.aligner_terms),
    }

    # how the guidance is read (layer, standardization): the detector is kept, the features,
    # aligner and IP scale run again
    detector_run = json.loads((copy / "train_all.json").read_text())["stages"]["detector"]
    lines = []
    layer_0 = replace(recipe, detector_guidance_layer=0, detector_guidance_standardize=True)
    again = train_all(copy, recipe=layer_0, reuse=True, log=lines.append)["stages"]
    assert [line for line in lines if line.endswith("skipped")] == [
        f"[{name}] done before ({again[name]['seconds']:.0f} s), skipped"
        for name in ("generator", "detector", "pairs")
    ]
    assert "[features] other settings (detector_guidance_layer, detector_guidance_standardize)" in lines
    assert again["detector"] == detector_run and again["features"]["result"]["guidance_layer"] == 0
    # the statistics, measured by the features stage on training renders, are in the detector folder
    assert json.loads((copy / "detector" / DETECTOR_INFO).read_text())["standardize"] == STATS_FILE
    detector = load_guidance(copy / "detector")
    assert detector.hidden_layer == 0 and detector.standardize["std"].shape == (32,)
    assert again["features"]["result"]["guidance_standardized"] is True
    # and turned off again, the record and the folder lose them
    plain = set_detector_guidance(
        copy / "detector", replace(layer_0, detector_guidance_standardize=False), print
    )
    assert plain.standardize is None and not (copy / "detector" / STATS_FILE).exists()
    assert "standardize" not in json.loads((copy / "detector" / DETECTOR_INFO).read_text())

    # a run whose report lacks a stage is not installed, though its folders are all there
    report = json.loads((copy / "train_all.json").read_text())
    del report["stages"]["ip_scale"]
    (copy / "train_all.json").write_text(json.dumps(report))
    with pytest.raises(FileNotFoundError, match=r"has no finished ip_scale: run train-all first"):
        install(copy, tmp_path / "weights")
    assert not (tmp_path / "weights").exists()


def test_the_pairs_stage_writes_corrections_and_checks_its_method(run):
    from img_guidance.shapes.judge import judge

    counts = json.loads((run / "train_all.json").read_text())["stages"]["pairs"]["result"]
    # the stand-in draws the prompt on odd seeds, a near miss on even ones: half the images are wrong,
    # each against its correction; the right half each against its redraw (pair_redraw_right)
    assert counts["images"] == 48 and counts["right"] == 24 and counts["pairs"] == 24
    assert counts["redraws"] == 24
    rendered = counts["rendered"]  # then the recipe's 30 rows from renders
    unpreferred_right = []
    for pair in iter_pairs(run / "data" / "pairs.parquet"):
        assert judge(pair.preferred, pair.prompt).correct is True
        unpreferred_right.append(judge(pair.unpreferred, pair.prompt).correct)
    assert sorted(unpreferred_right[:48]) == [False] * 24 + [True] * 24
    assert unpreferred_right[48:].count(True) == rendered["right"] and len(unpreferred_right) == 48 + 30
    with pytest.raises(ValueError, match=r"pair_method must be one of .*'correction'.*got 'best'"):
        ShapesRecipe(pair_method="best")


def test_the_ip_scale_is_chosen_on_validation_and_the_backend_takes_it(run, tmp_path, monkeypatch):
    import shutil

    from img_guidance.backends.shapes import ShapesBackend
    from img_guidance.recipes.train_shapes import choose_ip_scale
    from img_guidance.shapes.grammar import parse
    from img_guidance.shapes.render import render

    # in the run, every scale drew alike (the stand-in generator ignores tokens): the smaller wins
    chosen = json.loads((run / "generator" / "ip_scale.json").read_text())
    assert chosen["ip_scale"] == 0.5 and chosen["split"] == "validation" and chosen["scenes"] == 4
    assert chosen["chosen_by"] == "IMG (1 round)"
    assert list(chosen["rows"]) == [
        "base",
        "IMG, IP 0.5",
        "oracle tokens, IP 0.5",
        "nearest-correct-render tokens, IP 0.5",
        "IMG, IP 1",
        "oracle tokens, IP 1",
        "nearest-correct-render tokens, IP 1",
    ]
    assert ShapesBackend.from_pretrained(run / "generator").defaults.ip_scale == 0.5

    def right_at_one(self, prompts, seeds, *, image_tokens=None, ip_scale=0.2, **kwargs):
        # the prompt drawn right only from tokens at IP scale 1 (IMG's re-generation or the oracle's)
        steered = image_tokens is not None and ip_scale == 1.0
        return [
            render(parse(p) if steered else parse("a red circle"), seed=s)
            for p, s in zip(prompts, seeds, strict=True)
        ]

    folder = tmp_path / "run"
    for name in ("generator", "detector", "aligner"):
        shutil.copytree(run / name, folder / name)
    monkeypatch.setattr(ShapesBackend, "generate", right_at_one)
    result = choose_ip_scale(folder, (0.5, 1.0, 1.5), scenes=6, log=lambda line: None)
    assert result["ip_scale"] == 1.0 and result["rows"]["IMG, IP 1"]["accuracy"] == 1.0
    assert result["rows"]["oracle tokens, IP 1"]["accuracy"] == 1.0
    assert result["rows"]["nearest-correct-render tokens, IP 1"]["accuracy"] == 1.0
    assert result["rows"]["IMG, IP 1.5"]["accuracy"] < 1.0
    folder = folder / "generator"
    assert ShapesBackend.from_pretrained(folder).defaults.ip_scale == 1.0
    with pytest.raises(ValueError, match="ip_scales must be one or more scales > 0"):
        choose_ip_scale(folder.parent, (0.0, 1.0), log=lambda line: None)
    (folder / "ip_scale.json").write_text("{}")
    with pytest.raises(ValueError, match=r"ip_scale.json is not an IP-scale choice"):
        ShapesBackend.from_pretrained(folder)


def test_the_models_run_as_an_img_pipeline_and_the_judge_scores_generate(run, tmp_path):
    from img_guidance.cli import app

    dest = install(run, tmp_path / "weights")
    assert {p.name for p in dest.iterdir()} >= {"generator", "detector", "aligner", "train_all.json"}
    # installing again replaces the models in place
    (dest / "aligner" / "stale.txt").write_text("from an older install")
    assert install(run, tmp_path / "weights") == dest
    assert {p.name for p in dest.iterdir()} == {"generator", "detector", "aligner", "train_all.json"}
    assert not (dest / "aligner" / "stale.txt").exists()
    # a detector recorded with this machine's path (as before 2026-12-06) is installed without it
    older = tmp_path / "older"
    shutil.copytree(run, older)
    info = json.loads((older / "detector" / DETECTOR_INFO).read_text())
    absolute = {**info, "base_model": str(older / "detector_base")}
    (older / "detector" / DETECTOR_INFO).write_text(json.dumps(absolute))
    installed = json.loads((install(older, tmp_path / "w2") / "detector" / DETECTOR_INFO).read_text())
    assert installed == info and installed["base_model"] == "detector_base"
    out = tmp_path / "out"
    args = [
        "generate",
        "two red circles",
        "--model",
        str(dest / "generator"),
        "--mllm",
        str(dest / "detector"),
    ]
    args += ["--aligner", str(dest / "aligner"), "--out", str(out), "--seed", "3"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    judged = CliRunner().invoke(app, ["shapes", "judge", str(out)])
    assert judged.exit_code == 0, judged.output
    report = json.loads((out / "judge.json").read_text())
    assert report["prompts"][0]["prompt"] == "two red circles" and report["prompts"][0]["seed"] == 3
    assert report["prompts"][0]["img"] in ("win", "tie", "loss")


def test_text_embedding_guidance_reads_the_prompt(run):
    from img_guidance.guidance.text import TextEmbeddingGuidance

    guidance = TextEmbeddingGuidance.from_pretrained(run / "generator")
    out = guidance.guide([None, None], ["a red circle", "two blue squares"])
    assert out.hidden_states.shape[0] == 2 and out.hidden_states.shape[-1] == guidance.hidden_size
    assert out.attention_mask.sum(1).tolist()[0] < out.attention_mask.shape[1]
    single = guidance.guide([None], ["a red circle"])
    length = int(single.attention_mask.sum())
    torch.testing.assert_close(single.hidden_states[0, :length], out.hidden_states[0, :length])


def test_the_shapes_preset_and_demo_say_how_to_get_missing_weights(tmp_path, monkeypatch):
    from img_guidance.backends import load_backend
    from img_guidance.cli import app
    from img_guidance.presets import BACKEND_PRESETS, BackendPreset

    missing = str(tmp_path / "weights" / "generator")
    preset = BackendPreset(**{**BACKEND_PRESETS["shapes"].__dict__, "model": missing})
    monkeypatch.setitem(BACKEND_PRESETS, "shapes", preset)
    with pytest.raises(FileNotFoundError, match="shapes train-all OUT --install"):
        load_backend("shapes")
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "demo")])
    assert result.exit_code == 1 and "train-all" in result.output


def test_the_benchmark_runs_every_system_on_a_finished_run(run, tmp_path, capsys):
    from benchmarks import shapes_eval as module

    args = ["--run", str(run), "--split", "validation", "--per-category", "1", "--seeds", "2"]
    out = module.main([*args, "--json", str(tmp_path / "eval.json"), "--chart", str(tmp_path / "eval.png")])
    systems = out["systems"]
    assert {"base", "IMG (2 rounds)", "correct-render tokens (oracle)", "lambda 2"} <= set(systems)
    assert "nearest-correct-render tokens (oracle)" in systems
    chosen = out["ip_scale"]  # the run's own, chosen on validation by train-all
    assert chosen in (0.5, 1.0)
    scales = {f"IMG at IP scale {s}" for s in module.IP_SCALES if s != chosen}
    assert {"IMG, 1 pass", "reference never replaced", *scales} <= set(systems)
    assert len(scales) == 3 and len(systems) == 18
    # every system is paired against IMG (1 round) on the same images
    paired = systems["base"]["vs_img"]
    assert (
        paired["n"] == 12
        and 0 <= paired["p_value"] <= 1
        and "vs_img" not in systems["IMG (1 round, 3 passes)"]
    )
    assert (tmp_path / "eval.png").read_bytes().startswith(b"\x89PNG")
    # six categories, one scene each, two seeds
    assert out["images_per_system"] == 12 and systems["base"]["overall"]["n"] == 12
    assert sum(systems["IMG (1 round, 3 passes)"]["vs_base"]) == 12
    trained = {p.parent.name for p in (run / "ablations").glob("*/final")}
    assert 0 < out["seconds"]["ablation_training"] < out["seconds"]["total"]
    assert trained == {
        "text-embedding_guidance",
        "untrained_detector",
        "l_base_only",
        "l_base_plus_dpo",
        "lambda_0.5",
        "lambda_2",
        "reference_never_replaced",
    }
    table = capsys.readouterr().out
    assert table.startswith("## ShapesWorld")  # the ablations' training logs go to stderr
    assert "of them training ablation aligners\n" in table
    # three tables of systems, then two of failure kinds (a header and six categories each)
    assert table.count("\n| ") == 19 + 18 + 19 + 2 * 7 and "correct-render tokens (oracle)" in table
    assert "### Combinations no training scene holds (two groups with a held-out kind: " in table
    for system in systems.values():  # every image counted once, and as in the overall accuracy
        parts = system["by_novelty"].values()
        assert sum(p["n"] for p in parts) == 12 and len(system["correct"]) == 12
        right = system["correct"].count(True)
        assert sum(p["correct"] for p in parts) == system["overall"]["correct"] == right
    assert "### Why base's images are wrong" in table
    failures = systems["base"]["failures"]
    assert list(failures) == ["single_object", "counting", "two_object", "colors", "color_attr", "position"]
    assert all(f["images"] == 2 for f in failures.values())
    assert json.loads((tmp_path / "eval.json").read_text())["systems"] == systems


def test_the_benchmark_retrains_the_aligner_with_other_seeds_on_request(run, tmp_path, capsys):
    import shutil

    import yaml
    from safetensors.torch import load_file

    from benchmarks import shapes_eval as module

    copy = tmp_path / "run"  # the module's run folder stays as the other tests expect it
    shutil.copytree(run, copy)
    args = ["--run", str(copy), "--split", "validation", "--per-category", "1", "--seeds", "1"]
    # the run's own seed is its IMG row: refused, with one line, before any model loads
    for bad, says in (("0", "the run's own seed"), ("1,x", "comma-separated integers"), ("2,2", "distinct")):
        with pytest.raises(SystemExit) as exit_info:
            module.main([*args, "--aligner-seeds", bad])
        assert exit_info.value.code == 2 and says in capsys.readouterr().err
    assert not list(copy.glob("ablations/aligner_seed_*"))
    with pytest.raises(SystemExit) as exit_info:  # not a train-all folder: one line, no traceback
        module.main(["--run", str(tmp_path / "nowhere")])
    assert exit_info.value.code == 2 and "no train_all.json there" in capsys.readouterr().err
    out = module.main([*args, "--skip-ablations", "--aligner-seeds", "3,1"])
    systems = out["systems"]
    assert [name for name in systems if name.startswith("aligner seed")] == [
        "aligner seed 3",
        "aligner seed 1",
    ]
    assert systems["aligner seed 1"]["vs_img"]["n"] == 6 and "lambda 2" not in systems
    assert 0 < out["seconds"]["ablation_training"] < out["seconds"]["total"]
    shipped = load_file(copy / "aligner" / "model.safetensors")
    for seed in (1, 3):
        trained = copy / "ablations" / f"aligner_seed_{seed}"
        assert yaml.safe_load((trained / "config.yaml").read_text())["seed"] == seed
        other = load_file(trained / "final" / "model.safetensors")
        assert other.keys() == shipped.keys() and any(not torch.equal(other[k], shipped[k]) for k in other)
    assert "of them training ablation aligners\n" in capsys.readouterr().out


def test_the_joint_method_runs_every_stage_and_the_pipeline_carries_its_16_tokens(tmp_path):
    import dataclasses

    from img_guidance.backends.shapes import ShapesBackend
    from img_guidance.pipeline import IMGPipeline

    torch.set_num_threads(1)
    run = tmp_path / "run"
    recipe = dataclasses.replace(ShapesRecipe.quick(), generator_method="joint")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ShapesBackend, "generate", render_or_miss)
        train_all(run, recipe=recipe, log=lambda line: None)
    training = json.loads((run / "generator" / "training.json").read_text())["settings"]
    assert training["method"] == "joint"
    pipe = IMGPipeline.from_pretrained(
        str(run / "generator"), mllm=str(run / "detector"), aligner=str(run / "aligner"), device="cpu"
    )
    assert pipe.backend.token_shape == (16, 64)
    out = pipe(["a red circle"], seeds=[1], steps=2)
    assert out.calibrated[0].size == (32, 32)


def test_the_aligner_data_benchmark_probes_and_trains_a_variant(run, tmp_path, capsys):
    from benchmarks import shapes_aligner_data as module

    rows = module.main(["probe", "--run", str(run), "--steps", "2", "--held-out", "8"])
    assert [(r["guidance"], r["depth"]) for r in rows] == [
        *[("detector", 2)] * 3,
        *[("words", 2)] * 3,
        ("detector", 4),
        ("preferred tokens", 2),
    ]
    assert all(r["held_out_distance"] >= 0 and r["held_out_input_distance"] > 0 for r in rows)
    with pytest.raises(SystemExit):  # a variant needs a new folder
        module.main(["variant", "--run", str(run), "--out", str(run)])
    with torch.random.fork_rng():
        line = module.main(["variant", "--run", str(run), "--out", str(tmp_path / "v"), "--variant", "flip"])
    pairs = list(iter_pairs(tmp_path / "v" / "data" / "pairs.parquet"))
    assert line["added"] > 0 and len(pairs) == line["pairs"] + line["added"]
    assert set(line["validation"]) == {"base", "IMG, IP 0.5", "IMG, IP 1"}
    assert (tmp_path / "v" / "aligner").is_dir()
    # rows from renders, with recipe settings changed by --set; a setting that does not exist is refused
    for bad in (["--set", "pair_render=3"], ["--set", "aligner_steps=many"], ["--set", "ip_scales=1"]):
        with pytest.raises(SystemExit):
            module.main(["variant", "--run", str(run), "--out", str(tmp_path / "x"), *bad])
    with pytest.raises(SystemExit):  # rows from renders need a count
        module.main(["variant", "--run", str(run), "--out", str(tmp_path / "x"), "--variant", "renders"])
    assert not (tmp_path / "x").exists()
    # the run's pairs already hold its recipe's rows from renders: adding them again is refused
    argv = ["variant", "--run", str(run), "--out", str(tmp_path / "x"), "--variant", "renders"]
    with pytest.raises(SystemExit):
        module.main([*argv, "--set", "pair_renders=12"])
    assert "already hold 30 rows from renders" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    without = tmp_path / "without_renders"  # a run made with pair_renders=0, as far as its report says
    shutil.copytree(run, without)
    report = json.loads((without / "train_all.json").read_text())
    report["recipe"]["pair_renders"] = 0
    (without / "train_all.json").write_text(json.dumps(report))
    argv = ["variant", "--run", str(without), "--out", str(tmp_path / "r"), "--variant", "renders"]
    with torch.random.fork_rng():
        line = module.main([*argv, "--set", "pair_renders=12", "--set", "aligner_steps=3"])
    pairs = list(iter_pairs(tmp_path / "r" / "data" / "pairs.parquet"))
    assert line["added"] == 12 and len(pairs) == line["pairs"] + 12
    assert (tmp_path / "r" / "aligner_run" / "checkpoints" / "step_00000003").is_dir()


def test_a_report_written_before_a_setting_existed_reads_it_at_what_the_code_did_then():
    """A run recorded before ``pair_renders`` existed made no rows from renders, whatever the
    default is now: its folder resumes under a recipe with ``pair_renders=0`` only."""
    import dataclasses

    from img_guidance.recipes.train_shapes import recorded_settings

    settings = json.loads(json.dumps(dataclasses.asdict(ShapesRecipe(pair_renders=0))))
    older = {k: v for k, v in settings.items() if k != "pair_renders"}
    assert ShapesRecipe().pair_renders > 0
    assert recorded_settings(older) == settings
    assert recorded_settings({**older, "seed": 1}) != settings
    assert recorded_settings(older) != json.loads(json.dumps(dataclasses.asdict(ShapesRecipe())))
    # a run recorded before detector_guidance_layer existed read the last layer (-1), the paper's
    assert ShapesRecipe().detector_guidance_layer == 1
    settings = json.loads(json.dumps(dataclasses.asdict(ShapesRecipe(detector_guidance_layer=-1))))
    older = {k: v for k, v in settings.items() if k != "detector_guidance_layer"}
    assert recorded_settings(older) == settings
    # ... and trained the detector's norms; that setting is the detector stage's and reaches every
    # stage after it that reads the detector, not the generator or the pairs
    assert ShapesRecipe().detector_freeze_norms is True
    settings = json.loads(json.dumps(dataclasses.asdict(ShapesRecipe(detector_freeze_norms=False))))
    older = {k: v for k, v in settings.items() if k != "detector_freeze_norms"}
    assert recorded_settings(older) == settings
    reached = [n for n in STAGES if "detector_freeze_norms" in stage_settings(n, settings)]
    assert reached == ["detector", "features", "aligner", "ip_scale"]
    with pytest.raises(ValueError, match="detector_freeze_norms must be True or False, got 'no'"):
        ShapesRecipe(detector_freeze_norms="no")


def test_a_guidance_layer_the_detector_lacks_is_refused_with_the_recipe():
    with pytest.raises(ValueError, match=r"hidden_layer must name one of the 3 hidden states .* got 3"):
        replace(ShapesRecipe.quick(), detector_guidance_layer=3)  # the quick detector has 2 layers
    assert replace(ShapesRecipe.quick(), detector_guidance_layer=-3).detector_guidance_layer == -3
