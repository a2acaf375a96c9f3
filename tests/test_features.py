"""The feature stage (img_guidance.features.extract) and the encoder-only image-token path, on tiny
random models (src/img_guidance/testing) and a tiny Pick-a-Pic parquet."""

from __future__ import annotations

import json
import re
import shutil
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from img_guidance.backends import image_encoder_locations, load_image_encoder
from img_guidance.data.pairs import iter_pairs
from img_guidance.features.cache import MANIFEST, FeatureCache, shard_path, sidecar_path
from img_guidance.features.extract import OnlineFeatures, extract_features, run_features
from img_guidance.guidance.llava import LlavaGuidance
from img_guidance.guidance.questions import choose_question, fill
from img_guidance.testing.llava import HIDDEN_SIZE, make_tiny_llava
from img_guidance.testing.pairs import PREFER_1, TIE, PickapicRow, write_pickapic_parquet
from img_guidance.testing.sdxl import make_tiny_sdxl
from tests.helpers import run_as_processes

SEED = 3
ROWS_PER_SHARD = 3
BATCH = 2
# 8 rows in shards [0, 3), [3, 6), [6, 8); row 2 a tie, row 4 undecodable, row 7 unlabeled
ROWS = [
    PickapicRow("a red cube", colours=("red", "blue")),
    PickapicRow("two green balls", colours=("green", "yellow"), labels=PREFER_1),
    PickapicRow("a tie", labels=TIE),
    PickapicRow("a white cat on a mat", colours=("white", "black")),
    PickapicRow("broken", broken=1),
    PickapicRow("an orange sky", colours=("orange", "purple"), labels=PREFER_1),
    PickapicRow("a cyan door", colours=("cyan", "magenta")),
    PickapicRow("not rated", has_label=False),
]
USABLE = [0, 1, 3, 5, 6]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("features")
    return {
        "sdxl": make_tiny_sdxl(folder / "sdxl"),
        "llava": make_tiny_llava(folder / "llava"),
        "pairs": write_pickapic_parquet(folder / "pairs" / "train-0000.parquet", ROWS, image_size=16),
    }


@pytest.fixture(scope="module")
def encoder(tiny):
    sdxl = tiny["sdxl"]
    return load_image_encoder(
        sdxl["model"], ip_adapter=sdxl["ip_adapter"], image_encoder=sdxl["image_encoder"]
    )


@pytest.fixture(scope="module")
def guidance(tiny):
    return LlavaGuidance.from_pretrained(tiny["llava"])


@pytest.fixture(scope="module")
def pairs(tiny) -> dict:
    return {pair.index: pair for pair in iter_pairs(tiny["pairs"])}


def extract(tiny, out, encoder, guidance, **kwargs):
    options = dict(seed=SEED, rows_per_shard=ROWS_PER_SHARD, batch_size=BATCH, progress=False)
    return extract_features(
        tiny["pairs"], out, image_encoder=encoder, guidance=guidance, **(options | kwargs)
    )


@pytest.fixture(scope="module")
def reference(tiny, encoder, guidance, tmp_path_factory):
    """One uninterrupted single-process extraction: (folder, manifest)."""
    out = tmp_path_factory.mktemp("reference") / "cache"
    return out, extract(tiny, out, encoder, guidance)


class Recording:
    """A guidance model that records the source rows it is asked about (from the prompt in each
    question), optionally failing once ``fail_after`` calls are done (a killed run)."""

    def __init__(self, inner, *, fail_after: int | None = None, lock: threading.Lock | None = None):
        self.inner, self.fail_after, self.lock = inner, fail_after, lock or threading.Lock()
        self.rows: list[int] = []
        self.hidden_size = inner.hidden_size

    def describe(self):
        return self.inner.describe()

    def guide(self, images, questions):
        if self.fail_after is not None and len(self.rows) >= self.fail_after:
            raise KeyboardInterrupt("killed")
        # the row whose caption the question ends with (each question is a template filled with it)
        self.rows += [
            max((i for i, r in enumerate(ROWS) if r.caption in q), key=lambda i: len(ROWS[i].caption))
            for q in questions
        ]
        with self.lock:  # threads stand in for processes; the models run one call at a time
            return self.inner.guide(images, questions)


