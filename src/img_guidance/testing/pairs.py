"""Tiny preference-pair data sets in the formats ``img_guidance.data.pairs`` reads.

- ``write_pickapic_parquet(path, rows)``: a parquet file with every column of the Pick-a-Pic v2 schema
  (``PICKAPIC_COLUMNS``), the images as JPEG bytes;
- ``write_pairs_jsonl(folder, rows)``: ``folder/pairs.jsonl`` and PNG images under ``folder/images``,
  referenced by relative paths.

Every image is a small solid colour, so a test can tell which one came back with
``is_colour(image, "red")`` (JPEG moves colours by a few levels). Example::

    write_pickapic_parquet(tmp_path / "train-0000.parquet", [
        PickapicRow("a red cube"),                                  # image 0 (red) preferred
        PickapicRow("a blue ball", labels=PREFER_1),                # image 1 (blue) preferred
        PickapicRow("a tie", labels=TIE),                           # dropped, counted as a tie
        PickapicRow("not rated", has_label=False),                  # dropped, counted as unlabeled
        PickapicRow("broken", broken=1),                            # jpg_1 is garbage bytes
    ], row_group_size=2)
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

Colour = str | tuple[int, int, int]  # a PIL colour name or RGB

PREFER_0 = (1.0, 0.0)
PREFER_1 = (0.0, 1.0)
TIE = (0.5, 0.5)

# The Pick-a-Pic v2 columns, in the order of the released files.
PICKAPIC_COLUMNS = (
    "are_different",
    "best_image_uid",
    "caption",
    "created_at",
    "has_label",
    "image_0_uid",
    "image_0_url",
    "image_1_uid",
    "image_1_url",
    "jpg_0",
    "jpg_1",
    "label_0",
    "label_1",
    "model_0",
    "model_1",
    "num_example_per_prompt",
    "ranking_id",
    "user_id",
)

GARBAGE = b"this is not an image"


@dataclass(frozen=True)
class PickapicRow:
    """One Pick-a-Pic row.

    ``labels``: (label_0, label_1); ``PREFER_0`` = (1, 0), ``PREFER_1`` = (0, 1), ``TIE`` = (0.5, 0.5),
    or anything else (``(None, None)``, ``(0.3, 0.7)``) for labels that say neither.
    ``broken``: 0 or 1 writes that image as garbage bytes (it will not decode).
    ``ranking_id``: defaults to the row's position in its file.
    """

    caption: str
    colours: tuple[Colour, Colour] = ("red", "blue")
    labels: tuple[float | None, float | None] = PREFER_0
    has_label: bool = True
    broken: int | None = None
    ranking_id: int | None = None


@dataclass(frozen=True)
class JsonlPair:
    """One JSONL line. ``broken`` ("chosen" or "rejected") writes that image as garbage bytes;
    ``missing`` (same values) points that key at a file that is not written."""

    prompt: str
    chosen: Colour = "red"
    rejected: Colour = "blue"
    broken: str | None = None
    missing: str | None = None


def encode_image(colour: Colour, *, format: str = "JPEG", size: int = 8) -> bytes:
    """A ``size`` x ``size`` solid-colour image, encoded."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format=format)
    return buffer.getvalue()


def is_colour(image, colour: Colour, *, tolerance: int = 12) -> bool:
    """Whether ``image`` (a PIL image) is ``colour`` at its centre, within ``tolerance`` per channel."""
    from PIL import ImageColor

    expected = ImageColor.getrgb(colour) if isinstance(colour, str) else colour
    actual = image.convert("RGB").getpixel((image.width // 2, image.height // 2))
    return all(abs(a - e) <= tolerance for a, e in zip(actual, expected, strict=True))


def write_pickapic_parquet(
    path: str | os.PathLike, rows: list[PickapicRow], *, row_group_size: int = 2, image_size: int = 8
) -> Path:
    """Write ``rows`` as a Pick-a-Pic v2 parquet file at ``path`` (parents created) and return the path.

    Row groups hold ``row_group_size`` rows, so small files still have several of them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns: dict[str, list] = {name: [] for name in PICKAPIC_COLUMNS}
    for i, row in enumerate(rows):
        ranking_id = i if row.ranking_id is None else row.ranking_id
        uids = [f"{ranking_id:08d}-0", f"{ranking_id:08d}-1"]
        images = [
            GARBAGE if row.broken == k else encode_image(row.colours[k], size=image_size) for k in (0, 1)
        ]
        winner = {PREFER_0: 0, PREFER_1: 1}.get(tuple(row.labels)) if row.has_label else None
        values = {
            "are_different": row.colours[0] != row.colours[1],
            "best_image_uid": "" if winner is None else uids[winner],
            "caption": row.caption,
            "created_at": datetime(2023, 5, 1, 12, 0, i % 60),
            "has_label": row.has_label,
            "image_0_uid": uids[0],
            "image_0_url": f"https://example.invalid/{uids[0]}.jpg",
            "image_1_uid": uids[1],
            "image_1_url": f"https://example.invalid/{uids[1]}.jpg",
            "jpg_0": images[0],
            "jpg_1": images[1],
            "label_0": row.labels[0],
            "label_1": row.labels[1],
            "model_0": "tiny-model-a",
            "model_1": "tiny-model-b",
            "num_example_per_prompt": 1,
            "ranking_id": ranking_id,
            "user_id": 7,
        }
        for name, value in values.items():
            columns[name].append(value)
    types = {
        "are_different": pa.bool_(),
        "created_at": pa.timestamp("ns"),
        "has_label": pa.bool_(),
        "jpg_0": pa.binary(),
        "jpg_1": pa.binary(),
        "label_0": pa.float64(),
        "label_1": pa.float64(),
        "num_example_per_prompt": pa.int64(),
        "ranking_id": pa.int64(),
        "user_id": pa.int64(),
    }
    schema = pa.schema([(name, types.get(name, pa.string())) for name in PICKAPIC_COLUMNS])
    pq.write_table(pa.table(columns, schema=schema), path, row_group_size=row_group_size)
    return path


def write_pairs_jsonl(folder: str | os.PathLike, rows: list[JsonlPair], *, name: str = "pairs.jsonl") -> Path:
    """Write ``folder/name`` (one line per row) and its PNG images under ``folder/images``; return the
    JSONL path. Image paths in the file are relative to ``folder``."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, row in enumerate(rows):
        entry = {"prompt": row.prompt}
        for key, colour in (("chosen", row.chosen), ("rejected", row.rejected)):
            relative = f"images/{i:04d}_{key}.png"
            if row.missing != key:
                data = GARBAGE if row.broken == key else encode_image(colour, format="PNG")
                (folder / relative).write_bytes(data)
            entry[key] = relative
        lines.append(json.dumps(entry))
    path = folder / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
