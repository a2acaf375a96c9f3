"""The sharded feature cache (img_guidance.features.cache) on hand-made samples, no models."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from img_guidance.features.cache import (
    MANIFEST,
    CorruptShardError,
    FeatureCache,
    FeatureCacheWriter,
    collate_features,
    shard_path,
    sidecar_path,
)

DIMS = {"guidance_dim": 6, "num_tokens": 2, "image_dim": 4}
MODELS = {"image_encoder": {"family": "sdxl", "ip_adapter": "tiny"}, "guidance": {"model": "tiny-llava"}}
ROWS_PER_SHARD = 4


def writer(root, **overrides) -> FeatureCacheWriter:
    kwargs = dict(dims=DIMS, dtype="bfloat16", models=MODELS, question_seed=0, rows_per_shard=ROWS_PER_SHARD)
    return FeatureCacheWriter(root, **(kwargs | overrides))


def sample(index: int, length: int) -> dict:
    gen = torch.Generator().manual_seed(index)
    return {
        "guidance": torch.randn(length, DIMS["guidance_dim"], generator=gen),
        "tokens_l": torch.randn(DIMS["num_tokens"], DIMS["image_dim"], generator=gen),
        "tokens_w": torch.randn(DIMS["num_tokens"], DIMS["image_dim"], generator=gen),
        "index": index,
    }


def stats(rows: int, pairs: int, ties: int = 0, undecodable: list | None = None) -> dict:
    undecodable = undecodable or []
    return {
        "rows": rows,
        "pairs": pairs,
        "ties": ties,
        "unlabeled": rows - pairs - ties - len(undecodable),
        "undecodable": undecodable,
    }


# rows 0..9 in shards [0, 4), [4, 8), [8, 10); row 2 a tie, row 5 undecodable, rows 8 and 9 ties
SHARDS = {
    0: ([sample(0, 3), sample(1, 5), sample(3, 1)], stats(4, 3, ties=1)),
    1: ([sample(4, 2), sample(6, 4), sample(7, 3)], stats(4, 3, undecodable=["train.parquet:5"])),
    2: ([], stats(2, 0, ties=2)),  # every row dropped: a valid, empty shard
}


@pytest.fixture
def cache_dir(tmp_path):
    w = writer(tmp_path / "cache")
    for k, (samples, shard_stats) in SHARDS.items():
        w.write_shard(k, samples, first_row=k * 4, stop_row=min(k * 4 + 4, 10), stats=shard_stats)
    w.finalize(rows=10)
    return tmp_path / "cache"


def all_samples() -> list[dict]:
    return [s for samples, _ in SHARDS.values() for s in samples]


def test_round_trip_values_lengths_and_manifest(cache_dir):
    cache = FeatureCache(cache_dir)
    expected = all_samples()
    assert len(cache) == len(expected) == 6
    for i, want in enumerate(expected):
        got = cache[i]
        assert got["index"] == want["index"]
        assert got["guidance"].shape == want["guidance"].shape  # unpadded: its own length
        for key in ("guidance", "tokens_l", "tokens_w"):
            assert got[key].dtype == torch.bfloat16
            # stored in bfloat16: equal to the value rounded once, hence within 2^-8 relative
            assert torch.equal(got[key], want[key].bfloat16())
            torch.testing.assert_close(got[key].float(), want[key], rtol=2**-8, atol=0)

    manifest = cache.manifest
    assert cache.dims == DIMS == manifest["dims"]
    assert manifest["rows"] == 10 and manifest["samples"] == 6
    assert manifest["stats"] == {
        "rows": 10,
        "pairs": 6,
        "ties": 3,
        "unlabeled": 0,
        "undecodable": ["train.parquet:5"],
    }
    assert [s["count"] for s in manifest["shards"]] == [3, 3, 0]
    assert [(s["first_row"], s["stop_row"]) for s in manifest["shards"]] == [(0, 4), (4, 8), (8, 10)]
    assert manifest["models"] == MODELS and manifest["question_seed"] == 0
    assert manifest["dtype"] == "bfloat16" and manifest["rows_per_shard"] == 4
    assert all(len(s["sha256"]) == 64 and s["bytes"] > 0 for s in manifest["shards"])
    assert json.loads((cache_dir / MANIFEST).read_text()) == manifest

    from safetensors.torch import load_file

    shard = load_file(shard_path(cache_dir, 0))
    assert shard["guidance"].shape == (3 + 5 + 1, 6)  # concatenated, no padding
    assert shard["lengths"].tolist() == [3, 5, 1] and shard["index"].tolist() == [0, 1, 3]
    assert load_file(shard_path(cache_dir, 2))["tokens_l"].shape == (0, 2, 4)
    with pytest.raises(IndexError, match="out of range"):
        cache[6]


def test_float16_storage(tmp_path):
    w = writer(tmp_path, dtype="float16")
    w.write_shard(0, [sample(0, 2)], first_row=0, stop_row=1, stats=stats(1, 1))
    w.finalize(rows=1)
    got = FeatureCache(tmp_path)[0]
    assert got["tokens_w"].dtype == torch.float16
    assert torch.equal(got["tokens_w"], sample(0, 2)["tokens_w"].half())
    with pytest.raises(ValueError, match="storage dtype must be one of"):
        writer(tmp_path / "other", dtype="int8")


def test_collate_pads_guidance_and_masks_it(cache_dir):
    cache = FeatureCache(cache_dir)
    batch = collate_features([cache[1], cache[2], cache[0]])  # lengths 5, 1, 3
    assert batch["guidance"].shape == (3, 5, 6) and batch["guidance"].dtype == torch.float32
    assert batch["guidance_mask"].tolist() == [
        [True] * 5,
        [True] + [False] * 4,
        [True] * 3 + [False] * 2,
    ]
    assert torch.equal(batch["guidance"][2, :3], cache[0]["guidance"].float())
    assert not batch["guidance"][1, 1:].any() and not batch["guidance"][2, 3:].any()
    assert batch["tokens_l"].shape == batch["tokens_w"].shape == (3, 2, 4)
    assert batch["tokens_l"].dtype == torch.float32
    assert torch.equal(batch["tokens_w"][0], cache[1]["tokens_w"].float())
    assert batch["index"].dtype == torch.long and batch["index"].tolist() == [1, 3, 0]


def test_works_with_a_dataloader_and_pickles_without_open_files(cache_dir):
    cache = FeatureCache(cache_dir)
    cache[0]  # opens shard 0
    clone = pickle.loads(pickle.dumps(cache))
    assert torch.equal(clone[4]["guidance"], cache[4]["guidance"])
    loader = torch.utils.data.DataLoader(cache, batch_size=4, collate_fn=collate_features)
    indices = [i for batch in loader for i in batch["index"].tolist()]
    assert indices == [0, 1, 3, 4, 6, 7]


def test_random_order_reads_open_each_shard_once(tmp_path, monkeypatch):
    # training reads samples in random order across shards: a shard opened once stays open (an
    # open shard is a memory map, no file descriptor), rather than being reopened per sample
    import safetensors

    w = writer(tmp_path / "cache")
    shards = 12
    for k in range(shards):
        rows = [sample(k * 4 + j, 2) for j in range(4)]
        w.write_shard(k, rows, first_row=k * 4, stop_row=k * 4 + 4, stats=stats(4, 4))
    w.finalize(rows=shards * 4)
    opened = []
    real_open = safetensors.safe_open
    monkeypatch.setattr(
        safetensors, "safe_open", lambda path, **kw: opened.append(path) or real_open(path, **kw)
    )
    cache = FeatureCache(tmp_path / "cache")
    order = torch.randperm(len(cache), generator=torch.Generator().manual_seed(0)).tolist()
    for i in order + order:
        assert cache[i]["index"] == i
    assert sorted(opened) == sorted(set(opened)) and len(opened) == shards


def flip_byte(path, offset_from_end: int = 5) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF  # inside the last tensor's data: same size, other content
    path.write_bytes(bytes(data))


def test_a_flipped_byte_is_caught_by_the_checksum(cache_dir):
    flip_byte(shard_path(cache_dir, 1))
    cache = FeatureCache(cache_dir)  # lazy: shard 1 is not read yet
    assert torch.equal(cache[0]["tokens_l"], sample(0, 3)["tokens_l"].bfloat16())
    with pytest.raises(CorruptShardError, match=r"shard-000001\.safetensors does not match its checksum"):
        cache[3]
    with pytest.raises(CorruptShardError, match=r"shard-000001\.safetensors"):
        FeatureCache(cache_dir, verify="full")


def test_a_truncated_shard_fails_at_open(cache_dir):
    path = shard_path(cache_dir, 0)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CorruptShardError, match=r"shard-000000\.safetensors is \d+ bytes.*truncated"):
        FeatureCache(cache_dir)


def test_a_missing_shard_or_manifest_is_named(cache_dir):
    shard_path(cache_dir, 2).unlink()
    with pytest.raises(FileNotFoundError, match=r"shard-000002\.safetensors is listed"):
        FeatureCache(cache_dir)
    (cache_dir / MANIFEST).unlink()
    with pytest.raises(FileNotFoundError, match="did not finish; rerun"):
        FeatureCache(cache_dir)


def test_temporary_files_and_sidecarless_shards_never_count(tmp_path):
    w = writer(tmp_path)
    w.write_shard(0, [sample(0, 2)], first_row=0, stop_row=4, stats=stats(4, 1))
    # a run killed while writing shard 1: a half-written temporary file
    (tmp_path / "shard-000001.safetensors.tmp.4242").write_bytes(b"half a shard")
    # ... and one killed between shard 2's rename and its sidecar
    w.write_shard(2, [sample(8, 2)], first_row=8, stop_row=10, stats=stats(2, 1))
    sidecar_path(tmp_path, 2).unlink()

    assert w.shard_done(0) and not w.shard_done(1) and not w.shard_done(2)
    with pytest.raises(ValueError, match=r"2 of 3 shards are missing.*shard-000001, shard-000002"):
        w.finalize(rows=10)
    assert not (tmp_path / MANIFEST).exists()

    w.write_shard(1, [sample(4, 2)], first_row=4, stop_row=8, stats=stats(4, 1))
    assert not list(tmp_path.glob("*.tmp.*"))  # the leftover of shard 1 was cleaned up
    w.write_shard(2, [sample(8, 2)], first_row=8, stop_row=10, stats=stats(2, 1))
    assert w.finalize(rows=10)["samples"] == 3


def test_a_shard_of_the_wrong_size_or_range_is_not_done(tmp_path):
    w = writer(tmp_path)
    w.write_shard(0, [sample(0, 2)], first_row=0, stop_row=3, stats=stats(3, 1))
    assert w.shard_done(0) and w.shard_done(0, stop_row=3)
    assert not w.shard_done(0, stop_row=4)  # a run over more rows redoes it
    with open(shard_path(tmp_path, 0), "ab") as f:
        f.write(b"x")
    assert not w.shard_done(0)


def test_shards_beyond_the_rows_are_left_out_of_the_manifest(tmp_path):
    w = writer(tmp_path)
    for k in range(3):
        w.write_shard(k, [sample(4 * k, 2)], first_row=4 * k, stop_row=4 * k + 4, stats=stats(4, 1))
    manifest = w.finalize(rows=8)
    assert [s["shard"] for s in manifest["shards"]] == [0, 1] and manifest["rows"] == 8
    assert w.finalize()["rows"] == 12  # without rows: every shard found, from row 0 with no gap


def test_other_settings_in_the_same_folder_are_refused_naming_both(cache_dir):
    with pytest.raises(ValueError, match=r"dims.guidance_dim: 6 in the cache, 8 now"):
        writer(cache_dir, dims=DIMS | {"guidance_dim": 8})
    with pytest.raises(
        ValueError, match=r"models.guidance.model: 'tiny-llava' in the cache, 'other-llava' now"
    ):
        writer(cache_dir, models=MODELS | {"guidance": {"model": "other-llava"}})
    with pytest.raises(ValueError, match="question_seed: 0 in the cache, 1 now"):
        writer(cache_dir, question_seed=1)
    # a partial cache (sidecars, no manifest) is checked too
    (cache_dir / MANIFEST).unlink()
    with pytest.raises(ValueError, match=r"shard-000000\.json.*rows_per_shard: 4 in the cache, 5 now"):
        writer(cache_dir, rows_per_shard=5)
    assert writer(cache_dir).shard_done(1)  # the same settings resume
    # one sidecar of other settings among them is an error, not a shard to redo
    sidecar = json.loads(sidecar_path(cache_dir, 2).read_text())
    sidecar["settings"]["dtype"] = "float16"
    sidecar_path(cache_dir, 2).write_text(json.dumps(sidecar))
    with pytest.raises(
        ValueError, match=r"shard-000002\.json was written with other settings.*dtype: 'float16'"
    ):
        writer(cache_dir).shard_done(2)


def test_bad_samples_and_ranges_fail_before_writing(tmp_path):
    w = writer(tmp_path)
    with pytest.raises(ValueError, match=r"shard 1 covers rows \[4, 8\).*first_row=3"):
        w.write_shard(1, [], first_row=3, stop_row=8, stats={})
    with pytest.raises(ValueError, match=r"shard 0 covers rows \[0, 4\).*stop_row=5"):
        w.write_shard(0, [], first_row=0, stop_row=5, stats={})
    bad = sample(0, 2) | {"tokens_w": torch.zeros(3, 4)}
    with pytest.raises(
        ValueError, match=r"sample 0: tokens_w must be \[num_tokens 2, image_dim 4\], got \[3, 4\]"
    ):
        w.write_shard(0, [bad], first_row=0, stop_row=4, stats={})
    with pytest.raises(ValueError, match=r"guidance must be \[L >= 1, guidance_dim 6\], got \[2, 5\]"):
        w.write_shard(0, [sample(0, 2) | {"guidance": torch.zeros(2, 5)}], first_row=0, stop_row=4, stats={})
    with pytest.raises(ValueError, match=r"index 9 is outside the shard's rows \[0, 4\)"):
        w.write_shard(0, [sample(9, 2)], first_row=0, stop_row=4, stats={})
    with pytest.raises(ValueError, match="dims must have exactly the keys"):
        writer(tmp_path / "x", dims={"guidance_dim": 6})
    assert not list(tmp_path.iterdir())
