"""What keeping torch's freed CPU memory in the process (:mod:`img_guidance.allocator`) saves.

Generates the same images with the shipped ShapesWorld generator twice, each in a fresh process: once
with glibc's malloc as it comes, once after :func:`img_guidance.allocator.keep_freed_memory`. Prints
per setting the seconds of generation (after one warm-up batch), the process's user and system
seconds, its minor page faults and peak resident memory, and whether the images are the same byte
for byte. Run it alone on the machine; it names the CPU.

    python -m benchmarks.cpu_allocator                        # 256 images in batches of 128
    python -m benchmarks.cpu_allocator --images 128 --batch-size 32
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python -m benchmarks.cpu_allocator   # as without AVX-512
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

SETTINGS = ("as it comes", "freed memory kept")

# one timed run in a fresh process: argv = setting index, images, batch size; prints one JSON line
CHILD = """
import hashlib, json, resource, sys, time
from img_guidance import allocator
allocator.GPU_DRIVER_FILES = ()  # this measures the CPU, whatever else the machine has
setting, images, batch = (int(x) for x in sys.argv[1:4])
applied = allocator.keep_freed_memory() if setting else False
import torch
from img_guidance.backends.shapes import ShapesBackend
from img_guidance.precision import default_dtype
from img_guidance.presets import BACKEND_PRESETS
backend = ShapesBackend.from_pretrained(BACKEND_PRESETS["shapes"].model)
prompts = ["two red circles", "a blue square left of a green triangle", "three yellow triangles",
           "a red circle above a blue circle"]
prompts = [prompts[i % len(prompts)] for i in range(images)]
backend.generate(prompts[:batch], list(range(batch)))  # warm-up
start_usage = resource.getrusage(resource.RUSAGE_SELF)
start = time.perf_counter()
out = []
for i in range(0, images, batch):
    out += backend.generate(prompts[i : i + batch], list(range(i, min(i + batch, images))))
seconds = time.perf_counter() - start
usage = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({
    "applied": applied,
    "skipped": None if applied or not setting else allocator.skip_reason(),
    "seconds": seconds,
    "user": usage.ru_utime - start_usage.ru_utime,
    "system": usage.ru_stime - start_usage.ru_stime,
    "page_faults": usage.ru_minflt - start_usage.ru_minflt,
    "peak_gib": usage.ru_maxrss / 2**20,
    "dtype": str(default_dtype(backend.device)).removeprefix("torch."),
    "images_md5": hashlib.md5(b"".join(im.tobytes() for im in out)).hexdigest(),
}))
"""


def measure(setting: int, images: int, batch: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.pop("IMG_GUIDANCE_MALLOC", None)
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(setting), str(images), str(batch)],
        capture_output=True,
        text=True,
        env=env,
    )
    if out.returncode != 0:
        raise SystemExit(f"the timed process failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args(argv)
    if args.images < 1 or args.batch_size < 1:
        parser.error(f"--images and --batch-size must be at least 1, got {args.images} and {args.batch_size}")
    import torch

    from img_guidance.demo import check_installed
    from img_guidance.precision import describe_cpu

    try:
        check_installed()
    except FileNotFoundError as err:
        raise SystemExit(f"error: {err}") from None
    rows = [measure(i, args.images, args.batch_size) for i in range(len(SETTINGS))]
    print(
        f"{args.images} ShapesWorld images in batches of {args.batch_size}, shipped generator; "
        f"{describe_cpu()}, {torch.get_num_threads()} threads\n"
    )
    print("| malloc | generation s | user s | system s | minor page faults | peak GiB |")
    print("|---|---|---|---|---|---|")
    for name, row in zip(SETTINGS, rows, strict=True):
        print(
            f"| {name} | {row['seconds']:.1f} | {row['user']:.1f} | {row['system']:.1f} "
            f"| {row['page_faults']:,} | {row['peak_gib']:.2f} |"
        )
    if not rows[1]["applied"]:
        print(f"\nnote: the second setting was not applied here ({rows[1]['skipped']}): the rows are alike")
    same = len({row["images_md5"] for row in rows}) == 1
    print(
        f"\nimages the same byte for byte: {'yes' if same else 'NO'}; computed in {rows[0]['dtype']}; "
        f"kept: {rows[1]['seconds'] / rows[0]['seconds']:.2f}x the time"
    )
    return rows


if __name__ == "__main__":
    main()
