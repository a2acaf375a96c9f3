"""Row sources shared by the data readers (``pairs``, ``triplets``): where rows come from and how they stream.

A source is one of:

- a ``.parquet`` file, a local folder of them (searched recursively, ordered by relative path), or a hub
  dataset id ``owner/name``, ``owner/name/subfolder`` or ``owner/name/path/file.parquet``. Hub files are
  fetched one at a time with ``hf_hub_download``; the listing is pinned to one commit per call
  (``revision=`` pins it across runs), and offline (``HF_HUB_OFFLINE=1``) it is the cached snapshot's;
- a ``.jsonl`` file: one object per non-blank line, image paths relative to the file (or absolute).

Rows are numbered 0, 1, ... over all files in order (for JSONL: over the non-blank lines). A reader asks
for the rows ``[start, stop)`` that its ``keep`` predicate accepts; files and row groups holding none
of them are skipped from the parquet metadata, and a JSONL file is checked whole before any row is
returned. Parquet streams one file at a time, ``batch_rows`` rows at a time, column chunks read page by
page. Each format module (a ``SourceFormat``) names the columns it reads and turns a ``ParquetRow`` or
``JsonlRow`` into its items; an image is decoded only when the format asks for it (``row.image``).
"""

from __future__ import annotations

import io
import json
import logging
import os
from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

# Column chunks are read through a buffer of this size (page by page), not whole: a row group of
# images can be gigabytes.
_READ_BUFFER_BYTES = 1 << 20


# --- column types (pyarrow is imported only when a file is checked) ---------------------------------


def is_text(type_: pa.DataType) -> bool:
    import pyarrow as pa

    return pa.types.is_string(type_) or pa.types.is_large_string(type_)


def is_binary(type_: pa.DataType) -> bool:
    import pyarrow as pa

    return pa.types.is_binary(type_) or pa.types.is_large_binary(type_)


def is_number(type_: pa.DataType) -> bool:
    import pyarrow as pa

    return pa.types.is_floating(type_) or pa.types.is_integer(type_)


def is_image(type_: pa.DataType) -> bool:
    """Encoded image bytes, or a struct with a binary ``bytes`` field (the HF datasets ``Image`` feature)."""
    import pyarrow as pa

    if pa.types.is_struct(type_):
        index = type_.get_field_index("bytes")
        return index >= 0 and is_binary(type_.field(index).type)
    return is_binary(type_)


@dataclass(frozen=True)
class SourceFormat:
    """What a reader needs of its sources; the error messages quote it."""

    items: str  # what the rows hold, plural: "pairs" ("x.jsonl holds no pairs")
    parquet: str  # "a Pick-a-Pic parquet"
    columns: Mapping[str, Callable[[pa.DataType], bool]]  # required parquet columns and their type check
    column_types: str  # the type checks in words: "string caption, binary images, numeric labels"
    optional_columns: tuple[str, ...] = ()  # read when a file has them
    jsonl_keys: tuple[str, ...] = ()  # required keys, non-empty strings ...
    jsonl_may_be_empty: tuple[str, ...] = ()  # ... except these, which may also be "" or null


# --- rows ----------------------------------------------------------------------------------------------


class UndecodableImage(Exception):
    """An image that is missing, truncated, corrupt or not an image; ``which`` names it in its row."""

    def __init__(self, which: str, reason: str) -> None:
        super().__init__(reason)
        self.which = which


@dataclass(frozen=True)
class ParquetRow:
    index: int  # global row index in the source
    row_id: str  # "<file>:<row in file, 0-based>", the file named by its path in the folder / hub repo
    batch: pa.RecordBatch
    position: int  # the row's position in ``batch``

    def has(self, column: str) -> bool:
        return column in self.batch.schema.names

    def value(self, column: str) -> Any:
        return self.batch.column(column)[self.position].as_py()

    def image(self, column: str) -> Image.Image:
        data = self.value(column)
        if isinstance(data, dict):  # {"bytes": ..., "path": ...}; a path alone points off this machine
            data = data.get("bytes")
        return decode_image(data, which=column)


@dataclass(frozen=True)
class JsonlRow:
    index: int  # global row index in the source (the non-blank lines, 0-based)
    row_id: str  # "<file name>:<line, 1-based>"
    entry: dict
    folder: Path  # the JSONL file's folder, which relative image paths start from

    def value(self, key: str) -> Any:
        return self.entry[key]

    def image(self, key: str) -> Image.Image:
        # an absolute image path stays as it is
        return decode_image(self.folder / self.entry[key], which=f"{key} ({self.entry[key]})")