class Locked:
    def __init__(self, inner, lock):
        self.inner, self.lock, self.token_shape = inner, lock, inner.token_shape

    def describe(self):
        return self.inner.describe()

    def encode_image(self, images):
        with self.lock:
            return self.inner.encode_image(images)


# ---------------------------------------------------------------- encoder-only image tokens


def random_images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in range(n)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sdxl_encoder_only_tokens_equal_the_backend(tiny, dtype):
    from img_guidance.backends.sdxl import SDXLBackend, SDXLImageEncoder

    sdxl = tiny["sdxl"]
    locations = dict(ip_adapter=sdxl["ip_adapter"], image_encoder=sdxl["image_encoder"], torch_dtype=dtype)
    backend = SDXLBackend.from_pretrained(sdxl["model"], **locations)
    encoder = load_image_encoder(sdxl["model"], **locations)
    assert isinstance(encoder, SDXLImageEncoder) and not hasattr(encoder, "pipe")  # no UNet, VAE, text
    assert encoder.token_shape == backend.token_shape == sdxl["token_shape"]
    images = random_images(3)
    tokens = encoder.encode_image(images)
    assert tokens.dtype == dtype and tokens.shape == (3, *sdxl["token_shape"])
    assert torch.equal(tokens, backend.encode_image(images))
    assert not torch.equal(tokens[0], tokens[1])


def test_flux_encoder_only_tokens_equal_the_backend(tmp_path):
    from img_guidance.backends.flux import FluxBackend, FluxImageEncoder
    from img_guidance.testing.flux import make_tiny_flux

    flux = make_tiny_flux(tmp_path)
    locations = dict(ip_adapter=flux["ip_adapter"], image_encoder=flux["image_encoder"], device="cpu")
    backend = FluxBackend.from_pretrained(flux["model"], **locations)
    encoder = load_image_encoder(flux["model"], **locations)
    assert isinstance(encoder, FluxImageEncoder) and encoder.family == "flux"
    assert encoder.token_shape == backend.token_shape == flux["token_shape"]
    images = random_images(3)
    tokens = encoder.encode_image(images)
    assert tokens.shape == (3, *flux["token_shape"])
    assert torch.equal(tokens, backend.encode_image(images))
    assert encoder.describe()["ip_adapter"] == str(flux["ip_adapter"])


def test_encoder_locations_come_from_presets_without_loading():
    sdxl, dpo, flux = (image_encoder_locations(name) for name in ("sdxl", "sdxl-dpo", "flux"))
    assert sdxl == dpo  # a UNet swap does not change image tokens
    assert sdxl["image_encoder"] == "h94/IP-Adapter/models/image_encoder"
    assert flux == {
        "family": "flux",
        "ip_adapter": "XLabs-AI/flux-ip-adapter/ip_adapter.safetensors",
        "image_encoder": "openai/clip-vit-large-patch14",
    }
    assert image_encoder_locations("flux", image_encoder="my/clip")["image_encoder"] == "my/clip"


# ---------------------------------------------------------------- extraction


def test_extraction_counts_tokens_and_guidance(reference, encoder, guidance, pairs):
    out, manifest = reference
    assert manifest["rows"] == 8 and manifest["samples"] == len(USABLE)
    assert manifest["stats"]["ties"] == 1 and manifest["stats"]["unlabeled"] == 1
    assert manifest["stats"]["undecodable"] == ["train-0000.parquet:4 ranking_id=4"]
    assert manifest["stats"]["pairs"] == len(USABLE) and manifest["stats"]["rows"] == 8
    assert [(s["first_row"], s["stop_row"], s["count"]) for s in manifest["shards"]] == [
        (0, 3, 2),
        (3, 6, 2),
        (6, 8, 1),
    ]
    assert manifest["dims"] == {"guidance_dim": HIDDEN_SIZE, "num_tokens": 4, "image_dim": 64}
    assert manifest["question_seed"] == SEED and manifest["dtype"] == "bfloat16"
    assert manifest["models"]["image_encoder"]["family"] == "sdxl"
    assert manifest["models"]["questions"].startswith("sha256:")

    cache = FeatureCache(out, verify="full")
    assert [cache[i]["index"] for i in range(len(cache))] == USABLE
    for i in range(len(cache)):
        got = cache[i]
        pair = pairs[got["index"]]
        # tokens of the right images: l = the unpreferred one, w = the preferred one
        want_l, want_w = encoder.encode_image([pair.unpreferred, pair.preferred])
        torch.testing.assert_close(got["tokens_l"].float(), want_l, rtol=2**-7, atol=1e-5)
        torch.testing.assert_close(got["tokens_w"].float(), want_w, rtol=2**-7, atol=1e-5)
        assert not torch.allclose(got["tokens_l"].float(), got["tokens_w"].float(), rtol=0.05)
        # guidance of the unpreferred image with the question of (seed, row), its real tokens only
        question = fill(choose_question(SEED, index=pair.index), pair.prompt)
        alone = guidance.guide([pair.unpreferred], [question]).hidden_states[0]  # batch of one: no padding
        assert got["guidance"].shape == alone.shape
        torch.testing.assert_close(got["guidance"].float(), alone, rtol=2**-7, atol=1e-4)
        other = fill(choose_question(SEED + 1, index=pair.index), pair.prompt)
        if other != question:
            with_other = guidance.guide([pair.unpreferred], [other]).hidden_states[0]
            assert with_other.shape != alone.shape or not torch.allclose(with_other, alone, atol=1e-3)


