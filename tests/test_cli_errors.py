"""The command line with a user's mistakes and a machine's accidents: every bad input gets exit code 1
or 2 and one line on stderr naming what is wrong, no traceback, and no file of the output folder
changed or left half-written. ShapesWorld's shipped models keep the real runs to a few seconds."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from img_guidance.cli import app, shapes_app

runner = CliRunner()
GENERATE = ["generate", "--model", "shapes", "--steps", "2", "--passes", "1"]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones too) -> the sha1 of its bytes."""
    if not folder.exists():
        return {}
    return {
        str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def one_line_error(result, *needles: str) -> str:
    """The failed run's stderr: one line, starting "error:", naming each of ``needles``."""
    assert result.exit_code in (1, 2), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """A ShapesWorld generate folder with two finished prompts."""
    out = tmp_path_factory.mktemp("gen") / "out"
    result = runner.invoke(app, [*GENERATE, "a red circle", "two blue squares", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def copy_of(folder: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(folder, dest)
    return dest


def records(folder: Path) -> list[dict]:
    return [json.loads(x) for x in (folder / "metadata.jsonl").read_text().splitlines() if x.strip()]


# -- silent wrong results and lost records -----------------------------------------------------------


def test_a_redone_prompt_is_judged_once(generated, tmp_path):
    out = copy_of(generated, tmp_path / "out")
    first = records(out)[0]
    (out / first["files"]["calibrated"]).unlink()
    result = runner.invoke(app, [*GENERATE, "a red circle", "two blue squares", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "1 of 2 prompts already" in result.output
    assert len(records(out)) == 3  # the redone prompt's old line stays; the last one wins
    judged = runner.invoke(app, ["shapes", "judge", str(out)])
    assert judged.exit_code == 0, judged.output
    report = json.loads((out / "judge.json").read_text())
    assert sorted(p["name"] for p in report["prompts"]) == sorted({r["name"] for r in records(out)})
    assert report["initial"]["overall"]["n"] == 2


def test_a_cut_metadata_line_loses_nothing(generated, tmp_path):
    out = copy_of(generated, tmp_path / "out")
    lines = (out / "metadata.jsonl").read_text().splitlines()
    # killed while appending the second line: a fragment without its newline
    (out / "metadata.jsonl").write_text(lines[0] + "\n" + lines[1][:25])
    result = runner.invoke(app, [*GENERATE, "a red circle", "two blue squares", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "metadata.jsonl:2 is cut short" in result.stderr
    text = (out / "metadata.jsonl").read_text()
    assert text.splitlines()[1] == lines[1][:25]  # the fragment stays on its own line
    assert [r["prompt"] for r in records_skipping_broken(out)] == ["a red circle", "two blue squares"]
    # the next run finds everything finished, and the judge reads the folder, naming the bad line
    again = runner.invoke(app, [*GENERATE, "a red circle", "two blue squares", "--out", str(out)])
    assert again.exit_code == 0 and "all 2 prompts are already" in again.output
    judged = runner.invoke(app, ["shapes", "judge", str(out)])
    assert judged.exit_code == 0, judged.output
    assert "metadata.jsonl:2 is cut short" in judged.stderr
    assert json.loads((out / "judge.json").read_text())["initial"]["overall"]["n"] == 2


def records_skipping_broken(folder: Path) -> list[dict]:
    from img_guidance.outputs import read_records

    found, broken = read_records(folder / "metadata.jsonl")
    assert broken == [2]
    return found


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (["--steps", "3"], "steps: 2 there, 3 now"),
        (["--passes", "0"], "passes: 1 there, 0 now"),
        (["--ip-scale", "0.5"], "ip_scale: None there, 0.5 now"),
        (["--aligner", "elsewhere"], "aligner: None there, 'elsewhere' now"),
    ],
)
def test_a_rerun_with_other_settings_is_refused(generated, tmp_path, extra, named):
    out = copy_of(generated, tmp_path / "out")
    before = snapshot(out)
    args = [*GENERATE, "a red circle", "--out", str(out)]
    args[args.index("--steps") : args.index("--steps") + 2] = []
    args[args.index("--passes") : args.index("--passes") + 2] = []
    defaults = {"--steps": "2", "--passes": "1"}
    for flag, value in defaults.items():
        if flag not in extra:
            args += [flag, value]
    result = runner.invoke(app, [*args, *extra])
    line = one_line_error(result, named, "--overwrite")
    assert str(out) in line
    assert snapshot(out) == before


def test_overwrite_replaces_the_folder_with_the_new_settings(generated, tmp_path):
    out = copy_of(generated, tmp_path / "out")
    (out / "notes.txt").write_text("mine")
    result = runner.invoke(
        app, [*GENERATE[:-2], "--passes", "0", "a green triangle", "--out", str(out), "--overwrite"]
    )
    assert result.exit_code == 0, result.output
    assert [r["prompt"] for r in records(out)] == ["a green triangle"]
    assert json.loads((out / "settings.json").read_text())["passes"] == 0
    assert len(list((out / "initial").iterdir())) == 1
    assert (out / "notes.txt").read_text() == "mine"  # only what generate writes is replaced


def test_a_folder_without_settings_is_not_mixed_with_new_images(generated, tmp_path):
    out = copy_of(generated, tmp_path / "out")
    (out / "settings.json").unlink()
    before = snapshot(out)
    result = runner.invoke(app, [*GENERATE, "a red circle", "--out", str(out)])
    one_line_error(result, "does not record", "--overwrite")
    assert snapshot(out) == before


# -- a user's mistakes: checked before any model loads -------------------------------------------------

FINITE = "must be a finite number >= 0, got"


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["a red circle", "a purple unicorn"], "prompt 1 ('a purple unicorn')"),
        (["a red circle", "--height", "30"], "--height=30"),
        (["a red circle", "--width", "64"], "--width=64"),
        (["a red circle", "--guidance-scale", "inf"], f"--guidance-scale {FINITE} inf"),
        (["a red circle", "--ip-scale", "inf"], f"--ip-scale {FINITE} inf"),
    ],
)
def test_shapes_requests_are_checked_before_loading(tmp_path, monkeypatch, args, named):
    import img_guidance.pipeline

    def no_loading(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(img_guidance.pipeline.IMGPipeline, "from_pretrained", no_loading)
    out = tmp_path / "out"
    one_line_error(runner.invoke(app, [*GENERATE, *args, "--out", str(out)]), named)
    assert not out.exists()


def test_a_prompt_file_with_one_bad_line_writes_nothing(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\ntwo blue squares\na red circle made of cheese\n")
    out = tmp_path / "out"
    one_line_error(runner.invoke(app, [*GENERATE, "--prompts", str(prompts), "--out", str(out)]), "prompt 2")
    assert not out.exists()


def test_sdxl_sides_and_seeds_are_checked_before_loading(tmp_path):
    from img_guidance.testing.sdxl import make_tiny_sdxl

    model = make_tiny_sdxl(tmp_path / "sdxl")["model"]
    out = tmp_path / "out"
    base = ["generate", "a cat", "--model", model, "--out", str(out)]
    one_line_error(runner.invoke(app, [*base, "--height", "36"]), "positive multiples of 8", "--height=36")
    result = runner.invoke(app, [*base, "--seed", str(2**63)])
    assert result.exit_code == 2 and "--seed" in result.output and "Traceback" not in result.output
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "a cat", "seed": 2**64}) + "\n")
    one_line_error(
        runner.invoke(app, ["generate", "--prompts", str(prompts), "--model", model, "--out", str(out)]),
        "prompt 0: seed",
        str(2**64),
    )
    assert not out.exists()


def test_missing_model_folder_is_named_as_the_model(tmp_path):
    missing = tmp_path / "no-such-model"
    one_line_error(
        runner.invoke(app, ["generate", "a cat", "--model", str(missing), "--out", str(tmp_path / "o")]),
        f"--model {missing}",
    )


@pytest.mark.parametrize("option", ["--model", "--mllm", "--aligner"])
def test_an_uncached_hub_id_offline_says_so(tmp_path, monkeypatch, option):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    args = [*GENERATE, "a red circle", "--out", str(tmp_path / "o")]
    if option == "--model":
        args[args.index("shapes")] = "nobody/nothing"
    else:
        args += [option, "nobody/nothing"]
    line = one_line_error(runner.invoke(app, args), "nobody/nothing")
    assert "offline" in line and "cache" in line
    assert not (tmp_path / "o").exists()


def test_a_prompt_file_that_is_not_utf8_is_named(tmp_path):
    prompts = tmp_path / "latin1.txt"
    prompts.write_bytes("a r\xe9d circle\n".encode("latin-1"))
    one_line_error(
        runner.invoke(app, [*GENERATE, "--prompts", str(prompts), "--out", str(tmp_path / "o")]),
        str(prompts),
        "not UTF-8",
    )


# -- the file system -------------------------------------------------------------------------------


@pytest.fixture
def read_only(monkeypatch):
    """Make folders read-only (mode 0555; for root, who may write anyway, os.access says no too);
    their modes are restored afterwards."""
    folders: list[Path] = []
    real_access = os.access

    def access(path, mode, *args, **kwargs):
        if mode & os.W_OK and Path(path).resolve() in folders:
            return False
        return real_access(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)

    def make(folder: Path) -> Path:
        folder.mkdir(exist_ok=True)
        folder.chmod(0o555)
        folders.append(folder.resolve())
        return folder

    yield make
    for folder in folders:
        folder.chmod(0o755)


def test_a_read_only_out_fails_before_any_work(generated, tmp_path, monkeypatch, read_only):
    import img_guidance.pipeline

    monkeypatch.setattr(
        img_guidance.pipeline.IMGPipeline, "from_pretrained", lambda *a, **k: pytest.fail("model loaded")
    )
    out = copy_of(generated, tmp_path / "out")
    before = snapshot(out)
    read_only(out)
    one_line_error(runner.invoke(app, [*GENERATE, "a green triangle", "--out", str(out)]), str(out))
    one_line_error(runner.invoke(app, ["shapes", "judge", str(out)]), str(out))
    parent = read_only(tmp_path / "ro")
    one_line_error(
        runner.invoke(app, [*GENERATE, "a green triangle", "--out", str(parent / "new")]), str(parent)
    )
    assert snapshot(out) == before and list(parent.iterdir()) == []


def test_a_failed_image_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    from PIL import Image

    from img_guidance.outputs import OutputFolder

    def full_disk(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"\x89PNG partial")
        raise OSError(28, "No space left on device")

    folder = OutputFolder(tmp_path / "out")
    monkeypatch.setattr(Image.Image, "save", full_disk)
    image = Image.new("RGB", (4, 4))
    with pytest.raises(OSError, match="No space left"):
        folder.write("x", image, [image], {"prompt": "x"})
    assert [p.name for p in (tmp_path / "out").rglob("*") if p.is_file()] == []


def test_a_failed_write_during_generate_is_one_line(tmp_path, monkeypatch):
    from img_guidance.outputs import OutputFolder

    def full_disk(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(OutputFolder, "write", full_disk)
    out = tmp_path / "out"
    one_line_error(
        runner.invoke(app, [*GENERATE, "a red circle", "--out", str(out)]),
        str(out),
        "No space left on device",
        "0 of 1 prompts written",
    )


def test_convert_to_a_read_only_place_and_its_folder_mode(tmp_path, tiny_config, read_only):
    from tests.helpers import official_state_dict

    torch.save(official_state_dict(tiny_config), tmp_path / "a.pth")
    parent = read_only(tmp_path / "ro")
    one_line_error(runner.invoke(app, ["convert", str(tmp_path / "a.pth"), str(parent / "x")]), str(parent))
    assert list(parent.iterdir()) == []
    result = runner.invoke(app, ["convert", str(tmp_path / "a.pth"), str(tmp_path / "ok")])
    assert result.exit_code == 0, result.output
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "ok").stat().st_mode & 0o777 == 0o777 & ~umask


def test_garbage_safetensors_are_named(tmp_path):
    garbage = tmp_path / "aligner.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    one_line_error(
        runner.invoke(app, ["convert", str(garbage), str(tmp_path / "out")]), str(garbage), "not a readable"
    )
    assert not (tmp_path / "out").exists()
    one_line_error(
        runner.invoke(
            app, [*GENERATE, "a red circle", "--aligner", str(garbage), "--out", str(tmp_path / "o")]
        ),
        str(garbage),
    )
    assert not (tmp_path / "o" / "metadata.jsonl").exists()


def test_judge_names_a_truncated_image_and_goes_on(generated, tmp_path):
    out = copy_of(generated, tmp_path / "out")
    broken = out / records(out)[0]["files"]["calibrated"]
    broken.write_bytes(broken.read_bytes()[:60])
    result = runner.invoke(app, ["shapes", "judge", str(out)])
    assert result.exit_code == 0, result.output
    assert f"{broken} does not decode; judged undecidable" in result.stderr
    report = json.loads((out / "judge.json").read_text())
    assert report["calibrated"]["overall"]["n"] == 2
    assert report["calibrated"]["overall"]["undecidable"] >= 1


def test_judge_on_a_missing_folder_says_it_is_missing(tmp_path):
    one_line_error(runner.invoke(app, ["shapes", "judge", str(tmp_path / "nope")]), "does not exist")


# -- rich markup and help ----------------------------------------------------------------------------


def _commands(typer_app, prefix=()):
    import typer.main

    group = typer.main.get_command(typer_app)
    for name, command in group.commands.items():
        if hasattr(command, "commands"):
            for sub in command.commands:
                yield (*prefix, name, sub)
        else:
            yield (*prefix, name)


@pytest.mark.parametrize("command", list(_commands(app)), ids=" ".join)
def test_every_command_has_help(command):
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_shapes_commands_are_listed():
    assert {"judge", "train-all"} <= set(__import__("typer").main.get_command(shapes_app).commands)


@pytest.mark.parametrize("name", ["x[/b]y", "x[red]y"])
def test_paths_with_brackets_print_as_they_are(tmp_path, name):
    out = tmp_path / name
    result = runner.invoke(app, [*GENERATE, "a purple unicorn", "--out", str(out)])
    one_line_error(result, "'a purple unicorn'")
    (tmp_path / "file[red]").write_text("x")
    line = one_line_error(runner.invoke(app, ["shapes", "judge", str(tmp_path / "file[red]")]))
    assert "file[red]" in line


# -- training ----------------------------------------------------------------------------------------


def test_mixed_precision_no_on_the_command_line(tmp_path):
    from img_guidance.recipes.config import load_config
    from img_guidance.recipes.train_aligner import TrainConfig

    config = tmp_path / "c.yaml"
    config.write_text(f"cache_dir: {tmp_path}\noutput_dir: {tmp_path / 'run'}\nmixed_precision: no\n")
    assert load_config(TrainConfig, config, []).mixed_precision == "no"
    for value in ("no", "false", "False", "NO"):
        assert load_config(TrainConfig, config, [f"mixed_precision={value}"]).mixed_precision == "no"
