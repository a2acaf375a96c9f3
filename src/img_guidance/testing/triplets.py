"""Tiny instruction-triplet data sets in the formats ``img_guidance.data.triplets`` reads.

- ``write_instructpix2pix_parquet(path, rows)``: a parquet file with every column of the CLIP-filtered
  InstructPix2Pix schema (``INSTRUCTPIX2PIX_COLUMNS``), the images as PNG bytes or, with
  ``image_as_struct=True``, as ``{"bytes", "path"}`` structs (the HF datasets ``Image`` feature);
- ``write_triplets_jsonl(folder, rows)``: ``folder/triplets.jsonl`` and PNG images under
  ``folder/images``, referenced by relative paths.

Images are small solid colours (``solid("red")``), told apart with ``img_guidance.testing.pairs.is_colour``;
``GARBAGE`` (from the same module) is bytes that do not decode.
Example::

    write_instructpix2pix_parquet(tmp_path / "train-00000-of-00002.parquet", [
        TripletRow(solid("red"), "a blue cube", "make it blue"),
        TripletRow(GARBAGE, "a cat", "add a cat"),            # the image does not decode
        TripletRow(None, "a dog", "add a dog"),               # a null image (a missing file in JSONL)
        TripletRow(solid("red"), "", "make it blue"),         # an empty prompt
    ], row_group_size=2)
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from img_guidance.testing.pairs import Colour

if TYPE_CHECKING:
    from PIL import Image

# The columns of timbrooks/instructpix2pix-clip-filtered, in the order of the released files.
INSTRUCTPIX2PIX_COLUMNS = (
    "original_prompt",
    "original_image",
    "edit_prompt",
    "edited_prompt",
    "edited_image",
)


@dataclass(frozen=True)
class TripletRow:
    """One row. ``image`` is a PIL image (written as PNG), encoded bytes written as they are (JPEG, or
    ``GARBAGE`` for an image that does not decode), or None (a null image; in JSONL, a path to a file
    that is not written). ``edited_image`` defaults to a white image; the reader never looks at it."""

    image: Image.Image | bytes | None
    prompt: str | None  # edited_prompt, T1
    instruction: str | None  # edit_prompt, TE
    original_prompt: str = "a photo"
    edited_image: Image.Image | bytes | None = None


def solid(colour: Colour, *, mode: str = "RGB", size: int = 8) -> Image.Image:
    from PIL import Image

    return Image.new(mode, (size, size), colour)


def _encoded(image: Image.Image | bytes | None) -> bytes | None:
    if image is None or isinstance(image, bytes):
        return image
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_instructpix2pix_parquet(
    path: str | os.PathLike, rows: list[TripletRow], *, row_group_size: int = 2, image_as_struct: bool = False
) -> Path:
    """Write ``rows`` as an InstructPix2Pix parquet file at ``path`` (parents created); return the path.

    Row groups hold ``row_group_size`` rows, so small files still have several of them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    originals = [_encoded(row.image) for row in rows]
    edited = [_encoded(solid("white") if row.edited_image is None else row.edited_image) for row in rows]
    image_type = pa.binary()
    if image_as_struct:
        image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
        originals = [{"bytes": data, "path": f"{i:07d}_0.png"} for i, data in enumerate(originals)]
        edited = [{"bytes": data, "path": f"{i:07d}_1.png"} for i, data in enumerate(edited)]
    values = {
        "original_prompt": pa.array([row.original_prompt for row in rows], pa.string()),
        "original_image": pa.array(originals, image_type),
        "edit_prompt": pa.array([row.instruction for row in rows], pa.string()),
        "edited_prompt": pa.array([row.prompt for row in rows], pa.string()),
        "edited_image": pa.array(edited, image_type),
    }
    table = pa.table({name: values[name] for name in INSTRUCTPIX2PIX_COLUMNS})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def write_triplets_jsonl(
    folder: str | os.PathLike, rows: list[TripletRow], *, name: str = "triplets.jsonl"
) -> Path:
    """Write ``folder/name`` (one line per row) and its images under ``folder/images``; return the JSONL
    path. Image paths in the file are relative to ``folder``; a None image's file is not written."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, row in enumerate(rows):
        relative = f"images/{i:04d}.png"
        data = _encoded(row.image)
        if data is not None:
            (folder / relative).write_bytes(data)
        lines.append(json.dumps({"image": relative, "prompt": row.prompt, "instruction": row.instruction}))
    path = folder / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
