"""Instruction triplets (original image I0, edited prompt T1, edit instruction TE) to finetune the detector.

The misalignment detector learns from InstructPix2Pix to say how an image should change to match a
prompt: shown I0 and asked about T1, it should answer TE. Two kinds of source:

- **InstructPix2Pix parquet**, the CLIP-filtered release (hub ``timbrooks/instructpix2pix-clip-filtered``,
  columns ``original_prompt``, ``original_image``, ``edit_prompt``, ``edited_prompt``, ``edited_image``):
  I0 is ``original_image``, T1 ``edited_prompt`` and TE ``edit_prompt``; only these three columns are
  read. An image column holds encoded bytes or a ``{"bytes", "path"}`` struct (the HF datasets ``Image``
  feature). A ``.parquet`` file, a local folder of them, or a hub dataset id ``owner/name[/subfolder]``,
  offline from the hub cache too (see :mod:`img_guidance.data.sources`).
- **JSONL** (``.jsonl``) for one's own data: one object per line, ``{"image": path, "prompt": T1,
  "instruction": TE}``, the image path relative to the JSONL file or absolute; other keys are ignored.
  A malformed line (bad JSON, a key missing, a value of the wrong type) is an error naming the file and
  line, raised before any image is decoded.

Row indices count every row of the source, so ``start``/``stop`` select fixed ranges, and ``keep`` (a
predicate on the row index, e.g. ``lambda i: i % world_size == rank``) deals rows to training processes:
a process decodes only the images of its own rows. A row whose prompt or instruction is empty (or null)
is skipped and counted as ``empty``; a row whose image does not decode is skipped, counted in
``TripletStats.undecodable`` by row id and logged.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from img_guidance.data import sources
from img_guidance.data.sources import JsonlRow, ParquetRow, UndecodableImage, is_image, is_text

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "IMAGE_COLUMN",
    "INSTRUCTION_COLUMN",
    "JSONL_KEYS",
    "PROMPT_COLUMN",
    "REQUIRED_COLUMNS",
    "InstructionTriplet",
    "TripletStats",
    "count_triplet_rows",
    "iter_triplets",
]

logger = logging.getLogger(__name__)

IMAGE_COLUMN = "original_image"  # I0
PROMPT_COLUMN = "edited_prompt"  # T1
INSTRUCTION_COLUMN = "edit_prompt"  # TE
# the only columns read, in the order image, prompt, instruction (as JSONL_KEYS)
REQUIRED_COLUMNS = (IMAGE_COLUMN, PROMPT_COLUMN, INSTRUCTION_COLUMN)
JSONL_KEYS = ("image", "prompt", "instruction")

# Rows turned into Python objects at a time: a batch holds BATCH_ROWS encoded images (one per row), as
# many as a batch of preference pairs.
BATCH_ROWS = 32

_FORMAT = sources.SourceFormat(
    items="triplets",
    parquet="an InstructPix2Pix parquet",
    columns={IMAGE_COLUMN: is_image, PROMPT_COLUMN: is_text, INSTRUCTION_COLUMN: is_text},
    column_types="an image as binary or a {bytes, path} struct, string prompts",
    jsonl_keys=JSONL_KEYS,
    jsonl_may_be_empty=("prompt", "instruction"),
)


@dataclass
class InstructionTriplet:
    """One usable row: the original image, the prompt it should match, and the edit that gets it there."""

    index: int  # the row's global index in the source (0-based, skipped rows counted)
    row_id: str  # "train-00000-of-00262.parquet:17" (row number in the file, 0-based) or "triplets.jsonl:5"
    image: Image.Image  # I0, RGB
    prompt: str  # T1, the edited (intended) prompt
    instruction: str  # TE, the edit instruction


@dataclass
class TripletStats:
    """What ``iter_triplets`` did with the rows it looked at; pass one in and read it as you go.

    ``rows == triplets + empty + len(undecodable)`` once iteration is done."""

    rows: int = 0  # rows looked at (those in [start, stop) that `keep` accepts)
    triplets: int = 0  # triplets yielded
    empty: int = 0  # an empty or null prompt or instruction
    undecodable: list[str] = field(default_factory=list)  # row ids of rows whose image does not decode

    def as_dict(self) -> dict:
        return asdict(self)


def count_triplet_rows(
    source: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
) -> int:
    """How many rows ``iter_triplets`` numbers in ``source``, read from parquet footers (hub files are
    fetched) or counted as the JSONL file's non-blank lines; no image is decoded."""
    return sources.count_rows(
        source, _FORMAT, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only
    )


def iter_triplets(
    source: str | os.PathLike,
    *,
    start: int = 0,
    stop: int | None = None,
    keep: Callable[[int], bool] | None = None,
    stats: TripletStats | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
) -> Iterator[InstructionTriplet]:
    """Stream the triplets of the rows ``[start, stop)`` of ``source`` whose index ``keep`` accepts.

    ``keep`` is asked before anything of a row is decoded; rows it rejects are not counted in ``stats``.
    The source is resolved (and a JSONL file checked) when this is called, not at the first ``next``.
    ``stats``, when given, is updated in place as rows go by. ``revision``, ``cache_dir`` and
    ``local_files_only`` apply to hub ids only.
    """
    rows = sources.iter_rows(
        source,
        _FORMAT,
        start=start,
        stop=stop,
        keep=keep,
        batch_rows=BATCH_ROWS,
        revision=revision,
        cache_dir=cache_dir,
        local_files_only=local_files_only,
    )
    return _iter_triplets(rows, TripletStats() if stats is None else stats)


def _iter_triplets(
    rows: Iterator[ParquetRow] | Iterator[JsonlRow], stats: TripletStats
) -> Iterator[InstructionTriplet]:
    for row in rows:
        stats.rows += 1
        image_key, prompt_key, instruction_key = JSONL_KEYS if isinstance(row, JsonlRow) else REQUIRED_COLUMNS
        prompt, instruction = row.value(prompt_key), row.value(instruction_key)
        if not (prompt and prompt.strip() and instruction and instruction.strip()):
            stats.empty += 1
            continue
        try:
            image = row.image(image_key)
        except UndecodableImage as err:
            sources.report_undecodable(stats.undecodable, row.row_id, err, logger)
            continue
        stats.triplets += 1
        yield InstructionTriplet(row.index, row.row_id, image, prompt, instruction)
