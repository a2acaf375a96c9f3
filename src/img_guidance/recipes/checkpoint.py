"""What the two recipes share: the accelerator they run under (:func:`recipe_accelerator`) and their
checkpoints (writing, reading, discovery, pruning, resumption, RNG states).

A checkpoint is a folder ``ROOT/step_00001000`` that appears in one ``rename`` once everything in
it is written (it is built in ``ROOT/.tmp-step_00001000``), so a killed run leaves at worst a
hidden temporary folder, which discovery ignores. :func:`write_checkpoint` puts in it what every
recipe has (optimizer.pt, scheduler.pt, scaler.pt under fp16, rng/process_<i>.pt, and
trainer_state.json, written last); the recipe writes its model's files through a callback.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from img_guidance.recipes.config import ConfigError, TrainingDiverged, config_to_dict

STEP_PATTERN = re.compile(r"^step_(\d+)$")
TEMP_PREFIX = ".tmp-"
# written last: a folder is a complete checkpoint only with this file in it
STATE_FILE = "trainer_state.json"


def recipe_accelerator(mixed_precision: str, report_to: list[str], output: Path):
    """accelerate (TensorBoard always among its trackers, logging under ``output/logs``), and a
    console that prints on the main process only."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration
    from rich.console import Console

    accelerator = Accelerator(
        mixed_precision=mixed_precision,
        log_with=list(dict.fromkeys(["tensorboard", *report_to])),
        project_config=ProjectConfiguration(project_dir=str(output), logging_dir=str(output / "logs")),
    )
    console = Console(quiet=not accelerator.is_main_process, highlight=False, soft_wrap=True, markup=False)
    return accelerator, console


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


def resume_point(resume: str | bool | None, checkpoints: Path) -> Path | None:
    """The checkpoint to resume from (:func:`resolve_resume`); a fresh start over ``checkpoints``
    that already holds some is refused, so no run overwrites another."""
    path = resolve_resume(resume, checkpoints)
    if path is None and list_checkpoints(checkpoints):
        raise ConfigError(
            f"{checkpoints} already holds checkpoints: pass --resume to continue that run, "
            "or choose another output_dir"
        )
    return path


def changed_keys(saved: dict[str, Any], config: Any, free: set[str]) -> list[str]:
    """The config keys, outside ``free``, whose value differs from the checkpoint's ``saved`` config."""
    current = config_to_dict(config)
    return sorted(k for k, v in saved.items() if k not in free and current.get(k, v) != v)


def diverged(err: TrainingDiverged, root: str | os.PathLike) -> TrainingDiverged:
    """``err`` naming where the run can go on from: the last good checkpoint under ``root``."""
    last = latest_checkpoint(root)
    where = f"the last good checkpoint is {last}" if last else "no checkpoint was written"
    return TrainingDiverged(f"{err}; training stopped without saving this step; {where}")


def hparams(config: Any) -> dict[str, Any]:
    """A recipe config flattened to what TensorBoard's hparams accept (numbers, strings, bools;
    anything else as JSON)."""
    return {
        key: value if isinstance(value, (int, float, str, bool)) else json.dumps(value)
        for key, value in config_to_dict(config).items()
    }


# -- writing and reading -----------------------------------------------------------------------------


def write_checkpoint(
    accelerator,
    root: Path,
    step: int,
    *,
    state: dict[str, Any],
    keep: int,
    save_model: Callable[[Path], None],
    optimizer,
    scheduler,
    save_shard: Callable[[Path], None] | None = None,
) -> Path:
    """Write checkpoint ``step`` under ``root`` on every process, then (main process) rename it into
    place and keep the newest ``keep``. Nothing under a checkpoint name is ever partial.

    ``save_model(folder)`` writes the recipe's model files on the main process; ``save_shard(folder)``
    runs on every process first (DeepSpeed's sharded state). Then come the optimizer (``None``: it is
    in the shards), scheduler, grad scaler, every process's RNG state, and ``state`` as the trainer
    state, last."""
    tmp, final = temp_dir(root, step), Path(root) / checkpoint_name(step)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "rng").mkdir(parents=True)
    accelerator.wait_for_everyone()
    if save_shard is not None:
        save_shard(tmp)
    torch.save(rng_state(), tmp / "rng" / f"process_{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        save_model(tmp)
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        if accelerator.scaler is not None:
            torch.save(accelerator.scaler.state_dict(), tmp / "scaler.pt")
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")  # last: marks it complete
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        publish(tmp, final)
        prune_checkpoints(root, keep)
    accelerator.wait_for_everyone()
    return final


def read_checkpoint(
    path: Path, accelerator, *, load_model: Callable[[Path, dict[str, Any]], None], optimizer, scheduler
) -> dict[str, Any]:
    """Restore what :func:`write_checkpoint` wrote; returns the trainer state.

    ``load_model(path, state)`` runs first, so a checkpoint of another model fails before anything
    is restored; then the optimizer (``None``: restored with the model), scheduler, grad scaler and
    this process's RNG states."""
    state = json.loads((path / STATE_FILE).read_text())
    load_model(path, state)
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    if accelerator.scaler is not None and (path / "scaler.pt").is_file():
        accelerator.scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=True))
    rng_file = path / "rng" / f"process_{accelerator.process_index}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True))
    else:
        accelerator.print(f"warning: {rng_file} is missing (another process count?); RNG states not restored")
    return state


def write_folder(final: Path, write: Callable[[Path], None]) -> Path:
    """``write(folder)`` into a hidden sibling of ``final``, then move it into place in one rename."""
    staging = final.with_name(f"{TEMP_PREFIX}{final.name}")
    shutil.rmtree(staging, ignore_errors=True)
    write(staging)
    publish(staging, final)
    return final


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
