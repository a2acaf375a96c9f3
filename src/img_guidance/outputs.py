"""The output folder of ``img-guidance generate``.

    OUT/initial/NAME.png       the base model's image
    OUT/calibrated/NAME.png    the last round's calibrated image (NAME-round{r}.png for earlier rounds)
    OUT/compare/NAME.png       initial and calibrated side by side (every round, left to right)
    OUT/metadata.jsonl         one line per prompt: how its files were made
    OUT/settings.json          the settings every image in the folder was made with

A prompt's line is appended only after all its images are written (each written to a temporary
name and renamed), so a rerun into the same folder skips exactly the prompts that are finished.
The rules that keep a folder truthful:

- one record per image name: where a prompt was redone, its last complete line wins;
- a line cut short by a kill is skipped (and reported, with its line number); the next line is
  always appended on a fresh line, so a cut line never swallows a good one;
- a folder holds the images of one set of settings: :meth:`OutputFolder.check_settings` refuses a
  rerun with other settings (naming them) unless the user asks to overwrite.
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
SETTINGS = "settings.json"
GENERATED = ("initial", "calibrated", "compare", METADATA, SETTINGS, "judge.json")  # what --overwrite removes


class SettingsMismatch(ValueError):
    """A rerun into a folder whose images were made with other settings."""


def read_records(path: str | Path) -> tuple[list[dict[str, Any]], list[int]]:
    """The records of a ``metadata.jsonl`` in file order, and the numbers (from 1) of the lines that
    are not a complete record (cut short by a kill, or not JSON objects); blank lines are ignored."""
    records, broken = [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                broken.append(number)
                continue
            if not isinstance(record, dict) or not isinstance(record.get("name"), str):
                broken.append(number)
                continue
            records.append(record)
    return records, broken


def latest_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per image name, the last one, in the order of their last appearance."""
    by_name: dict[str, dict[str, Any]] = {}
    for record in records:
        by_name.pop(record["name"], None)
        by_name[record["name"]] = record
    return list(by_name.values())


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


def save_image_atomic(image: Image, path: Path) -> None:
    """Write ``path`` through a temporary name: it is either the whole new image or untouched, and
    a failed write (a full disk) leaves no temporary file behind."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        image.save(tmp, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, value: Any) -> None:
    """``path`` as indented JSON, written through a temporary name (removed if the write fails)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def check_writable(path: str | Path) -> None:
    """Raise ``PermissionError`` naming ``path`` unless files can be made in it: in the folder itself
    where it exists, else in its nearest existing parent (where it would be created)."""
    target = Path(path)
    probe = target
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise NotADirectoryError(f"{probe} is not a folder, so {target} cannot be written")
    if not os.access(probe, os.W_OK | os.X_OK):
        where = "" if probe == target else f" (its parent {probe} is not writable)"
        raise PermissionError(f"cannot write to {target}{where}")


class OutputFolder:
    """Reads what a folder already holds and adds finished prompts to it."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise NotADirectoryError(f"output path {self.root} exists and is not a folder")
        self.undecodable: list[str] = []  # image files found by the last finished() that do not decode
        self.broken_lines: list[int] = []  # metadata lines the last records() skipped (cut or not JSON)

    def _decodes(self, path: Path) -> bool:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as im:
                im.verify()
            return True
        except (OSError, UnidentifiedImageError, SyntaxError):
            return False

    def records(self) -> list[dict[str, Any]]:
        """The folder's metadata records, one per image name (the last complete line wins); the lines
        skipped as cut short or invalid are in ``broken_lines``."""
        path = self.root / METADATA
        self.broken_lines = []
        if not path.is_file():
            return []
        records, self.broken_lines = read_records(path)
        return latest_records(records)

    def finished(self) -> set[str]:
        """Names of the prompts whose line and images are all present and decode. Image files that
        exist but do not decode are listed in ``undecodable``; their prompts count as unfinished."""
        done = set()
        self.undecodable = []
        for record in self.records():
            files = record.get("files")
            files = [self.root / f for f in files.values()] if isinstance(files, dict) else []
            if not files or not all(f.is_file() for f in files):
                continue
            broken = [f for f in files if not self._decodes(f)]
            if broken:
                self.undecodable += [str(f) for f in broken]
            else:
                done.add(record["name"])
        return done

    def settings(self) -> dict[str, Any] | None:
        """The settings the folder's images were made with (None where it records none)."""
        path = self.root / SETTINGS
        if not path.is_file():
            return None
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
        return value if isinstance(value, dict) else None

    def check_settings(self, settings: dict[str, Any], *, overwrite: bool = False) -> None:
        """Raise :class:`SettingsMismatch` if the folder holds images made with other settings (or with
        settings it does not record), naming each difference; nothing to check with ``overwrite`` or
        where no prompt has its line yet."""
        if overwrite or not self.records():
            return
        recorded = self.settings()
        if recorded is None:
            raise SettingsMismatch(
                f"{self.root} holds images whose settings it does not record (no {SETTINGS}); "
                "pass --overwrite to replace them, or choose a new --out"
            )
        keys = sorted(set(recorded) | set(settings))
        differ = [k for k in keys if recorded.get(k) != settings.get(k)]
        if differ:
            listed = "; ".join(f"{k}: {recorded.get(k)!r} there, {settings.get(k)!r} now" for k in differ)
            raise SettingsMismatch(
                f"{self.root} holds images made with other settings ({listed}); "
                "pass --overwrite to replace them, or choose a new --out"
            )

    def start(self, settings: dict[str, Any], *, overwrite: bool = False) -> None:
        """Get the folder ready for new images: with ``overwrite``, remove what an earlier run
        wrote (images, metadata, settings, judge.json; nothing else); then record ``settings``."""
        import shutil

        if overwrite:
            for name in GENERATED:
                path = self.root / name
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
        self.root.mkdir(parents=True, exist_ok=True)
        if self.settings() != settings:
            write_json_atomic(self.root / SETTINGS, settings)

    def write(
        self, name: str, initial: Image, calibrated: list[Image], record: dict[str, Any]
    ) -> dict[str, Any]:
        """Write one prompt's images, then its metadata line; returns the line."""
        for sub in ("initial", "calibrated", "compare"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        files = {"initial": f"initial/{name}.png"}
        save_image_atomic(initial, self.root / files["initial"])
        for r, image in enumerate(calibrated):
            last = r == len(calibrated) - 1
            key = "calibrated" if last else f"calibrated_round{r + 1}"
            files[key] = f"calibrated/{name}.png" if last else f"calibrated/{name}-round{r + 1}.png"
            save_image_atomic(image, self.root / files[key])
        files["compare"] = f"compare/{name}.png"
        save_image_atomic(side_by_side([initial, *calibrated]), self.root / files["compare"])
        line = {"name": name, **record, "files": files}
        append_lines(self.root / METADATA, [line])
        return line


def append_lines(path: Path, records: list[dict[str, Any]]) -> None:
    """Append one JSON line per record to ``path`` in one write, on a fresh line: a line cut short by
    a kill has no newline, and the next must never be glued to it."""
    fresh = not path.exists() or path.stat().st_size == 0 or _last_byte(path) == b"\n"
    text = "".join(json.dumps(record) + "\n" for record in records)
    with open(path, "ab") as f:
        f.write((("" if fresh else "\n") + text).encode("utf-8"))


def _last_byte(path: Path) -> bytes:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1)