def decode_image(data: bytes | Path | None, *, which: str) -> Image.Image:
    """An RGB image from encoded bytes or a file, fully loaded; ``UndecodableImage`` when it is not one."""
    from PIL import Image

    if data is None:
        raise UndecodableImage(which, "the image is null")
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as image:
            return image.convert("RGB")
    # OSError: unidentified, truncated or missing files; the others: corrupt headers, pixel bombs
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise UndecodableImage(which, f"{type(err).__name__}: {err}") from err


def report_undecodable(
    undecodable: list[str], row_id: str, err: UndecodableImage, logger: logging.Logger
) -> None:
    undecodable.append(row_id)
    logger.warning("skipping %s: image %s does not decode (%s)", row_id, err.which, err)


# --- reading -------------------------------------------------------------------------------------------


def count_rows(
    source: str | os.PathLike,
    fmt: SourceFormat,
    *,
    revision: str | None,
    cache_dir: str | os.PathLike | None,
    local_files_only: bool,
) -> int:
    """The number of rows of ``source``, from parquet metadata or the JSONL line count."""
    resolved = _resolve(source, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)
    if isinstance(resolved, Path):
        return sum(1 for _ in _jsonl_lines(resolved, fmt))
    total = 0
    for part in resolved:
        with _open_parquet(part.fetch(), part.where, fmt) as pf:
            total += pf.metadata.num_rows
    return total


def iter_rows(
    source: str | os.PathLike,
    fmt: SourceFormat,
    *,
    start: int,
    stop: int | None,
    keep: Callable[[int], bool] | None,
    batch_rows: int,
    revision: str | None,
    cache_dir: str | os.PathLike | None,
    local_files_only: bool,
) -> Iterator[ParquetRow] | Iterator[JsonlRow]:
    """The rows ``[start, stop)`` of ``source`` that ``keep`` accepts (all when None), in order.

    The range is checked, the source resolved and a JSONL file read and checked now, not at the first
    ``next``. Parquet rows come from streamed record batches of the format's columns; nothing of a row
    is decoded until the caller asks for it."""
    if not isinstance(start, int) or isinstance(start, bool) or start < 0:
        raise ValueError(f"start must be a non-negative integer, got {start!r}")
    if stop is not None and (not isinstance(stop, int) or isinstance(stop, bool) or stop < start):
        raise ValueError(f"stop must be None or an integer >= start ({start}), got {stop!r}")
    if keep is not None and not callable(keep):
        raise ValueError(f"keep must be None or a function of the row index, got {keep!r}")
    resolved = _resolve(source, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)
    if isinstance(resolved, Path):
        return iter(_read_jsonl(resolved, fmt, start=start, stop=stop, keep=keep))
    return _iter_parquet(resolved, fmt, start=start, stop=stop, keep=keep, batch_rows=batch_rows)


# --- sources -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ParquetPart:
    name: str  # shown in row ids: the path relative to the folder / inside the hub repo
    where: str  # shown in errors: the full local path or hub location
    fetch: Callable[[], Path]  # the local file (hub files are downloaded on the first call)


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


