"""keep_freed_memory: large freed blocks stay in the process (no page faults to take them again), child
processes inherit the settings, and it leaves malloc alone where the user or the machine says so."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from img_guidance import allocator

glibc = pytest.mark.skipif(
    sys.platform != "linux" or not allocator._glibc(), reason="mallopt is glibc's (Linux)"
)

# Allocates, touches and frees a 64 MiB block twice with the C library's malloc; prints the page faults
# the second round took, whether the settings were applied, and what a child process sees in its environment.
PROBE = """
import ctypes, json, os, resource, subprocess, sys
from img_guidance import allocator
allocator.GPU_DRIVER_FILES = ()  # the probe measures malloc, whatever this machine has
applied = allocator.keep_freed_memory() if sys.argv[1] == "apply" else False
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = (ctypes.c_void_p,)
size = 64 * 1024 * 1024
def round_trip():
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    libc.free(block)
round_trip()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
round_trip()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
child = subprocess.run(
    [sys.executable, "-c", "import os; print(os.environ.get('MALLOC_MMAP_MAX_'))"],
    capture_output=True, text=True, check=True,
).stdout.strip()
print(json.dumps({"applied": applied, "faults": faults, "child": child}))
"""


def probe(mode: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != allocator.OPT_OUT}
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True, env=env
    )
    return json.loads(out.stdout)


@glibc
def test_freed_blocks_are_taken_again_without_page_faults():
    plain, kept = probe("plain"), probe("apply")
    pages = 64 * 1024 * 1024 // os.sysconf("SC_PAGE_SIZE")
    assert not plain["applied"] and plain["child"] == "None"
    # glibc maps a 64 MiB block afresh each time: every page faults again (fewer with huge pages)
    assert plain["faults"] > pages // 600
    assert kept["applied"] and kept["child"] == "0"
    assert kept["faults"] < max(plain["faults"] // 10, 1)


@pytest.fixture
def fresh(monkeypatch):
    """This process as if keep_freed_memory had never run and no MALLOC_ variable were set."""
    monkeypatch.setattr(allocator, "_applied", False)
    monkeypatch.setattr(allocator, "GPU_DRIVER_FILES", ())
    for name in [*allocator._USER_VARIABLES, allocator.OPT_OUT]:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@glibc
def test_nothing_to_skip_on_a_plain_linux_cpu(fresh):
    assert allocator.skip_reason() is None


def test_opt_out_leaves_malloc_alone(fresh):
    fresh.setenv(allocator.OPT_OUT, "system")
    assert allocator.skip_reason() == "IMG_GUIDANCE_MALLOC=system"
    assert allocator.keep_freed_memory() is False
    assert "MALLOC_MMAP_MAX_" not in os.environ


@glibc
def test_a_users_malloc_setting_wins(fresh):
    fresh.setenv("MALLOC_ARENA_MAX", "2")
    assert allocator.skip_reason() == "MALLOC_ARENA_MAX is set"
    assert allocator.keep_freed_memory() is False
    assert "MALLOC_TRIM_THRESHOLD_" not in os.environ


@glibc
def test_a_gpu_driver_leaves_malloc_alone(fresh, tmp_path):
    driver = tmp_path / "nvidiactl"
    driver.touch()
    fresh.setattr(allocator, "GPU_DRIVER_FILES", (str(driver),))
    assert allocator.skip_reason() == "a GPU driver is present"
    assert allocator.keep_freed_memory() is False


def test_off_glibc_it_does_nothing(fresh):
    fresh.setattr(allocator, "_glibc", lambda: False)
    assert allocator.skip_reason() == "not Linux with glibc"
    assert allocator.keep_freed_memory() is False


@glibc
def test_the_benchmark_times_both_settings_on_the_same_images(capsys):
    from benchmarks import cpu_allocator
    from img_guidance.demo import check_installed

    try:
        check_installed()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    rows = cpu_allocator.main(["--images", "2", "--batch-size", "1"])
    assert [row["applied"] for row in rows] == [False, True]
    assert rows[0]["images_md5"] == rows[1]["images_md5"]
    assert all(row["seconds"] > 0 and row["peak_gib"] > 0 for row in rows)
    out = capsys.readouterr().out
    assert "| freed memory kept |" in out and "images the same byte for byte: yes" in out


def test_the_benchmark_refuses_a_bad_count(capsys):
    from benchmarks import cpu_allocator

    with pytest.raises(SystemExit):
        cpu_allocator.main(["--images", "0"])
    assert "--images and --batch-size must be at least 1, got 0" in capsys.readouterr().err
