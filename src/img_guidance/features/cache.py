"""The sharded feature cache: what the feature stage writes and the aligner's training reads.

    ROOT/shard-000000.safetensors   guidance [sum L, G] (every sample's guidance, unpadded, concatenated),
                                    lengths [n], tokens_l [n, N, D], tokens_w [n, N, D], index [n]
    ROOT/shard-000000.json          its sidecar: the source rows it covers, its sample count, the shard's
                                    sha256 and size, the settings it was made with, stats (ties, ...)
    ROOT/manifest.json              written when every shard exists: settings, counts, merged stats and
                                    every shard's checksum

Shard k covers the fixed source rows [k * rows_per_shard, (k + 1) * rows_per_shard), whatever was
dropped from them (ties, undecodable images), so shards can be made by any process in any order and
a rerun knows which are missing. A sample's ``index`` is its pair's global row in the source.

Writes are atomic: each file goes to a temporary name (``shard-000003.safetensors.tmp.<pid>``) and is
renamed with ``os.replace``; the shard is renamed before its sidecar is written, and a shard counts
as done only when its sidecar exists and describes it. A killed run therefore leaves at worst a
temporary file or a shard without a sidecar, and both are rewritten by the next run. Readers check
each shard's sha256 against the manifest before using it, so a corrupt or truncated shard is an
error that names it, never silently used.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import json
import math
import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

FORMAT = "img-guidance-features"
VERSION = 1
MANIFEST = "manifest.json"
STORAGE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DIM_KEYS = ("guidance_dim", "num_tokens", "image_dim")
VERIFY_MODES = ("lazy", "full")
# what a cache was made with: equal in every sidecar and in the manifest
_SETTINGS = ("format", "version", "dims", "dtype", "models", "question_seed", "rows_per_shard")
_HASH_CHUNK = 1 << 24  # 16 MiB


class CorruptShardError(ValueError):
    """A shard whose bytes do not match the checksum recorded when it was written."""


def shard_stem(shard: int) -> str:
    return f"shard-{shard:06d}"


def shard_path(root: str | os.PathLike, shard: int) -> Path:
    return Path(root) / f"{shard_stem(shard)}.safetensors"


def sidecar_path(root: str | os.PathLike, shard: int) -> Path:
    return Path(root) / f"{shard_stem(shard)}.json"


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file, read in chunks (shards can be gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _json_normal(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists), for comparisons with files."""
    return json.loads(json.dumps(value))


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_json(path: Path) -> dict | None:
    """The JSON object in ``path``; None when it is missing or unreadable (a half-written file of
    a killed run cannot exist under a final name, but a hand-edited one can)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def storage_dtype(name: str) -> torch.dtype:
    if name not in STORAGE_DTYPES:
        raise ValueError(f"storage dtype must be one of {', '.join(STORAGE_DTYPES)}, got {name!r}")
    return STORAGE_DTYPES[name]


def check_dims(dims: dict) -> dict[str, int]:
    if not isinstance(dims, dict) or set(dims) != set(DIM_KEYS):
        raise ValueError(f"dims must have exactly the keys {', '.join(DIM_KEYS)}, got {dims!r}")
    for key in DIM_KEYS:
        value = dims[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"dims[{key!r}] must be a positive integer, got {value!r}")
    return {key: dims[key] for key in DIM_KEYS}


def existing_settings(root: str | os.PathLike) -> tuple[dict, str] | None:
    """The settings a cache folder was (partly) made with, and the file they were read from: its
    manifest, else any shard's sidecar; None for a folder with neither (or no folder)."""
    root = Path(root)
    manifest = _read_json(root / MANIFEST)
    if manifest is not None:
        return {key: manifest.get(key) for key in _SETTINGS}, MANIFEST
    for path in sorted(root.glob("shard-*.json")):
        sidecar = _read_json(path)
        if sidecar is not None and isinstance(sidecar.get("settings"), dict):
            return sidecar["settings"], path.name
    return None


def check_compatible(
    root: str | os.PathLike,
    *,
    dims: dict | None = None,
    dtype: str | None = None,
    models: dict | None = None,
    question_seed: int | None = None,
    rows_per_shard: int | None = None,
) -> None:
    """Fail when ``root`` already holds a cache (or part of one) made with other settings than the
    given ones (those left None are not compared); the error names both values."""
    found = existing_settings(root)
    if found is None:
        return
    settings, source = found
    wanted = {
        "format": FORMAT,
        "version": VERSION,
        "dims": dims,
        "dtype": dtype,
        "models": models,
        "question_seed": question_seed,
        "rows_per_shard": rows_per_shard,
    }
    differences = setting_differences(settings, {k: v for k, v in wanted.items() if v is not None})
    if differences:
        raise ValueError(
            f"{root} already holds features made with other settings ({source}): "
            + "; ".join(differences)
            + ". Use another output folder, or delete this one to start over."
        )


