"""The pure helpers of benchmarks/pipeline_cost.py (the benchmark itself runs outside the suite)."""

import pytest


@pytest.fixture(scope="module")
def cost():
    from benchmarks import pipeline_cost

    return pipeline_cost


def test_qwen_image_grid_follows_the_processor_resize(cost):
    # 1024 -> nearest multiple of 28 = 1036 -> 74 x 74 patches -> 37 x 37 merged tokens
    assert cost.qwen_image_grid(1024, 1024) == (74, 74, 1369)
    assert cost.qwen_image_grid(448, 448) == (32, 32, 256)
    assert cost.qwen_image_grid(336, 672) == (24, 48, 288)
    # below min_pixels (56 x 56) the image is scaled up, above max_pixels down
    assert cost.qwen_image_grid(20, 20) == (4, 4, 4)
    rows, cols, tokens = cost.qwen_image_grid(8000, 8000)
    assert (rows * 14) * (cols * 14) <= cost.QWEN_MAX_PIXELS and rows == cols and rows % 2 == 0
    assert tokens == rows * cols // 4


def test_weight_bytes_per_precision(cost):
    assert cost.weight_bytes(10, 8, "bf16") == 20
    assert cost.weight_bytes(10, 8, "fp32") == 40
    assert cost.weight_bytes(10, 8, "int8") == 8 * 1 + 2 * 2
    assert cost.weight_bytes(10, 8, "nf4") == 8 * 0.5 + 2 * 2
    with pytest.raises(KeyError):
        cost.weight_bytes(10, 8, "fp8")


def test_offload_peaks(cost):
    stages = {"text": ["te"], "denoise": ["unet", "ip"], "guide": ["mllm"]}
    sizes = {"te": 3, "unet": 5, "ip": 1, "mllm": 8, "unused": 100}
    leaves = {"te": 1, "unet": 2, "ip": 0.5, "mllm": 1.5, "unused": 50}
    peaks = cost.offload_peaks(stages, sizes, leaves)
    assert peaks["none"] == (17, "all stages")  # modules no stage uses are not counted
    assert peaks["model"] == (8, "guide")
    assert peaks["sequential"] == (2, "unet")
    kept = cost.offload_peaks(stages, sizes, leaves, pinned=["mllm"])
    assert kept["none"] == (17, "all stages")
    assert kept["model"] == (8 + 6, "denoise")
    assert kept["sequential"] == (8 + 2, "unet")


def test_llava_closed_form_scales_with_length(cost):
    # the language model's linear layers: 2 FLOPs per weight per token; attention 4 L^2 d per layer
    d, ff, layers = 5120, 13824, 40
    step = cost.llava_flops_closed_form(681) - cost.llava_flops_closed_form(680)
    assert step == layers * (2 * (4 * d * d + 3 * d * ff) + 4 * (681**2 - 680**2) * d)
