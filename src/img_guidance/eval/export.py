"""Writing generations in the layouts the official GenEval and DPG-Bench evaluators read, so that a user
runs those evaluators (whose detectors need old stacks) unchanged on this project's images.

- GenEval (``geneval``): ``DEST/<prompt index, 5 digits>/metadata.jsonl`` holding that prompt's line of
  GenEval's ``evaluation_metadata.jsonl`` (its index is the line's place in that file), and
  ``DEST/<index>/samples/<image, 4 digits>.png``, a prompt's images in seed order.
- DPG-Bench (``dpg``): one 2 x 2 grid PNG per prompt (its first four images in seed order, left to
  right, top to bottom), named after the prompt's file in DPG-Bench's prompt folder (``<stem>.png``).

Every prompt of the chosen system must be found in the benchmark's files, and have enough images;
nothing is written otherwise. DEST is written beside itself and moved into place.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from img_guidance.eval.harness import EvalImage, read_folder

FORMATS = ("geneval", "dpg")


def export(
    folder: str | os.PathLike,
    dest: str | os.PathLike,
    *,
    format: str,
    benchmark_files: str | os.PathLike,
    system: str | None = None,
    overwrite: bool = False,
) -> dict[str, int]:
    """Export ``system``'s images of ``folder`` (default: ``calibrated`` for a generate folder, else
    the only system) to ``dest`` in ``format``; ``benchmark_files``: GenEval's
    ``evaluation_metadata.jsonl`` or DPG-Bench's prompt folder. Returns {"prompts", "images"}."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    folder, dest, benchmark_files = Path(folder), Path(dest), Path(benchmark_files)
    if dest.exists() and (not dest.is_dir() or (any(dest.iterdir()) and not overwrite)):
        raise FileExistsError(f"{dest} already exists and holds files; pass --overwrite to replace it")
    images = _system_images(read_folder(folder), system)
    by_prompt: dict[str, list[EvalImage]] = defaultdict(list)
    for image in images:
        by_prompt[image.prompt].append(image)
    for entries in by_prompt.values():
        entries.sort(key=lambda im: (im.seed is None, im.seed))
    lookup = _geneval_lines(benchmark_files) if format == "geneval" else _dpg_files(benchmark_files)
    missing = [p for p in by_prompt if p not in lookup]
    if missing:
        raise ValueError(f"{len(missing)} prompts are not in {benchmark_files}, e.g. {missing[0]!r}")
    if format == "dpg":
        short = [p for p, entries in by_prompt.items() if len(entries) < 4]
        if short:
            raise ValueError(
                f"DPG-Bench grids need 4 images per prompt; {short[0]!r} has {len(by_prompt[short[0]])}"
            )
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        count = 0
        for prompt, entries in by_prompt.items():
            if format == "geneval":
                index, line = lookup[prompt]
                where = staging / f"{index:05d}"
                (where / "samples").mkdir(parents=True)
                (where / "metadata.jsonl").write_text(line.rstrip("\n") + "\n", encoding="utf-8")
                for k, entry in enumerate(entries):
                    with Image.open(folder / entry.file) as image:
                        image.convert("RGB").save(where / "samples" / f"{k:04d}.png")
                    count += 1
            else:
                tiles = []
                for entry in entries[:4]:
                    with Image.open(folder / entry.file) as image:
                        tiles.append(image.convert("RGB"))
                grid_image(tiles).save(staging / f"{lookup[prompt]}.png")
                count += 4
        os.chmod(staging, 0o777 & ~_umask())
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(staging, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {"prompts": len(by_prompt), "images": count}


def grid_image(tiles: Sequence[Image.Image]) -> Image.Image:
    """Four images of one size as a 2 x 2 grid (left to right, top to bottom)."""
    width, height = tiles[0].size
    if any(t.size != (width, height) for t in tiles):
        raise ValueError("a grid needs images of one size")
    grid = Image.new("RGB", (2 * width, 2 * height))
    for k, tile in enumerate(tiles[:4]):
        grid.paste(tile, ((k % 2) * width, (k // 2) * height))
    return grid


def _system_images(images: list[EvalImage], system: str | None) -> list[EvalImage]:
    systems = list(dict.fromkeys(im.system for im in images))
    if system is None:
        system = "calibrated" if "calibrated" in systems else systems[0] if len(systems) == 1 else None
        if system is None:
            raise ValueError(
                f"the folder holds several systems ({', '.join(systems)}); choose one with --system"
            )
    if system not in systems:
        raise ValueError(f"no system {system!r} in the folder; it holds {', '.join(systems)}")
    return [im for im in images if im.system == system]


def _geneval_lines(path: Path) -> dict[str, tuple[int, str]]:
    """GenEval's evaluation_metadata.jsonl: prompt -> (its line index, the line)."""
    if not path.is_file():
        raise FileNotFoundError(f"GenEval's evaluation_metadata.jsonl not found: {path}")
    lookup = {}
    for index, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        try:
            prompt = json.loads(line)["prompt"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{path}:{index + 1} is not a GenEval metadata line ({err})") from None
        lookup.setdefault(prompt, (index, line))
    return lookup


def _dpg_files(path: Path) -> dict[str, str]:
    """DPG-Bench's prompt folder (one .txt per prompt): prompt -> the file's stem."""
    if not path.is_dir():
        raise FileNotFoundError(f"DPG-Bench's prompt folder not found: {path}")
    lookup = {}
    for file in sorted(path.glob("*.txt")):
        lookup.setdefault(file.read_text(encoding="utf-8").strip(), file.stem)
    if not lookup:
        raise ValueError(f"{path} holds no .txt prompt files")
    return lookup


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
