"""The recipes as classes (setup, train_step, save_checkpoint, train, cleanup) and the checkpoint
module they share, on the aligner recipe's tiny feature cache (CPU, offline)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from img_guidance.recipes.checkpoint import (
    STATE_FILE,
    hparams,
    list_checkpoints,
    read_checkpoint,
    write_checkpoint,
)
from img_guidance.recipes.train_aligner import AlignerRecipe, train
from tests.test_train_aligner import make_config, reset_accelerate, write_cache


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return write_cache(tmp_path_factory.mktemp("features"))


@pytest.fixture(autouse=True)
def _one_thread_and_fresh_accelerate():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    reset_accelerate()


def test_driving_the_recipe_step_by_step_equals_train(cache, tmp_path):
    """setup + 3 x train_step + save_checkpoint lands on the weights train() has after 3 steps, and
    the state (step, data position) lives on the recipe and in its checkpoint."""
    whole = train(make_config(tmp_path / "whole", cache, max_steps=3, checkpoint_every=3))
    reset_accelerate()

    recipe = AlignerRecipe(make_config(tmp_path / "steps", cache, max_steps=3, checkpoint_every=3))
    recipe.setup()
    try:
        batches = recipe.epoch_batches(0, 0)
        losses = [recipe.train_step(next(batches))["loss"] for _ in range(3)]
        path = recipe.save_checkpoint()
    finally:
        recipe.cleanup()
    assert all(math.isfinite(loss) for loss in losses)
    assert (recipe.step, recipe.epoch, recipe.batch_in_epoch) == (3, 0, 3)
    assert losses[0] == pytest.approx(whole["history"][0]["train/loss"])
    state = json.loads((path / STATE_FILE).read_text())
    assert (state["step"], state["epoch"], state["batch_in_epoch"]) == (3, 0, 3)
    ours = load_file(path / "aligner" / "model.safetensors")
    theirs = load_file(tmp_path / "whole" / "final" / "model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_a_resumed_recipe_starts_where_the_checkpoint_left(cache, tmp_path):
    train(make_config(tmp_path / "run", cache, batch_size=3, max_steps=15, checkpoint_every=15))
    reset_accelerate()
    recipe = AlignerRecipe(make_config(tmp_path / "run", cache, batch_size=3, max_steps=20), resume=True)
    recipe.setup()
    recipe.cleanup()
    # 13 batches of 3 an epoch: step 15 is batch 2 of epoch 1
    assert (recipe.step, recipe.epoch, recipe.batch_in_epoch) == (15, 1, 2)
    assert recipe.position() == {"epoch": 1, "batch_in_epoch": 2}
    assert (
        recipe.replacement_steps
        == json.loads((tmp_path / "run" / "checkpoints" / "step_00000015" / STATE_FILE).read_text())[
            "replacement_steps"
        ]
    )


def test_the_shared_checkpoint_round_trip_restores_optimizer_and_rng(tmp_path):
    """write_checkpoint + read_checkpoint with a model of the test's own: the recipe's model files
    come from its callbacks (read first), the rest is shared; only the newest ``keep`` survive."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)
    root = tmp_path / "checkpoints"
    for step in (1, 2):
        model(torch.ones(1, 3)).sum().backward()
        optimizer.step()
        scheduler.step()
        path = write_checkpoint(
            accelerator,
            root,
            step,
            state={"step": step, "mine": [1, 2]},
            keep=1,
            save_model=lambda folder: torch.save(model.state_dict(), folder / "model.pt"),
            optimizer=optimizer,
            scheduler=scheduler,
        )
    assert [step for step, _ in list_checkpoints(root)] == [2]
    assert sorted(p.name for p in path.iterdir()) == [
        "model.pt",
        "optimizer.pt",
        "rng",
        "scheduler.pt",
        STATE_FILE,
    ]
    expected_draw = torch.rand(4)
    saved_moments = optimizer.state_dict()["state"][0]["exp_avg"].clone()

    fresh = torch.optim.AdamW(model.parameters(), lr=0.1)
    fresh_scheduler = torch.optim.lr_scheduler.LambdaLR(fresh, lambda step: 0.5)
    order = []

    def load_model(folder: Path, state: dict) -> None:
        order.append(("model", state["mine"]))
        model.load_state_dict(torch.load(folder / "model.pt", weights_only=True))

    state = read_checkpoint(
        path, accelerator, load_model=load_model, optimizer=fresh, scheduler=fresh_scheduler
    )
    assert state == {"step": 2, "mine": [1, 2]} and order == [("model", [1, 2])]
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], saved_moments)
    assert fresh_scheduler.last_epoch == 2
    assert torch.equal(torch.rand(4), expected_draw)  # the RNG is back where the checkpoint left it


def test_hparams_flatten_what_tensorboard_cannot_take(tmp_path):
    flat = hparams(make_config(tmp_path, tmp_path, terms=["dpo"]))
    assert flat["terms"] == '["dpo"]' and flat["lr"] == 1e-2 and flat["online"] == "null"
    assert all(isinstance(v, (int, float, str, bool)) for v in flat.values())
