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

import io
import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0", "label_1")
OPTIONAL_COLUMNS = ("has_label", "ranking_id")
JSONL_KEYS = ("prompt", "chosen", "rejected")

# Rows turned into Python objects at a time: a batch holds 2 x BATCH_ROWS encoded images.
BATCH_ROWS = 16
# Column chunks are read through a buffer of this size (page by page), not whole: a row group of
# Pick-a-Pic images can be gigabytes.
_READ_BUFFER_BYTES = 1 << 20


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


@dataclass(frozen=True)
class _ParquetPart:
    name: str  # shown in row ids: the path relative to the folder / inside the hub repo
    where: str  # shown in errors: the full local path or hub location
    fetch: Callable[[], Path]  # the local file (hub files are downloaded on the first call)


def count_rows(
    source: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
) -> int:
    """The number of rows of ``source`` (dropped rows included), from parquet metadata or the JSONL line
    count, without decoding any image. Hub parquet files are fetched (their footers are read)."""
    resolved = _resolve(source, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)
    if isinstance(resolved, Path):
        return sum(1 for _ in _jsonl_lines(resolved))
    total = 0
    for part in resolved:
        with _open_parquet(part.fetch(), part.where) as pf:
            total += pf.metadata.num_rows
    return total


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
    if not isinstance(start, int) or isinstance(start, bool) or start < 0:
        raise ValueError(f"start must be a non-negative integer, got {start!r}")
    if stop is not None and (not isinstance(stop, int) or isinstance(stop, bool) or stop < start):
        raise ValueError(f"stop must be None or an integer >= start ({start}), got {stop!r}")
    stats = PairStats() if stats is None else stats
    resolved = _resolve(source, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)
    if isinstance(resolved, Path):
        return _iter_jsonl(resolved, _read_jsonl(resolved, start=start, stop=stop), stats)
    return _iter_parquet(resolved, start=start, stop=stop, stats=stats)


# --- sources ---------------------------------------------------------------------------------------


def _resolve(
    source: str | os.PathLike,
    *,
    revision: str | None,
    cache_dir: str | os.PathLike | None,
    local_files_only: bool,
) -> Path | list[_ParquetPart]:
    """A JSONL file, or the parquet files of ``source`` in row order."""
    path = Path(source)
    if not path.exists():
        return _hub_parts(
            os.fspath(source), revision=revision, cache_dir=cache_dir, local_files_only=local_files_only
        )
    if path.is_dir():
        files = sorted(
            (p for p in path.rglob("*.parquet") if p.is_file()), key=lambda p: p.relative_to(path).as_posix()
        )
        if not files:
            raise FileNotFoundError(f"{path} holds no .parquet files (searched recursively)")
        return [_ParquetPart(p.relative_to(path).as_posix(), str(p), partial(Path, p)) for p in files]
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return path
    if suffix == ".parquet":
        return [_ParquetPart(path.name, str(path), partial(Path, path))]
    raise ValueError(
        f"{path}: unsupported file type {suffix!r} (use a .parquet file, a folder of them, a .jsonl file "
        "or a hub dataset id owner/name[/subfolder])"
    )


def _hub_parts(
    spec: str, *, revision: str | None, cache_dir: str | os.PathLike | None, local_files_only: bool
) -> list[_ParquetPart]:
    from img_guidance.hub import split_hub_path

    repo_id, sub = split_hub_path(spec)  # FileNotFoundError for strings that are no hub id either
    commit, files = _list_hub_dataset(
        repo_id, sub, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only
    )
    picked = sorted(
        f for f in files if f.endswith(".parquet") and (sub is None or f == sub or f.startswith(f"{sub}/"))
    )
    if not picked:
        raise FileNotFoundError(f"hub dataset {spec!r} (commit {commit}) holds no .parquet files")
    download = partial(
        _download, repo_id, revision=commit, cache_dir=cache_dir, local_files_only=local_files_only
    )
    return [_ParquetPart(f, f"{repo_id}/{f}", partial(download, f)) for f in picked]