def test_limit_caps_rows(tiny, encoder, guidance, tmp_path):
    manifest = extract(tiny, tmp_path / "cache", encoder, guidance, limit=4, rows_per_shard=2)
    assert manifest["rows"] == 4 and [s["stop_row"] for s in manifest["shards"]] == [2, 4]
    assert manifest["samples"] == 3  # rows 0, 1, 3 (row 2 is a tie)


def test_a_killed_run_resumes_with_only_the_missing_shards(tiny, encoder, guidance, reference, tmp_path):
    out = tmp_path / "cache"
    # killed at the first batch of shard 1 (shard 0's two samples are one batch)
    with pytest.raises(KeyboardInterrupt):
        extract(tiny, out, encoder, Recording(guidance, fail_after=2))
    assert sidecar_path(out, 0).exists() and not sidecar_path(out, 1).exists()
    assert not (out / MANIFEST).exists()
    # ... leaving what a kill during the write of shard 1 would leave
    (out / "shard-000001.safetensors.tmp.31337").write_bytes(b"half a shard")

    recording = Recording(guidance)
    manifest = extract(tiny, out, encoder, recording)
    assert sorted(recording.rows) == [3, 5, 6]  # shards 1 and 2 only
    assert not list(out.glob("*.tmp.*"))
    _, expected = reference
    assert manifest["shards"] == expected["shards"]  # the same bytes as an uninterrupted run
    assert manifest["stats"] == expected["stats"]

    again = Recording(guidance)
    assert extract(tiny, out, encoder, again) == manifest and again.rows == []  # nothing left to do


def test_a_rerun_with_other_settings_is_refused(tiny, encoder, guidance, reference, tmp_path):
    out = tmp_path / "cache"
    shutil.copytree(reference[0], out)
    with pytest.raises(ValueError, match="question_seed: 3 in the cache, 4 now"):
        extract(tiny, out, encoder, guidance, seed=4)
    with pytest.raises(ValueError, match=r"models.questions: 'sha256:\w+' in the cache, 'sha256:\w+' now"):
        extract(tiny, out, encoder, guidance, questions=["What about {prompt}?"])


def test_two_processes_split_the_shards_and_equal_one(tiny, encoder, guidance, reference, tmp_path):
    out, lock = tmp_path / "cache", threading.Lock()
    recordings = [Recording(guidance, lock=lock) for _ in range(2)]
    results = run_as_processes(
        lambda p, process: extract(tiny, out, Locked(encoder, lock), recordings[p], accelerator=process)
    )
    assert sorted(recordings[0].rows) == [0, 1, 6]  # shards 0 and 2
    assert sorted(recordings[1].rows) == [3, 5]  # shard 1
    _, expected = reference
    assert results[0] == results[1]  # every process returns the merged manifest
    assert results[0]["shards"] == expected["shards"] and results[0]["stats"] == expected["stats"]


# ---------------------------------------------------------------- online mode


