"""Benchmark prompt files, fetched from their published sources on first use (issue 14).

Each benchmark with published prompts has a :class:`Source`: its files' URLs, each pinned to an exact
revision (a git commit in a ``raw.githubusercontent.com`` URL, a Hugging Face dataset commit in a
``resolve/<sha>/`` URL), so the prompts cannot change under a result. :func:`fetch_prompts` downloads
them once into ``$IMG_GUIDANCE_CACHE/benchmarks/<name>/<revision>/`` (default
``~/.cache/img-guidance``), records ``source.json`` beside them (every file's URL, revision, sha256 and
size, and the fetch date) and returns the path the benchmark's reader takes. Later calls check the
files against ``source.json`` and read them without the network; a file that no longer matches is
fetched again. ``eval run BENCHMARK --prompts-file PATH`` reads a local copy instead, offline.

The files, and where each revision was seen (none is guessed):

- ``hpd``: ``benchmark/{anime,concept-art,paintings,photo}.json`` of the Hugging Face dataset
  ``zhwang/HPDv2`` (where the ``hpsv2`` package downloads them from) at ``260dbde75ab1...``, the
  commit "Release benchmark and HPSv2 test data" that the dataset's file pages name for these files.
- ``parti``: ``PartiPrompts.tsv`` of ``google-research/parti`` at ``2c99f6652cbc...``, a commit holding
  it in a public code index.
- ``pickapic-test``: the ``test_unique`` split of Pick-a-Pic v1 as ``yuvalkirstain/pickapic_v1_no_images``
  publishes it (the same rows without image bytes; 150 kB instead of the image dataset's shards),
  ``data/test_unique-00000-of-00001-73a51cbb6488571d.parquet`` at ``a3592a4f2e6a...``, whose file page
  lists it.
- ``t2i-compbench``: ``examples/dataset/{color,shape,texture,spatial,non_spatial,complex}_val.txt`` of
  ``Karine-Huang/T2I-CompBench``, each at a commit that holds it in a public code index:
  ``color_val.txt`` at ``3310c2f1f43c...`` (its later version, 11,871 bytes; at ``7710d059c339...`` it
  repeated two prompts where their colour-swapped versions belong), ``non_spatial_val.txt`` at
  ``41388b8b6ae7...``, the four others at ``7710d059c339...`` (one version each). The cache folder is
  named after the three.
- ``geneval``: ``prompts/evaluation_metadata.jsonl`` of ``djghosh13/geneval`` at ``d927da8e42fd...``
  (a commit of the repository in a public code index, which other code pins this file to; the file
  itself is not in that index).
- ``dpg``: DPG-Bench publishes one ``.txt`` per prompt (1,065 files, ``dpg_bench/prompts/`` of
  ``TencentQQGYLab/ELLA``) and every prompt's text in ``dpg_bench/dpg_bench.csv``, which its evaluator
  reads (one row per question; ``item_id`` is the prompt file's name, ``text`` the prompt). The csv is
  fetched, at ``4b8cbd38aff5...``, the commit that released DPG-Bench (its prompt files and
  ``compute_dpg_bench.py``, which reads ``./dpg_bench/dpg_bench.csv``, are stored at it in a public code
  index; the csv itself is not in that index), and the prompt folder is materialised from it: one
  ``<item_id>.txt`` per prompt holding its ``text``, in ``prompts/``.
"""

from __future__ import annotations

import csv
import hashlib
import http.client
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from img_guidance.eval.benchmarks import BENCHMARKS, COMPBENCH_CATEGORIES, HPD_STYLES

TIMEOUT_S = 60
SOURCE_JSON = "source.json"

Opener = Callable[[str], bytes]  # URL -> the file's bytes; raises OSError when it cannot


class FetchError(OSError):
    """A prompt file that could not be downloaded (the message names its URL)."""


@dataclass(frozen=True)
class PromptFile:
    path: str  # where it is stored, relative to the benchmark's cache folder
    url: str
    revision: str


@dataclass(frozen=True)
class Source:
    files: tuple[PromptFile, ...]
    read: str  # what the benchmark's reader is given, relative to the cache folder
    derive: Callable[[Path], None] | None = None  # builds ``read`` inside the folder from the files

    @property
    def revision(self) -> str:
        """The cache folder's name: the files' revision, or their short forms joined by ``+``."""
        revisions = list(dict.fromkeys(f.revision for f in self.files))
        return revisions[0] if len(revisions) == 1 else "+".join(r[:12] for r in revisions)


