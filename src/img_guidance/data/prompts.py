"""Prompt files for batch generation.

- ``.txt``: one prompt per line (blank lines are skipped);
- ``.jsonl``: one JSON object per line, ``{"prompt": str, "seed": int (optional), "category": str
  (optional: recorded with the prompt's images, and read by ``img-guidance eval``)}``;
- ``.json``: a list of strings, or a list of such objects.

A file is read and checked whole before any model is loaded, so a bad line never costs a model load.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PromptItem:
    prompt: str
    seed: int | None = None
    category: str | None = None


def _item(entry: object, where: str) -> PromptItem:
    category = None
    if isinstance(entry, str):
        prompt, seed = entry, None
    elif isinstance(entry, dict):
        unknown = set(entry) - {"prompt", "seed", "category"}
        if unknown:
            raise ValueError(
                f"{where}: unknown keys {sorted(unknown)} (expected 'prompt' and optional 'seed', 'category')"
            )
        prompt, seed, category = entry.get("prompt"), entry.get("seed"), entry.get("category")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise ValueError(f"{where}: seed must be an integer, got {seed!r}")
        if category is not None and (not isinstance(category, str) or not category.strip()):
            raise ValueError(f"{where}: category must be a non-empty string, got {category!r}")
    else:
        raise ValueError(f"{where}: expected a prompt string or an object, got {entry!r}")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{where}: prompt must be a non-empty string, got {prompt!r}")
    return PromptItem(prompt.strip(), seed, category.strip() if category else None)


def _check_uniform(entries: list[tuple[object, str]], path: Path) -> None:
    kinds = {type(e).__name__ for e, _ in entries if isinstance(e, str | dict)}
    if len(kinds) > 1:
        first_obj = next(w for e, w in entries if isinstance(e, dict))
        first_str = next(w for e, w in entries if isinstance(e, str))
        raise ValueError(
            f"{path} mixes plain strings ({first_str}) and objects ({first_obj}); use one form throughout"
        )


def read_prompts(path: str | Path) -> list[PromptItem]:
    """Read and validate a prompt file; errors name the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text (byte {err.start} cannot be decoded)") from None
    suffix = path.suffix.lower()
    if suffix == ".txt":
        items = [PromptItem(line.strip()) for line in text.splitlines() if line.strip()]
    elif suffix == ".jsonl":
        entries = []
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                entries.append((json.loads(line), f"{path}:{n}"))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n}: not valid JSON ({err.msg})") from err
        _check_uniform(entries, path)
        items = [_item(entry, where) for entry, where in entries]
    elif suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err.msg})") from err
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of prompts, got {type(data).__name__}")
        entries = [(entry, f"{path}[{i}]") for i, entry in enumerate(data)]
        _check_uniform(entries, path)
        items = [_item(entry, where) for entry, where in entries]
    else:
        raise ValueError(f"{path}: unsupported prompt file type {suffix!r} (use .txt, .jsonl or .json)")
    if not items:
        raise ValueError(f"{path} holds no prompts")
    return items
