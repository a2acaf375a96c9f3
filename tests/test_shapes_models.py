"""ShapesWorld's diffusion model, its adapter, their training and the shapes backend, on tiny models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from img_guidance.backends.shapes import ShapesBackend
from img_guidance.recipes.train_shapes_generator import (
    adapter_loss,
    denoising_loss,
    diffusion_loss,
    pretrain_image_encoder,
    scene_targets,
    train_adapter,
    train_generator,
    train_joint,
)
from img_guidance.shapes.grammar import all_scenes, category, describe, parse
from img_guidance.shapes.models import (
    ShapesTextEncoder,
    ShapesTokenizer,
    ShapesWorldPipeline,
    background_image,
    grammar_words,
    ip_processors,
    to_pixels,
)
from img_guidance.shapes.render import render
from img_guidance.shapes.splits import by_category, held_out_kinds, split_scenes, unseen_combination

torch.set_num_threads(1)

TINY_UNET = dict(block_out_channels=(16, 32), head_dim=16)
SAMPLING = dict(steps=3)
PROMPTS = ["a red circle", "two blue squares"]


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im, dtype=np.int16) for im in images])


def tiny_pipeline(*, adapter: bool = True) -> ShapesWorldPipeline:
    pipe = ShapesWorldPipeline.build(seed=0, unet=TINY_UNET, text_layers=1)
    if adapter:
        pipe.add_ip_adapter(seed=1)
    return pipe.eval()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("shapes_model")
    tiny_pipeline().save_pretrained(path, dtype=torch.float32)  # exact: the round-trip test compares
    return path


@pytest.fixture(scope="module")
def backend(folder) -> ShapesBackend:
    return ShapesBackend.from_pretrained(folder)


@pytest.fixture(scope="module")
def tokens(backend) -> torch.Tensor:
    """[2, 4, 64]: tokens of renders of two different scenes (rows A and B)."""
    return backend.encode_image([render("a red circle", seed=1), render("three green triangles", seed=2)])


# ---------------------------------------------------------------------------------------------
# tokenizer and model folder


def test_tokenizer_round_trip_and_errors(tmp_path):
    tokenizer = ShapesTokenizer()
    assert tokenizer.vocab[:3] == ["<pad>", "<unk>", "<eos>"]
    assert set(grammar_words()) >= {"a", "an", "one", "three", "yellow", "triangles", "left", "above"}
    for spec in all_scenes()[::7]:
        prompt = describe(spec)
        assert tokenizer.decode(tokenizer.encode(prompt)) == prompt
    assert tokenizer.decode(tokenizer.encode("Two RED circles, and a blue square.")) == (
        "two red circles and a blue square"
    )
    ids, mask = tokenizer(["a red circle", ""])
    assert ids.shape == mask.shape == (2, 12)
    assert ids[0, :4].tolist() == [*tokenizer.encode("a red circle")[:3], tokenizer.eos_token_id]
    assert mask.sum(1).tolist() == [4, 1]  # the empty prompt is <eos> alone

    with pytest.raises(ValueError, match=r"unknown words \['purple'\] in prompt 'a purple circle'"):
        tokenizer.encode("a purple circle")
    assert tokenizer.encode("a purple circle", strict=False)[1] == tokenizer.unk_token_id
    with pytest.raises(ValueError, match="at most 11 fit"):
        tokenizer.encode(" ".join(["a"] * 12))

    tokenizer.save(tmp_path / "tokenizer.json")
    assert ShapesTokenizer.from_file(tmp_path / "tokenizer.json") == tokenizer
    assert ShapesTextEncoder().config.vocab_size == len(tokenizer)


def _states(pipe: ShapesWorldPipeline) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{k}": v for name, module in pipe.modules().items() for k, v in module.state_dict().items()
    }


def test_save_load_round_trip(folder, tmp_path):
    original = tiny_pipeline()
    loaded = ShapesWorldPipeline.from_pretrained(folder)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "ShapesWorldPipeline"
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    expected, got = _states(original), _states(loaded)
    assert expected.keys() == got.keys()
    assert any("to_k_ip" in k for k in got)  # the adapter's processors came back
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=0, msg=key)
    assert loaded.tokenizer == original.tokenizer
    assert loaded.scheduler.config.prediction_type == "v_prediction"

    # the default storage is float16: half the size, loaded back as float32
    original.save_pretrained(tmp_path / "half")
    half = _states(ShapesWorldPipeline.from_pretrained(tmp_path / "half"))
    for key, value in expected.items():
        assert half[key].dtype == value.dtype
        torch.testing.assert_close(half[key], value, rtol=1e-3, atol=1e-4, msg=key)

    base = tiny_pipeline(adapter=False)
    base.save_pretrained(tmp_path / "base")
    assert not (tmp_path / "base" / "ip_adapter.safetensors").exists()
    reloaded = ShapesWorldPipeline.from_pretrained(tmp_path / "base")
    assert not reloaded.has_adapter
    assert _states(reloaded).keys() == _states(base).keys()


def test_from_pretrained_rejects_other_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no model_index\.json"):
        ShapesWorldPipeline.from_pretrained(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    with pytest.raises(ValueError, match="holds a StableDiffusionXLPipeline"):
        ShapesWorldPipeline.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------------------------
# the backend


def test_backend_tokens(backend, tokens):
    assert backend.family == "shapes"
    assert backend.token_shape == (4, 64)
    assert (backend.defaults.height, backend.defaults.width) == (32, 32)
    assert tokens.shape == (2, 4, 64)
    assert not torch.allclose(tokens[0], tokens[1])
    again = backend.encode_image([render("a red circle", seed=1), render("three green triangles", seed=2)])
    torch.testing.assert_close(again, tokens, rtol=0, atol=0)
    negative = backend.negative_image_tokens()
    assert negative.shape == (1, 4, 64)
    torch.testing.assert_close(negative, backend.encode_image([background_image()]), rtol=0, atol=0)


def test_generate_is_deterministic_per_seed(backend):
    first = backend.generate(PROMPTS, [3, 4], **SAMPLING)
    assert [im.size for im in first] == [(32, 32), (32, 32)]
    a = pixels(first)
    np.testing.assert_array_equal(pixels(backend.generate(PROMPTS, [3, 4], **SAMPLING)), a)
    assert np.abs(a[0] - pixels(backend.generate(PROMPTS[:1], [5], **SAMPLING))[0]).max() > 20


def test_batch_rows_equal_single_calls_and_follow_their_tokens(backend, tokens):
    kwargs = dict(image_tokens=tokens, ip_scale=1.0, **SAMPLING)
    batch = pixels(backend.generate(PROMPTS, [7, 7], **kwargs))
    first = pixels(backend.generate(PROMPTS[:1], [7], image_tokens=tokens[:1], ip_scale=1.0, **SAMPLING))
    second = pixels(backend.generate(PROMPTS[1:], [7], image_tokens=tokens[1:], ip_scale=1.0, **SAMPLING))
    assert np.abs(batch - np.concatenate([first, second])).max() <= 1

    same_prompt = ["a red circle", "a red circle"]
    ab = pixels(backend.generate(same_prompt, [7, 7], image_tokens=tokens, ip_scale=1.0, **SAMPLING))
    ba = pixels(backend.generate(same_prompt, [7, 7], image_tokens=tokens.flip(0), ip_scale=1.0, **SAMPLING))
    assert np.abs(ab[0] - ab[1]).max() > 5  # rows A and B give different images
    assert np.abs(ab - ba[::-1]).max() <= 1  # swapping the rows swaps the images


def test_ip_scale_zero_is_plain_generation(backend, tokens):
    plain = pixels(backend.generate(PROMPTS, [3, 4], **SAMPLING))
    at_zero = pixels(backend.generate(PROMPTS, [3, 4], image_tokens=tokens, ip_scale=0.0, **SAMPLING))
    np.testing.assert_array_equal(at_zero, plain)
    at_one = pixels(backend.generate(PROMPTS, [3, 4], image_tokens=tokens, ip_scale=1.0, **SAMPLING))
    assert np.abs(at_one - plain).max() > 5
    assert all(p.scale == [0.0] for p in ip_processors(backend.pipe.unet))  # off again after the call


def test_generate_rejects_bad_inputs_before_any_work(backend, tokens):
    with pytest.raises(ValueError, match="a purple circle"):
        backend.generate(["a red circle", "a purple circle"], [1, 2])
    with pytest.raises(ValueError, match="32 x 32 images only; got height=64"):
        backend.generate(PROMPTS, [1, 2], height=64)
    with pytest.raises(ValueError, match=r"\[2, 4, 64\] for the shapes backend, got \[1, 4, 64\]"):
        backend.generate(PROMPTS, [1, 2], image_tokens=tokens[:1])
    with pytest.raises(ValueError, match="one seed per prompt"):
        backend.generate(PROMPTS, [1])
    with pytest.raises(ValueError, match="ip_scale"):
        backend.generate(PROMPTS, [1, 2], image_tokens=tokens, ip_scale=-1.0)


def test_backend_needs_the_adapter():
    with pytest.raises(ValueError, match="base model"):
        ShapesBackend(pipe=tiny_pipeline(adapter=False))


# ---------------------------------------------------------------------------------------------
# training


def test_split_scenes_is_disjoint_and_holds_out_combinations():
    splits = split_scenes(0)
    assert split_scenes(0) == splits
    train, validation, test = (set(splits[k]) for k in ("train", "validation", "test"))
    assert not (train & validation or train & test or validation & test)
    assert len(train | validation | test) == len(all_scenes())
    kinds = held_out_kinds(0)
    assert len(kinds) == 2 and len({c for c, _ in kinds}) == len({s for _, s in kinds}) == 2

    def combines_held_out(spec) -> bool:
        return len(spec.objects) == 2 and any((o.colour, o.shape) in kinds for o in spec.objects)

    assert not any(combines_held_out(s) for s in train)
    assert all(unseen_combination(s) == combines_held_out(s) for s in all_scenes())
    assert unseen_combination(parse(f"a {kinds[0][0]} {kinds[0][1]} and a blue square"))
    assert not unseen_combination(parse(f"a {kinds[0][0]} {kinds[0][1]}"))
    assert any(combines_held_out(s) for s in validation) and any(combines_held_out(s) for s in test)
    assert any(not combines_held_out(s) and category(s) == "color_attr" for s in validation)
    # the held-out kinds are still seen alone
    assert all(parse(f"a {c} {s}") in train for c, s in kinds)
    # word orders of one meaning stay together
    assert parse("a blue square to the right of a green circle") in train
    assert parse("a green circle to the left of a blue square") in train
    assert set(by_category(splits["validation"])) == set(by_category(splits["train"]))


def test_diffusion_loss_by_hand():
    """Two samples of 2 values. Errors (1, 1) and (2, 0): squared-error means 1 and 2.
    SNRs 1 and 9 with gamma 5: weights min(1, 5) / 2 = 0.5 and min(9, 5) / 10 = 0.5.
    Loss = (0.5 * 1 + 0.5 * 2) / 2 = 0.75."""
    prediction = torch.tensor([[1.0, 1.0], [2.0, 0.0]])
    loss = diffusion_loss(prediction, torch.zeros(2, 2), torch.tensor([1.0, 9.0]), snr_gamma=5.0)
    torch.testing.assert_close(loss, torch.tensor(0.75))


def _fixed_batch():
    specs = [parse(p) for p in PROMPTS]
    return to_pixels([render(s, seed=i) for i, s in enumerate(specs)]), [describe(s) for s in specs]


def _optimise(params, loss_fn, *, steps: int = 8, lr: float = 3e-3) -> tuple[float, float]:
    optimizer = torch.optim.Adam(params, lr=lr)
    with torch.no_grad():
        before = float(loss_fn())
    for _ in range(steps):
        optimizer.zero_grad()
        loss_fn().backward()
        optimizer.step()
    with torch.no_grad():
        return before, float(loss_fn())


def test_a_few_steps_lower_the_loss_of_both_stages():
    clean, prompts = _fixed_batch()
    pipe = ShapesWorldPipeline.build(seed=0, unet=TINY_UNET, text_layers=1)
    base_params = [*pipe.unet.parameters(), *pipe.text_encoder.parameters()]
    before, after = _optimise(
        base_params, lambda: denoising_loss(pipe, clean, prompts, torch.Generator().manual_seed(0))
    )
    assert after < 0.9 * before

    pipe = tiny_pipeline()  # a fresh base: its errors leave the adapter room
    pipe.set_ip_scale(1.0)
    adapter_params = [*pipe.image_encoder.parameters(), *pipe.image_projection.parameters()]
    adapter_params += [p for proc in ip_processors(pipe.unet) for p in proc.parameters()]
    for p in adapter_params:
        p.requires_grad_(True)  # eval() froze everything
    references = to_pixels([render(p, seed=10 + i) for i, p in enumerate(prompts)])
    keep = torch.tensor([True, True])

    def loss():  # prompts dropped: the truth and the base model's prediction given the prompt teach
        tokens = pipe.image_tokens(references)
        return adapter_loss(pipe, clean, ["", ""], prompts, tokens, keep, torch.Generator().manual_seed(0))

    before, after = _optimise(adapter_params, loss, steps=12, lr=1e-2)
    assert after < 0.97 * before  # the adapter only adds to frozen layers: it moves the loss less


def test_the_image_encoder_learns_which_kind_lies_where():
    from img_guidance.shapes.render import PlacedObject

    layout = [PlacedObject("circle", "red", 3.0, 30.0, 6.0), PlacedObject("square", "blue", 17.0, 9.0, 6.0)]
    target = scene_targets([layout]).view(1, 4, 3, 4, 4)  # colours x shapes x grid rows x grid columns
    assert target.sum() == 2 and target[0, 0, 0, 3, 0] == 1 and target[0, 2, 1, 1, 2] == 1

    pipe = tiny_pipeline()
    untrained = pipe.image_encoder.state_dict()
    untrained = {k: v.clone() for k, v in untrained.items()}
    result = pretrain_image_encoder(pipe, all_scenes(), steps=40, batch_size=16, log=lambda _: None)
    assert len(result["losses"]) == 40 and result["loss"] < 0.5 * result["losses"][0]
    assert 0.9 < result["cell_accuracy"] <= 1.0
    changed = pipe.image_encoder.state_dict()
    assert any(not torch.equal(changed[k], v) for k, v in untrained.items())


def test_stage_two_trains_only_the_adapter():
    pipe = tiny_pipeline()
    frozen = {
        k: v.clone() for k, v in _states(pipe).items() if ".processor." not in k and "image_proj" not in k
    }
    adapter = {k: v.clone() for k, v in _states(pipe).items() if k not in frozen}
    result = train_adapter(pipe, all_scenes()[:50], steps=2, batch_size=2, log=lambda _: None)
    assert len(result["losses"]) == 2
    after = _states(pipe)
    for key, value in frozen.items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=0, msg=key)
    assert any(not torch.equal(after[k], v) for k, v in adapter.items() if "to_k_ip" in k)
    assert any(not torch.equal(after[k], v) for k, v in adapter.items() if k.startswith("image_projection"))
    assert all(p.scale == [0.0] for p in ip_processors(pipe.unet))


def test_train_generator_is_deterministic_and_loads_as_a_backend(tmp_path):
    kwargs = dict(
        seed=3,
        steps_base=2,
        steps_encoder=2,
        steps_adapter=2,
        batch_size=2,
        unet=TINY_UNET,
        log=lambda _: None,
    )
    result = train_generator(tmp_path / "a", **kwargs)
    assert set(result["seconds"]) == {"base", "encoder", "adapter", "total"}
    assert np.isfinite([result["loss"]["base"], result["loss"]["adapter"]]).all()
    record = json.loads((tmp_path / "a" / "training.json").read_text())
    assert record["settings"]["steps_base"] == 2 and len(record["losses"]["adapter"]) == 2
    train_generator(tmp_path / "b", **kwargs)
    a = _states(ShapesWorldPipeline.from_pretrained(tmp_path / "a"))
    b = _states(ShapesWorldPipeline.from_pretrained(tmp_path / "b"))
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=0, msg=key)
    backend = ShapesBackend.from_pretrained(tmp_path / "a")
    assert backend.generate(["a red circle"], [0], steps=2)[0].size == (32, 32)
    with pytest.raises(FileExistsError, match="not empty"):
        train_generator(tmp_path / "a", **kwargs)

    # a new adapter on the base of "a": stage 1 skipped, the base weights as they were
    result = train_generator(tmp_path / "c", **kwargs | dict(steps_adapter=1, base_model=tmp_path / "a"))
    assert result["seconds"]["base"] == 0.0 and result["loss"]["base"] is None
    c = _states(ShapesWorldPipeline.from_pretrained(tmp_path / "c"))
    for key in a:
        if key.startswith(("unet.", "text_encoder.")) and ".processor." not in key:
            torch.testing.assert_close(c[key], a[key], rtol=0, atol=0, msg=key)


# -- the joint method: a spatial adapter trained with the model ------------------------------------------


def spatial_pipeline() -> ShapesWorldPipeline:
    pipe = ShapesWorldPipeline.build(seed=0, unet={**TINY_UNET, "coordinates": True}, text_layers=1)
    pipe.add_ip_adapter(seed=1, kind="spatial")
    pipe.compute_dtype = None
    return pipe.eval()


def test_a_spatial_adapter_has_a_token_per_cell_and_zero_is_no_image(tmp_path):
    pipe = spatial_pipeline()
    assert pipe.spatial_adapter and pipe.token_shape == (16, 64) and pipe.unet.config.in_channels == 5
    images = [render("a red circle", seed=0), render("a red circle", seed=1)]
    tokens = pipe.encode_images(images)
    assert tokens.shape == (2, 16, 64) and not torch.allclose(tokens[0], tokens[1])  # the layout differs
    assert torch.equal(pipe.negative_image_tokens(), torch.zeros(1, 16, 64))
    pipe.save_pretrained(tmp_path / "m", dtype=torch.float32)
    again = ShapesWorldPipeline.from_pretrained(tmp_path / "m")
    again.compute_dtype = None
    assert again.spatial_adapter and torch.equal(again.encode_images(images), tokens)

    def draw(model, **kwargs):
        generators = [torch.Generator().manual_seed(k) for k in range(2)]
        return pixels(model(["a red circle", "two blue squares"], generators, steps=3, **kwargs))

    # IP scale 0 (and zero tokens at any scale) is the base model bit for bit; tokens change it
    base = draw(ShapesWorldPipeline.from_pretrained(tmp_path / "m", adapter=False))
    np.testing.assert_array_equal(draw(again, image_tokens=tokens, ip_scale=0.0), base)
    np.testing.assert_array_equal(draw(again, image_tokens=torch.zeros_like(tokens), ip_scale=1.0), base)
    assert not np.array_equal(draw(again, image_tokens=tokens, ip_scale=1.0), base)


def test_the_joint_method_trains_everything_and_lowers_the_loss():
    pipe = spatial_pipeline()
    before = {k: v.clone() for k, v in _states(pipe).items()}
    result = train_joint(
        pipe, all_scenes()[:60], all_scenes(), steps=40, batch_size=8, lr=3e-3, log=lambda _: None
    )
    losses = result["losses"]
    assert len(losses) == 40 and np.mean(losses[-10:]) < 0.8 * np.mean(losses[:10])
    after = _states(pipe)
    for prefix in ("text_encoder.", "unet.", "image_encoder.", "image_projection."):
        assert any(not torch.equal(after[k], before[k]) for k in before if k.startswith(prefix)), prefix
    assert any(not torch.equal(after[k], before[k]) for k in before if "to_v_ip" in k)
    assert all(p.scale == [0.0] for p in ip_processors(pipe.unet))
    with pytest.raises(ValueError, match="conditions must be 4 chances"):
        train_joint(pipe, all_scenes(), all_scenes(), steps=1, conditions=(1, 0, 0), log=lambda _: None)


def test_train_generator_joint_writes_a_spatial_model(tmp_path):
    kwargs = dict(seed=3, steps_base=2, steps_encoder=2, batch_size=2, unet=TINY_UNET, log=lambda _: None)
    result = train_generator(tmp_path / "j", method="joint", **kwargs)
    assert result["loss"]["adapter"] is None and np.isfinite(result["loss"]["base"])
    record = json.loads((tmp_path / "j" / "training.json").read_text())["settings"]
    assert record["method"] == "joint" and record["steps_adapter"] == 0 and record["snr_gamma"] is None
    assert record["conditions"] == [0.4, 0.3, 0.2, 0.1]
    backend = ShapesBackend.from_pretrained(tmp_path / "j")
    assert backend.token_shape == (16, 64)
    assert backend.generate(["a red circle"], [0], steps=2)[0].size == (32, 32)
    with pytest.raises(ValueError, match="method must be one of two-stage, joint"):
        train_generator(tmp_path / "x", method="both", **kwargs)
    with pytest.raises(ValueError, match="base_model does not apply"):
        train_generator(tmp_path / "x", method="joint", base_model=tmp_path / "j", **kwargs)