def setting_differences(cached: dict, wanted: dict, prefix: str = "") -> list[str]:
    """``"key: <cached> in the cache, <wanted> now"`` for each key of ``wanted`` whose value differs
    from ``cached``'s. Only ``wanted``'s own keys are compared (a caller may check a part of the
    settings); values that are dicts must match exactly and are compared key by key, so a message
    names the innermost key (``models.guidance.model``)."""
    cached = cached if isinstance(cached, dict) else {}
    differences = []
    for key, value in _json_normal(wanted).items():
        old = cached.get(key)
        if isinstance(value, dict) and isinstance(old, dict):
            differences += setting_differences(old, value, f"{prefix}{key}.")
            differences += [
                f"{prefix}{key}.{k}: {old[k]!r} in the cache, absent now" for k in old if k not in value
            ]
        elif old != value:
            differences.append(f"{prefix}{key}: {old!r} in the cache, {value!r} now")
    return differences


class FeatureCacheWriter:
    """Writes the shards of one cache folder, and at the end its manifest.

    Args:
        root: the cache folder (created if missing).
        dims: ``{"guidance_dim": G, "num_tokens": N, "image_dim": D}``; every sample is checked
            against them.
        dtype: storage dtype of the features, "bfloat16" (default) or "float16" ("float32" too).
        models: what made the features (JSON-serialisable), kept in every sidecar and the manifest.
        question_seed: the seed of the question rule (``choose_question(seed, index=row)``).
        rows_per_shard: source rows per shard (the last shard may have fewer).

    A folder that already holds a cache made with other settings is refused (an error naming both).
    Several processes may write shards of the same folder at once, as long as each shard has one
    writer; :meth:`finalize` runs once, on one process, after all shards are written.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        dims: dict,
        dtype: str = "bfloat16",
        models: dict,
        question_seed: int,
        rows_per_shard: int,
    ) -> None:
        self.dims = check_dims(dims)
        self.storage_dtype = storage_dtype(dtype)
        if not isinstance(rows_per_shard, int) or isinstance(rows_per_shard, bool) or rows_per_shard < 1:
            raise ValueError(f"rows_per_shard must be a positive integer, got {rows_per_shard!r}")
        if not isinstance(question_seed, int) or isinstance(question_seed, bool):
            raise ValueError(f"question_seed must be an integer, got {question_seed!r}")
        try:
            models = _json_normal(models)
        except TypeError as err:
            raise ValueError(f"models must be JSON-serialisable, got {models!r}: {err}") from err
        self.root = Path(root)
        self.rows_per_shard = rows_per_shard
        self.settings = {
            "format": FORMAT,
            "version": VERSION,
            "dims": self.dims,
            "dtype": dtype,
            "models": models,
            "question_seed": question_seed,
            "rows_per_shard": rows_per_shard,
        }
        check_compatible(
            self.root, **{k: v for k, v in self.settings.items() if k not in ("format", "version")}
        )
        self.root.mkdir(parents=True, exist_ok=True)

    def shard_range(self, shard: int) -> tuple[int, int]:
        """The source rows [first, first + rows_per_shard) shard ``shard`` covers at most."""
        return shard * self.rows_per_shard, (shard + 1) * self.rows_per_shard

    def shard_done(self, shard: int, *, stop_row: int | None = None) -> bool:
        """True when the shard and its sidecar both exist and the sidecar describes this shard file
        (its recorded size; the sha256 is checked by readers). With ``stop_row``, the shard must also
        end at that row (a run with a larger ``limit`` redoes a last shard that ended earlier).

        A sidecar written with other settings is an error, not a shard to redo silently."""
        sidecar = _read_json(sidecar_path(self.root, shard))
        if sidecar is None:
            return False
        if sidecar.get("settings") != self.settings:
            differences = setting_differences(sidecar.get("settings"), self.settings)
            raise ValueError(
                f"{sidecar_path(self.root, shard)} was written with other settings than this run's: "
                + "; ".join(differences)
            )
        if stop_row is not None and sidecar.get("stop_row") != stop_row:
            return False
        path = shard_path(self.root, shard)
        return path.is_file() and path.stat().st_size == sidecar.get("bytes")

    def _remove_leftovers(self, shard: int) -> None:
        """Temporary files a killed writer of this shard left behind (only this shard's writer
        touches them, so this is safe while other processes write other shards)."""
        stem = shard_stem(shard)
        for pattern in (f"{stem}.safetensors.tmp.*", f"{stem}.json.tmp.*"):
            for path in self.root.glob(pattern):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

    def _check_sample(self, sample: dict, position: int, first_row: int, stop_row: int) -> None:
        g, n, d = (self.dims[k] for k in DIM_KEYS)
        guidance, tokens_l, tokens_w = sample["guidance"], sample["tokens_l"], sample["tokens_w"]
        if guidance.ndim != 2 or guidance.shape[1] != g or guidance.shape[0] < 1:
            raise ValueError(
                f"sample {position}: guidance must be [L >= 1, guidance_dim {g}], got {list(guidance.shape)}"
            )
        for name, tokens in (("tokens_l", tokens_l), ("tokens_w", tokens_w)):
            if tuple(tokens.shape) != (n, d):
                raise ValueError(
                    f"sample {position}: {name} must be [num_tokens {n}, image_dim {d}], "
                    f"got {list(tokens.shape)}"
                )
        index = sample["index"]
        if not first_row <= int(index) < stop_row:
            raise ValueError(
                f"sample {position}: index {index} is outside the shard's rows [{first_row}, {stop_row})"
            )

    def write_shard(
        self, shard: int, samples: Sequence[dict], *, first_row: int, stop_row: int, stats: dict
    ) -> None:
        """Write shard ``shard`` atomically: its safetensors file, then its sidecar.

        ``samples``: dicts with ``guidance`` [L, G], ``tokens_l`` [N, D], ``tokens_w`` [N, D] (any
        float dtype and device; stored in the storage dtype on the CPU) and ``index`` (the source row).
        ``first_row``/``stop_row``: the source rows this shard covers, which must be its fixed range
        (``stop_row`` earlier only for the last shard of the source). ``stats``: JSON-serialisable
        counts of the rows (numbers are summed and lists concatenated across shards in the manifest).
        An empty ``samples`` (every row dropped) makes a valid, empty shard.
        """
        from safetensors.torch import save_file

        first, end = self.shard_range(shard)
        if first_row != first or not first_row <= stop_row <= end:
            raise ValueError(
                f"shard {shard} covers rows [{first}, {end}) at {self.rows_per_shard} rows per shard; "
                f"got first_row={first_row}, stop_row={stop_row}"
            )
        samples = list(samples)
        for position, sample in enumerate(samples):
            self._check_sample(sample, position, first_row, stop_row)
        g, n, d = (self.dims[k] for k in DIM_KEYS)
        dtype = self.storage_dtype

        def stored(t: torch.Tensor) -> torch.Tensor:
            return t.detach().to(device="cpu", dtype=dtype)

        if samples:
            guidance = torch.cat([stored(s["guidance"]) for s in samples])  # [L_i, G] each -> [sum L_i, G]
            tokens_l = torch.stack([stored(s["tokens_l"]) for s in samples])  # [N, D] each -> [n, N, D]
            tokens_w = torch.stack([stored(s["tokens_w"]) for s in samples])
        else:  # every row of the shard was dropped
            guidance = torch.zeros(0, g, dtype=dtype)
            tokens_l = tokens_w = torch.zeros(0, n, d, dtype=dtype)
        tensors = {
            "guidance": guidance,
            "lengths": torch.tensor([s["guidance"].shape[0] for s in samples], dtype=torch.int64),  # [n]
            "tokens_l": tokens_l,
            "tokens_w": tokens_w,
            "index": torch.tensor([int(s["index"]) for s in samples], dtype=torch.int64),  # [n]
        }
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        try:
            stats = _json_normal(stats)
        except TypeError as err:
            raise ValueError(f"stats must be JSON-serialisable, got {stats!r}: {err}") from err

        self._remove_leftovers(shard)
        path = shard_path(self.root, shard)
        tmp = path.with_name(f"{path.name}.tmp.{os.getpid()}")
        # one metadata key: safetensors writes several in a random order, and the same features
        # must give the same bytes (and checksum) on every run
        metadata = {FORMAT: json.dumps({"version": VERSION, "shard": shard}, sort_keys=True)}
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        sidecar = {
            "shard": shard,
            "file": path.name,
            "first_row": first_row,
            "stop_row": stop_row,
            "count": len(samples),
            "sha256": file_sha256(tmp),
            "bytes": tmp.stat().st_size,
            "stats": stats,
            "settings": self.settings,
        }
        # an old sidecar must not describe the new shard file while it is being replaced
        with contextlib.suppress(FileNotFoundError):
            sidecar_path(self.root, shard).unlink()
        os.replace(tmp, path)
        _write_json_atomic(sidecar_path(self.root, shard), sidecar)

    def finalize(self, *, rows: int | None = None) -> dict:
        """Merge the sidecars into ``manifest.json`` (atomically) and return the manifest.

        ``rows``: the number of source rows the cache must cover; shards 0 .. ceil(rows /
        rows_per_shard) - 1 must then all be done, ending at ``rows`` (sidecars of shards beyond
        are left out). Without it, the shards found must cover rows 0 .. their last row with no gap.
        Call it on one process only, after every process has written its shards.
        """
        sidecars: dict[int, dict] = {}
        for path in self.root.glob("shard-*.json"):
            sidecar = _read_json(path)
            if sidecar is not None and isinstance(sidecar.get("shard"), int):
                sidecars[sidecar["shard"]] = sidecar
        if rows is None:
            count = max(sidecars, default=-1) + 1
            rows = sidecars[count - 1]["stop_row"] if count else 0
        else:
            count = math.ceil(rows / self.rows_per_shard)
        entries, missing = [], []
        for shard in range(count):
            stop_row = min(self.shard_range(shard)[1], rows)
            if shard not in sidecars or not self.shard_done(shard, stop_row=stop_row):
                missing.append(shard)
                continue
            entries.append(sidecars[shard])
        if missing:
            names = ", ".join(shard_stem(k) for k in missing[:10]) + (" ..." if len(missing) > 10 else "")
            raise ValueError(
                f"{self.root}: {len(missing)} of {count} shards are missing or unfinished ({names}); "
                "rerun the extraction with the same arguments to write them"
            )
        manifest = dict(self.settings)
        manifest |= {
            "rows": rows,
            "samples": sum(e["count"] for e in entries),
            "stats": merge_stats([e["stats"] for e in entries]),
            "shards": [
                {
                    key: e[key]
                    for key in ("shard", "file", "first_row", "stop_row", "count", "sha256", "bytes")
                }
                for e in entries
            ],
        }
        _write_json_atomic(self.root / MANIFEST, manifest)
        return manifest


def merge_stats(parts: Sequence[dict]) -> dict:
    """Per-shard stats merged: numbers summed, lists concatenated (shard order), other values listed."""
    merged: dict[str, Any] = {}
    for part in parts:
        for key, value in part.items():
            if isinstance(value, bool) or not isinstance(value, (int, float, list)):
                merged.setdefault(key, []).append(value)
            elif isinstance(value, list):
                merged[key] = [*merged.get(key, []), *value]
            else:
                merged[key] = merged.get(key, 0) + value
    return merged


def read_manifest(root: str | os.PathLike) -> dict:
    """The manifest of a finished cache; an error that says what to do when there is none."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder; a feature cache folder was expected")
    manifest = _read_json(root / MANIFEST)
    if manifest is None:
        sidecars = list(root.glob("shard-*.json"))
        if sidecars:
            raise FileNotFoundError(
                f"{root} has {len(sidecars)} finished shards but no {MANIFEST}: the extraction did not "
                "finish; rerun it with the same arguments to complete the cache"
            )
        raise FileNotFoundError(f"{root} has no {MANIFEST}; it is not a feature cache")
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ValueError(
            f"{root / MANIFEST} is format {manifest.get('format')!r} version {manifest.get('version')!r}; "
            f"this version of img-guidance reads {FORMAT!r} version {VERSION}"
        )
    return manifest


