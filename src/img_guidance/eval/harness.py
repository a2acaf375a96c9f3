"""Scoring folders of images and comparing systems: what ``img-guidance eval score`` and ``eval compare``
do, as functions.

A folder to score is either an ``img-guidance generate`` output folder (``metadata.jsonl``: two systems,
``initial`` and ``calibrated``, one image each per prompt and seed) or any folder of images with an
``images.jsonl`` mapping, one line per image: ``{"file": "a.png", "prompt": "...", "seed": 0,
"system": "sd-xl", "category": "colors"}`` (``file`` and ``prompt`` required; ``system`` defaults to
the folder's name, ``category`` to ``all``), so another method's outputs are scored and compared in
the same harness. Images pair across systems by (prompt, seed).

``score_folder`` writes, under ``FOLDER/eval/``:

- ``scores.jsonl``: one line per image: ``file`` (relative to the folder), ``prompt``, ``seed``,
  ``system``, ``category``, and one key per scorer;
- ``summary.json``: ``{"systems": {NAME: {SCORER: {"mean", "n", "per_category": {...}}}},
  "scorers": [...]}``.

Under several processes (``eval run`` started by a launcher) process p first writes the lines of its
share to ``eval/parts/scores-rank-p.jsonl``; the main process merges them into ``scores.jsonl``.

``compare`` reads those files from several folders: per scorer and system, the mean per category; the
per-prompt win rate of each system over the first (scores averaged over a prompt's images; ties
counted apart) with a 95% bootstrap interval resampling prompts, the mean difference with its
interval, and the exact sign test (McNemar's, on the prompts won and lost).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

EVAL_DIR = "eval"
SCORES_FILE = "scores.jsonl"
SUMMARY_FILE = "summary.json"
MAPPING_FILE = "images.jsonl"
SCORE_PARTS = "parts"  # eval/parts/: each process's score lines while a run over several lasts
ALL = "all"


@dataclass(frozen=True)
class EvalImage:
    """One image to score: its file (relative to the folder), prompt, seed (None where unknown),
    system and category."""

    file: str
    prompt: str
    seed: int | None
    system: str
    category: str = ALL

    @property
    def key(self) -> tuple[str, int | None]:
        """What pairs images across systems: the same prompt and seed."""
        return (self.prompt, self.seed)


def read_folder(folder: str | os.PathLike, *, warn: Callable[[str], None] | None = None) -> list[EvalImage]:
    """The images of ``folder`` to score (see the module docstring); errors name the folder or line."""
    from img_guidance.outputs import METADATA, latest_records, read_records

    warn = warn or (lambda line: None)
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{folder} is not a folder" if folder.exists() else f"{folder} does not exist"
        )
    mapping, metadata = folder / MAPPING_FILE, folder / METADATA
    if mapping.is_file():
        return _read_mapping(folder, mapping)
    if not metadata.is_file():
        raise FileNotFoundError(
            f"{folder} has neither {MAPPING_FILE} (one line per image: file, prompt) nor an "
            f"`img-guidance generate` {METADATA}; write one to say which prompt each image shows"
        )
    records, broken = read_records(metadata)
    for number in broken:
        warn(f"warning: {metadata}:{number} is cut short or not a record; skipped")
    images = []
    for record in latest_records(records):
        files = record.get("files") or {}
        for system in ("initial", "calibrated"):
            if system not in files:
                raise ValueError(f"{metadata}: {record['name']} lists no {system} image")
            images.append(
                EvalImage(
                    file=files[system],
                    prompt=str(record.get("prompt")),
                    seed=record.get("seed"),
                    system=system,
                    category=str(record.get("category") or ALL),
                )
            )
    if not images:
        raise ValueError(f"{metadata} lists no finished prompt")
    return images


def _read_mapping(folder: Path, mapping: Path) -> list[EvalImage]:
    images = []
    for number, line in enumerate(mapping.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{mapping}:{number}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where} is not valid JSON: {err}") from None
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: expected an object with file and prompt, got {entry!r}")
        unknown = sorted(set(entry) - {"file", "prompt", "seed", "system", "category"})
        if unknown:
            raise ValueError(
                f"{where}: unknown keys {unknown}; allowed: file, prompt, seed, system, category"
            )
        file, prompt, seed = entry.get("file"), entry.get("prompt"), entry.get("seed")
        if not isinstance(file, str) or not file:
            raise ValueError(f"{where}: file must be a non-empty string, got {file!r}")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{where}: prompt must be a non-empty string, got {prompt!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"{where}: seed must be an integer, got {seed!r}")
        if not (folder / file).is_file():
            raise FileNotFoundError(f"{where}: {folder / file} does not exist")
        images.append(
            EvalImage(
                file=file,
                prompt=prompt,
                seed=seed,
                system=str(entry.get("system") or folder.name),
                category=str(entry.get("category") or ALL),
            )
        )
    if not images:
        raise ValueError(f"{mapping} lists no image")
    return images


def score_folder(
    folder: str | os.PathLike,
    scorers: Sequence[Any],
    *,
    batch_size: int = 16,
    warn: Callable[[str], None] | None = None,
    progress: Callable[[int], None] | None = None,
    processes: Any = None,
) -> dict[str, Any]:
    """Score every image of ``folder`` with each of ``scorers`` (objects with ``name`` and
    ``score(images, prompts)``); write ``eval/scores.jsonl`` and ``eval/summary.json`` (each through a
    temporary name) and return the summary. An image that does not decode is reported through ``warn``
    and gets no score (null, left out of the means). ``progress(k)``: k more images scored.

    ``processes``: accelerate's ``PartialState`` of a launch with several processes (or anything with
    ``num_processes``, ``process_index``, ``is_main_process``, ``wait_for_everyone``): process p scores
    the batches b with b % num_processes == p into ``eval/parts/scores-rank-p.jsonl``; the main process
    merges them, in the folder's order, once all are done. The batches, so the scores, are those of one
    process. Every process returns the summary."""
    from img_guidance.outputs import check_writable

    folder = Path(folder)
    several = processes is not None and processes.num_processes > 1
    main = not several or processes.is_main_process
    images = read_folder(folder, warn=warn if main else None)
    check_writable(folder / EVAL_DIR)
    if not several:
        rows = score_rows(folder, images, scorers, batch_size=batch_size, warn=warn, progress=progress)
        return write_scores(folder, rows, scorers)
    from img_guidance.eval.distributed import merge_batches, split_batches

    # 1. This process's batches, its lines in a file of its own
    index, count = processes.process_index, processes.num_processes
    mine = split_batches(images, batch_size, index, count)
    rows = score_rows(folder, mine, scorers, batch_size=batch_size, warn=warn, progress=progress)
    parts = folder / EVAL_DIR / SCORE_PARTS
    parts.mkdir(parents=True, exist_ok=True)
    _write_lines_atomic(parts / score_part_name(index), rows)
    processes.wait_for_everyone()
    # 2. The main process merges the lines in the folder's order
    if main:
        shares = [_read_lines(parts / score_part_name(i)) for i in range(count)]
        rows = merge_batches(shares, batch_size)
        for row, image in zip(rows, images, strict=True):
            if (row["file"], row["system"]) != (image.file, image.system):
                raise ValueError(f"{parts}: the score lines do not follow {folder}'s images")
        write_scores(folder, rows, scorers)
        for part in parts.glob(score_part_name("*")):
            part.unlink()
        with contextlib.suppress(OSError):  # holding what is not ours
            parts.rmdir()
    processes.wait_for_everyone()
    return json.loads((folder / EVAL_DIR / SUMMARY_FILE).read_text(encoding="utf-8"))


def score_part_name(index: int | str) -> str:
    """The file of process ``index``'s score lines in ``eval/parts/``."""
    return f"scores-rank-{index}.jsonl"


