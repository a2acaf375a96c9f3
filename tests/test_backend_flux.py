"""FluxBackend on a tiny random FLUX pipeline with an XLabs-format IP-Adapter (img_guidance.testing.flux);
the contract every backend keeps is tested in tests/backend_contract.py."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from img_guidance.backends.base import GenerationDefaults
from img_guidance.testing.flux import make_tiny_flux
from tests.backend_contract import BackendContractTests, ForwardCounter, pixels

SAMPLING = dict(steps=2, height=32, width=32)
PROMPTS = ["a red cube on a table", "two blue balls"]


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory) -> dict:
    return make_tiny_flux(tmp_path_factory.mktemp("tiny_flux"))


def load(tiny_flux: dict, **kwargs):
    from img_guidance.backends.flux import FluxBackend

    locations = {"ip_adapter": tiny_flux["ip_adapter"], "image_encoder": tiny_flux["image_encoder"]}
    return FluxBackend.from_pretrained(tiny_flux["model"], **{**locations, "device": "cpu", **kwargs})


@pytest.fixture(scope="module")
def backend(tiny_flux):
    return load(tiny_flux)


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in range(2)]


@pytest.fixture(scope="module")
def tokens(backend, images) -> torch.Tensor:
    return backend.encode_image(images)


def file_projection(tiny_flux: dict, image_embeds: torch.Tensor) -> torch.Tensor:
    """The XLabs ImageProjModel computed by hand from the file: Linear -> [B, N, D] -> LayerNorm."""
    from safetensors.torch import load_file

    state = load_file(tiny_flux["ip_adapter"])
    num_tokens, dim = tiny_flux["token_shape"]
    x = image_embeds @ state["ip_adapter_proj_model.proj.weight"].T + state["ip_adapter_proj_model.proj.bias"]
    x = x.reshape(len(image_embeds), num_tokens, dim)  # [B, N*D] -> [B, N, D]
    return torch.nn.functional.layer_norm(
        x, (dim,), state["ip_adapter_proj_model.norm.weight"], state["ip_adapter_proj_model.norm.bias"]
    )


def clip_image_embeds(backend, images: list[Image.Image]) -> torch.Tensor:
    pixel_values = backend.pipe.feature_extractor(images=images, return_tensors="pt").pixel_values
    with torch.no_grad():
        return backend.pipe.image_encoder(pixel_values=pixel_values).image_embeds  # [B, 16]


# ------------------------------------------------------------------------------------------ loading
def test_loads_offline_from_local_paths_with_the_official_defaults(backend, tiny_flux):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    assert backend.family == "flux"
    assert backend.token_shape == tiny_flux["token_shape"] == (4, 32)
    assert backend.device == torch.device("cpu")
    assert backend.defaults == GenerationDefaults(steps=30, guidance_scale=3.5, height=1024, width=1024)
    assert backend.true_cfg_scale == 3.5
    info = backend.describe()
    assert info["family"] == "flux"
    assert info["model"] == os.fspath(tiny_flux["model"])
    assert info["ip_adapter"] == os.fspath(tiny_flux["ip_adapter"])
    assert info["image_encoder"] == os.fspath(tiny_flux["image_encoder"])
    assert info["transformer"] == ""
    assert info["dtype"] == "float32"


def test_xlabs_weights_land_in_the_diffusers_ip_attention(backend, tiny_flux):
    from safetensors.torch import load_file

    state = load_file(tiny_flux["ip_adapter"])
    projection = backend.pipe.transformer.encoder_hid_proj.image_projection_layers[0]
    torch.testing.assert_close(projection.image_embeds.weight, state["ip_adapter_proj_model.proj.weight"])
    for i, block in enumerate(backend.pipe.transformer.transformer_blocks):
        processor = block.attn.processor
        for kind, linears in (("k", processor.to_k_ip), ("v", processor.to_v_ip)):
            prefix = f"double_blocks.{i}.processor.ip_adapter_double_stream_{kind}_proj"
            torch.testing.assert_close(linears[0].weight, state[f"{prefix}.weight"])
            torch.testing.assert_close(linears[0].bias, state[f"{prefix}.bias"])


def test_from_preset_takes_the_preset_settings_and_local_overrides(tiny_flux):
    from img_guidance.backends.flux import FluxBackend

    backend = FluxBackend.from_preset(
        "flux",
        model=tiny_flux["model"],
        ip_adapter=tiny_flux["ip_adapter"],
        image_encoder=tiny_flux["image_encoder"],
        device="cpu",
    )
    assert backend.defaults == GenerationDefaults(steps=30, guidance_scale=3.5, height=1024, width=1024)
    assert backend.true_cfg_scale == 3.5
    assert backend.describe()["model"] == os.fspath(tiny_flux["model"])
    with pytest.raises(ValueError, match="'sdxl' is not a flux backend preset"):
        FluxBackend.from_preset("sdxl")


def test_transformer_can_be_swapped(tiny_flux, backend):
    folder = tiny_flux["model"] / "transformer"
    swapped = load(tiny_flux, transformer=folder)
    assert swapped.describe()["transformer"] == os.fspath(folder)
    assert swapped.pipe.transformer is not backend.pipe.transformer
    assert swapped.token_shape == (4, 32)


def test_missing_ip_adapter_file_is_named(tiny_flux, tmp_path):
    missing = tmp_path / "nowhere" / "ip_adapter.safetensors"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load(tiny_flux, ip_adapter=missing)


def test_ip_adapter_file_of_another_layout_is_named(tiny_flux, tmp_path):
    from safetensors.torch import save_file

    wrong = tmp_path / "sdxl_style.safetensors"
    save_file({"image_proj.latents": torch.zeros(1, 16, 8)}, wrong)
    with pytest.raises(ValueError, match=f"{wrong} is not a flux IP-Adapter file"):
        load(tiny_flux, ip_adapter=wrong)


# ------------------------------------------------------------------------------------- image tokens
def test_encode_image_gives_post_projection_tokens(backend, images, tiny_flux):
    first = backend.encode_image(images)
    assert first.shape == (2, 4, 32)
    assert torch.equal(first, backend.encode_image(images))
    assert not torch.allclose(first[0], first[1])
    expected = file_projection(tiny_flux, clip_image_embeds(backend, images))
    torch.testing.assert_close(first, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="no images"):
        backend.encode_image([])


def test_negative_tokens_are_the_projection_of_a_black_image(backend, tiny_flux):
    black = Image.new("RGB", (1024, 1024))
    expected = file_projection(tiny_flux, clip_image_embeds(backend, [black]))
    negative = backend.negative_image_tokens()
    assert negative.shape == (1, 4, 32)
    torch.testing.assert_close(negative, expected, rtol=1e-5, atol=1e-5)
    with ForwardCounter({"encoder": backend.pipe.image_encoder}) as counter:
        assert torch.equal(backend.negative_image_tokens(), negative)
    assert counter.calls["encoder"] == 0  # cached


# --------------------------------------------------------------------------------------- generation
def test_without_tokens_equals_the_plain_flux_pipeline(backend, tiny_flux):
    """(Tokens at IP scale 0, the official first pass, give the same: the contract's
    test_without_tokens_equals_tokens_at_scale_zero.)"""
    from diffusers import FluxPipeline

    plain = FluxPipeline.from_pretrained(tiny_flux["model"])
    expected = plain(
        PROMPTS,
        negative_prompt=[""] * 2,
        true_cfg_scale=3.5,
        guidance_scale=3.5,
        num_inference_steps=2,
        height=32,
        width=32,
        generator=[torch.Generator().manual_seed(s) for s in (7, 8)],
    ).images
    ours = pixels(backend.generate(PROMPTS, [7, 8], **SAMPLING))
    assert np.array_equal(ours, pixels(expected))


def test_tokens_are_injected_as_given_with_no_projection(backend, tokens):
    transformer = backend.pipe.transformer
    projection = transformer.encoder_hid_proj
    processors = transformer.attn_processors
    negative = backend.negative_image_tokens()  # computed once, before the count
    edited = tokens + 0.5 * torch.randn_like(tokens)  # not the projection of any CLIP embedding
    seen: list[torch.Tensor] = []
    to_k_ip = transformer.transformer_blocks[0].attn.processor.to_k_ip[0]
    handle = to_k_ip.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    try:
        with ForwardCounter({"projection": projection, "encoder": backend.pipe.image_encoder}) as counter:
            backend.generate(PROMPTS, [1, 2], image_tokens=edited, **SAMPLING)
    finally:
        handle.remove()
    assert counter.calls == {"projection": 0, "encoder": 0}
    # per step: the positive branch (row i for sample i), then the true-CFG negative branch
    assert len(seen) == 2 * SAMPLING["steps"]
    for step in range(SAMPLING["steps"]):
        assert torch.equal(seen[2 * step], edited)
        assert torch.equal(seen[2 * step + 1], negative.expand(2, -1, -1))
    assert transformer.encoder_hid_proj is projection
    assert transformer.attn_processors == processors


def test_projection_and_processors_come_back_after_an_error(backend, tokens, monkeypatch):
    transformer = backend.pipe.transformer
    projection, processors = transformer.encoder_hid_proj, transformer.attn_processors

    def broken_step(*args, **kwargs):
        raise RuntimeError("scheduler failed")

    monkeypatch.setattr(backend.pipe.scheduler, "step", broken_step)
    for kwargs in ({"image_tokens": tokens}, {}):
        with pytest.raises(RuntimeError, match="scheduler failed"):
            backend.generate(PROMPTS, [1, 2], **kwargs, **SAMPLING)
        assert transformer.encoder_hid_proj is projection
        assert transformer.attn_processors == processors


# ---------------------------------------------------------------------------------------- offload
def test_a_bad_offload_mode_fails_before_loading(tiny_flux, monkeypatch):
    from diffusers import FluxPipeline

    def no_loading(*args, **kwargs):
        raise AssertionError("the pipeline was loaded")

    monkeypatch.setattr(FluxPipeline, "from_pretrained", no_loading)
    with pytest.raises(ValueError, match="'gpu'"):
        load(tiny_flux, offload="gpu")


# ------------------------------------------------------------------------------- the backend contract
class TestFluxBackendContract(BackendContractTests):
    prompts = tuple(PROMPTS)
    sampling = SAMPLING
    ip_scale = 0.2  # the official re-generation's
    bad_side = 36  # the tiny VAE downsamples 4x, packed 2 x 2: multiples of 8
    visible = 10
    row_tolerance = 2
    offload_tolerance = 0

    @pytest.fixture
    def fresh_backend(self, tiny_flux):
        return load(tiny_flux)

    def denoiser(self, backend):
        return backend.pipe.transformer

    def text_encoder(self, backend):
        return backend.pipe.text_encoder_2


def test_from_pipe_needs_the_image_encoder_registered(tiny_flux):
    from diffusers import FluxPipeline

    from img_guidance.backends.flux import FluxBackend
    from img_guidance.testing.flux import pipeline_parts

    pipe = FluxPipeline(**pipeline_parts())
    with pytest.raises(ValueError, match="needs an image_encoder"):
        FluxBackend.from_pipe(pipe, ip_adapter=tiny_flux["ip_adapter"])