class FeatureCache(Dataset):
    """A finished feature cache as a map-style dataset.

    Sample i is ``{"guidance": [L, G], "tokens_l": [N, D], "tokens_w": [N, D], "index": int}`` in the
    storage dtype (``index``: the pair's row in the source); batch them with :func:`collate_features`.
    Samples are read from memory-mapped shards one slice at a time, so a worker holds no whole shard.

    verify: "lazy" checks a shard's sha256 the first time this process reads from it; "full" checks
        every shard at open (one full read of the cache; the result travels to DataLoader workers,
        which then do not re-hash). Shard sizes are checked at open in both modes, so a truncated
        shard fails at once. A mismatch raises :class:`CorruptShardError` naming the shard.
    """

    # An open shard is a memory map and no file descriptor, so keeping many costs address space
    # only; training reads samples in random order across all shards, and a short list reopened a
    # shard for nearly every sample (about 0.2 ms each, a third of a small aligner's step).
    max_open_shards = 4096

    def __init__(self, root: str | os.PathLike, *, verify: str = "lazy") -> None:
        if verify not in VERIFY_MODES:
            raise ValueError(f"verify must be one of {', '.join(VERIFY_MODES)}, got {verify!r}")
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        self.dims: dict[str, int] = dict(self.manifest["dims"])
        self.verify = verify
        self._shards: list[dict] = list(self.manifest["shards"])
        counts = [entry["count"] for entry in self._shards]
        self._starts = [0]
        for count in counts:
            self._starts.append(self._starts[-1] + count)
        for entry in self._shards:
            path = self.root / entry["file"]
            if not path.is_file():
                raise FileNotFoundError(f"{path} is listed in {self.root / MANIFEST} but missing")
            size = path.stat().st_size
            if size != entry["bytes"]:
                raise CorruptShardError(
                    f"{path} is {size} bytes but was written with {entry['bytes']}: it is truncated or "
                    f"corrupt; {_redo_hint(self.root, entry)}"
                )
        self._verified: set[int] = set()
        self._open: OrderedDict[int, tuple[Any, torch.Tensor, torch.Tensor]] = OrderedDict()
        if verify == "full":
            for position in range(len(self._shards)):
                self._verify(position)

    def __len__(self) -> int:
        return self._starts[-1]

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_open"] = OrderedDict()  # file handles stay with their process
        return state

    def _verify(self, position: int) -> None:
        entry = self._shards[position]
        path = self.root / entry["file"]
        digest = file_sha256(path)
        if digest != entry["sha256"]:
            raise CorruptShardError(
                f"{path} does not match its checksum (sha256 {digest}, written as {entry['sha256']}): "
                f"it is corrupt or truncated; {_redo_hint(self.root, entry)}"
            )
        self._verified.add(position)

    def _reader(self, position: int) -> tuple[Any, torch.Tensor, torch.Tensor]:
        """(open shard, guidance row offsets [n + 1], source indices [n]) of a shard, opened on
        first use (after its checksum is verified) and kept among the last few used."""
        if position in self._open:
            self._open.move_to_end(position)
            return self._open[position]
        from safetensors import safe_open

        if position not in self._verified:
            self._verify(position)
        handle = safe_open(os.fspath(self.root / self._shards[position]["file"]), framework="pt")
        lengths = handle.get_tensor("lengths")
        offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
        torch.cumsum(lengths, 0, out=offsets[1:])
        self._open[position] = (handle, offsets, handle.get_tensor("index"))
        while len(self._open) > self.max_open_shards:
            self._open.popitem(last=False)
        return self._open[position]

    def __getitem__(self, i: int) -> dict:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} is out of range for a cache of {len(self)} samples")
        position = bisect.bisect_right(self._starts, i) - 1
        j = i - self._starts[position]
        handle, offsets, index = self._reader(position)
        a, b = int(offsets[j]), int(offsets[j + 1])
        return {
            "guidance": handle.get_slice("guidance")[a:b],  # [L, G]
            "tokens_l": handle.get_slice("tokens_l")[j],  # [N, D]
            "tokens_w": handle.get_slice("tokens_w")[j],
            "index": int(index[j]),
        }


