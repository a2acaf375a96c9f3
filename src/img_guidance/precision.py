"""Which floating-point dtype to compute in, decided from the hardware in one place.

bfloat16 halves memory traffic and, on hardware with native bf16 arithmetic, the time too: every
CUDA GPU this project targets, and CPUs with AVX512-BF16 or AMX. Elsewhere torch emulates it, and
autocast to bf16 is many times *slower* than float32: 16 ShapesWorld images took 183.6 s under bf16
autocast against 8.1 s in float32 on a 2-core AMD EPYC with AVX2 only (measured for issue 12).
So bf16 is the default only where it is native; everything that has a dtype or mixed-precision setting asks
:func:`default_dtype` / :func:`default_mixed_precision` when the user gave none, and a user's
``--dtype`` or config key always wins (:func:`resolve_dtype`).

The CPU check follows what torch and oneDNN will actually run: ``ATEN_CPU_CAPABILITY`` below AVX-512
or ``ONEDNN_MAX_CPU_ISA`` below AVX512_CORE_BF16 (e.g. ``ONEDNN_MAX_CPU_ISA=AVX2
ATEN_CPU_CAPABILITY=avx2``, which makes an AMX machine behave like an AVX2-only one) count as no
native bf16.

torch is imported inside the functions, so that the CLI and the guidance module can share
:data:`DTYPE_NAMES` without loading it.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

DTYPE_NAMES = ("float32", "bfloat16", "float16")
MixedPrecision = Literal["no", "bf16"]

# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) that still include native bf16 dot products
_BF16_ISAS = ("AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX10", "ALL", "DEFAULT")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX) *and* torch and oneDNN are
    allowed to use it (see the module docstring for the environment variables that cap them)."""
    import torch

    if not (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()):
        return False
    if not torch.backends.cpu.get_cpu_capability().upper().startswith("AVX512"):
        return False
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
    return not isa or isa.startswith(_BF16_ISAS)


def has_native_bf16(device: str | torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively: CUDA GPUs that support it, or
    :func:`cpu_has_native_bf16` for the CPU; False for other device types."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return cpu_has_native_bf16()
    return False


def default_dtype(device: str | torch.device) -> torch.dtype:
    """The dtype to compute in on ``device`` when the user chose none: bfloat16 where it is native
    (:func:`has_native_bf16`), float32 otherwise."""
    import torch

    return torch.bfloat16 if has_native_bf16(device) else torch.float32


def default_mixed_precision(device: str | torch.device) -> MixedPrecision:
    """accelerate's ``mixed_precision`` to train with when the user chose none: ``"bf16"`` where bf16
    is native on ``device``, else ``"no"``."""
    return "bf16" if has_native_bf16(device) else "no"


def resolve_mixed_precision(value: str | bool | None, device: str | torch.device) -> MixedPrecision:
    """A user's mixed-precision setting -> ``"no"`` or ``"bf16"``: None or ``"auto"`` ->
    :func:`default_mixed_precision`; False (what YAML 1.1 makes of a bare ``no``) -> ``"no"``.
    Anything else raises a ValueError naming it."""
    if value is None or value == "auto":
        return default_mixed_precision(device)
    if value is False or value == "no":
        return "no"
    if value == "bf16":
        return "bf16"
    raise ValueError(f"mixed_precision must be auto, no or bf16, got {value!r}")


def resolve_dtype(value: str | torch.dtype | None, device: str | torch.device) -> torch.dtype:
    """A user's dtype setting -> a torch dtype: None or ``"auto"`` -> :func:`default_dtype`, a name
    in :data:`DTYPE_NAMES` or a torch dtype -> itself. Anything else raises a ValueError naming it."""
    import torch

    if value is None or value == "auto":
        return default_dtype(device)
    if isinstance(value, torch.dtype):
        if value.is_floating_point:
            return value
    elif value in DTYPE_NAMES:
        return getattr(torch, value)
    raise ValueError(f"dtype must be auto or one of {', '.join(DTYPE_NAMES)}, got {value!r}")


def describe_cpu() -> str:
    """One line naming this machine's CPU and what torch runs on it, for timings in reports:
    e.g. ``"AMD EPYC (2 cores, torch AVX2, native bf16: no)"``."""
    import torch

    name = _cpu_model_name() or "unknown CPU"
    cores = os.cpu_count() or 0
    capability = torch.backends.cpu.get_cpu_capability()
    native = "yes" if cpu_has_native_bf16() else "no"
    return f"{name} ({cores} cores, torch {capability}, native bf16: {native})"


def _cpu_model_name() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or None
