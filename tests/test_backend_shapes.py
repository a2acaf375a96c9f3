"""ShapesBackend on a tiny untrained ShapesWorld model (img_guidance.testing.shapes): the contract every
backend keeps (tests/backend_contract.py) and the shapes family's own rules, a grammar and one image
size. The model itself is tested in tests/test_shapes_models.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from img_guidance.backends import check_request
from img_guidance.backends.base import ImageSides
from img_guidance.backends.shapes import ShapesBackend
from img_guidance.shapes.render import render
from img_guidance.testing.shapes import make_tiny_shapes
from tests.backend_contract import BackendContractTests, pixels

SAMPLING = dict(steps=3)
PROMPTS = ("a red circle", "two blue squares")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_shapes(tmp_path_factory.mktemp("tiny_shapes"))


@pytest.fixture(scope="module")
def backend(folder) -> ShapesBackend:
    return ShapesBackend.from_pretrained(folder)


@pytest.fixture(scope="module")
def images() -> list:
    return [render("a red circle", seed=1), render("three green triangles", seed=2)]


@pytest.fixture(scope="module")
def tokens(backend, images) -> torch.Tensor:
    """[2, 4, 64]: rows A and B."""
    return backend.encode_image(images)


def test_prompts_outside_the_grammar_are_named(backend):
    with pytest.raises(
        ValueError, match=r"prompt 1 \('a purple circle'\) is not one the shapes model can draw"
    ):
        backend.generate(["a red circle", "a purple circle"], [1, 2], **SAMPLING)


def test_the_one_image_size_is_accepted_and_others_refused(backend):
    assert backend.image_sides == ImageSides(only=32)
    default = pixels(backend.generate(PROMPTS[:1], [1], **SAMPLING))
    np.testing.assert_array_equal(
        pixels(backend.generate(PROMPTS[:1], [1], height=32, width=32, **SAMPLING)), default
    )
    with pytest.raises(ValueError, match="32 x 32 images only; got width=16"):
        backend.generate(PROMPTS[:1], [1], width=16, **SAMPLING)


def test_the_cli_check_refuses_what_the_backend_refuses(backend, folder):
    """check_request reads the folder's configs, loads no weights, and says what the backend would."""
    for prompts, sides in (([PROMPTS[0], "a purple circle"], {}), (list(PROMPTS), {"height": 64})):
        with pytest.raises(ValueError) as loaded:
            backend.generate(prompts, [1, 2], **sides, **SAMPLING)
        with pytest.raises(ValueError) as unloaded:
            check_request(folder, prompts, **sides)
        assert str(unloaded.value) == str(loaded.value).replace("height=", "--height=")
    assert check_request(folder, list(PROMPTS), height=32, width=32) == "shapes"


class TestShapesBackendContract(BackendContractTests):
    prompts = PROMPTS
    sampling = SAMPLING
    ip_scale = 1.0  # the untrained adapter needs a high scale to show
    bad_side = 64  # the model makes 32 x 32 images only
    visible = 5
    row_tolerance = 1
    offload_tolerance = None  # a few MB: it stays where it is

    def denoiser(self, backend):
        return backend.pipe.unet

    def text_encoder(self, backend):
        return backend.pipe.text_encoder