def _github(repo: str, commit: str, path: str) -> PromptFile:
    return PromptFile(
        path.rsplit("/", 1)[-1], f"https://raw.githubusercontent.com/{repo}/{commit}/{path}", commit
    )


def _hf_dataset(repo: str, revision: str, path: str) -> PromptFile:
    url = f"https://huggingface.co/datasets/{repo}/resolve/{revision}/{path}"
    return PromptFile(path.rsplit("/", 1)[-1], url, revision)


_ITEM_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")


def _dpg_prompt_folder(folder: Path) -> None:
    """``folder/prompts/<item_id>.txt`` holding each prompt's text, from ``folder/dpg_bench.csv``."""
    table = folder / "dpg_bench.csv"
    with open(table, encoding="utf-8-sig", newline="") as f:
        rows = csv.DictReader(f)
        if not {"item_id", "text"} <= set(rows.fieldnames or ()):
            raise ValueError(f"{table} has no item_id and text columns: not DPG-Bench's dpg_bench.csv")
        prompts: dict[str, str] = {}
        for row in rows:  # one row per question: a prompt's first row gives its text
            item = (row["item_id"] or "").strip()
            if not _ITEM_ID.fullmatch(item):
                raise ValueError(f"{table}: item_id {item!r} cannot name a prompt file")
            prompts.setdefault(item, row["text"] or "")
    if not prompts:
        raise ValueError(f"{table} holds no prompts")
    (folder / "prompts").mkdir()
    for item, text in prompts.items():
        (folder / "prompts" / f"{item}.txt").write_text(text, encoding="utf-8")


HPD_REVISION = "260dbde75ab1c68e86d32a8e7739f1b49b100578"
PARTI_REVISION = "2c99f6652cbc7f0d0441aa91f4c7e7055bcb0071"
PICKAPIC_REVISION = "a3592a4f2e6adb7646ef56f3bb18e2968348a163"
COMPBENCH_REVISIONS = {
    "color": "3310c2f1f43cc173505fc40cf6cc70762f090c07",
    "shape": "7710d059c3391fe97fbf9e2ad3813ed0e7d87979",
    "texture": "7710d059c3391fe97fbf9e2ad3813ed0e7d87979",
    "spatial": "7710d059c3391fe97fbf9e2ad3813ed0e7d87979",
    "non_spatial": "41388b8b6ae716108ebb507133930c1f030990c3",
    "complex": "7710d059c3391fe97fbf9e2ad3813ed0e7d87979",
}
GENEVAL_REVISION = "d927da8e42fde2b1b5cd743da4df5ff83c1654ff"
DPG_REVISION = "4b8cbd38aff526f866319ca2b113f7285b39ddc0"

SOURCES = {
    "hpd": Source(
        tuple(_hf_dataset("zhwang/HPDv2", HPD_REVISION, f"benchmark/{style}.json") for style in HPD_STYLES),
        read=".",
    ),
    "parti": Source(
        (_github("google-research/parti", PARTI_REVISION, "PartiPrompts.tsv"),), read="PartiPrompts.tsv"
    ),
    "pickapic-test": Source(
        (
            _hf_dataset(
                "yuvalkirstain/pickapic_v1_no_images",
                PICKAPIC_REVISION,
                "data/test_unique-00000-of-00001-73a51cbb6488571d.parquet",
            ),
        ),
        read="test_unique-00000-of-00001-73a51cbb6488571d.parquet",
    ),
    "t2i-compbench": Source(
        tuple(
            _github("Karine-Huang/T2I-CompBench", COMPBENCH_REVISIONS[c], f"examples/dataset/{c}_val.txt")
            for c in COMPBENCH_CATEGORIES
        ),
        read=".",
    ),
    "geneval": Source(
        (_github("djghosh13/geneval", GENEVAL_REVISION, "prompts/evaluation_metadata.jsonl"),),
        read="evaluation_metadata.jsonl",
    ),
    "dpg": Source(
        (_github("TencentQQGYLab/ELLA", DPG_REVISION, "dpg_bench/dpg_bench.csv"),),
        read="prompts",
        derive=_dpg_prompt_folder,
    ),
}


