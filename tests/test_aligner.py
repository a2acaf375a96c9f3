import json
import math
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from img_guidance import ImplicitAligner, load_aligner
from img_guidance.aligner import infer_config
from tests.helpers import official_state_dict

# -- helpers ---------------------------------------------------------------------------------------


def functional_aligner(sd: dict, cfg: dict, guidance: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The formulas of the official Resampler_cross written out with torch.nn.functional, one
    unpadded sample at a time, independent of the module code."""
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    heads, head_dim, dim = cfg["heads"], cfg["head_dim"], cfg["image_dim"]

    def ln(x, name):
        return F.layer_norm(x, (dim,), sd[f"{name}.weight"], sd[f"{name}.bias"], eps=1e-5)

    identity = tokens
    x = guidance @ sd["proj_in.weight"].T + sd["proj_in.bias"]
    lat = tokens
    for i in range(cfg["depth"]):
        p = f"layers.{i}"
        xn, ln_lat = ln(x, f"{p}.0.norm1"), ln(lat, f"{p}.0.norm2")
        q = ln_lat @ sd[f"{p}.0.to_q.weight"].T
        kv = torch.cat([xn, ln_lat], dim=0) @ sd[f"{p}.0.to_kv.weight"].T
        k, v = kv.chunk(2, dim=-1)
        outs = []
        for h in range(heads):
            s = slice(h * head_dim, (h + 1) * head_dim)
            scores = (q[:, s] @ k[:, s].T) / math.sqrt(head_dim)
            outs.append(torch.softmax(scores, dim=-1) @ v[:, s])
        lat = torch.cat(outs, dim=-1) @ sd[f"{p}.0.to_out.weight"].T + lat
        ff = ln(lat, f"{p}.1.0") @ sd[f"{p}.1.1.weight"].T
        lat = F.gelu(ff) @ sd[f"{p}.1.3.weight"].T + lat
    lat = lat @ sd["proj_out.weight"].T + sd["proj_out.bias"]
    out = ln(lat, "norm_out") @ sd["zero_linear.weight"].T + sd["zero_linear.bias"]
    return identity + out


def random_aligner(cfg: dict) -> ImplicitAligner:
    model = ImplicitAligner(**cfg)
    torch.nn.init.normal_(model.zero_linear.weight, std=0.2)
    torch.nn.init.normal_(model.zero_linear.bias, std=0.2)
    return model.eval()


# -- architecture ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("image_dim", "expected"), [(2048, 195_094_528), (4096, 675_401_728)])
def test_parameter_count_at_real_sizes(image_dim, expected):
    with torch.device("meta"):
        model = ImplicitAligner(guidance_dim=5120, image_dim=image_dim)
    assert sum(p.numel() for p in model.parameters()) == expected


def test_state_dict_names_and_shapes_match_the_official_layout():
    with torch.device("meta"):
        model = ImplicitAligner()  # paper defaults: SDXL dims
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert len(ours) == 52
    assert ours["proj_in.weight"] == (2048, 5120)
    assert ours["layers.3.0.to_q.weight"] == (1280, 2048)
    assert ours["layers.3.0.to_kv.weight"] == (2560, 2048)
    assert ours["layers.3.0.to_out.weight"] == (2048, 1280)
    assert ours["layers.3.1.1.weight"] == (8192, 2048)
    assert ours["layers.3.1.3.weight"] == (2048, 8192)
    assert ours["zero_linear.bias"] == (2048,)
    expected_names = {
        "proj_in.weight", "proj_in.bias", "proj_out.weight", "proj_out.bias",
        "norm_out.weight", "norm_out.bias", "zero_linear.weight", "zero_linear.bias",
    }  # fmt: skip
    for i in range(4):
        expected_names |= {
            f"layers.{i}.0.norm1.weight", f"layers.{i}.0.norm1.bias",
            f"layers.{i}.0.norm2.weight", f"layers.{i}.0.norm2.bias",
            f"layers.{i}.0.to_q.weight", f"layers.{i}.0.to_kv.weight", f"layers.{i}.0.to_out.weight",
            f"layers.{i}.1.0.weight", f"layers.{i}.1.0.bias",
            f"layers.{i}.1.1.weight", f"layers.{i}.1.3.weight",
        }  # fmt: skip
    assert set(ours) == expected_names


def test_untrained_aligner_is_the_identity(tiny_config):
    model = ImplicitAligner(**tiny_config)
    tokens = torch.randn(3, 4, tiny_config["image_dim"])
    out = model(torch.randn(3, 9, tiny_config["guidance_dim"]), tokens)
    assert out.shape == tokens.shape
    torch.testing.assert_close(out, tokens, rtol=0, atol=0)


def test_official_state_dict_loads_strictly_and_matches_the_formulas(tmp_path, tiny_config):
    sd = official_state_dict(tiny_config)
    path = tmp_path / "aligner_sdxl.pth"
    torch.save(sd, path)
    model = load_aligner(path)
    assert model.config.to_dict() == tiny_config
    assert not model.training
    guidance = torch.randn(2, 7, tiny_config["guidance_dim"])
    tokens = torch.randn(2, 4, tiny_config["image_dim"])
    with torch.no_grad():
        out = model(guidance, tokens)
        expected = torch.stack(
            [functional_aligner(sd, tiny_config, guidance[b], tokens[b]) for b in range(2)]
        )
    assert (out - tokens).abs().max() > 0.1  # not the identity: the comparison means something
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    model.set_attention_implementation("naive")
    with torch.no_grad():
        torch.testing.assert_close(model(guidance, tokens), expected, rtol=1e-5, atol=1e-5)


def test_sdpa_and_naive_attention_agree_with_padding(tiny_config):
    model = random_aligner(tiny_config)
    guidance = torch.randn(3, 10, tiny_config["guidance_dim"])
    mask = torch.arange(10)[None] < torch.tensor([[10], [4], [7]])
    tokens = torch.randn(3, 5, tiny_config["image_dim"])
    with torch.no_grad():
        sdpa = model(guidance, tokens, mask)
        model.set_attention_implementation("naive")
        naive = model(guidance, tokens, mask)
    torch.testing.assert_close(sdpa, naive, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="'flash'"):
        model.set_attention_implementation("flash")


@pytest.mark.parametrize("implementation", ["sdpa", "naive"])
@pytest.mark.parametrize("junk", [1e4, float("nan"), float("inf")])
def test_padding_never_changes_the_output(tiny_config, implementation, junk):
    model = random_aligner(tiny_config)
    model.set_attention_implementation(implementation)
    lengths = [9, 3, 6]
    seqs = [torch.randn(n, tiny_config["guidance_dim"]) for n in lengths]
    tokens = torch.randn(3, 4, tiny_config["image_dim"])
    guidance = torch.full((3, 9, tiny_config["guidance_dim"]), junk)
    mask = torch.zeros(3, 9, dtype=torch.long)  # HF-style 0/1 masks are accepted too
    for b, s in enumerate(seqs):
        guidance[b, : len(s)] = s
        mask[b, : len(s)] = 1
    with torch.no_grad():
        batched = model(guidance, tokens, mask)
        alone = torch.cat([model(s[None], tokens[b : b + 1]) for b, s in enumerate(seqs)])
    assert torch.isfinite(batched).all()
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)


def test_align_is_recurrent_forward(tiny_config):
    model = random_aligner(tiny_config)
    guidance = torch.randn(2, 6, tiny_config["guidance_dim"])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    tokens = torch.randn(2, 4, tiny_config["image_dim"])
    with torch.no_grad():
        expected = tokens
        for _ in range(3):
            expected = model(guidance, expected, mask)
        torch.testing.assert_close(model.align(guidance, tokens, 3, mask), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.align(guidance, tokens, passes=1), model(guidance, tokens))
        assert torch.equal(model.align(guidance, tokens, passes=0), tokens)
    with pytest.raises(ValueError, match="-1"):
        model.align(guidance, tokens, passes=-1)


def test_inputs_are_cast_to_the_aligner_dtype(tiny_config):
    model = random_aligner(tiny_config).to(torch.bfloat16)
    out = model(torch.randn(1, 5, tiny_config["guidance_dim"]), torch.randn(1, 4, tiny_config["image_dim"]))
    assert out.dtype == torch.bfloat16


def test_bad_inputs_name_both_sides(tiny_config):
    model = ImplicitAligner(**tiny_config)
    g = torch.randn(2, 5, tiny_config["guidance_dim"])
    t = torch.randn(2, 4, tiny_config["image_dim"])
    with pytest.raises(ValueError, match=r"image tokens of shape \[batch, tokens, 16\] but got \(2, 4, 32\)"):
        model(g, torch.randn(2, 4, 32))
    with pytest.raises(ValueError, match=r"guidance of shape \[batch, length, 24\] but got \(2, 5, 7\)"):
        model(torch.randn(2, 5, 7), t)
    with pytest.raises(ValueError, match="batch 2 does not match image-token batch 3"):
        model(g, torch.randn(3, 4, tiny_config["image_dim"]))
    with pytest.raises(ValueError, match=r"guidance_mask must have shape \(2, 5\)"):
        model(g, t, torch.ones(2, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="depth must be a positive integer, got 0"):
        ImplicitAligner(depth=0)


# -- checkpoints -----------------------------------------------------------------------------------


def test_save_pretrained_round_trip(tmp_path, tiny_config):
    model = random_aligner(tiny_config)
    model.save_pretrained(tmp_path / "aligner")
    files = {p.name for p in (tmp_path / "aligner").iterdir()}
    assert {"config.json", "model.safetensors"} <= files
    assert json.loads((tmp_path / "aligner" / "config.json").read_text()) == tiny_config
    g, t = torch.randn(1, 5, tiny_config["guidance_dim"]), torch.randn(1, 3, tiny_config["image_dim"])
    for loaded in (
        ImplicitAligner.from_pretrained(tmp_path / "aligner"),
        load_aligner(tmp_path / "aligner"),
        load_aligner(tmp_path / "aligner" / "model.safetensors"),
    ):
        assert loaded.config == model.config
        with torch.no_grad():
            assert torch.equal(loaded(g, t), model(g, t))


def test_from_pretrained_dtype_and_head_split(tmp_path, tiny_config):
    model = random_aligner(tiny_config)
    model.save_pretrained(tmp_path / "a")
    loaded = load_aligner(tmp_path / "a", torch_dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    # config.json carries the head split, which shapes alone cannot tell
    cfg = dict(tiny_config, heads=4, head_dim=32)
    ImplicitAligner(**cfg).save_pretrained(tmp_path / "b")
    assert load_aligner(tmp_path / "b").config.heads == 4


def test_shape_inference_and_head_overrides(tiny_config):
    sd = official_state_dict(tiny_config, prefix="")
    assert infer_config(sd).to_dict() == tiny_config
    assert infer_config(sd, heads=4).head_dim == 32
    assert infer_config(sd, head_dim=16).heads == 8
    with pytest.raises(ValueError, match="heads=3 x head_dim=64 does not match the attention width 128"):
        infer_config(sd, heads=3, head_dim=64)


def _fake_hub_cache(cache: Path, repo_id: str, files: dict[str, bytes]) -> None:
    """The on-disk layout of the huggingface_hub cache, so hub ids resolve offline."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        (snapshot / name).write_bytes(data)


def test_hub_ids_and_presets_resolve_from_the_cache_offline(tmp_path, tiny_config):
    sd = official_state_dict(tiny_config)
    torch.save(sd, tmp_path / "official.pth")
    folder = tmp_path / "folder"
    reference = load_aligner(tmp_path / "official.pth")
    reference.save_pretrained(folder)
    cache = tmp_path / "cache"
    _fake_hub_cache(cache, "shi-labs/IMG", {"aligner_sdxl.pth": (tmp_path / "official.pth").read_bytes()})
    _fake_hub_cache(
        cache,
        "someone/tiny-aligner",
        {n: (folder / n).read_bytes() for n in ("config.json", "model.safetensors")},
    )
    g, t = torch.randn(1, 5, tiny_config["guidance_dim"]), torch.randn(1, 3, tiny_config["image_dim"])
    with torch.no_grad():
        expected = reference(g, t)
        for name in ("img-sdxl", "shi-labs/IMG/aligner_sdxl.pth", "someone/tiny-aligner"):
            model = load_aligner(name, cache_dir=cache, local_files_only=True)
            torch.testing.assert_close(model(g, t), expected, rtol=0, atol=0)


def test_mismatched_checkpoints_name_the_key_and_both_shapes(tmp_path, tiny_config):
    sd = official_state_dict(tiny_config, prefix="")
    bad = dict(sd)
    bad["layers.1.0.to_out.weight"] = torch.zeros(16, 64)
    torch.save(bad, tmp_path / "bad_shape.pth")
    with pytest.raises(
        ValueError, match=r"'layers.1.0.to_out.weight' has shape \(16, 64\) .* expects \(16, 128\)"
    ):
        load_aligner(tmp_path / "bad_shape.pth")

    missing = {k: v for k, v in sd.items() if k != "norm_out.bias"}
    save_file(missing, tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match=r"missing key 'norm_out.bias' \(expected shape \(16,\)\)"):
        load_aligner(tmp_path / "missing.safetensors")

    extra = dict(sd, **{"resampler.latents": torch.zeros(1, 16, 16)})
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match=r"unexpected key 'resampler.latents' \(shape \(1, 16, 16\)\)"):
        load_aligner(tmp_path / "extra.pth")

    # a folder whose config.json disagrees with its weights
    ImplicitAligner(**tiny_config).save_pretrained(tmp_path / "folder")
    config = json.loads((tmp_path / "folder" / "config.json").read_text())
    (tmp_path / "folder" / "config.json").write_text(json.dumps(config | {"image_dim": 32}))
    with pytest.raises(ValueError, match=r"'proj_in.weight' has shape \(16, 24\) .* expects \(32, 24\)"):
        load_aligner(tmp_path / "folder")


