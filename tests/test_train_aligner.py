"""The aligner training recipe, on a tiny feature cache written by the test (CPU, offline).

The cache holds 40 samples: guidance of 3-8 tokens of width 12, and 4 image tokens of width 8, where
w = l + a fixed offset + (mean of the guidance) @ a fixed map, so an aligner can learn to move l to w.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch.utils.data import IterableDataset

from img_guidance.aligner import load_aligner
from img_guidance.features.cache import FeatureCache, FeatureCacheWriter
from img_guidance.recipes.checkpoint import STATE_FILE, list_checkpoints
from img_guidance.recipes.config import ConfigError, load_config, parse_args
from img_guidance.recipes.train_aligner import (
    USAGE,
    EpochSampler,
    TrainConfig,
    build_aligner,
    main,
    resolve_resume,
    train,
)

ROOT = Path(__file__).resolve().parents[1]
DIMS = {"guidance_dim": 12, "num_tokens": 4, "image_dim": 8}
SAMPLES = 40
TINY = dict(depth=1, heads=2, head_dim=8, ff_mult=2)


def write_cache(root: Path, *, nan_sample: int | None = None) -> Path:
    g = torch.Generator().manual_seed(0)
    width, tokens, image = DIMS["guidance_dim"], DIMS["num_tokens"], DIMS["image_dim"]
    mix = torch.randn(width, image, generator=g) / width**0.5
    offset = torch.randn(image, generator=g)
    samples = []
    for i in range(SAMPLES):
        length = int(torch.randint(3, 9, (1,), generator=g))
        guidance = torch.randn(length, width, generator=g)
        tokens_l = torch.randn(tokens, image, generator=g)
        tokens_w = tokens_l + offset + guidance.mean(0) @ mix
        if i == nan_sample:
            tokens_w[0, 0] = float("nan")
        samples.append({"guidance": guidance, "tokens_l": tokens_l, "tokens_w": tokens_w, "index": i})
    writer = FeatureCacheWriter(
        root, dims=DIMS, dtype="float32", models={"test": "synthetic"}, question_seed=0, rows_per_shard=64
    )
    writer.write_shard(0, samples, first_row=0, stop_row=SAMPLES, stats={})
    writer.finalize()
    return root


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return write_cache(tmp_path_factory.mktemp("features"))


def reset_accelerate() -> None:
    """Forget accelerate's process-wide state, so the next run in this process starts clean."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(autouse=True)
def _one_thread_and_fresh_accelerate():
    # Tiny kernels on a shared 2-core machine: OpenMP thread hand-offs cost 20x the compute.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    reset_accelerate()


def make_config(output: Path, cache: Path, **overrides) -> TrainConfig:
    values = dict(
        output_dir=str(output),
        cache_dir=str(cache),
        **TINY,
        batch_size=4,
        lr=1e-2,
        k=2,
        max_steps=20,
        checkpoint_every=5,
        keep_checkpoints=0,
        log_every=1,
        validate_every=0,
        num_workers=0,
        seed=0,
    )
    return TrainConfig(**(values | overrides))


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def assert_same_tensors(a: dict, b: dict, **tolerance) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if tolerance:
            torch.testing.assert_close(a[key], b[key], **tolerance, msg=key)
        else:
            assert torch.equal(a[key], b[key]), key


# -- training ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(cache, tmp_path_factory):
    """One 30-step run with a 20% held-out split, validated every 10 steps."""
    output = tmp_path_factory.mktemp("run") / "out"
    torch.set_num_threads(1)
    cfg = make_config(output, cache, max_steps=30, checkpoint_every=10, val_fraction=0.2, validate_every=10)
    result = train(cfg)
    reset_accelerate()
    return output, result


def test_training_lowers_the_loss_and_final_loads(trained):
    output, result = trained
    losses = [row["train/L_base"] for row in result["history"]]
    assert len(losses) == 30
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.5 * first, (first, last)
    aligner = load_aligner(output / "final")
    assert aligner.config.guidance_dim == DIMS["guidance_dim"]
    assert aligner.config.image_dim == DIMS["image_dim"]
    assert (aligner.config.depth, aligner.config.heads, aligner.config.head_dim) == (1, 2, 8)
    assert_same_tensors(weights(output / "final"), weights(output / "checkpoints/step_00000030/aligner"))
    assert result["replacement_steps"], "the reference was never replaced"


