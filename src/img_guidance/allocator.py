"""Keep the memory torch frees on the CPU in the process, so that the next step need not fault it in again.

glibc's malloc hands every block above its mmap threshold (32 MiB at most) to the kernel on ``free``
and takes a fresh, zero-filled mapping on the next ``malloc``. torch allocates and frees blocks that size
at every layer of every step on the CPU (one feature map of the ShapesWorld UNet over 128 images with
guidance is 32 MiB in float32), so a CPU run spends a large share of its time in the kernel, faulting
the same memory in again. Measured for issue 12 with ``python -m benchmarks.cpu_allocator`` on 2 cores
of an AMD EPYC (the same images byte for byte): 256 images in bf16 took 44.0 s -> 31.3 s, and 128 in
float32 with ``ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2`` 45.0 s -> 27.3 s (docs/performance.md).

:func:`keep_freed_memory` tells glibc to serve large blocks from its heap (``M_MMAP_MAX`` 0) and to give
the heap's free top back to the kernel only above :data:`TRIM_THRESHOLD` (``M_TRIM_THRESHOLD``), and
exports the same settings (``MALLOC_MMAP_MAX_``, ``MALLOC_TRIM_THRESHOLD_``) to child processes such as
``accelerate launch``'s. It is a process-wide choice, so only entry points make it (the CLI, the recipes'
``main``, the benchmarks), never a library call. It does nothing:

- off Linux with glibc (``mallopt`` is glibc's);
- where a GPU driver is present (``/dev/nvidiactl``, ``/dev/kfd``): the large tensors live on the GPU, and
  host memory holding a checkpoint on its way there should go back to the system;
- where the user tuned malloc (``GLIBC_TUNABLES`` or a ``MALLOC_`` variable glibc reads): theirs wins;
- with ``IMG_GUIDANCE_MALLOC=system``.
"""

from __future__ import annotations

import ctypes
import os
import sys

TRIM_THRESHOLD = 256 * 1024 * 1024  # bytes of free heap top kept before glibc trims it
OPT_OUT = "IMG_GUIDANCE_MALLOC"
GPU_DRIVER_FILES = ("/dev/nvidiactl", "/dev/kfd")
# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_USER_VARIABLES = (
    "MALLOC_MMAP_MAX_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "MALLOC_ARENA_MAX",
    "MALLOC_ARENA_TEST",
    "MALLOC_PERTURB_",
    "MALLOC_CHECK_",
    "GLIBC_TUNABLES",
)

_applied = False


def skip_reason() -> str | None:
    """Why :func:`keep_freed_memory` would leave malloc as it is here, or None when it would act."""
    if _applied:
        return None
    if os.environ.get(OPT_OUT, "").strip().lower() == "system":
        return f"{OPT_OUT}=system"
    if sys.platform != "linux" or not _glibc():
        return "not Linux with glibc"
    user = [name for name in _USER_VARIABLES if name in os.environ]
    if user:
        return f"{user[0]} is set"
    if any(os.path.exists(path) for path in GPU_DRIVER_FILES):
        return "a GPU driver is present"
    return None


def _glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (ValueError, OSError, AttributeError):
        return False


def keep_freed_memory() -> bool:
    """Keep freed CPU memory in the process (see the module docstring); True when the settings are in
    force (now or from an earlier call), False when this process leaves malloc alone."""
    global _applied
    if _applied:
        return True
    if skip_reason() is not None:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    if mallopt(_M_MMAP_MAX, 0) != 1 or mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) != 1:
        return False
    os.environ["MALLOC_MMAP_MAX_"] = "0"
    os.environ["MALLOC_TRIM_THRESHOLD_"] = str(TRIM_THRESHOLD)
    _applied = True
    return True
