"""The output folder of ``img-guidance generate``.

    OUT/initial/NAME.png       the base model's image
    OUT/calibrated/NAME.png    the last round's calibrated image (NAME-round{r}.png for earlier rounds)
    OUT/compare/NAME.png       initial and calibrated side by side (every round, left to right)
    OUT/metadata.jsonl         one line per prompt: how its files were made

A prompt's line is appended only after all its images are written (each written to a temporary
name and renamed), so a rerun into the same folder skips exactly the prompts that are finished.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL.Image import Image

METADATA = "metadata.jsonl"


def slug(text: str, limit: int = 48) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].strip("-") or "prompt"


def entry_name(prompt: str, seed: int) -> str:
    """A file name stem that depends only on the prompt and the seed (not on its place in a list),
    so a rerun recognises finished work whatever order the prompts come in."""
    digest = hashlib.sha1(prompt.encode("utf-8")).hexdigest()[:8]
    return f"{slug(prompt)}-s{seed}-{digest}"


def side_by_side(images: list[Image], gap: int = 4) -> Image:
    from PIL import Image as PILImage

    height = max(im.height for im in images)
    width = sum(im.width for im in images) + gap * (len(images) - 1)
    canvas = PILImage.new("RGB", (width, height), "white")
    x = 0
    for im in images:
        canvas.paste(im.convert("RGB"), (x, 0))
        x += im.width + gap
    return canvas


def _save_atomic(image: Image, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


class OutputFolder:
    """Reads what a folder already holds and adds finished prompts to it."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise NotADirectoryError(f"output path {self.root} exists and is not a folder")
        self.undecodable: list[str] = []  # image files found by the last finished() that do not decode

    def _decodes(self, path: Path) -> bool:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as im:
                im.verify()
            return True
        except (OSError, UnidentifiedImageError, SyntaxError):
            return False

    def finished(self) -> set[str]:
        """Names of the prompts whose line and images are all present and decode. Image files that
        exist but do not decode are listed in ``undecodable``; their prompts count as unfinished."""
        path = self.root / METADATA
        if not path.is_file():
            return set()
        done = set()
        self.undecodable = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill: that prompt is redone
            files = [self.root / f for f in record.get("files", {}).values()]
            if not files or not all(f.is_file() for f in files):
                continue
            broken = [f for f in files if not self._decodes(f)]
            if broken:
                self.undecodable += [str(f) for f in broken]
            else:
                done.add(record["name"])
        return done

    def write(
        self, name: str, initial: Image, calibrated: list[Image], record: dict[str, Any]
    ) -> dict[str, Any]:
        """Write one prompt's images, then its metadata line; returns the line."""
        for sub in ("initial", "calibrated", "compare"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        files = {"initial": f"initial/{name}.png"}
        _save_atomic(initial, self.root / files["initial"])
        for r, image in enumerate(calibrated):
            last = r == len(calibrated) - 1
            key = "calibrated" if last else f"calibrated_round{r + 1}"
            files[key] = f"calibrated/{name}.png" if last else f"calibrated/{name}-round{r + 1}.png"
            _save_atomic(image, self.root / files[key])
        files["compare"] = f"compare/{name}.png"
        _save_atomic(side_by_side([initial, *calibrated]), self.root / files["compare"])
        line = {"name": name, **record, "files": files}
        with open(self.root / METADATA, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")
        return line