def test_validation_metrics_are_logged(trained):
    output, result = trained
    assert [v["step"] for v in result["validations"]] == [10, 20, 30]
    last = result["validations"][-1]
    assert last["val/L_base"] < last["val/input_distance"]
    assert last["val/closer_fraction"] > 0.5
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(output / "logs" / "img-guidance"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in (
        "val/L_base",
        "val/closer_fraction",
        "train/L_base",
        "train/L_pref",
        "train/margin_dpo",
        "train/margin_spin",
        "train/win_fraction",
        "train/reference_replacements",
        "train/lr",
        "train/samples_per_s",
    ):
        assert tag in tags, tag
    logged = [e.value for e in events.Scalars("val/L_base")]
    assert logged == pytest.approx([v["val/L_base"] for v in result["validations"]])


def test_resume_equals_an_uninterrupted_run(cache, tmp_path):
    """20 steps straight vs 10 + --resume + 10, resuming mid-epoch (batch 3: 13 steps per epoch)
    past stale leftovers of a killed run; weights, reference and tracker must be identical."""
    straight = tmp_path / "straight"
    full = train(make_config(straight, cache, batch_size=3, keep_checkpoints=2))
    assert [step for step, _ in list_checkpoints(straight / "checkpoints")] == [15, 20]
    assert full["replacement_steps"], "the reference was never replaced: the test would prove little"

    split = tmp_path / "split"
    train(make_config(split, cache, batch_size=3, max_steps=10))
    # what a run killed while writing checkpoint 15 leaves, and a folder that is no checkpoint
    stale = split / "checkpoints" / ".tmp-step_00000015"
    (stale / "aligner").mkdir(parents=True)
    (stale / STATE_FILE).write_text("{")
    (split / "checkpoints" / "step_00000099").mkdir()
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        train(make_config(split, cache, batch_size=3))
    resumed = train(make_config(split, cache, batch_size=3), resume=True)
    assert not stale.exists()

    assert resumed["step"] == full["step"] == 20
    assert_same_tensors(weights(straight / "final"), weights(split / "final"))
    last = "checkpoints/step_00000020"
    assert_same_tensors(
        load_file(straight / last / "reference.safetensors"),
        load_file(split / last / "reference.safetensors"),
    )
    assert resumed["tracker"] == full["tracker"]
    assert resumed["replacement_steps"] == full["replacement_steps"]
    a, b = (json.loads((run / last / STATE_FILE).read_text()) for run in (straight, split))
    assert (a["tracker"], a["epoch"], a["batch_in_epoch"]) == (b["tracker"], b["epoch"], b["batch_in_epoch"])
    assert (a["epoch"], a["batch_in_epoch"]) == (1, 7)


def test_nan_loss_stops_with_the_last_good_checkpoint(tmp_path, capsys):
    # poison the first sample of step 7's batch (batch 4, no held-out split, seed 0)
    order = EpochSampler(range(SAMPLES), global_batch=4, seed=0).order(0)
    cache = write_cache(tmp_path / "features", nan_sample=int(order[6 * 4]))
    output = tmp_path / "out"
    config = tmp_path / "nan.yaml"
    config.write_text(yaml.safe_dump({"output_dir": str(output), "cache_dir": str(cache), **TINY}))
    code = main([str(config), "batch_size=4", "max_steps=20", "checkpoint_every=3", "num_workers=0", "k=2"])
    assert code == 1
    err = capsys.readouterr().err
    assert "step 7" in err and "L_base=nan" in err and "step_00000006" in err, err
    assert [step for step, _ in list_checkpoints(output / "checkpoints")] == [3, 6]
    state = json.loads((output / "checkpoints/step_00000006" / STATE_FILE).read_text())
    assert state["step"] == 6
    assert not (output / "final").exists()


class Streamed(IterableDataset):
    """The cache's samples as a stream, the way OnlineFeatures yields them (one process here)."""

    def __init__(self, root: Path):
        self.cache = FeatureCache(root)
        self.dims = self.cache.dims

    def __iter__(self):
        return (self.cache[i] for i in range(len(self.cache)))


def test_a_streamed_dataset_trains_and_resumes_exactly(cache, tmp_path):
    """Any iterable dataset of feature samples plugs in (as online features do); 10 batches an epoch,
    so 14 steps cross an epoch, and 7 + resume + 7 skips to the same batch."""
    straight = train(
        make_config(tmp_path / "a", cache, max_steps=14, checkpoint_every=7), dataset=Streamed(cache)
    )
    train(make_config(tmp_path / "b", cache, max_steps=7, checkpoint_every=7), dataset=Streamed(cache))
    resumed = train(
        make_config(tmp_path / "b", cache, max_steps=14, checkpoint_every=7),
        resume=True,
        dataset=Streamed(cache),
    )
    assert straight["step"] == resumed["step"] == 14
    assert_same_tensors(weights(tmp_path / "a" / "final"), weights(tmp_path / "b" / "final"))
    assert straight["tracker"] == resumed["tracker"]


class FakeEncoder:
    """Image tokens from an image's mean colour: [B, 4, 8]."""

    token_shape = (DIMS["num_tokens"], DIMS["image_dim"])

    def encode_image(self, images):
        colours = torch.tensor([list(image.convert("RGB").getpixel((0, 0))) for image in images]) / 255
        return colours.repeat(1, 11)[:, : 4 * 8].reshape(len(images), 4, 8)


class FakeGuidance:
    """Hidden states of width 12 and a question-dependent length."""

    hidden_size = DIMS["guidance_dim"]

    def guide(self, images, questions):
        from types import SimpleNamespace

        lengths = torch.tensor([3 + len(q) % 4 for q in questions])
        mask = torch.arange(6)[None, :] < lengths[:, None]
        return SimpleNamespace(hidden_states=torch.randn(len(questions), 6, 12), attention_mask=mask)


def test_online_config_trains_on_online_features(tmp_path, monkeypatch, capsys):
    import img_guidance.backends
    import img_guidance.guidance
    from img_guidance.testing.pairs import JsonlPair, write_pairs_jsonl

    loaded = []

    def load_image_encoder(model, **options):
        loaded.append(model)
        return FakeEncoder()

    monkeypatch.setattr(img_guidance.backends, "load_image_encoder", load_image_encoder)
    monkeypatch.setattr(img_guidance.guidance, "load_guidance", lambda spec, **kw: FakeGuidance())
    colours = ["red", "blue", "green", "yellow", "white", "black"]
    rows = [JsonlPair(f"prompt {i}", chosen=colours[i % 6], rejected=colours[(i + 1) % 6]) for i in range(10)]
    pairs = write_pairs_jsonl(tmp_path / "pairs", rows)
    config = tmp_path / "online.yaml"
    online = {"pairs": str(pairs), "model": "sdxl", "batch_size": 4}
    config.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "out"), "online": online, **TINY}))
    overrides = ["num_workers=0", "batch_size=4", "max_steps=4", "checkpoint_every=2", "log_every=1"]
    assert main([str(config), *overrides]) == 0, capsys.readouterr().err
    assert loaded == ["sdxl"]
    assert "on streamed features" in capsys.readouterr().out
    assert load_aligner(tmp_path / "out" / "final").config.guidance_dim == DIMS["guidance_dim"]
    assert main([str(config), "num_workers=2"]) == 2
    assert "online extraction runs its models in the main process" in capsys.readouterr().err
    assert main([str(config), "online.bogus=1"]) == 2
    assert "unknown online key 'bogus'; valid keys: pairs, model" in capsys.readouterr().err


