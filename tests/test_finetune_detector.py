"""The detector finetuning recipe on a tiny LLaVA and a tiny InstructPix2Pix parquet, offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from img_guidance.data.triplets import iter_triplets
from img_guidance.guidance import DETECTOR_INFO, load_guidance
from img_guidance.recipes.checkpoint import list_checkpoints
from img_guidance.recipes.config import ConfigError, load_config
from img_guidance.recipes.finetune_detector import (
    IGNORE_INDEX,
    TRAINABLE_FILE,
    ExampleBuilder,
    FinetuneConfig,
    check_config,
    exact_match,
    finetune,
    main,
    prepare_model,
    token_f1,
)
from img_guidance.testing.llava import make_tiny_llava
from img_guidance.testing.triplets import TripletRow, solid, write_instructpix2pix_parquet

ROOT = Path(__file__).resolve().parents[1]
COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 20)]
NAMES = ["red", "green", "blue", "yellow"]


def triplet_rows(n: int) -> list[TripletRow]:
    rows = []
    for i in range(n):
        a, b = i % 4, (i + 1) % 4
        rows.append(
            TripletRow(
                image=solid(COLOURS[a]),
                prompt=f"a {NAMES[b]} square",
                instruction=f"make it {NAMES[b]}",
                original_prompt=f"a {NAMES[a]} square",
            )
        )
    return rows


@pytest.fixture(scope="module")
def llava(tmp_path_factory) -> Path:
    return make_tiny_llava(tmp_path_factory.mktemp("llava") / "llava")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("triplets") / "train.parquet"
    write_instructpix2pix_parquet(path, triplet_rows(14), row_group_size=4)
    return path


def config(llava: Path, data: Path, out: Path, **overrides) -> FinetuneConfig:
    values = dict(
        model=str(llava),
        data=str(data),
        output_dir=str(out),
        val_rows=4,
        batch_size=2,
        max_steps=4,
        lr=1e-3,
        warmup_ratio=0.0,
        lr_scheduler="constant",
        checkpoint_every=2,
        keep_checkpoints=0,
        log_every=1,
        eval_max_new_tokens=6,
        eval_examples=2,
        seed=0,
    )
    values.update(overrides)
    return FinetuneConfig(**values)


def test_labels_are_the_answer_tokens_only_in_the_guidance_format(llava, data):
    detector = load_guidance(llava)
    triplets = list(iter_triplets(data, start=0, stop=3))
    build = ExampleBuilder(detector, questions=("Fix it for {prompt}?",), question_seed=0, max_length=2048)
    batch = build(triplets)
    ids, labels, mask = batch["inputs"]["input_ids"], batch["labels"], batch["inputs"]["attention_mask"]
    tokenizer = detector.processor.tokenizer
    # the prompt part is exactly what the guidance stage feeds the model for the same question
    guidance_inputs = detector.encode(
        [t.image for t in triplets], detector.prompts([build.question(t) for t in triplets])
    )
    assert (
        detector.guide([triplets[0].image], [build.question(triplets[0])]).texts[0].endswith("###Assistant:")
    )
    for i, triplet in enumerate(triplets):
        length = int(guidance_inputs["attention_mask"][i].sum())
        assert torch.equal(ids[i, :length], guidance_inputs["input_ids"][i, :length])
        assert (labels[i, :length] == IGNORE_INDEX).all()
        positions = (labels[i] != IGNORE_INDEX).nonzero().flatten()
        # the answer tokens follow the prompt without a gap and run to the end of the sample
        assert positions.tolist() == list(range(length, int(mask[i].sum())))
        # llava_v0: the answer, ended by the turn separator
        assert tokenizer.decode(labels[i][positions]).strip() == f"{triplet.instruction}###"
        assert (labels[i][~mask[i].bool()] == IGNORE_INDEX).all()
    assert batch["next_row"] == 3 and batch["index"].tolist() == [0, 1, 2]

    short = ExampleBuilder(detector, questions=("Fix it for {prompt}?",), question_seed=0, max_length=40)
    with pytest.raises(ValueError, match="max_length 40"):
        short(triplets)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_a_few_steps_lower_the_loss_on_a_fixed_batch(llava, data, tmp_path, method):
    torch.manual_seed(0)
    detector = load_guidance(llava)
    cfg = config(llava, data, tmp_path, method=method, lora_r=4, lora_alpha=8, lora_dropout=0.0)
    model = prepare_model(detector.model, cfg, base=str(llava))
    vision = [p for n, p in model.named_parameters() if ".vision_tower." in n]
    assert vision and not any(p.requires_grad for p in vision)
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("multi_modal_projector" in n for n in trained)
    if method == "lora":
        assert all("lora_" in n or "multi_modal_projector" in n for n in trained)
    batch = ExampleBuilder(detector, questions=("Fix it for {prompt}?",), question_seed=0, max_length=2048)(
        list(iter_triplets(data, start=0, stop=4))
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(8):
        loss = model(**batch["inputs"], labels=batch["labels"]).loss
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert losses[-1] < 0.8 * losses[0], losses


def test_full_finetuning_saves_a_folder_the_guidance_stage_loads(llava, data, tmp_path):
    summary = finetune(config(llava, data, tmp_path / "run", prompt_format="llava_v1"))
    final = Path(summary["final_dir"])
    assert summary["step"] == 4 and [c for c, _ in list_checkpoints(tmp_path / "run" / "checkpoints")] == [
        2,
        4,
    ]
    info = json.loads((final / DETECTOR_INFO).read_text())
    assert info["prompt_format"] == "llava_v1" and info["merged"] is True
    detector = load_guidance(final)  # the recorded format is used, the weights are the trained ones
    assert detector.prompt_format == "llava_v1"
    base = load_guidance(llava)
    changed = [
        n for n, p in detector.model.named_parameters() if not torch.equal(p, base.model.state_dict()[n])
    ]
    assert any("language_model" in n for n in changed) and not any("vision_tower" in n for n in changed)
    out = detector.guide([solid(COLOURS[0])], ["Fix it for a red square?"])
    assert out.hidden_states.shape[-1] == base.hidden_size
    evaluation = json.loads((tmp_path / "run" / "eval" / "step_00000004.json").read_text())
    assert evaluation["samples"] == 4 and 0 <= evaluation["val/token_f1"] <= 1
    assert len(evaluation["examples"]) == 2 and evaluation["examples"][0]["target"] == "make it green"
    assert len(summary["history"]) == 4 and all(row["train/loss"] > 0 for row in summary["history"])


def test_defaults_train_a_frozen_vision_tower_where_bf16_is_native(llava, data, tmp_path, monkeypatch):
    # with dtype unset and no autocast, the frozen tower must not load in bfloat16 even where the
    # hardware computes it natively: its bf16 output would meet the float32 projector
    import img_guidance.precision as precision

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert precision.default_dtype("cpu") == torch.bfloat16
    summary = finetune(config(llava, data, tmp_path / "run", max_steps=2, checkpoint_every=2))
    assert summary["step"] == 2
    weights = load_file(Path(summary["final_dir"]) / "model.safetensors")
    assert {w.dtype for w in weights.values()} == {torch.float32}


def test_lora_adapter_and_merged_folders_load_to_the_same_detector(llava, data, tmp_path):
    common = dict(method="lora", lora_r=4, lora_alpha=8, lora_dropout=0.0, val_rows=0, max_steps=2)
    adapter = Path(finetune(config(llava, data, tmp_path / "adapter", **common))["final_dir"])
    merged = Path(finetune(config(llava, data, tmp_path / "merged", merge_lora=True, **common))["final_dir"])
    assert (adapter / "adapter_config.json").is_file() and not (adapter / "config.json").exists()
    assert (merged / "config.json").is_file()
    image, question = [solid(COLOURS[2])], ["Fix it for a blue square?"]
    from_adapter = load_guidance(adapter).guide(image, question).hidden_states
    from_merged = load_guidance(merged).guide(image, question).hidden_states
    base = load_guidance(llava).guide(image, question).hidden_states
    torch.testing.assert_close(from_adapter, from_merged, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(from_adapter, base, atol=1e-4)


def test_resume_equals_an_uninterrupted_run(llava, data, tmp_path):
    common = dict(method="lora", lora_r=4, lora_alpha=8, lora_dropout=0.3, val_rows=2, checkpoint_every=2)
    finetune(config(llava, data, tmp_path / "straight", max_steps=4, **common))
    finetune(config(llava, data, tmp_path / "split", max_steps=2, **common))
    summary = finetune(config(llava, data, tmp_path / "split", max_steps=4, **common), resume=True)
    assert summary["step"] == 4
    a = load_file(tmp_path / "straight" / "checkpoints" / "step_00000004" / TRAINABLE_FILE)
    b = load_file(tmp_path / "split" / "checkpoints" / "step_00000004" / TRAINABLE_FILE)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    state = json.loads(
        (tmp_path / "split" / "checkpoints" / "step_00000004" / "trainer_state.json").read_text()
    )
    # rows 0-1 held out; 4 steps x batch 2 read rows 2-9
    assert state["next_rows"] == [10]


def test_an_epoch_ends_at_the_data_and_skipped_rows_are_reported(llava, tmp_path):
    rows = triplet_rows(7)
    rows[3] = TripletRow(image=b"not an image", prompt="a red square", instruction="make it red")
    rows[5] = TripletRow(image=solid(COLOURS[0]), prompt="a red square", instruction="")
    path = tmp_path / "data.parquet"
    write_instructpix2pix_parquet(path, rows)
    summary = finetune(config(llava, path, tmp_path / "run", val_rows=0, max_steps=None, epochs=1))
    # 7 rows, 2 skipped: 5 triplets make two whole batches of 2 and a last batch of 1
    assert summary["step"] == 3
    assert summary["reader"]["undecodable"] == ["data.parquet:3"] and summary["reader"]["empty"] == 1


def test_bad_configs_fail_before_any_work(llava, data, tmp_path, capsys):
    with pytest.raises(ConfigError, match="set method: lora"):
        check_config(config(llava, data, tmp_path, quantization="4bit"))
    with pytest.raises(ConfigError, match="mixed_precision: bf16"):
        check_config(config(llava, data, tmp_path, dtype="bfloat16"))
    with pytest.raises(ConfigError, match="lora_targets"):
        finetune(config(llava, data, tmp_path / "x", method="lora", lora_targets=["nope_proj"]))
    with pytest.raises(ConfigError, match="none is left"):
        finetune(config(llava, data, tmp_path / "y", val_rows=20))
    path = tmp_path / "c.yaml"
    path.write_text(
        yaml.safe_dump({"model": str(llava), "data": str(data), "output_dir": str(tmp_path / "z")})
    )
    assert main([str(path), "lora_rank=4"]) == 2
    assert "unknown config key 'lora_rank' (did you mean 'lora_r'?)" in capsys.readouterr().err
    assert main([str(path), "method=qlora"]) == 2
    assert "method must be one of full, lora, got 'qlora'" in capsys.readouterr().err


def test_answer_metrics_by_hand():
    assert exact_match("Make it blue.", "make it  blue")
    assert not exact_match("make it blue", "make it red")
    # prediction "make the cube blue" vs reference "make it blue": overlap {make, blue} = 2,
    # precision 2/4, recall 2/3, F1 = 2 * (1/2 * 2/3) / (1/2 + 2/3) = 4/7
    assert token_f1("make the cube blue", "make it blue") == pytest.approx(4 / 7)
    assert token_f1("", "make it blue") == 0.0 and token_f1("", "") == 1.0


def test_the_configs_carry_llava_recipe_defaults():
    for name, lr in (("detector_llava13b_full.yaml", 2e-5), ("detector_llava13b_lora.yaml", 2e-4)):
        path = ROOT / "configs" / name
        assert path.read_text().startswith("# accelerate launch")
        cfg = load_config(FinetuneConfig, path)
        assert cfg.lr == lr and cfg.lr_scheduler == "cosine" and cfg.warmup_ratio == 0.03 and cfg.epochs == 1
        assert cfg.freeze_vision


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_models_finetune_in_their_chat_format(data, tmp_path, family):
    from img_guidance.testing.qwen import make_tiny_qwen

    qwen = make_tiny_qwen(tmp_path / "qwen", family=family)
    common = dict(method="lora", lora_r=4, lora_alpha=8, val_rows=2, max_steps=2, eval_max_new_tokens=3)
    summary = finetune(config(qwen, data, tmp_path / "run", **common))
    final = Path(summary["final_dir"])
    assert json.loads((final / DETECTOR_INFO).read_text())["prompt_format"] == "chat"
    detector = load_guidance(final)
    assert detector.family == family and detector.prompt_format == "chat"
    # the merger (Qwen's projector) was trained with the adapters, the vision blocks were not
    base = load_guidance(qwen)
    weights = base.model.state_dict()
    changed = {
        n.split(".")[1] for n, p in detector.model.named_parameters() if not torch.equal(p, weights[n])
    }
    assert changed == {"language_model", "visual"}
    assert not any(
        not torch.equal(p, weights[n]) for n, p in detector.model.named_parameters() if "visual.blocks" in n
    )
    assert any(
        not torch.equal(p, weights[n]) for n, p in detector.model.named_parameters() if "visual.merger" in n
    )


def test_the_cli_runs_the_recipe_and_passes_its_exit_codes(llava, data, tmp_path):
    from typer.testing import CliRunner

    from img_guidance.cli import app

    path = tmp_path / "c.yaml"
    values = {"model": str(llava), "data": str(data), "output_dir": str(tmp_path / "run"), "batch_size": 2}
    path.write_text(yaml.safe_dump(values))
    runner = CliRunner()
    bad = runner.invoke(app, ["finetune-detector", str(path), "method=qlora"])
    assert bad.exit_code == 2 and "method must be one of full, lora" in bad.output
    good = runner.invoke(app, ["finetune-detector", str(path), "max_steps=1", "report_to=[]"])
    assert good.exit_code == 0, good.output
    assert (tmp_path / "run" / "final" / DETECTOR_INFO).is_file()


def test_freeze_norms_keeps_every_normalization_weight_and_trains_the_rest(llava, data, tmp_path):
    base = {n: p.clone() for n, p in load_guidance(llava).model.named_parameters()}
    cfg = config(llava, data, tmp_path / "run", freeze_vision=False, freeze_norms=True)
    model = prepare_model(load_guidance(llava).model, cfg)
    norms = {n for n, p in model.named_parameters() if "norm" in n}  # layer norms and RMS norms
    assert norms and not any(p.requires_grad for n, p in model.named_parameters() if n in norms)
    assert all(p.requires_grad for n, p in model.named_parameters() if n not in norms)
    final = Path(finetune(cfg)["final_dir"])
    trained = dict(load_guidance(final).model.named_parameters())
    assert all(torch.equal(trained[n], base[n]) for n in norms)
    assert not all(torch.equal(trained[n], base[n]) for n in base if n not in norms)
