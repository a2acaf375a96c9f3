import os

import pytest
import torch

# Tests never reach a hub; loaders must work from local files and the local cache alone.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Every test, and every module- or session-scoped fixture built before a test's own fixtures run,
# sees a CPU without native bf16: "auto" dtypes are float32 on any machine (see _float32_defaults).
os.environ["ONEDNN_MAX_CPU_ISA"] = "AVX2"

# heads x head_dim = 2 x 64: the 64-wide heads that shape inference assumes, as in the official files
TINY = dict(guidance_dim=24, image_dim=16, depth=2, heads=2, head_dim=64, ff_mult=4)


@pytest.fixture
def tiny_config() -> dict:
    return dict(TINY)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _float32_defaults(monkeypatch):
    """Every test sees a CPU without native bf16, so "auto" dtypes are float32 on any machine and
    pinned outputs hold on AMX machines too (tests/test_precision.py fakes the other CPUs)."""
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