def test_init_from_and_resume_paths(trained, cache, tmp_path):
    output, _ = trained
    cfg = make_config(tmp_path / "x", cache, init_from=str(output / "final"))
    start = build_aligner(cfg, DIMS)
    assert_same_tensors(start.state_dict(), weights(output / "final"))
    assert start.training
    with pytest.raises(ConfigError, match=r"init_from .* has depth=1 \(config or data: 2\)"):
        build_aligner(make_config(tmp_path / "x", cache, init_from=str(output / "final"), depth=2), DIMS)
    with pytest.raises(ConfigError, match=r"init_from .*does not match the attention width"):
        build_aligner(make_config(tmp_path / "x", cache, init_from=str(output / "final"), heads=3), DIMS)

    checkpoints = output / "checkpoints"
    assert resolve_resume(True, checkpoints) == checkpoints / "step_00000030"
    assert resolve_resume(str(checkpoints / "step_00000010"), checkpoints) == checkpoints / "step_00000010"
    with pytest.raises(ConfigError, match="not a complete checkpoint"):
        resolve_resume(str(tmp_path), checkpoints)
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        resolve_resume(True, tmp_path)


# -- config and command line -------------------------------------------------------------------------


def test_overrides_are_typed_and_unknown_keys_are_named(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("output_dir: out\ncache_dir: feats\nlr: 1e-4\n")
    cfg = load_config(
        TrainConfig,
        path,
        ["lr=3e-4", "terms=[dpo]", "max_steps=2e3", "grad_clip=1", "init_from=null", "online.pairs=p.jsonl"],
    )
    assert cfg.lr == 3e-4 and isinstance(cfg.lr, float)
    assert cfg.terms == ["dpo"] and cfg.max_steps == 2000 and cfg.grad_clip == 1.0
    assert cfg.init_from is None and cfg.online == {"pairs": "p.jsonl"}
    assert load_config(TrainConfig, path).lr == 1e-4  # YAML 1.1 reads 1e-4 as a string

    with pytest.raises(ConfigError, match=r"unknown config key 'lrr' \(did you mean 'lr'\?\).*weight_decay"):
        load_config(TrainConfig, path, ["lrr=1"])
    with pytest.raises(ConfigError, match="max_steps must be an integer, got 'many'"):
        load_config(TrainConfig, path, ["max_steps=many"])
    with pytest.raises(ConfigError, match=r"lr is .*, not a section"):
        load_config(TrainConfig, path, ["lr.x=1"])
    assert main([str(path), "bogus=1"]) == 2
    assert "unknown config key 'bogus'" in capsys.readouterr().err

    assert parse_args(["c.yaml", "lr=1", "--resume"], USAGE) == ("c.yaml", ["lr=1"], True)
    assert parse_args(["c.yaml", "--resume", "lr=1"], USAGE) == ("c.yaml", ["lr=1"], True)
    assert parse_args(["c.yaml", "--resume", "ckpt/step_1"], USAGE) == ("c.yaml", [], "ckpt/step_1")


def test_configs_carry_their_launch_command_and_the_paper_defaults():
    configs = sorted((ROOT / "configs").glob("*.yaml"))
    assert {p.name for p in configs} >= {
        "sdxl_llava13b.yaml",
        "flux_llava13b.yaml",
        "accelerate_deepspeed_zero2.yaml",
    }
    for path in configs:
        first = path.read_text().splitlines()[0]
        assert first.startswith("# ") and f"configs/{path.name}" in first, (path.name, first)
        assert "img-guidance train" in first or "accelerate launch" in first, first
    for name, image_dim in (("sdxl_llava13b.yaml", 2048), ("flux_llava13b.yaml", 4096)):
        cfg = load_config(TrainConfig, ROOT / "configs" / name)
        assert (cfg.lr, cfg.weight_decay, cfg.batch_size, cfg.lam, cfg.k) == (1e-4, 1e-4, 8, 1.0, 10)
        assert (cfg.max_steps, cfg.terms, cfg.warmup_steps) == (100_000, ["dpo", "spin"], 0)
        assert f"image_dim {image_dim}" in (ROOT / "configs" / name).read_text()
    deepspeed = yaml.safe_load((ROOT / "configs/accelerate_deepspeed_zero2.yaml").read_text())
    assert deepspeed["distributed_type"] == "DEEPSPEED"
    assert deepspeed["deepspeed_config"]["zero_stage"] == 2 and deepspeed["mixed_precision"] == "bf16"


# -- distributed -------------------------------------------------------------------------------------


def test_two_processes_equal_one_with_the_same_global_batch(cache, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` on the CPU (ACCELERATE_USE_CPU: gloo) x batch 2
    against 1 process x batch 4: same weights within float tolerance, and both processes replaced the
    reference at the same steps. (`accelerate launch --cpu --num_processes 2` starts a single process
    in accelerate 1.15; --multi_gpu with ACCELERATE_USE_CPU starts two CPU processes.)"""
    single = tmp_path / "single"
    one = train(make_config(single, cache, max_steps=12, checkpoint_every=6))

    double = tmp_path / "double"
    config = tmp_path / "two.yaml"
    values = {"output_dir": str(double), "cache_dir": str(cache), **TINY, "lr": 1e-2, "k": 2, "seed": 0}
    config.write_text(yaml.safe_dump(values))
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    command += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    command += ["-m", "img_guidance.recipes.train_aligner", str(config), "batch_size=2", "max_steps=12"]
    command += ["checkpoint_every=6", "num_workers=0", "log_every=1"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "2 process(es) x batch 2 = global batch 4" in done.stdout

    records = [
        json.loads((double / "logs" / f"reference_replacements.process{i}.json").read_text()) for i in (0, 1)
    ]
    assert records[0] == records[1] and records[0]["last_step"] == 12
    assert records[0]["steps"] == one["replacement_steps"] != []
    assert_same_tensors(weights(single / "final"), weights(double / "final"), atol=1e-5, rtol=1e-4)
    last = "checkpoints/step_00000012/reference.safetensors"
    assert_same_tensors(load_file(single / last), load_file(double / last), atol=1e-5, rtol=1e-4)


# -- a user's mistakes and a machine's accidents -------------------------------------------------------


def test_resume_with_another_architecture_names_the_differences(trained, cache, tmp_path, capsys):
    import shutil

    output, _ = trained
    copy = tmp_path / "run"
    shutil.copytree(output, copy)
    before = sorted(p.relative_to(copy) for p in copy.rglob("*"))
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"output_dir": str(copy), "cache_dir": str(cache), **TINY}))
    code = main(
        [str(config), "depth=2", "ff_mult=4", "batch_size=4", "num_workers=0", "max_steps=40", "--resume"]
    )
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert "depth 1 there, 2 here" in err[0] and "ff_mult 2 there, 4 here" in err[0], err
    assert sorted(p.relative_to(copy) for p in copy.rglob("*")) == before


def test_a_corrupt_shard_is_one_line_and_leaves_no_run_behind(tmp_path, capsys):
    cache = write_cache(tmp_path / "features")
    (shard,) = cache.glob("*.safetensors")
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF  # same size, other bytes: only the checksum can tell
    shard.write_bytes(bytes(data))
    output = tmp_path / "out"
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"output_dir": str(output), "cache_dir": str(cache), **TINY}))
    code = main([str(config), "batch_size=4", "max_steps=5", "num_workers=0"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not match its checksum" in err[0] and shard.name in err[0], err
    # it stopped before its first checkpoint: no config.yaml or logs/ left behind
    assert not output.exists()


def test_a_run_stopped_before_its_first_checkpoint_leaves_other_files_alone(cache, tmp_path, monkeypatch):
    import img_guidance.objective

    output = tmp_path / "out"
    output.mkdir()
    (output / "notes.txt").write_text("mine")

    def interrupted(*args, **kwargs):  # Ctrl-C during the first step
        raise KeyboardInterrupt

    monkeypatch.setattr(img_guidance.objective, "iupo_loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(make_config(output, cache, max_steps=5, checkpoint_every=5))
    assert sorted(p.name for p in output.iterdir()) == ["notes.txt"]
