"""The dtype helper: bf16 only where the hardware has it natively, and a user's choice always wins."""

import pytest
import torch

from img_guidance import precision
from img_guidance.recipes.config import ConfigError, build_config, parse_overrides, safe_load


def fake_cpu(monkeypatch, *, avx512_bf16: bool, amx: bool = False, capability: str = "AVX512") -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)


def test_a_cpu_without_native_bf16_computes_in_float32(monkeypatch):
    fake_cpu(monkeypatch, avx512_bf16=False, capability="AVX2")
    assert not precision.cpu_has_native_bf16()
    assert precision.default_dtype("cpu") == torch.float32
    assert precision.default_mixed_precision("cpu") == "no"
    assert precision.resolve_dtype("auto", "cpu") == torch.float32
    assert precision.resolve_mixed_precision(None, "cpu") == "no"


@pytest.mark.parametrize("avx512_bf16, amx", [(True, False), (False, True), (True, True)])
def test_a_cpu_with_avx512_bf16_or_amx_computes_in_bf16(monkeypatch, avx512_bf16, amx):
    fake_cpu(monkeypatch, avx512_bf16=avx512_bf16, amx=amx)
    assert precision.default_dtype("cpu") == torch.bfloat16
    assert precision.default_mixed_precision(torch.device("cpu")) == "bf16"


@pytest.mark.parametrize(
    "capability, isa, native",
    [
        ("AVX2", None, False),  # ATEN_CPU_CAPABILITY=avx2 caps torch's kernels
        ("AVX512", "AVX2", False),  # ONEDNN_MAX_CPU_ISA=AVX2 caps oneDNN's
        ("AVX512", "avx512_core", False),  # AVX-512 without BF16
        ("AVX512", "AVX512_CORE_BF16", True),
        ("AVX512", "AVX512_CORE_AMX", True),
        ("AVX512", "ALL", True),
    ],
)
def test_the_environment_caps_are_respected(monkeypatch, capability, isa, native):
    fake_cpu(monkeypatch, avx512_bf16=True, amx=True, capability=capability)
    if isa is not None:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", isa)
    assert precision.cpu_has_native_bf16() is native
    assert precision.default_dtype("cpu") == (torch.bfloat16 if native else torch.float32)


def test_other_devices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert precision.default_dtype("cuda:0") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert precision.default_dtype("cuda") == torch.float32
    assert precision.default_dtype("meta") == torch.float32


@pytest.mark.parametrize("native", [False, True])
def test_an_override_wins(monkeypatch, native):
    fake_cpu(monkeypatch, avx512_bf16=native, capability="AVX512" if native else "AVX2")
    assert precision.resolve_dtype("float32", "cpu") == torch.float32
    assert precision.resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    assert precision.resolve_dtype(torch.float16, "cpu") == torch.float16
    assert precision.resolve_mixed_precision("bf16", "cpu") == "bf16"
    assert precision.resolve_mixed_precision("no", "cpu") == "no"
    assert precision.resolve_mixed_precision(False, "cpu") == "no"  # YAML 1.1's bare `no`


@pytest.mark.parametrize("bad", ["fp32", "int8", torch.int64, 3])
def test_a_bad_dtype_is_named(bad):
    with pytest.raises(ValueError, match="dtype must be auto or one of float32, bfloat16, float16") as err:
        precision.resolve_dtype(bad, "cpu")
    assert repr(bad) in str(err.value)


def test_a_bad_mixed_precision_is_named():
    with pytest.raises(ValueError, match="mixed_precision must be auto, no or bf16, got 'fp8'"):
        precision.resolve_mixed_precision("fp8", "cpu")


def test_describe_cpu_names_the_capability(monkeypatch):
    fake_cpu(monkeypatch, avx512_bf16=False, capability="AVX2")
    line = precision.describe_cpu()
    assert "torch AVX2" in line and "native bf16: no" in line


def test_a_bare_no_stays_a_string_in_configs():
    from dataclasses import dataclass

    @dataclass
    class Config:
        mixed_precision: str = "auto"
        merge_lora: bool = False

    assert parse_overrides(["mixed_precision=no"]) == {"mixed_precision": "no"}
    assert safe_load("mixed_precision: no\nmerge_lora: yes\n") == {
        "mixed_precision": "no",
        "merge_lora": "yes",
    }
    cfg = build_config(Config, safe_load("mixed_precision: no\nmerge_lora: yes\n"))
    assert cfg == Config(mixed_precision="no", merge_lora=True)
    assert build_config(Config, {"merge_lora": True}).merge_lora is True
    with pytest.raises(ConfigError, match="merge_lora must be true or false, got 'maybe'"):
        build_config(Config, {"merge_lora": "maybe"})


@pytest.mark.parametrize("native", [False, True])
def test_the_shapes_pipeline_autocasts_only_where_bf16_is_native(monkeypatch, native):
    """ "auto" samples exactly as float32 (no autocast) on a CPU without native bf16, and exactly as
    bf16 autocast on one with it."""
    import numpy as np

    from img_guidance.shapes.models import ShapesWorldPipeline

    pipe = ShapesWorldPipeline.build(
        seed=0, unet=dict(block_out_channels=(16, 32), head_dim=16), text_layers=1
    )
    pipe.eval()

    def sample(compute_dtype):
        pipe.compute_dtype = compute_dtype
        images = pipe(["a red circle"], [torch.Generator().manual_seed(0)], steps=1)
        return np.asarray(images[0], dtype=np.int16)

    float32, bfloat16 = sample(None), sample(torch.bfloat16)
    assert np.abs(bfloat16 - float32).max() > 0  # the two paths differ
    fake_cpu(monkeypatch, avx512_bf16=native, capability="AVX512" if native else "AVX2")
    np.testing.assert_array_equal(sample("auto"), bfloat16 if native else float32)
    with pytest.raises(ValueError, match="compute_dtype must be a torch dtype, 'auto' or None, got 'bf16'"):
        ShapesWorldPipeline(
            tokenizer=pipe.tokenizer,
            text_encoder=pipe.text_encoder,
            unet=pipe.unet,
            scheduler=pipe.scheduler,
            compute_dtype="bf16",
        )
