"""Scoring an ``img-guidance generate`` output folder of ShapesWorld prompts with the judge.

:func:`judge_output_folder` reads ``OUT/metadata.jsonl`` (one line per prompt, with its initial and
calibrated image files), judges both images against the prompt, and writes ``OUT/judge.json``:

- ``prompts``: per prompt (and seed) the verdict of the initial and of the calibrated image
  (correct True / False / null when the judge cannot decide, score, each check), and IMG's outcome
  (win / tie / loss of the calibrated image's score against the initial one's);
- ``initial`` and ``calibrated``: accuracy per category (GenEval's) with 95% Wilson intervals;
- ``img_vs_initial``: wins, ties and losses over the prompts.

Any prompt the grammar can say is accepted; a prompt it cannot say is an error that names it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from img_guidance.outputs import write_json_atomic
from img_guidance.shapes.judge import Report, Verdict, judge, outcome, win_tie_loss

JUDGE_FILE = "judge.json"


def verdict_dict(verdict: Verdict) -> dict[str, Any]:
    """A verdict as JSON-ready values, with its failure kinds
    (:func:`~img_guidance.shapes.judge.failure_kinds`)."""
    from img_guidance.shapes.judge import failure_kinds

    return {
        "correct": verdict.correct,
        "score": verdict.score,
        "failures": list(failure_kinds(verdict)),
        "checks": verdict.checks,
        "objects": [
            {"shape": o.shape, "colour": o.colour, "x": round(o.cx, 2), "y": round(o.cy, 2), "area": o.area}
            for o in verdict.objects
        ],
    }


def report_dict(report: Report) -> dict[str, Any]:
    """Per-category and overall accuracy with 95% intervals, and the mean over categories (GenEval's
    overall score), as JSON-ready values."""

    def stats(s) -> dict[str, Any]:
        low, high = s.interval
        return {
            "n": s.n,
            "correct": s.correct,
            "accuracy": s.accuracy,
            "ci95": [low, high],
            "undecidable": s.undecidable,
            "mean_score": s.mean_score,
        }

    return {
        "per_category": {name: stats(s) for name, s in report.per_category.items()},
        "overall": stats(report.overall),
        "category_mean": report.category_mean,
    }


def judge_output_folder(
    folder: str | os.PathLike, *, warn: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Judge every finished prompt of a ``generate`` output folder; writes and returns
    ``folder/judge.json`` (see the module docstring). One record per image name counts (where a
    prompt was redone, its last line); a metadata line cut short, or an image that does not decode,
    is reported through ``warn`` (by line number or file name) and skipped or judged undecidable."""
    from img_guidance.outputs import METADATA, check_writable, latest_records, read_records
    from img_guidance.shapes.grammar import parse

    warn = warn or (lambda line: None)
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"{folder} does not exist")
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder} is not a folder")
    metadata = folder / METADATA
    if not metadata.is_file():
        raise FileNotFoundError(
            f"{folder} has no {METADATA}: is it an `img-guidance generate` output folder?"
        )
    check_writable(folder)  # before any judging: judge.json goes there
    records, broken = read_records(metadata)
    for number in broken:
        warn(f"warning: {metadata}:{number} is cut short or not a record; skipped")
    records = latest_records(records)
    if not records:
        raise ValueError(f"{metadata} lists no finished prompt")
    initial, calibrated, prompts = [], [], []
    for record in records:
        prompt = record.get("prompt")
        try:
            spec = parse(prompt)
        except (ValueError, TypeError) as err:
            raise ValueError(
                f"{record.get('name')}: the prompt {prompt!r} is not one ShapesWorld can judge: {err}"
            ) from err
        files = record.get("files", {})
        missing = [key for key in ("initial", "calibrated") if key not in files]
        if missing:
            raise ValueError(f"{record.get('name')}: metadata lists no {' or '.join(missing)} image")
        before, after = (_judge_file(folder / files[key], spec, warn) for key in ("initial", "calibrated"))
        initial.append(before)
        calibrated.append(after)
        prompts.append(
            {
                "name": record.get("name"),
                "prompt": prompt,
                "seed": record.get("seed"),
                "category": before.category,
                "initial": verdict_dict(before),
                "calibrated": verdict_dict(after),
                "img": outcome(after, before),
            }
        )
    outcomes = win_tie_loss(calibrated, initial)
    result = {
        "folder": str(folder),
        "prompts": prompts,
        "initial": report_dict(Report(initial)),
        "calibrated": report_dict(Report(calibrated)),
        "img_vs_initial": {"wins": outcomes.wins, "ties": outcomes.ties, "losses": outcomes.losses},
    }
    write_json_atomic(folder / JUDGE_FILE, result)
    return result


def _judge_file(path: Path, spec, warn: Callable[[str], None]) -> Verdict:
    """The verdict of one image file; a file that is missing or does not decode is reported and
    judged as an unreadable image (every check undecidable)."""
    from PIL import Image, UnidentifiedImageError

    from img_guidance.shapes.judge import judge_objects

    try:
        with Image.open(path) as image:
            return judge(image.convert("RGB"), spec)
    except (OSError, UnidentifiedImageError, SyntaxError) as err:
        reason = "is missing" if isinstance(err, FileNotFoundError) else "does not decode"
        warn(f"warning: {path} {reason}; judged undecidable")
        return judge_objects(None, spec, image_size=32)