def score_rows(
    folder: str | os.PathLike,
    images: Sequence[EvalImage],
    scorers: Sequence[Any],
    *,
    batch_size: int = 16,
    warn: Callable[[str], None] | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[dict[str, Any]]:
    """The score lines of ``images`` (files of ``folder``), scored in batches of ``batch_size`` in
    order; an image that does not decode is reported through ``warn`` and scored None."""
    from PIL import Image, UnidentifiedImageError

    warn = warn or (lambda line: None)
    folder = Path(folder)
    rows = [
        {"file": im.file, "prompt": im.prompt, "seed": im.seed, "system": im.system, "category": im.category}
        for im in images
    ]
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        loaded, readable = [], []
        for i, entry in enumerate(chunk):
            try:
                with Image.open(folder / entry.file) as image:
                    loaded.append(image.convert("RGB"))
                readable.append(i)
            except (OSError, UnidentifiedImageError, SyntaxError):
                warn(f"warning: {folder / entry.file} does not decode; left out of the scores")
        prompts = [chunk[i].prompt for i in readable]
        for scorer in scorers:
            values = scorer.score(loaded, prompts).tolist() if loaded else []
            by_index = dict(zip(readable, values, strict=True))
            for i in range(len(chunk)):
                rows[start + i][scorer.name] = by_index.get(i)  # None: did not decode
        if progress is not None:
            progress(len(chunk))
    return rows


def write_scores(folder: str | os.PathLike, rows: Sequence[dict[str, Any]], scorers: Sequence[Any]) -> dict:
    """Write ``rows`` to ``folder/eval/scores.jsonl`` and their summary (with each scorer's
    ``describe()``) to ``folder/eval/summary.json``, each through a temporary name; return the summary."""
    from img_guidance.outputs import write_json_atomic

    summary = summarize(rows, [s.name for s in scorers])
    summary["scorers"] = [s.describe() for s in scorers]
    out = Path(folder) / EVAL_DIR
    out.mkdir(parents=True, exist_ok=True)
    _write_lines_atomic(out / SCORES_FILE, rows)
    write_json_atomic(out / SUMMARY_FILE, summary)
    return summary


def _write_lines_atomic(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def read_scores(folder: str | os.PathLike) -> list[dict[str, Any]]:
    """The per-image score lines ``score_folder`` wrote in ``folder/eval/scores.jsonl``."""
    path = Path(folder) / EVAL_DIR / SCORES_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: score the folder first (img-guidance eval score)")
    return _read_lines(path)


def summarize(rows: Sequence[dict[str, Any]], scorers: Sequence[str]) -> dict[str, Any]:
    """Per system and scorer: the mean over images (missing scores left out; None where none is
    left), their count, and the mean per category."""
    systems: dict[str, dict[str, Any]] = {}
    for system in dict.fromkeys(row["system"] for row in rows):
        mine = [row for row in rows if row["system"] == system]
        systems[system] = {}
        for name in scorers:
            values = [row[name] for row in mine if _finite(row.get(name))]
            per_category: dict[str, float | None] = {}
            for cat in dict.fromkeys(row["category"] for row in mine):
                vals = [row[name] for row in mine if row["category"] == cat and _finite(row.get(name))]
                per_category[cat] = _mean(vals) if vals else None
            mean = _mean(values) if values else None
            systems[system][name] = {"mean": mean, "n": len(values), "per_category": per_category}
    return {"systems": systems}


def compare(
    rows: Sequence[dict[str, Any]],
    scorers: Sequence[str],
    *,
    reference: str | None = None,
    resamples: int = 10000,
    seed: int = 0,
) -> dict[str, Any]:
    """Every other system against ``reference`` (default: the first system of ``rows``), per scorer,
    on the prompts both have: {scorer: {system: {"prompts", "wins", "ties", "losses", "win_rate",
    "win_rate_ci95", "mean_difference", "mean_difference_ci95", "sign_test_p"}}}. A prompt's score is
    the mean over its images (its seeds); win rate = wins / prompts."""
    from img_guidance.eval.stats import bootstrap_mean_interval, mcnemar_exact

    systems = list(dict.fromkeys(row["system"] for row in rows))
    if len(systems) < 2:
        raise ValueError(f"compare needs at least two systems, got {systems}")
    reference = reference or systems[0]
    if reference not in systems:
        raise ValueError(f"reference system {reference!r} is not among {systems}")
    result: dict[str, Any] = {"reference": reference, "scorers": {}}
    for name in scorers:
        per_prompt = _per_prompt(rows, name)
        base = per_prompt.get(reference, {})
        table = {}
        for system in systems:
            if system == reference:
                continue
            mine = per_prompt.get(system, {})
            shared = [p for p in base if p in mine]
            if not shared:
                raise ValueError(f"{system} and {reference} share no prompt with a {name} score")
            diff = np.array([mine[p] - base[p] for p in shared])
            wins, losses = int((diff > 0).sum()), int((diff < 0).sum())
            table[system] = {
                "prompts": len(shared),
                "wins": wins,
                "ties": len(shared) - wins - losses,
                "losses": losses,
                "win_rate": wins / len(shared),
                "win_rate_ci95": list(
                    bootstrap_mean_interval((diff > 0).astype(float), resamples=resamples, seed=seed)
                ),
                "mean_difference": float(diff.mean()),
                "mean_difference_ci95": list(bootstrap_mean_interval(diff, resamples=resamples, seed=seed)),
                "sign_test_p": mcnemar_exact(wins, losses),
            }
        result["scorers"][name] = table
    return result


def _per_prompt(rows: Sequence[dict[str, Any]], name: str) -> dict[str, dict[str, float]]:
    """{system: {prompt: the mean of its images' finite scores}}."""
    sums: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        if _finite(row.get(name)):
            sums[row["system"]][row["prompt"]].append(row[name])
    return {system: {p: _mean(v) for p, v in prompts.items()} for system, prompts in sums.items()}


def category_intervals(
    rows: Sequence[dict[str, Any]], name: str, *, resamples: int = 10000, seed: int = 0
) -> dict[str, dict[str, dict[str, Any]]]:
    """Per system, per category and ``overall``: the mean of the per-prompt scores of ``name`` with
    its 95% bootstrap interval (resampling prompts) -> {system: {column: {"mean", "ci95", "prompts"}}};
    every system gets the columns of all, in first-seen order (empty ones with None)."""
    from img_guidance.eval.stats import bootstrap_mean_interval

    categories = list(dict.fromkeys(row["category"] for row in rows))
    category_of = {(row["system"], row["prompt"]): row["category"] for row in rows}
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for system, prompts in _per_prompt(rows, name).items():
        table = {}
        for column in [*categories, "overall"]:
            values = [
                v for p, v in prompts.items() if column == "overall" or category_of[(system, p)] == column
            ]
            if values:
                low, high = bootstrap_mean_interval(values, resamples=resamples, seed=seed)
                table[column] = {"mean": _mean(values), "ci95": [low, high], "prompts": len(values)}
            else:
                table[column] = {"mean": None, "ci95": [None, None], "prompts": 0}
        out[system] = table
    return out


def merge_rows(folders: Sequence[str | os.PathLike]) -> list[dict[str, Any]]:
    """The score lines of several scored folders, system names made unique: a name that appears in
    more than one folder is prefixed with its folder's name (``runA/calibrated``). Each line gets
    ``path``: its image's path."""
    loaded = [(Path(f), read_scores(f)) for f in folders]
    seen: dict[str, int] = defaultdict(int)
    for _, rows in loaded:
        for system in {row["system"] for row in rows}:
            seen[system] += 1
    merged = []
    for folder, rows in loaded:
        for row in rows:
            name = row["system"] if seen[row["system"]] == 1 else f"{folder.name}/{row['system']}"
            merged.append({**row, "system": name, "path": str(folder / row["file"])})
    return merged


def markdown_table(summary: dict[str, Any], comparison: dict[str, Any] | None = None) -> str:
    """The means per system and scorer (and, with a comparison, each system's win rate over the
    reference with its interval), as a Markdown table."""
    systems = summary["systems"]
    scorers = list(next(iter(systems.values())))
    header = ["system", *scorers]
    if comparison is not None:
        header += [f"win rate vs {comparison['reference']} ({s})" for s in scorers]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for system, scores in systems.items():
        cells = [system, *(_fmt(scores[s]["mean"]) for s in scorers)]
        if comparison is not None:
            for s in scorers:
                entry = comparison["scorers"].get(s, {}).get(system)
                if entry is None:
                    cells.append("")
                else:
                    low, high = entry["win_rate_ci95"]
                    cells.append(
                        f"{entry['win_rate']:.1%} [{low:.1%}, {high:.1%}] (p {entry['sign_test_p']:.2g})"
                    )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _fmt(value: float) -> str:
    return "n/a" if not _finite(value) else f"{value:.4g}"


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values) if values else math.nan


def gallery_html(
    rows: Sequence[dict[str, Any]], comparison: dict[str, Any], out: str | os.PathLike, *, count: int = 24
) -> Path:
    """A static page, ``out/gallery.html``: per scorer and system, the ``count`` prompts where the
    system and the reference differ most (by the prompt's mean score), each with both systems' first
    images (linked by relative path) and scores. Written through a temporary name."""
    import html

    out = Path(out)
    reference = comparison["reference"]
    first_image: dict[tuple[str, str], str] = {}
    for row in rows:
        first_image.setdefault((row["system"], row["prompt"]), row["path"])
    parts = [
        "<!doctype html><meta charset='utf-8'><title>img-guidance eval: where the systems differ</title>",
        "<style>body{font-family:sans-serif} td{vertical-align:top;padding:4px} img{width:192px;"
        "image-rendering:pixelated}</style>",
        f"<h1>Where each system differs most from {html.escape(reference)}</h1>",
    ]
    for name, systems in comparison["scorers"].items():
        per_prompt = _per_prompt(rows, name)
        for system in systems:
            mine, base = per_prompt.get(system, {}), per_prompt.get(reference, {})
            shared = sorted((p for p in base if p in mine), key=lambda p: -abs(mine[p] - base[p]))[:count]
            parts.append(
                f"<h2>{html.escape(name)}: {html.escape(system)} against {html.escape(reference)}</h2>"
            )
            parts.append("<table><tr><th>prompt</th><th>reference</th><th>system</th></tr>")
            for prompt in shared:
                cells = []
                for who, scores in ((reference, base), (system, mine)):
                    src = html.escape(os.path.relpath(first_image[(who, prompt)], out))
                    label = f"{html.escape(who)}: {scores[prompt]:.4g}"
                    cells.append(f"<td><img src='{src}' alt=''><br>{label}</td>")
                parts.append(f"<tr><td>{html.escape(prompt)}</td>{''.join(cells)}</tr>")
            parts.append("</table>")
    path = out / "gallery.html"
    tmp = out / ".gallery.html.tmp"
    try:
        tmp.write_text("\n".join(parts) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