def _open_parquet(path: Path, where: str, fmt: SourceFormat) -> pq.ParquetFile:
    """Open a parquet file for streaming and check that it has the format's columns."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path, pre_buffer=False, buffer_size=_READ_BUFFER_BYTES)
    except (OSError, pa.ArrowException) as err:
        raise ValueError(f"{where}: not a readable parquet file ({err})") from err
    schema = pf.schema_arrow
    missing = [c for c in fmt.columns if c not in schema.names]
    wrong = [
        f"{c} ({schema.field(c).type})"
        for c, type_ok in fmt.columns.items()
        if c not in missing and not type_ok(schema.field(c).type)
    ]
    if missing or wrong:
        pf.close()
        problem = f"lacks the column(s) {missing}" if missing else f"has columns of the wrong type: {wrong}"
        raise ValueError(
            f"{where} {problem}; {fmt.parquet} needs {list(fmt.columns)} ({fmt.column_types}); "
            f"it has {schema.names}"
        )
    return pf


def _iter_parquet(
    parts: list[_ParquetPart],
    fmt: SourceFormat,
    *,
    start: int,
    stop: int | None,
    keep: Callable[[int], bool] | None,
    batch_rows: int,
) -> Iterator[ParquetRow]:
    offset = 0  # global index of the current file's first row
    for part in parts:
        if stop is not None and offset >= stop:
            return  # later files are not even fetched
        with _open_parquet(part.fetch(), part.where, fmt) as pf:
            num_rows = pf.metadata.num_rows
            if offset + num_rows > start:
                yield from _iter_parquet_file(
                    pf,
                    fmt,
                    part.name,
                    offset=offset,
                    start=start,
                    stop=stop,
                    keep=keep,
                    batch_rows=batch_rows,
                )
        offset += num_rows


def _iter_parquet_file(
    pf: pq.ParquetFile,
    fmt: SourceFormat,
    name: str,
    *,
    offset: int,
    start: int,
    stop: int | None,
    keep: Callable[[int], bool] | None,
    batch_rows: int,
) -> Iterator[ParquetRow]:
    columns = [*fmt.columns, *(c for c in fmt.optional_columns if c in pf.schema_arrow.names)]
    group_start = offset  # global index of the current row group's first row
    for group in range(pf.metadata.num_row_groups):
        group_rows = pf.metadata.row_group(group).num_rows
        # the rows of [start, stop) in this group that `keep` accepts, as sorted row numbers within the
        # group; a group with none is not read
        lo = max(start - group_start, 0)
        hi = group_rows if stop is None else min(stop - group_start, group_rows)
        wanted = range(lo, hi) if keep is None else [r for r in range(lo, hi) if keep(group_start + r)]
        if wanted:
            batches = pf.iter_batches(batch_size=batch_rows, row_groups=[group], columns=columns)
            yield from _group_rows(
                batches, wanted, name=name, first_index=group_start, first_file_row=group_start - offset
            )
        group_start += group_rows


def _group_rows(
    batches: Iterator[pa.RecordBatch],
    wanted: Sequence[int],
    *,
    name: str,
    first_index: int,
    first_file_row: int,
) -> Iterator[ParquetRow]:
    """The rows ``wanted`` (sorted row numbers within the group) of a row group's batches."""
    batch_start = 0  # row number within the group of the batch's first row
    for batch in batches:
        if batch_start > wanted[-1]:
            break
        batch_end = batch_start + batch.num_rows
        for r in wanted[bisect_left(wanted, batch_start) : bisect_left(wanted, batch_end)]:
            yield ParquetRow(first_index + r, f"{name}:{first_file_row + r}", batch, r - batch_start)
        batch_start = batch_end


# --- JSONL -------------------------------------------------------------------------------------------


def _jsonl_lines(path: Path, fmt: SourceFormat) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) of the non-blank lines; the rows of a JSONL source."""
    empty = True
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if line.strip():
                empty = False
                yield n, line
    if empty:
        raise ValueError(f"{path} holds no {fmt.items}")


def _read_jsonl(
    path: Path, fmt: SourceFormat, *, start: int, stop: int | None, keep: Callable[[int], bool] | None
) -> list[JsonlRow]:
    """Check every line of ``path`` (text only, no images) and keep the rows in [start, stop) that
    ``keep`` accepts."""
    kept = []
    for index, (n, line) in enumerate(_jsonl_lines(path, fmt)):
        where = f"{path}:{n}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: not valid JSON ({err.msg})") from err
        if not isinstance(entry, dict):
            raise ValueError(
                f"{where}: expected an object with keys {list(fmt.jsonl_keys)}, got {type(entry).__name__}"
            )
        missing = [k for k in fmt.jsonl_keys if k not in entry]
        if missing:
            raise ValueError(f"{where}: missing key(s) {missing} (expected {list(fmt.jsonl_keys)})")
        for key in fmt.jsonl_keys:
            value = entry[key]
            if key in fmt.jsonl_may_be_empty:
                if value is not None and not isinstance(value, str):
                    raise ValueError(f"{where}: {key!r} must be a string or null, got {value!r}")
            elif not isinstance(value, str) or not value.strip():
                raise ValueError(f"{where}: {key!r} must be a non-empty string, got {value!r}")
        if index >= start and (stop is None or index < stop) and (keep is None or keep(index)):
            kept.append(JsonlRow(index, f"{path.name}:{n}", entry, path.parent))
    return kept