def test_online_samples_equal_the_cache(tiny, encoder, guidance, reference):
    cache = FeatureCache(reference[0])
    options = dict(image_encoder=encoder, guidance=guidance, seed=SEED, batch_size=BATCH)
    online = OnlineFeatures(tiny["pairs"], rows_per_block=ROWS_PER_SHARD, dtype=torch.bfloat16, **options)
    samples = list(online)
    assert [s["index"] for s in samples] == USABLE
    for i, got in enumerate(samples):
        want = cache[i]
        assert got["index"] == want["index"]
        for key in ("guidance", "tokens_l", "tokens_w"):
            assert got[key].shape == want[key].shape
            torch.testing.assert_close(got[key].float(), want[key].float(), rtol=2**-7, atol=1e-5)

    # two processes read disjoint blocks that together are everything
    halves = [
        [s["index"] for s in OnlineFeatures(tiny["pairs"], process_index=p, num_processes=2, **options)]
        for p in range(2)
    ]
    # blocks of 8 rows: [0, 8) for process 0, none for process 1
    assert halves == [USABLE, []]
    split = [
        [
            s["index"]
            for s in OnlineFeatures(
                tiny["pairs"], rows_per_block=2, process_index=p, num_processes=2, **options
            )
        ]
        for p in range(2)
    ]
    assert split == [[0, 1, 5], [3, 6]]  # blocks [0, 2), [4, 6) and [2, 4), [6, 8)


# ---------------------------------------------------------------- the CLI's function


@pytest.fixture
def fresh_accelerate():
    """run_features makes an accelerate Accelerator; forget its process-wide state afterwards, so
    later tests in this process can make theirs with other settings."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def test_run_features_loads_the_encoder_only_path_and_resumes(tiny, reference, tmp_path, fresh_accelerate):
    sdxl = tiny["sdxl"]
    kwargs = dict(
        model=sdxl["model"],
        ip_adapter=sdxl["ip_adapter"],
        image_encoder=sdxl["image_encoder"],
        mllm=str(tiny["llava"]),
        seed=SEED,
        rows_per_shard=ROWS_PER_SHARD,
        batch_size=BATCH,
        device="cpu",
        progress=False,
    )
    out = tmp_path / "cache"
    manifest = run_features(tiny["pairs"], out, **kwargs)
    assert manifest["models"] == {
        "family": "sdxl",
        "ip_adapter": str(sdxl["ip_adapter"]),
        "image_encoder": str(sdxl["image_encoder"]),
        "mllm": str(tiny["llava"]),
        "questions": reference[1]["models"]["questions"],
        "prompt_format": "llava_v0",
    }
    assert [s["sha256"] for s in manifest["shards"]] == [s["sha256"] for s in reference[1]["shards"]]
    assert run_features(tiny["pairs"], out, **kwargs) == manifest  # resumes: nothing to do


def test_run_features_checks_inputs_before_loading_models(tiny, tmp_path, monkeypatch):
    import img_guidance.backends

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(img_guidance.backends, "load_image_encoder", no_loading)
    sdxl = tiny["sdxl"]
    kwargs = dict(model=sdxl["model"], ip_adapter=sdxl["ip_adapter"], image_encoder=sdxl["image_encoder"])
    with pytest.raises(FileNotFoundError, match=r"no-such-pairs\.parquet"):
        run_features(tmp_path / "no-such-pairs.parquet", tmp_path / "out", **kwargs)
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        run_features(tiny["pairs"], tmp_path / "out", batch_size=0, **kwargs)
    with pytest.raises(ValueError, match="storage dtype must be one of"):
        run_features(tiny["pairs"], tmp_path / "out", storage_dtype="int8", **kwargs)

    # an existing cache made by other models: both locations named, nothing loaded
    out = tmp_path / "cache"
    out.mkdir()
    made_by = {"family": "sdxl", "ip_adapter": "/elsewhere/ip.safetensors", "image_encoder": "x", "mllm": "m"}
    (out / MANIFEST).write_text(
        json.dumps({"format": "img-guidance-features", "version": 1, "models": made_by})
    )
    named = re.escape(
        f"models.ip_adapter: '/elsewhere/ip.safetensors' in the cache, '{sdxl['ip_adapter']}' now"
    )
    with pytest.raises(ValueError, match=named):
        run_features(tiny["pairs"], out, mllm=str(tiny["llava"]), **kwargs)
    assert not shard_path(out, 0).exists()