def _list_hub_dataset(
    repo_id: str,
    sub: str | None,
    *,
    revision: str | None,
    cache_dir: str | os.PathLike | None,
    local_files_only: bool,
) -> tuple[str, list[str]]:
    """(commit, the repo's file paths at that commit), from the hub or, offline, from the cache."""
    from huggingface_hub import HfApi, is_offline_mode, snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    spec = repo_id if sub is None else f"{repo_id}/{sub}"
    where = f"hub dataset {spec!r}" + (f" at revision {revision!r}" if revision else "")
    online_error: Exception | None = None
    if not (local_files_only or is_offline_mode()):
        api = HfApi()
        try:
            # one commit for the listing and every download, so row indices cannot shift mid-run
            commit = api.dataset_info(repo_id, revision=revision).sha
            return commit, api.list_repo_files(repo_id, repo_type="dataset", revision=commit)
        except (RepositoryNotFoundError, RevisionNotFoundError) as err:
            raise FileNotFoundError(
                f"{where} is not a local path and was not found on the hub: {err}"
            ) from err
        except Exception as err:  # no connection, hub down: fall back on the cache, as hf_hub_download does
            online_error = err
    if sub is None:
        pattern = "*.parquet"  # fnmatch: * crosses folders
    elif sub.endswith(".parquet"):
        pattern = sub
    else:
        pattern = f"{sub}/*.parquet"
    try:
        # raises when the cache is known to miss some of these files (their row indices would shift)
        snapshot = Path(
            snapshot_download(
                repo_id,
                repo_type="dataset",
                revision=revision,
                cache_dir=cache_dir,
                local_files_only=True,
                allow_patterns=[pattern],
            )
        )
    except (OSError, ValueError) as err:
        why = "the hub is not used (offline)" if online_error is None else f"the hub failed ({online_error})"
        cache = cache_dir if cache_dir is not None else "the default hub cache"
        raise FileNotFoundError(
            f"{where} is not a local path and is not in {cache}, and {why}: {err}"
        ) from err
    return snapshot.name, [p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()]


def _download(
    repo_id: str,
    filename: str,
    *,
    revision: str,
    cache_dir: str | os.PathLike | None,
    local_files_only: bool,
) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        return Path(
            hf_hub_download(
                repo_id,
                filename,
                repo_type="dataset",
                revision=revision,
                cache_dir=cache_dir,
                local_files_only=local_files_only,
            )
        )
    except OSError as err:
        raise FileNotFoundError(
            f"could not get {filename!r} of hub dataset {repo_id!r} (commit {revision}): {err}"
        ) from err


# --- parquet -----------------------------------------------------------------------------------------


def _open_parquet(path: Path, where: str) -> pq.ParquetFile:
    """Open a parquet file for streaming and check that it has the Pick-a-Pic columns."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path, pre_buffer=False, buffer_size=_READ_BUFFER_BYTES)
    except (OSError, pa.ArrowException) as err:
        raise ValueError(f"{where}: not a readable parquet file ({err})") from err
    schema = pf.schema_arrow
    missing = [c for c in REQUIRED_COLUMNS if c not in schema.names]
    wrong = [
        f"{c} ({schema.field(c).type})"
        for c in REQUIRED_COLUMNS
        if c not in missing and not _column_type_ok(c, schema.field(c).type)
    ]
    if missing or wrong:
        pf.close()
        problem = f"lacks the column(s) {missing}" if missing else f"has columns of the wrong type: {wrong}"
        raise ValueError(
            f"{where} {problem}; a Pick-a-Pic parquet needs {list(REQUIRED_COLUMNS)} (string caption, "
            f"binary images, numeric labels); it has {schema.names}"
        )
    return pf


def _column_type_ok(column: str, type_: pa.DataType) -> bool:
    import pyarrow as pa

    if column == "caption":
        return pa.types.is_string(type_) or pa.types.is_large_string(type_)
    if column.startswith("jpg_"):
        return pa.types.is_binary(type_) or pa.types.is_large_binary(type_)
    return pa.types.is_floating(type_) or pa.types.is_integer(type_)  # label_0, label_1


def _iter_parquet(
    parts: list[_ParquetPart], *, start: int, stop: int | None, stats: PairStats
) -> Iterator[PreferencePair]:
    offset = 0  # global index of the current file's first row
    for part in parts:
        if stop is not None and offset >= stop:
            return  # later files are not even fetched
        with _open_parquet(part.fetch(), part.where) as pf:
            num_rows = pf.metadata.num_rows
            if offset + num_rows > start:
                yield from _iter_parquet_file(
                    pf, part.name, offset=offset, start=start, stop=stop, stats=stats
                )
        offset += num_rows


def _iter_parquet_file(
    pf: pq.ParquetFile, name: str, *, offset: int, start: int, stop: int | None, stats: PairStats
) -> Iterator[PreferencePair]:
    columns = [*REQUIRED_COLUMNS, *(c for c in OPTIONAL_COLUMNS if c in pf.schema_arrow.names)]
    group_start = offset  # global index of the current row group's first row
    for group in range(pf.metadata.num_row_groups):
        group_rows = pf.metadata.row_group(group).num_rows
        # [lo, hi): the part of [start, stop) inside this group, as row numbers within the group
        lo = max(start - group_start, 0)
        hi = group_rows if stop is None else min(stop - group_start, group_rows)
        if lo < hi:
            batch_start = 0  # row number within the group of the batch's first row
            for batch in pf.iter_batches(batch_size=BATCH_ROWS, row_groups=[group], columns=columns):
                if batch_start >= hi:
                    break
                first, last = max(lo - batch_start, 0), min(hi - batch_start, batch.num_rows)
                if first < last:
                    yield from _batch_pairs(
                        batch,
                        range(first, last),
                        name=name,
                        first_index=group_start + batch_start,
                        first_file_row=group_start + batch_start - offset,
                        stats=stats,
                    )
                batch_start += batch.num_rows
        group_start += group_rows


def _batch_pairs(
    batch: pa.RecordBatch,
    rows: range,
    *,
    name: str,
    first_index: int,
    first_file_row: int,
    stats: PairStats,
) -> Iterator[PreferencePair]:
    """The pairs of ``rows`` (positions in ``batch``); image bytes are taken out only for rows kept."""
    names = batch.schema.names
    captions = batch.column("caption").to_pylist()
    labels_0, labels_1 = batch.column("label_0").to_pylist(), batch.column("label_1").to_pylist()
    has_label = batch.column("has_label").to_pylist() if "has_label" in names else None
    ranking_ids = batch.column("ranking_id").to_pylist() if "ranking_id" in names else None
    for j in rows:
        stats.rows += 1
        row_id = f"{name}:{first_file_row + j}"
        if ranking_ids is not None and ranking_ids[j] is not None:
            row_id += f" ranking_id={ranking_ids[j]}"
        if has_label is not None and has_label[j] is False:
            stats.unlabeled += 1
            continue
        side = _preferred_side(labels_0[j], labels_1[j])
        if side == "tie":
            stats.ties += 1
            continue
        if side is None:
            stats.unlabeled += 1
            continue
        images = []
        for column in (f"jpg_{side}", f"jpg_{1 - side}"):
            try:
                images.append(_decode(batch.column(column)[j].as_py()))
            except _UndecodableImage as err:
                _report_undecodable(stats, row_id, column, err)
                break
        else:
            stats.pairs += 1
            yield PreferencePair(first_index + j, row_id, captions[j] or "", images[0], images[1])


def _preferred_side(label_0: float | None, label_1: float | None) -> int | str | None:
    """0 or 1 (the preferred image), "tie", or None for labels that say neither (null, (0, 0), ...)."""
    if label_0 == 0.5 and label_1 == 0.5:
        return "tie"
    if label_0 == 1 and label_1 == 0:
        return 0
    if label_0 == 0 and label_1 == 1:
        return 1
    return None


# --- JSONL -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _JsonlRow:
    index: int
    line: int
    prompt: str
    chosen: str
    rejected: str


def _jsonl_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) of the non-blank lines; the rows of a JSONL source."""
    empty = True
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if line.strip():
                empty = False
                yield n, line
    if empty:
        raise ValueError(f"{path} holds no pairs")