def _redo_hint(root: Path, entry: dict) -> str:
    stem = shard_stem(entry["shard"])
    return (
        f"delete {root / (stem + '.safetensors')}, {root / (stem + '.json')} and {root / MANIFEST}, "
        f"then rerun the extraction with the same arguments to rewrite rows "
        f"[{entry['first_row']}, {entry['stop_row']})"
    )


def collate_features(samples: Sequence[dict]) -> dict[str, torch.Tensor]:
    """Batch cache samples: guidance right-padded with zeros to the longest.

    Returns guidance [B, Lmax, G] float32, guidance_mask [B, Lmax] bool (True on real tokens),
    tokens_l and tokens_w [B, N, D] float32, index [B] long.
    """
    samples = list(samples)
    if not samples:
        raise ValueError("collate_features got no samples")
    lengths = [s["guidance"].shape[0] for s in samples]
    width = samples[0]["guidance"].shape[1]
    guidance = torch.zeros(len(samples), max(lengths), width, dtype=torch.float32)
    mask = torch.zeros(len(samples), max(lengths), dtype=torch.bool)
    for row, (sample, length) in enumerate(zip(samples, lengths, strict=True)):
        guidance[row, :length] = sample["guidance"].float()
        mask[row, :length] = True
    return {
        "guidance": guidance,
        "guidance_mask": mask,
        "tokens_l": torch.stack([s["tokens_l"].float() for s in samples]),
        "tokens_w": torch.stack([s["tokens_w"].float() for s in samples]),
        "index": torch.tensor([int(s["index"]) for s in samples], dtype=torch.long),
    }
