"""Preference pairs (prompt, preferred image w, unpreferred image l) for training the Implicit Aligner.

Two kinds of source:

- **Pick-a-Pic v2 parquet** (columns ``caption``, ``jpg_0``, ``jpg_1`` (JPEG bytes), ``label_0``,
  ``label_1``, and optionally ``has_label`` and ``ranking_id``; other columns are not read): a ``.parquet``
  file, a local folder of them (searched recursively, ordered by relative path), or a hub dataset id
  ``owner/name`` or ``owner/name/subfolder`` (or ``owner/name/path/file.parquet``). Hub files are fetched
  one at a time with ``hf_hub_download`` and work offline (``HF_HUB_OFFLINE=1``) from the hub cache.
  Labels ``(1, 0)`` prefer image 0 and ``(0, 1)`` image 1; ties ``(0.5, 0.5)`` are dropped and counted;
  rows with ``has_label`` False, or labels that say neither, are dropped and counted as unlabeled.
- **JSONL** (``.jsonl``) for one's own data: one object per line, ``{"prompt": str, "chosen": path,
  "rejected": path}``, image paths relative to the JSONL file (absolute paths allowed; other keys are
  ignored). A malformed line is an error naming the file and line; the whole file is checked before
  any image is decoded.

Rows are numbered 0, 1, ... over the rows of all files in order, counting dropped rows too (for JSONL:
the non-blank lines), so ``PreferencePair.index`` is stable for a given source and ``start``/``stop``
select fixed row ranges: the feature stage cuts the rows into shards and gives each process every
n-th shard. Files and row groups outside ``[start, stop)`` are skipped from the parquet metadata, without
reading their data. A hub listing is pinned to one commit per call; pass ``revision=`` (a commit) to pin
it across runs. Offline, a hub id lists the parquet files of the cached snapshot.

Reading streams: one file open at a time, ``BATCH_ROWS`` rows decoded from arrow at a time, column
chunks read page by page (no pre-buffering of a row group). An image that does not decode skips its
row, which is counted in ``PairStats.undecodable`` by row id and logged; iteration goes on.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from img_guidance.data import sources
from img_guidance.data.sources import JsonlRow, ParquetRow, UndecodableImage, is_binary, is_number, is_text

if TYPE_CHECKING:
    from PIL import Image

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0", "label_1")
OPTIONAL_COLUMNS = ("has_label", "ranking_id")
JSONL_KEYS = ("prompt", "chosen", "rejected")

# Rows turned into Python objects at a time: a batch holds 2 x BATCH_ROWS encoded images.
BATCH_ROWS = 16

_FORMAT = sources.SourceFormat(
    items="pairs",
    parquet="a Pick-a-Pic parquet",
    columns=dict(zip(REQUIRED_COLUMNS, (is_text, is_binary, is_binary, is_number, is_number), strict=True)),
    column_types="string caption, binary images, numeric labels",
    optional_columns=OPTIONAL_COLUMNS,
    jsonl_keys=JSONL_KEYS,
)


@dataclass
class PreferencePair:
    """One usable row: the preferred image w and the unpreferred image l for ``prompt``."""

    index: int  # the row's global index in the source (0-based, dropped rows counted)
    row_id: str  # "train-0001.parquet:17 ranking_id=123" (row number in the file, 0-based) or "pairs.jsonl:5"
    prompt: str
    preferred: Image.Image  # RGB
    unpreferred: Image.Image  # RGB


@dataclass
class PairStats:
    """What ``iter_pairs`` did with the rows it looked at; pass one in and read it as you go.

    ``rows == pairs + ties + unlabeled + len(undecodable)`` once iteration is done."""

    rows: int = 0  # rows looked at (those in [start, stop))
    pairs: int = 0  # pairs yielded
    ties: int = 0
    unlabeled: int = 0  # has_label False, or labels that are neither a tie nor 0/1
    undecodable: list[str] = field(default_factory=list)  # row ids of rows with an image that does not decode

    def as_dict(self) -> dict:
        return asdict(self)


def count_rows(
    source: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
) -> int:
    """The number of rows of ``source`` (dropped rows included), from parquet metadata or the JSONL line
    count, without decoding any image. Hub parquet files are fetched (their footers are read)."""
    return sources.count_rows(
        source, _FORMAT, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only
    )


def iter_pairs(
    source: str | os.PathLike,
    *,
    start: int = 0,
    stop: int | None = None,
    stats: PairStats | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
) -> Iterator[PreferencePair]:
    """Stream the preference pairs of the rows ``[start, stop)`` of ``source`` (see the module docstring).

    The source is resolved (and a JSONL file checked) when this is called, not at the first ``next``.
    ``stats``, when given, is updated in place as rows go by. ``revision``, ``cache_dir`` and
    ``local_files_only`` apply to hub ids only.
    """
    rows = sources.iter_rows(
        source,
        _FORMAT,
        start=start,
        stop=stop,
        keep=None,
        batch_rows=BATCH_ROWS,
        revision=revision,
        cache_dir=cache_dir,
        local_files_only=local_files_only,
    )
    return _iter_pairs(rows, PairStats() if stats is None else stats)


def _iter_pairs(
    rows: Iterator[ParquetRow] | Iterator[JsonlRow], stats: PairStats
) -> Iterator[PreferencePair]:
    for row in rows:
        stats.rows += 1
        if isinstance(row, JsonlRow):
            row_id, prompt, sides = row.row_id, row.value("prompt"), ("chosen", "rejected")
        else:
            ranking_id = row.value("ranking_id") if row.has("ranking_id") else None
            row_id = row.row_id if ranking_id is None else f"{row.row_id} ranking_id={ranking_id}"
            if row.has("has_label") and row.value("has_label") is False:
                stats.unlabeled += 1
                continue
            side = _preferred_side(row.value("label_0"), row.value("label_1"))
            if side == "tie":
                stats.ties += 1
                continue
            if side is None:
                stats.unlabeled += 1
                continue
            prompt, sides = row.value("caption") or "", (f"jpg_{side}", f"jpg_{1 - side}")
        try:  # image bytes are taken out only for rows kept
            preferred, unpreferred = row.image(sides[0]), row.image(sides[1])
        except UndecodableImage as err:
            sources.report_undecodable(stats.undecodable, row_id, err, logger)
            continue
        stats.pairs += 1
        yield PreferencePair(row.index, row_id, prompt, preferred, unpreferred)


def _preferred_side(label_0: float | None, label_1: float | None) -> int | str | None:
    """0 or 1 (the preferred image), "tie", or None for labels that say neither (null, (0, 0), ...)."""
    if label_0 == 0.5 and label_1 == 0.5:
        return "tie"
    if label_0 == 1 and label_1 == 0:
        return 0
    if label_0 == 0 and label_1 == 1:
        return 1
    return None