def benchmark_cache(cache: str | os.PathLike | None = None) -> Path:
    """Where fetched prompt files live: ``CACHE/benchmarks``, CACHE defaulting to
    ``$IMG_GUIDANCE_CACHE``, else ``~/.cache/img-guidance``."""
    root = cache or os.environ.get("IMG_GUIDANCE_CACHE") or Path.home() / ".cache" / "img-guidance"
    return Path(root) / "benchmarks"


def download(url: str) -> bytes:
    """The default opener: the bytes at ``url`` (urllib, a timeout of ``TIMEOUT_S`` seconds)."""
    import urllib.request

    request = urllib.request.Request(url, headers={"User-Agent": "img-guidance"})
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
        return response.read()


def fetch_prompts(
    benchmark: str,
    cache: str | os.PathLike | None = None,
    *,
    opener: Opener | None = None,
    warn: Callable[[str], None] | None = None,
) -> Path:
    """The path ``benchmark``'s reader takes (a file or a folder), downloaded from its pinned source into
    ``benchmark_cache(cache)/<benchmark>/<revision>/`` on first use and read from there afterwards.

    ``opener`` fetches a URL's bytes (default :func:`download`); ``warn`` hears of a cached copy that no
    longer matches its ``source.json`` and is fetched again. Raises :class:`FetchError` naming the URL
    when a download fails; nothing is left in the cache then.
    """
    # 1. Check inputs
    if benchmark not in SOURCES:
        if benchmark in BENCHMARKS:
            raise ValueError(f"the {benchmark} benchmark has no prompt file to fetch")
        raise ValueError(f"no published prompts for {benchmark!r}; choose from {', '.join(SOURCES)}")
    source = SOURCES[benchmark]
    folder = benchmark_cache(cache) / benchmark / source.revision

    # 2. A complete copy in the cache needs no network
    if folder.exists():
        problem = _check(folder, source)
        if problem is None:
            return folder / source.read
        (warn or (lambda line: None))(f"warning: {problem}; fetching the {benchmark} prompts again")

    # 3. Download beside the folder, record, derive, then move into place: complete or absent
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        files = []
        for file in source.files:
            data = _get(opener or download, file.url)
            (staging / file.path).write_bytes(data)
            files.append({"path": file.path, "url": file.url, "revision": file.revision, **_digest(data)})
        record = {
            "benchmark": benchmark,
            "revision": source.revision,
            "fetched": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "read": source.read,
            "files": files,
        }
        if source.derive is not None:
            source.derive(staging)
            record["derived"] = {"path": source.read, "sha256": _tree_sha256(staging / source.read)}
        (staging / SOURCE_JSON).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        if folder.exists():  # the copy found wrong above
            shutil.rmtree(folder)
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder / source.read


def _get(opener: Opener, url: str) -> bytes:
    try:
        return opener(url)
    except (OSError, http.client.HTTPException) as err:
        reason = getattr(err, "reason", None) or err
        raise FetchError(
            f"could not fetch {url} ({reason}); give --prompts-file PATH to read a local copy offline"
        ) from err


def _digest(data: bytes) -> dict:
    return {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def _tree_sha256(path: Path) -> str:
    """One sha256 over a folder's files (their relative paths and contents), or a file's."""
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(file.read_bytes()).digest())
    return digest.hexdigest()


def _check(folder: Path, source: Source) -> str | None:
    """What is wrong with a cached copy (None: nothing): every file as ``source.json`` records it."""
    record_path = folder / SOURCE_JSON
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
        recorded = {entry["path"]: entry for entry in record["files"]}
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{record_path} is missing or unreadable ({err})"
    for file in source.files:
        entry = recorded.get(file.path)
        if not isinstance(entry, dict) or entry.get("url") != file.url:
            return f"{record_path} does not record {file.url}"
        path = folder / file.path
        if not path.is_file():
            return f"{path} is missing"
        if _digest(path.read_bytes()) != {"sha256": entry.get("sha256"), "size": entry.get("size")}:
            return f"{path} does not match its sha256 and size in {record_path}"
    if source.derive is not None:
        derived = folder / source.read
        if not derived.exists() or _tree_sha256(derived) != (record.get("derived") or {}).get("sha256"):
            return f"{derived} does not match its sha256 in {record_path}"
    return None
