"""Checkpoint folders for the recipes: atomic publication, discovery, pruning, and RNG states.

A checkpoint is a folder ``ROOT/step_00001000`` that appears in one ``rename`` once everything in
it is written (it is built in ``ROOT/.tmp-step_00001000``), so a killed run leaves at worst a
hidden temporary folder, which discovery ignores. What goes inside is the recipe's business.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from img_guidance.recipes.config import ConfigError

STEP_PATTERN = re.compile(r"^step_(\d+)$")
TEMP_PREFIX = ".tmp-"
# written last: a folder is a complete checkpoint only with this file in it
STATE_FILE = "trainer_state.json"


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def temp_dir(root: str | os.PathLike, step: int) -> Path:
    return Path(root) / f"{TEMP_PREFIX}{checkpoint_name(step)}"


def list_checkpoints(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """The complete checkpoints under ``root`` as (step, folder), oldest first. Temporary folders
    and folders without the state file are not checkpoints."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = STEP_PATTERN.match(path.name)
        if match and path.is_dir() and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def remove_stale_temps(root: str | os.PathLike) -> list[Path]:
    """Delete temporary checkpoint folders a killed run left behind; returns what was removed."""
    root = Path(root)
    stale = [p for p in root.glob(f"{TEMP_PREFIX}*") if p.is_dir()] if root.is_dir() else []
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not every platform opens directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def publish(temp: Path, final: Path) -> None:
    """Move a fully written folder into place in one rename (replacing an older ``final``)."""
    _fsync_tree(temp)
    if final.exists():
        old = final.with_name(f"{TEMP_PREFIX}old-{final.name}")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        temp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        temp.rename(final)
    _fsync_dir(final.parent)


def prune_checkpoints(root: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints (``keep <= 0`` keeps all); returns the deleted."""
    if keep <= 0:
        return []
    doomed = [path for _, path in list_checkpoints(root)[:-keep]]
    for path in doomed:
        # hide it first, so a crash mid-delete never leaves a partial folder under a checkpoint name
        hidden = path.with_name(f"{TEMP_PREFIX}prune-{path.name}")
        path.rename(hidden)
        shutil.rmtree(hidden, ignore_errors=True)
    return doomed


def resolve_resume(resume: str | bool | None, checkpoints: Path) -> Path | None:
    """``True``/``"latest"``: the newest complete checkpoint; a path: that checkpoint."""
    if resume is None or resume is False:
        return None
    if resume is True or resume == "latest":
        path = latest_checkpoint(checkpoints)
        if path is None:
            raise ConfigError(f"--resume: no complete checkpoint in {checkpoints}")
        return path
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise ConfigError(f"--resume {path}: not a complete checkpoint (no {STATE_FILE})")
    return path


# -- random number generators ---------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """This process's python, numpy, torch and CUDA generator states, in a form that
    ``torch.load(..., weights_only=True)`` reads back (tensors, numbers, strings, tuples)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["bit_generator"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["pos"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