def _read_jsonl(path: Path, *, start: int, stop: int | None) -> list[_JsonlRow]:
    """Check every line of ``path`` (text only, no images) and keep the rows in [start, stop)."""
    kept = []
    for index, (n, line) in enumerate(_jsonl_lines(path)):
        where = f"{path}:{n}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: not valid JSON ({err.msg})") from err
        if not isinstance(entry, dict):
            raise ValueError(
                f"{where}: expected an object with keys {list(JSONL_KEYS)}, got {type(entry).__name__}"
            )
        missing = [k for k in JSONL_KEYS if k not in entry]
        if missing:
            raise ValueError(f"{where}: missing key(s) {missing} (expected {list(JSONL_KEYS)})")
        for key in JSONL_KEYS:
            if not isinstance(entry[key], str) or not entry[key].strip():
                raise ValueError(f"{where}: {key!r} must be a non-empty string, got {entry[key]!r}")
        if index >= start and (stop is None or index < stop):
            kept.append(_JsonlRow(index, n, entry["prompt"], entry["chosen"], entry["rejected"]))
    return kept


def _iter_jsonl(path: Path, rows: list[_JsonlRow], stats: PairStats) -> Iterator[PreferencePair]:
    for row in rows:
        stats.rows += 1
        row_id = f"{path.name}:{row.line}"
        images = []
        for key, image in (("chosen", row.chosen), ("rejected", row.rejected)):
            try:
                images.append(_decode(path.parent / image))  # an absolute image path stays as it is
            except _UndecodableImage as err:
                _report_undecodable(stats, row_id, f"{key} ({image})", err)
                break
        else:
            stats.pairs += 1
            yield PreferencePair(row.index, row_id, row.prompt, images[0], images[1])


# --- images ------------------------------------------------------------------------------------------


class _UndecodableImage(Exception):
    """An image that is missing, truncated, corrupt or not an image."""


def _decode(data: bytes | Path | None) -> Image.Image:
    """An RGB image from encoded bytes or a file, fully loaded."""
    from PIL import Image

    if data is None:
        raise _UndecodableImage("the image is null")
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as image:
            return image.convert("RGB")
    # OSError: unidentified, truncated or missing files; the others: corrupt headers, pixel bombs
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise _UndecodableImage(f"{type(err).__name__}: {err}") from err


def _report_undecodable(stats: PairStats, row_id: str, which: str, err: _UndecodableImage) -> None:
    stats.undecodable.append(row_id)
    logger.warning("skipping %s: image %s does not decode (%s)", row_id, which, err)
