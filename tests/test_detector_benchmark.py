"""benchmarks/detector.py: parameter counts at real size, the LoRA count, the memory model, the report."""

import json

import pytest

# Vicuna-7B: 32 layers, h = 4096, f = 11008; r = 128 on q, k, v, o (h -> h) and gate, up, down (h <-> f)
LORA_7B = 32 * 128 * (4 * (4096 + 4096) + 3 * (4096 + 11008))


@pytest.fixture(scope="module")
def detector():
    from benchmarks import detector

    return detector


@pytest.fixture(scope="module")
def real(detector):
    configs = {size: detector.llava_config(size) for size in ("7b", "13b")}
    return {size: (config, detector.parameter_breakdown(config)) for size, config in configs.items()}


@pytest.mark.parametrize("size", ["7b", "13b"])
def test_parameter_counts_match_the_published_models(detector, real, size):
    config, params = real[size]
    published = detector.PUBLISHED_PARAMS[size]
    assert abs(params.total - published) / published < 0.005
    # the components add up to every parameter of the model
    assert params.total == sum(p.numel() for p in detector.build_meta(config).parameters())
    h, f = config.text_config.hidden_size, config.text_config.intermediate_size
    layers = config.text_config.num_hidden_layers
    assert params.projector == 1024 * h + h + h * h + h  # mlp2x_gelu: 1024 -> h -> h, with biases
    assert params.decoder_linear == layers * (4 * h * h + 3 * h * f)
    assert params.embeddings == params.lm_head == 32064 * h
    assert params.vision_tower == 303_507_456  # CLIP ViT-L/14-336 vision model, both sizes


def test_unknown_size_is_refused(detector):
    with pytest.raises(ValueError, match="'70b'"):
        detector.llava_config("70b")


def test_lora_count_equals_a_hand_count_on_a_tiny_llava(detector):
    """Text model h = 64, 4 heads of 16, 2 key/value heads (k, v: 64 -> 32), f = 96, 3 layers; r = 4,
    r * (in + out) per targeted linear:
    q 4*(64+64) = 512, k 4*(64+32) = 384, v 384, o 512, gate 4*(64+96) = 640, up 640, down 640:
    3712 per layer, 11136 in all; q and v only: (512 + 384) * 3 = 2688. The vision tower's own
    q_proj / k_proj / v_proj are not targeted."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=28
        ),
        text_config=LlamaConfig(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
        ),
        image_token_id=100,
    )
    assert detector.lora_trainable(config, 4) == 11136
    assert detector.lora_trainable(config, 4, ("q_proj", "v_proj")) == 2688


def estimates(detector, config, params, **kwargs):
    return {
        mode: detector.memory_estimate(config, params, mode=mode, lora_params=LORA_7B, **kwargs)
        for mode in detector.MODES
    }


def test_memory_accounting_and_order(detector, real):
    config, params = real["7b"]
    for batch_size in (1, 4):
        for checkpointing in (False, True):
            e = estimates(detector, config, params, batch_size=batch_size, checkpointing=checkpointing)
            assert e["qlora"].peak < e["lora"].peak < e["full"].peak
            assert e["qlora"].weights < e["lora"].weights < e["full"].weights

    e = estimates(detector, config, params)
    full, lora, qlora = e["full"], e["lora"], e["qlora"]
    trainable = params.projector + params.language_model
    assert full.trainable == trainable
    assert full.weights == 2 * params.vision_tower + 4 * trainable  # frozen bf16, trainable fp32
    assert full.gradients == 4 * trainable and full.optimizer == 8 * trainable
    assert full.optimizer_step == 4 * trainable  # foreach AdamW: sqrt(exp_avg_sq) for every parameter
    fused = detector.memory_estimate(config, params, mode="full", adamw="fused")
    assert fused.optimizer_step == 0 and fused.peak < full.peak
    # the frozen vision tower and the projector's original (peft's modules_to_save) in bf16, trained in fp32
    frozen = params.vision_tower + params.projector + params.language_model
    assert lora.weights == 2 * frozen + 4 * (params.projector + LORA_7B)
    assert lora.trainable == qlora.trainable == params.projector + LORA_7B
    assert lora.weights - qlora.weights == pytest.approx((2 - detector.NF4_BYTES) * params.decoder_linear)
    sharded = detector.memory_estimate(config, params, mode="full", shards=8)
    assert sharded.optimizer == full.optimizer / 8 and sharded.peak < full.peak


def test_checkpointing_and_attention_lower_activations(detector, real):
    config, params = real["13b"]
    for mode in detector.MODES:
        common = dict(mode=mode, lora_params=LORA_7B, batch_size=4)
        plain = detector.memory_estimate(config, params, **common)
        ckpt = detector.memory_estimate(config, params, checkpointing=True, **common)
        eager = detector.memory_estimate(config, params, attention="eager", **common)
        assert ckpt.activations < plain.activations / 5
        assert ckpt.peak <= plain.peak
        assert eager.activations > plain.activations
        one = detector.memory_estimate(config, params, mode=mode, lora_params=LORA_7B, batch_size=1)
        assert plain.activations == pytest.approx(4 * one.activations)


def test_bad_estimate_arguments_are_refused(detector, real):
    config, params = real["7b"]
    with pytest.raises(ValueError, match="'int8'"):
        detector.memory_estimate(config, params, mode="int8")
    with pytest.raises(ValueError, match="'adam8bit'"):
        detector.memory_estimate(config, params, mode="full", adamw="adam8bit")
    with pytest.raises(ValueError, match="lora_params=0"):
        detector.memory_estimate(config, params, mode="lora")
    with pytest.raises(ValueError, match="576 image tokens, got 500"):
        detector.memory_estimate(config, params, mode="full", seq_len=500)


def test_main_prints_the_tables(detector, capsys, tmp_path):
    out = detector.main(
        ["--sizes", "7b", "--batch-size", "2", "--skip-timing", "--json", str(tmp_path / "d.json")]
    )
    printed = capsys.readouterr().out
    assert "| peak bs 1 | peak bs 2 |" in printed
    parameters, memory = printed.split("## Peak GPU memory")
    assert "| LLaVA-1.5-7B | 303,507,456 | 20,979,712 | 6,738,939,904 " in parameters
    rows = [line.split(" | ") for line in memory.splitlines() if line.startswith("| LLaVA-1.5-7B")]
    assert [row[1] for row in rows] == [
        "full",
        "full, ZeRO-3 / FSDP x 8",
        "LoRA r=128",
        "QLoRA r=128 (NF4 + DQ)",
    ]
    assert all(len(row) == 12 for row in rows)
    assert out["parameters"]["7b"]["lora"] == LORA_7B
    saved = json.loads((tmp_path / "d.json").read_text())
    assert len(saved["memory"]) == 4 * 4  # four modes x (batch 1, 2) x (checkpointing off, on)
    assert all(m["peak"] > m["weights"] for m in saved["memory"])