class _Payload:
    def __reduce__(self):  # what a malicious pickle would do on load
        return (print, ("unpickled arbitrary code",))


def test_only_plain_tensor_state_dicts_are_accepted(tmp_path, tiny_config):
    torch.save({"weights": _Payload()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="weights_only=True"):
        load_aligner(tmp_path / "evil.pth")
    torch.save({"step": 3, "proj_in.weight": torch.zeros(2, 2)}, tmp_path / "mixed.pth")
    with pytest.raises(ValueError, match=r"not a plain tensor state dict: entries \['step'\]"):
        load_aligner(tmp_path / "mixed.pth")
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="found list"):
        load_aligner(tmp_path / "list.pth")
    (tmp_path / "garbage.pth").write_bytes(pickle.dumps("not torch") + b"junk")
    with pytest.raises(ValueError, match=r"garbage\.pth"):
        load_aligner(tmp_path / "garbage.pth")
    torch.save({"something.else": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"missing key 'proj_in\.weight'"):
        load_aligner(tmp_path / "other.pth")


def test_missing_paths_are_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothing_here\.pth"):
        load_aligner(tmp_path / "nothing_here.pth")
    with pytest.raises(FileNotFoundError, match="neither a preset"):
        load_aligner("no-such-preset")
    empty_cache = tmp_path / "cache"
    with pytest.raises(FileNotFoundError, match=r"'aligner_sdxl\.pth' of hub repo 'shi-labs/IMG'"):
        load_aligner("img-sdxl", cache_dir=empty_cache, local_files_only=True)
    # tests run offline (HF_HUB_OFFLINE=1): the message says so
    with pytest.raises(
        FileNotFoundError, match="aligner 'someone/absent' is not a local path nor in the local hub cache"
    ):
        load_aligner("someone/absent", cache_dir=empty_cache, local_files_only=True)
