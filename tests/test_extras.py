"""The base install is what `generate` and `demo` need; the extras ([train], [eval], [serve], [study],
[dev]) add the rest, and a command that needs a missing extra says so in one line before anything
loads."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from img_guidance.cli import PACKAGE_NAMES, TRAIN_MODULES, app

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
# what only training, evaluation, the web page and the study import (module names)
NOT_BASE = ("pyarrow", "yaml", "peft", "tensorboard", "matplotlib", "gradio", "fastapi")


def project() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def name_of(requirement: str) -> str:
    return re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower().replace("_", "-")


def test_the_base_install_leaves_training_eval_serve_and_study_to_the_extras():
    base = {name_of(r) for r in project()["dependencies"]}
    assert not base & {"pyarrow", "pyyaml", "tensorboard", "peft", "matplotlib", "gradio", "fastapi"}, base
    assert {"torch", "diffusers", "transformers", "accelerate", "safetensors", "typer"} <= base
    extras = project()["optional-dependencies"]
    assert {"train", "eval", "serve", "study", "dev"} <= set(extras)
    assert {name_of(r) for r in extras["train"]} == {"pyarrow", "pyyaml", "tensorboard", "peft"}
    assert {"matplotlib", "pyarrow"} <= {name_of(r) for r in extras["eval"]}
    # what the CLI asks for before training is in the train extra
    assert {PACKAGE_NAMES.get(m, m) for m in (*TRAIN_MODULES, "peft")} <= {
        name_of(r) for r in extras["train"]
    }
    # make install installs .[dev]: the demo's and the tests' needs, through the other extras
    assert '-e ".[dev]"' in (ROOT / "Makefile").read_text()
    pulled = [re.search(r"\[(.*)\]", r) for r in extras["dev"] if name_of(r) == project()["name"]]
    assert len(pulled) == 1 and {"train", "eval", "study", "serve"} <= set(pulled[0].group(1).split(","))
    # no extra pulls in another torch
    assert not any(name_of(r) == "torch" for reqs in extras.values() for r in reqs)


def test_generate_and_the_demo_need_no_extra(tmp_path):
    """With every extra's modules unimportable, the modules of the generate path import, and a
    ShapesWorld generate runs through the CLI on the shipped models. yaml stays: huggingface_hub,
    transformers and accelerate depend on pyyaml themselves, so every install has it."""
    out = tmp_path / "out"
    blocked = tuple(name for name in NOT_BASE if name != "yaml")
    code = f"""
import sys
for name in {blocked!r}:
    sys.modules[name] = None  # `import name` raises ImportError; find_spec(name) is None
import importlib
for module in ("img_guidance.cli", "img_guidance.pipeline", "img_guidance.backends.sdxl",
               "img_guidance.backends.flux", "img_guidance.backends.shapes", "img_guidance.guidance.llava",
               "img_guidance.guidance.qwen", "img_guidance.aligner", "img_guidance.demo"):
    importlib.import_module(module)
from img_guidance.cli import app
sys.argv = ["img-guidance", "generate", "--model", "shapes", "--steps", "2", "--passes", "1",
            "a red circle", "--out", {str(out)!r}]
app()
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    (record,) = [json.loads(x) for x in (out / "metadata.jsonl").read_text().splitlines() if x.strip()]
    assert record["prompt"] == "a red circle"
    assert all((out / f).is_file() for f in record["files"].values())


def one_error_line(result) -> str:
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture
def without_train_extra(monkeypatch):
    for name in ("yaml", "pyarrow"):
        monkeypatch.setitem(sys.modules, name, None)


def test_training_commands_name_the_missing_train_extra(without_train_extra, tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text("lr: 1e-4\n")
    result = runner.invoke(app, ["train", str(config), "lr=1e-3"])
    assert (
        one_error_line(result)
        == 'error: img-guidance train needs pyyaml, pyarrow: pip install "img-guidance[train]"'
    )

    result = runner.invoke(app, ["finetune-detector", str(config)])
    assert one_error_line(result) == (
        'error: img-guidance finetune-detector needs pyyaml, pyarrow: pip install "img-guidance[train]"'
    )

    out = tmp_path / "shapes"
    result = runner.invoke(app, ["shapes", "train-all", str(out), "--quick"])
    assert one_error_line(result) == (
        'error: img-guidance shapes train-all needs pyyaml, pyarrow: pip install "img-guidance[train]"'
    )
    assert not out.exists()

    result = runner.invoke(app, ["features", "--pairs", "pairs.parquet", "--out", str(tmp_path / "cache")])
    assert (
        one_error_line(result)
        == 'error: img-guidance features needs pyarrow: pip install "img-guidance[train]"'
    )
    assert not (tmp_path / "cache").exists()


def test_the_parquet_benchmark_names_the_missing_eval_extra(without_train_extra, tmp_path):
    result = runner.invoke(app, ["eval", "run", "pickapic-test", "--out", str(tmp_path / "out")])
    assert one_error_line(result) == (
        'error: img-guidance eval run pickapic-test needs pyarrow: pip install "img-guidance[eval]"'
    )
    assert not (tmp_path / "out").exists()


def test_a_lora_adapter_folder_without_peft_says_so_before_its_base_model_loads(monkeypatch, tmp_path):
    from img_guidance.guidance import load_guidance

    base = tmp_path / "base"  # no model in it: the error has to come before it is read
    base.mkdir()
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base)}))
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(ImportError) as caught:
        load_guidance(adapter)
    assert str(caught.value) == (
        f'{adapter} is a LoRA adapter folder, which needs peft: pip install "img-guidance[train]"'
    )
